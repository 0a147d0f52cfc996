"""End to end with the real launcher: torchrun subprocesses, gloo on CPU, the example trainer.

Each torchrun call costs ~7-15 s on this machine (agent + worker start-up), so the runs are
shared through module-scoped fixtures where several tests look at the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import repo_paths

ROOT = repo_paths.REPO_ROOT
TRAIN = os.path.join(ROOT, "launch", "train.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def node_root(tmp):
    """The node-local root (what tmp:// resolves to) of this module's runs: explicit, never the machine's default."""
    root = os.path.join(tmp, "node")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def torchrun(tmp, name, args, *, nproc=2, max_restarts=0, env=None, timeout=240):
    e = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        PYTHONUNBUFFERED="1",
        DIST_GUARDIAN_NODE_LOCAL_ROOT=node_root(tmp),
    )
    e.update(env or {})
    out = os.path.join(tmp, f"{name}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        TRAIN,
        *args,
        "--out",
        out,
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)
    log = p.stdout + p.stderr
    with open(os.path.join(tmp, f"{name}.log"), "w") as f:
        f.write(log)
    summary = json.load(open(out)) if os.path.exists(out) else None
    return p.returncode, summary, log


def stores(tmp, tag):
    return [
        "--stores",
        os.path.join(tmp, tag, "ckpt"),
        f"tmp://{tag}",
        "file://" + os.path.join(tmp, tag, "remote"),
        "--run-name",
        "e2e",
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def uninterrupted(work):
    rc, summary, log = torchrun(work, "clean", [*stores(work, "clean"), "--steps", "40", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    assert not summary["resume"]["resumed"] and summary["final_step"] == 40
    return summary


def test_killed_rank_restarted_by_torchrun_ends_bit_identical(work, uninterrupted):
    """Rank 1 dies at step 25 (os._exit); torchrun --max-restarts=1 restarts; the job resumes from step 20."""
    rc, summary, log = torchrun(
        work,
        "crash",
        [*stores(work, "crash"), "--steps", "40", "--save-every", "10", "--fail-at-step", "25"],
        max_restarts=1,
    )
    assert rc == 0, log[-3000:]
    assert "simulated crash at step 25" in log
    assert summary["restart_count"] == 1
    assert summary["resume"]["resumed"] and summary["resume"]["step"] == 20
    assert summary["weights"] == uninterrupted["weights"], "final weights differ from the uninterrupted run"


def test_fallback_past_corrupt_newest_is_bit_identical(work, uninterrupted):
    """Train to 30; damage step 30 everywhere beyond the sanity gate; resume falls back to 20, trains to 40."""
    import corruption

    rc, _, log = torchrun(work, "fb1", [*stores(work, "fb"), "--steps", "30", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    copies = [
        os.path.join(work, "fb", "ckpt", "e2e"),
        os.path.join(node_root(work), "fb", "e2e"),
        os.path.join(work, "fb", "remote", "e2e"),
    ]
    for base in copies:
        corruption.flip_bit_in_tensor(os.path.join(base, "step-000000000030", "replicated.dgt"), bit=6, byte_in_elem=3)
    rc, summary, log = torchrun(work, "fb2", [*stores(work, "fb"), "--steps", "40", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    rec = summary["resume"]
    assert rec["resumed"] and rec["step"] == 20, rec
    failed = [a for a in rec["attempts"] if a["step"] == 30]
    assert len(failed) == 3 and all(a["outcome"] == "failed" for a in failed)
    assert all("sanity_gate_failed" in r["reason"] for a in failed for r in a["reasons"])
    assert summary["weights"] == uninterrupted["weights"]
    for base in copies:  # the damaged checkpoint is kept (quarantine), never deleted
        assert os.path.isdir(os.path.join(base, "step-000000000030"))


@pytest.mark.parametrize("action", ["exit", "hang"])
def test_F23_F24_crash_loop_across_restarts_demotes_the_candidate(work, action):
    """A candidate that kills (F24) or hangs (F23) rank 1 during load is tried at most twice, then demoted."""
    tag = f"loop-{action}"
    rc, _, log = torchrun(work, f"{tag}-1", [*stores(work, tag), "--steps", "20", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    env = {"DIST_GUARDIAN_FAULT": f"during_load@20:1:{action}"}
    args = [*stores(work, tag), "--steps", "30", "--save-every", "10", "--timeout", "6"]
    rc, summary, log = torchrun(work, f"{tag}-2", args, max_restarts=3, env=env)
    assert rc == 0, log[-4000:]
    rec = summary["resume"]
    assert rec["resumed"] and rec["step"] == 10, rec
    assert summary["restart_count"] == 2, "two incarnations died on step 20, the third demoted it"
    loaded = [a for a in rec["attempts"] if a["outcome"] == "loaded"]
    assert loaded and loaded[0]["step"] == 10
    journal_dir = os.path.join(work, tag, "ckpt", "e2e", ".journal")
    entries = [json.load(open(os.path.join(journal_dir, n))) for n in os.listdir(journal_dir) if n.endswith(".json")]
    s20 = [e for e in entries if e["step"] == 20 and e["path"].startswith(os.path.join(work, tag, "ckpt"))]
    assert s20 and s20[0]["started"] - s20[0]["finished"] == 2


def test_F28_oom_killed_rank_across_restarts(work):
    """F28 with the launcher: the load of the newest checkpoint is killed (SIGKILL, as the OOM killer does) twice."""
    tag = "oom"
    rc, _, log = torchrun(work, f"{tag}-1", [*stores(work, tag), "--steps", "20", "--save-every", "10"])
    assert rc == 0, log[-3000:]
    env = {"DIST_GUARDIAN_FAULT": "during_load@20:0:kill"}
    rc, summary, log = torchrun(
        work,
        f"{tag}-2",
        [*stores(work, tag), "--steps", "30", "--save-every", "10", "--timeout", "6"],
        max_restarts=3,
        env=env,
    )
    assert rc == 0, log[-4000:]
    assert summary["resume"]["step"] == 10 and summary["restart_count"] == 2


def test_two_nodes_one_machine_availability_vote(work):
    """Two torchrun agents (c10d rendezvous on 127.0.0.1), each with its own node-local root.

    Step 30 exists only in node 0's node-local store; ranks on node 1 cannot reach it, so the
    availability vote drops it before any data is read and the shared step 20 loads.
    """
    out = os.path.join(work, "nodes")
    script = os.path.join(ROOT, "launch", "two_nodes_one_machine.sh")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    common = [
        "--stores",
        os.path.join(out, "shared"),
        "tmp://nodes",
        "--run-name",
        "nodes",
        "--save-every",
        "10",
        "--quiet",
    ]
    p = subprocess.run(
        [script, out, "--", *common, "--steps", "30", "--out", os.path.join(out, "a.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    logs = "".join(open(os.path.join(out, f"node{n}.log")).read() for n in (0, 1))
    assert p.returncode == 0, logs[-3000:]
    # Who hosted rank 0 (and so mirrored into its node-local store)?
    rank0_node = 0 if "[train] incarnation" in open(os.path.join(out, "node0.log")).read() else 1
    node_dir = os.path.join(out, f"node{rank0_node}", "nodes", "nodes")
    assert os.path.isdir(os.path.join(node_dir, "step-000000000030"))
    shutil.rmtree(os.path.join(out, "shared", "nodes", "step-000000000030"))  # now only in that node's tmp://
    p = subprocess.run(
        [script, out, "--", *common, "--steps", "40", "--out", os.path.join(out, "b.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    logs = "".join(open(os.path.join(out, f"node{n}.log")).read() for n in (0, 1))
    assert p.returncode == 0, logs[-3000:]
    rec = json.load(open(os.path.join(out, "b.json")))["resume"]
    assert rec["step"] == 20 and rec["resumed"], rec
    b_rank0_node = 0 if "[train] incarnation" in open(os.path.join(out, "node0.log")).read() else 1
    if b_rank0_node == rank0_node:  # rank 0 saw step 30: the vote must have dropped it
        unav = [a for a in rec["attempts"] if a["outcome"] == "unavailable"]
        assert unav and unav[0]["step"] == 30 and [r["rank"] for r in unav[0]["reasons"]] == [1]


def test_make_demo_story(tmp_path):
    """The `make demo` script itself: its summary says what was found, what failed and why, what loaded."""
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "demo.py"), "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "rank 1 crashed at step 25; torchrun restarted the job, which resumed from step 20" in out
    assert out.count("FAILED step 40") == 2 and "sanity_gate_failed" in out and "checksum_mismatch" in out
    assert "LOADED step 40 from file://" in out
    assert "steps lost beyond the last checkpoint: 0" in out
