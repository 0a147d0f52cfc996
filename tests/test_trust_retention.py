"""Retention and the lineage generation against foreign checkpoints in the same run dir.

T02: retention and ``prune`` count and delete only within one (compat, layout) group, and
``prune`` treats the other stores on its command line as mirrors, like the library.
T03: one planted manifest (any store) never blocks saving, and every number a writer can
produce round-trips through every reader.
"""

from __future__ import annotations

import json
import os
import shutil

from dist_guardian import Guardian, cli, stores
from helpers import committed, make_state, same, snapshot

RUN = "r"


def save_steps(root: str | list[str], steps, *, compat=None, hidden: int = 16, keep_last=None, seed: int = 0):
    """Real saves of ``steps`` by one Guardian; returns the snapshot of the state saved at each step."""
    state = make_state(seed=seed, hidden=hidden)
    g = Guardian(stores=root if isinstance(root, list) else [root], run=RUN, compat=compat, keep_last=keep_last)
    snaps = {}
    for s in steps:
        assert g.save(state, step=s).committed
        snaps[s] = snapshot(state)
    g.close()
    return snaps


def name(step: int) -> str:
    return stores.step_dir_name(step)


# ----------------------------------------------------------------------------- T02 retention groups


def test_T02_library_retention_never_counts_or_deletes_other_compat_or_layout(tmp_path):
    """Foreign compat (a) and layout (hidden 32) checkpoints newer than ours must not push ours out."""
    root = str(tmp_path / "ck")
    ours = {"model": "b"}
    save_steps(root, [100, 200], compat={"model": "a"})
    save_steps(root, [300, 400], compat=ours, hidden=32)
    save_steps(root, [150, 250], compat=ours, keep_last=2)
    left = set(committed(root, RUN))
    assert left == {name(s) for s in (100, 200, 300, 400, 150, 250)}, left
    snaps = save_steps(root, [260], compat=ours, keep_last=2, seed=1)
    left = set(committed(root, RUN))
    assert left == {name(s) for s in (100, 200, 300, 400, 250, 260)}, left  # only our own oldest (150) went
    state = make_state(seed=9)
    g = Guardian(stores=[root], run=RUN, compat=ours)
    r = g.resume(state)
    g.close()
    assert r.resumed and r.step == 260
    assert same(snapshot(state), snaps[260])


def test_T02_prune_never_deletes_the_newest_of_any_group_and_compat_restricts(tmp_path, capsys):
    root = str(tmp_path / "ck")
    save_steps(root, [100, 200, 300], compat={"model": "a"})
    save_steps(root, [150, 250], compat={"model": "b"})
    save_steps(root, [50, 120], compat={"model": "b"}, hidden=32)
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--compat", '{"model": "b"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: []}  # compat b: two in each layout, none to go
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--compat", '{"model": "a"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: [os.path.join(root, RUN, name(100))]}
    save_steps(root, [90], compat={"model": "b"}, hidden=32)
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: [os.path.join(root, RUN, name(50))]}
    assert set(committed(root, RUN)) == {name(s) for s in (200, 300, 150, 250, 90, 120)}


def test_T02_prune_keeps_a_local_step_that_no_mirror_holds(tmp_path, capsys):
    """``prune PRIMARY MIRROR``: the mirror rules of the library (F42), with the other stores as mirrors."""
    primary, mirror = str(tmp_path / "local"), str(tmp_path / "mirror")
    save_steps(primary, [100, 200, 300, 400, 500])
    for s in (200, 500):
        shutil.copytree(os.path.join(primary, RUN, name(s)), os.path.join(mirror, RUN, name(s)))
    assert cli.main(["prune", primary, mirror, "--run", RUN, "--keep-last", "2", "--json"]) == 0
    deleted = json.loads(capsys.readouterr().out)["deleted"]
    # 300 exists only here and the mirror (one newer: 500) would keep it; 200 is held; 100 the mirror would not keep.
    assert deleted == {primary: [os.path.join(primary, RUN, name(s)) for s in (200, 100)], mirror: []}
    assert set(committed(primary, RUN)) == {name(s) for s in (300, 400, 500)}
    assert set(committed(mirror, RUN)) == {name(s) for s in (200, 500)}

