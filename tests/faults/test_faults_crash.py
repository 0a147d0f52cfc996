"""F10: kill -9 during a local save, at every crash point, then resume.

A small script runs under ``sys.executable`` (the venv's python) as a real subprocess. It
imports torch once and, for each crash point, forks a child that saves C = step 300 with
``DIST_GUARDIAN_FAULT="<point>:0:kill"``: the child SIGKILLs itself at that point of the
real save path. (One torch import for the six points keeps this fast; each killed process
is still a separate process killed by a real SIGKILL.) The test then resumes: the
committed set is exactly {A, B} before the rename and {A, B, C} after it, never a
committed C that fails verification, and A and B are intact. The S3 crash points of F10
and the random-time kills belong to test_faults_s3*.py / test_faults_distributed*.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import helpers
import pytest
import repo_paths
from helpers import assert_nothing_lost, committed, make_state, same, snapshot

from dist_guardian import Guardian, formats, manifest, stores, verify

RUN = "r"
POINTS = [
    "before_data_write",
    "mid_data_write",
    "after_data_fsync",
    "before_manifest",
    "after_manifest_before_rename",
    "after_rename_before_dirsync",
]
COMMITTED_AFTER = {"after_rename_before_dirsync"}

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch  # noqa: F401  (imported once, before the forks)
import helpers
from dist_guardian import Guardian

helpers.make_state(seed=0)  # torch's lazy imports (optimizers, schedulers) once, before the forks
out = {}
for point, root in json.loads(sys.argv[2]):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ["DIST_GUARDIAN_FAULT"] = point + ":0:kill"
            state = helpers.make_state(seed=3)
            res = Guardian(stores=[root], run="r").save(state, step=300)
            code = 10 if res.committed else 11  # the fault did not fire
        except BaseException:
            code = 12
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out[point] = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Six stores holding A and B; a child process killed at one save point in each."""
    base = tmp_path_factory.mktemp("f10")
    roots, before, snaps = {}, {}, {}
    for p in POINTS:
        root = str(base / p)
        snap_b = helpers.save_a_b([root], RUN).snap_b
        roots[p], before[p], snaps[p] = root, committed(root, RUN), snap_b
        assert set(before[p]) == {"step-000000000100", "step-000000000200"}
    nl = base / "node_local"
    nl.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "DIST_GUARDIAN_FAULT"}
    env[stores.NODE_LOCAL_ENV] = str(nl)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, repo_paths.SUPPORT_DIR, json.dumps([[p, roots[p]] for p in POINTS])],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    c_state = make_state(seed=3)  # what the children saved (deterministic)
    return {"roots": roots, "before": before, "snap_b": snaps, "status": status, "snap_c": snapshot(c_state)}


def _staging(root: str) -> list[str]:
    base = os.path.join(root, RUN)
    return sorted(os.path.join(base, n) for n in os.listdir(base) if stores.STAGING_RE.match(n))


@pytest.mark.parametrize("point", POINTS)
def test_F10_kill9_during_local_save(crashed, point):
    root = crashed["roots"][point]
    assert crashed["status"][point] == {"signal": signal.SIGKILL, "exit": None}, "the save was not killed at its point"
    after = committed(root, RUN)
    assert_nothing_lost(crashed["before"][point], after)
    c_committed = point in COMMITTED_AFTER
    want = {"step-000000000100", "step-000000000200"} | ({"step-000000000300"} if c_committed else set())
    assert set(after) == want
    store = stores.resolve(root)
    for step in sorted(int(n[5:]) for n in after):
        assert verify.verify_full(store, f"{RUN}/{stores.step_dir_name(step)}") == ("V", []), step

    # What the killed save left behind, exactly where the point says it died.
    staging = _staging(root)
    if c_committed:
        assert staging == []
    else:
        assert len(staging) == 1
        left = sorted(os.listdir(staging[0]))
        repl = os.path.join(staging[0], "replicated.dgt")
        expect = {
            "before_data_write": [],
            "mid_data_write": ["replicated.dgt"],
            "after_data_fsync": ["replicated.dgt"],
            "before_manifest": ["rank-00000-of-00001.dgt", "replicated.dgt"],
            "after_manifest_before_rename": ["manifest.json", "rank-00000-of-00001.dgt", "replicated.dgt"],
        }[point]
        assert left == expect
        if point == "mid_data_write":  # a partial file: its header promises more than it holds
            with open(repl, "rb") as f, pytest.raises(formats.CheckpointFormatError):
                formats.parse_header(f, os.path.getsize(repl), name="replicated.dgt")
        if point == "after_data_fsync":
            with open(repl, "rb") as f:
                formats.parse_header(f, os.path.getsize(repl), name="replicated.dgt")

    # Resume: never the staging dir; C only once it was renamed into place.
    g = Guardian(stores=[root], run=RUN)
    state = make_state(seed=42)
    r = g.resume(state)
    g.close()
    assert r.resumed and r.tier == "V"
    assert all(".staging-" not in a.path for a in r.attempts)
    if c_committed:
        assert r.step == 300 and same(snapshot(state), crashed["snap_c"])
    else:
        assert r.step == 200 and same(snapshot(state), crashed["snap_b"][point])
        assert r.rejected == ()  # the leftover is not even a sighting
    assert_nothing_lost(crashed["before"][point], committed(root, RUN))


@pytest.mark.parametrize("point", POINTS[:-1])
def test_F10_save_after_crash_commits_cleanly(crashed, point):
    """The next save of step 300 after the crash commits normally; the leftover staging blocks nothing."""
    root = crashed["roots"][point]
    state = make_state(seed=5)
    g = Guardian(stores=[root], run=RUN)
    res = g.save(state, step=300)
    g.close()
    assert res.committed and res.path == helpers.step_dir(root, RUN, 300)
    assert verify.verify_full(stores.resolve(root), f"{RUN}/step-000000000300") == ("V", [])
    assert_nothing_lost(crashed["before"][point], committed(root, RUN))
    assert manifest.MANIFEST_NAME in os.listdir(res.path)
