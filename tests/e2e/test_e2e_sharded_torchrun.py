"""End to end with the real launcher and FSDP2: an FSDP2 run killed and restarted by torchrun ends bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import repo_paths

ROOT = repo_paths.REPO_ROOT
TRAIN = os.path.join(ROOT, "launch", "train.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def torchrun(tmp: str, name: str, args: list[str], *, max_restarts: int = 0) -> tuple[int, dict | None, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONUNBUFFERED="1")
    out = os.path.join(tmp, f"{name}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        TRAIN,
        "--fsdp",
        "--stores",
        os.path.join(tmp, name, "ckpt"),
        "--run-name",
        "fsdp",
        *args,
        "--out",
        out,
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    summary = json.load(open(out)) if os.path.exists(out) else None
    return p.returncode, summary, p.stdout + p.stderr


def test_fsdp2_killed_rank_restarted_by_torchrun_ends_bit_identical(tmp_path):
    tmp = str(tmp_path)
    rc, clean, log = torchrun(tmp, "clean", ["--steps", "20", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    rc, crash, log = torchrun(
        tmp, "crash", ["--steps", "20", "--save-every", "10", "--fail-at-step", "15"], max_restarts=1
    )
    assert rc == 0, log[-3000:]
    assert "simulated crash at step 15" in log and crash["restart_count"] == 1
    assert crash["resume"]["resumed"] and crash["resume"]["step"] == 10
    with open(os.path.join(tmp, "crash", "ckpt", "fsdp", "step-000000000010", "manifest.json")) as f:
        mf = json.load(f)
    assert mf["world_size"] == 2 and mf["sharded"]
    assert crash["weights"] == clean["weights"], "final weights differ from the uninterrupted FSDP2 run"
