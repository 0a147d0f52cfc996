"""F37: a checkpoint planted in the node-local root by another user is rejected before it is opened.

Inject (FAULTS.md, as root in CI): inside the private node-local store ``tmp://nl`` (0700, ours),
a committed-looking ``step-000000999999`` directory (a byte copy of B whose manifest says step
999999: it would verify as tier V and be loaded first) and a ``step_999999.pt`` whose pickle runs
``touch <marker>``, both ``chown``-ed to uid 65534 (nobody). Expect: both are tier R with
``insecure: ... owned by uid 65534``, decided from ``lstat`` alone (the files are never opened, so
never unpickled), a ``security_event`` is logged, **B is loaded**, the marker is absent and nothing
is lost. A second test runs two ranks as two "nodes": a foreign-owned copy in rank 1's own
node-local root, which rank 0 never lists, is refused by rank 1's availability check.

Without root, ``chown`` to another uid is impossible; the tests try it and skip with that reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import helpers
import pytest
import rank_fns as rf
import torch
from dg_harness import run_ranks
from helpers import assert_nothing_lost, committed, make_state, same, snapshot

from dist_guardian import Guardian, formats, manifest, stores, verify

RUN = "r"
NOBODY = 65534


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _chown_tree(path: str, uid: int) -> None:
    """chown -R, or skip the test (with the reason) when this process may not give files away."""
    try:
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, uid)
        os.lchown(path, uid, uid)
    except PermissionError as e:
        pytest.fail(f"F37 plants files owned by another uid: chown to {uid} failed ({e})")


NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="F37 plants files owned by another uid: needs root (CI runs as root)"
)


def _plant_copy(src_dir: str, dst_dir: str, step: int) -> None:
    shutil.copytree(src_dir, dst_dir)
    p = os.path.join(dst_dir, manifest.MANIFEST_NAME)
    with open(p, "rb") as f:
        doc = json.loads(f.read())
    doc["step"] = step
    os.unlink(p)
    with open(p, "wb") as f:
        f.write(json.dumps(doc).encode())


@NEEDS_ROOT
def test_F37_planted_checkpoint_by_another_user(tmp_path, node_local_root, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dist_guardian")
    root = str(tmp_path / "ck")
    state = make_state(seed=0)
    g = Guardian(stores=[root, "tmp://nl"], run=RUN)
    assert g.save(state, step=100).committed
    helpers.train(state, 1)
    assert g.save(state, step=200).committed
    snap_b = snapshot(state)
    assert g.close() == []
    before = committed(root, RUN)
    nl = os.path.join(str(node_local_root), "nl")
    assert set(committed(nl, RUN)) == {"step-000000000100", "step-000000000200"}

    planted_dir = os.path.join(nl, RUN, stores.step_dir_name(999999))
    _plant_copy(os.path.join(nl, RUN, stores.step_dir_name(200)), planted_dir, 999999)
    marker = tmp_path / "pwned"
    planted_pt = os.path.join(nl, RUN, "step_999999.pt")
    torch.save({"model": _Evil(f"touch {marker}")}, planted_pt)
    # Controls: the planted dir is a perfectly valid checkpoint (only its owner gives it away),
    # and the payload is live when unpickled unsafely.
    assert verify.verify_full(stores.resolve("tmp://nl"), f"{RUN}/{stores.step_dir_name(999999)}") == ("V", [])
    control = tmp_path / "control_marker"
    torch.save({"model": _Evil(f"touch {control}")}, str(tmp_path / "control.pt"))
    torch.load(str(tmp_path / "control.pt"), weights_only=False)
    assert control.exists()
    _chown_tree(planted_dir, NOBODY)
    os.lchown(planted_pt, NOBODY, NOBODY)
    assert os.lstat(planted_pt).st_uid == NOBODY != os.geteuid()

    touched: list[str] = []  # every path the package opens, sniffs or unpickles during the resume
    real_open, real_sniff, real_load = stores.open_regular, formats.sniff_torch_file, torch.load

    def spy_open(path, *a, **k):
        touched.append(os.path.abspath(path))
        return real_open(path, *a, **k)

    def spy_sniff(f, size, name, *a, **k):
        touched.append(str(name))
        return real_sniff(f, size, name, *a, **k)

    def spy_load(f, *a, **k):
        touched.append(f"torch.load:{f if isinstance(f, (str, os.PathLike)) else type(f).__name__}")
        return real_load(f, *a, **k)

    monkeypatch.setattr(stores, "open_regular", spy_open)
    monkeypatch.setattr(stores.local, "open_regular", spy_open)  # where the package's own reads look it up
    monkeypatch.setattr(formats, "sniff_torch_file", spy_sniff)
    monkeypatch.setattr(torch, "load", spy_load)

    fresh = make_state(seed=42)
    g = Guardian(stores=[root, "tmp://nl"], run=RUN)
    try:
        r = g.resume(fresh)
    finally:
        g.close()
    monkeypatch.undo()

    assert r.resumed and r.step == 200 and r.tier == "V" and r.path == helpers.step_dir(root, RUN, 200), r.to_json()
    assert same(snapshot(fresh), snap_b)
    rj = dict(r.rejected)
    for p in (planted_dir, planted_pt):
        assert rj.get(p, "").startswith("insecure: "), (p, rj)
        assert f"owned by uid {NOBODY}" in rj[p]
    assert not marker.exists()
    leaked = [t for t in touched if "999999" in t]
    assert not leaked, f"planted files were opened: {leaked}"
    assert not any(t.startswith("torch.load") for t in touched)  # nothing was unpickled at all
    sec = [m.getMessage() for m in caplog.records if m.getMessage().startswith("security_event:")]
    assert any(planted_dir in m and f"uid {NOBODY}" in m for m in sec), sec
    assert any(planted_pt in m and f"uid {NOBODY}" in m for m in sec), sec
    assert_nothing_lost(before, committed(root, RUN))
    assert os.path.isdir(planted_dir) and os.path.exists(planted_pt)  # rejected, never deleted


@NEEDS_ROOT
def test_F37_foreign_owned_copy_in_another_nodes_root_is_unavailable(tmp_path):
    """Two "nodes": C (step 300) sits in each rank's own node-local root; rank 0's copy is ours, rank 1's
    is owned by uid 65534. Rank 0 plans from its own root only, so rank 1's availability check must
    refuse its copy (insecure, never opened); the vote drops C and every rank loads B."""
    ck = str(tmp_path / "ck")
    roots = [tmp_path / "nodeA", tmp_path / "nodeB"]
    for r_ in roots:
        r_.mkdir(mode=0o700)
    env = {i: {stores.NODE_LOCAL_ENV: str(roots[i])} for i in range(2)}
    out = run_ranks(rf.save_steps, 2, timeout=90, env=env, stores=[ck], run=RUN, steps=[100, 200])
    assert out.ok(), out.errors
    b_dir = helpers.step_dir(ck, RUN, 200)
    for r_ in roots:
        os.makedirs(os.path.join(str(r_), "nl", RUN), mode=0o700)
        os.chmod(os.path.join(str(r_), "nl"), 0o700)
        _plant_copy(b_dir, os.path.join(str(r_), "nl", RUN, stores.step_dir_name(300)), 300)
    _chown_tree(os.path.join(str(roots[1]), "nl", RUN, stores.step_dir_name(300)), NOBODY)
    before = committed(ck, RUN)
    back = run_ranks(rf.resume_state, 2, timeout=90, env=env, stores=[ck, "tmp://nl"], run=RUN)
    assert back.ok(), back.errors
    for r in range(2):
        got = back.results[r]
        assert got["step"] == 200 and got["path"] == b_dir, got["record"]
        rec = json.loads(got["record"])
        unavailable = [a for a in rec["attempts"] if a["outcome"] == "unavailable"]
        assert [a["step"] for a in unavailable] == [300], rec["attempts"]
        assert [x["rank"] for x in unavailable[0]["reasons"]] == [1]
        assert "insecure: " in unavailable[0]["reasons"][0]["reason"]
        assert f"owned by uid {NOBODY}" in unavailable[0]["reasons"][0]["reason"]
    assert_nothing_lost(before, committed(ck, RUN))
