"""FSDP2 state saved natively and resumed: same world size, bit-identical continuation (real gloo ranks)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sharded_rank_fns as srf
from dg_harness import run_ranks

pytestmark = pytest.mark.timeout(120)


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _manifest(root: str, run: str, step: int) -> dict:
    with open(os.path.join(root, run, f"step-{step:012d}", "manifest.json")) as f:
        return json.load(f)


def _cli_shows_the_sharded_layout(root: str, capsys) -> None:
    from dist_guardian import cli

    capsys.readouterr()
    assert cli.main(["ls", root, "--run", "r"]) == 0
    assert cli.main(["plan", root, "--run", "r"]) == 0
    out = capsys.readouterr().out
    assert out.count("ws=2 shards=2") == 2, out
    step = os.path.join(root, "r", "step-000000000002")
    assert cli.main(["verify", step]) == 0
    out = capsys.readouterr().out
    assert "every checksum matches" in out and "written by 2 ranks; sharded:" in out and "over 2 shard files" in out
    assert cli.main(["verify", step, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 2 and doc["chunks"] >= doc["sharded_tensors"] > 0
    shard = os.path.join(step, "shards-00001-of-00002.dgt")
    with open(shard, "r+b") as f:  # one flipped byte in a chunk: verify says suspect
        f.seek(os.path.getsize(shard) - 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    assert cli.main(["verify", step]) == 4
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) - 3)
        f.write(b)


def test_fsdp2_save_resume_same_world_bit_identical(tmp_path, capsys):
    root = str(tmp_path / "ck")
    saved = run_ranks(srf.save_run, 2, timeout=90, root=root, run="r", saves=[2], total=5)
    assert saved.ok(), saved.errors
    assert saved.results[0]["committed"] == [True]
    mf = _manifest(root, "r", 2)
    assert mf["world_size"] == 2 and "model/0.weight" in mf["sharded"]
    assert sorted(f for f in mf["files"] if f.startswith("shards-")) == [
        "shards-00000-of-00002.dgt",
        "shards-00001-of-00002.dgt",
    ]
    _cli_shows_the_sharded_layout(root, capsys)
    out = run_ranks(srf.resume_run, 2, timeout=90, root=root, run="r", total=5, forbid_unpickle=True)
    assert out.ok(), out.errors
    for r in range(2):
        got = out.results[r]
        assert got["resumed"] and got["step"] == 2
        assert got["unpickled"] == []  # get/set_state_dict act on live objects: no checkpoint byte is unpickled
        _equal(got["loaded"], saved.results[r]["at"][2])  # model and AdamW step/exp_avg/exp_avg_sq
        _equal(got["final"], saved.results[r]["final"])  # the continuation, bit for bit
        assert got["data"] == {"position": 3 + 100 * r}
        assert got["next_rand"] == saved.results[r]["next_rand"]
        assert not any("world_size_changed" in w for w in got["warnings"])


def test_fsdp2_async_save_is_a_snapshot_and_resumes_bit_identical(tmp_path):
    """``blocking=False``: training goes on while the shards are written; the checkpoint holds the saved step."""
    root = str(tmp_path / "ck")
    saved = run_ranks(srf.save_run, 2, timeout=90, root=root, run="r", saves=[1, 3], total=6, blocking=False)
    assert saved.ok(), saved.errors
    assert saved.results[0]["committed"] == [True, True]
    out = run_ranks(srf.resume_run, 2, timeout=90, root=root, run="r", total=6)
    assert out.ok(), out.errors
    for r in range(2):
        got = out.results[r]
        assert got["step"] == 3
        _equal(got["loaded"], saved.results[r]["at"][3])
        _equal(got["final"], saved.results[r]["final"])


def test_fsdp2_retention_keeps_the_newest_sharded_checkpoints(tmp_path):
    root = str(tmp_path / "ck")
    saved = run_ranks(srf.save_run, 2, timeout=90, root=root, run="r", saves=[0, 1, 2, 3], total=4, keep_last=2)
    assert saved.ok(), saved.errors
    assert saved.results[0]["committed"] == [True] * 4
    assert sorted(d for d in os.listdir(os.path.join(root, "r")) if d.startswith("step-")) == [
        "step-000000000002",
        "step-000000000003",
    ]
    out = run_ranks(srf.resume_run, 2, timeout=90, root=root, run="r")
    assert out.ok(), out.errors
    assert [out.results[r]["step"] for r in range(2)] == [3, 3]
    _equal(out.results[1]["loaded"], saved.results[1]["at"][3])
