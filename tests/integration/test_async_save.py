"""Async save: training waits only for a copy into reusable buffers; the checkpoint holds the values at save()."""

from __future__ import annotations

from concurrent.futures import Future

import helpers
import torch
from dg_harness import run_ranks

from dist_guardian import Guardian


def test_async_save_snapshots_at_call_time_and_commits_in_background(tmp_path):
    state = helpers.make_state(seed=2)
    g = Guardian(stores=[str(tmp_path / "ck")], run="r")
    want = helpers.snapshot(state)
    fut = g.save(state, step=10, blocking=False)
    assert isinstance(fut, Future)
    with torch.no_grad():  # training goes on and changes everything right away
        for p in state["model"].parameters():
            p.add_(1.0)
    state["trainer"]["epoch"] = 99
    res = fut.result(timeout=60)
    assert res.committed and res.step == 10
    g.close()
    fresh = helpers.make_state(seed=7)
    r = Guardian(stores=[str(tmp_path / "ck")], run="r").resume(fresh)
    assert r.step == 10 and helpers.same(helpers.snapshot(fresh), want)


def test_async_buffers_are_reused_and_saves_serialise(tmp_path):
    state = helpers.make_state(seed=2)
    g = Guardian(stores=[str(tmp_path / "ck")], run="r", keep_last=2)
    f1 = g.save(state, step=1, blocking=False)
    bufs = dict(g._saver.buffers._bufs)
    helpers.train(state, 1)
    f2 = g.save(state, step=2, blocking=False)  # waits for f1 first: one background save at a time
    assert f1.done() and f1.result().committed
    assert all(g._saver.buffers._bufs[k] is v for k, v in bufs.items())  # same memory, no reallocation
    assert g.wait().committed and f2.done()
    g.close()
    assert sorted(helpers.committed(str(tmp_path / "ck"), "r")) == ["step-000000000001", "step-000000000002"]


def async_two_ranks(rank: int, world: int, *, root: str) -> dict:
    state = helpers.make_state(seed=4)
    data = torch.Generator().manual_seed(4)
    g = Guardian(stores=[root], run="r", timeout=20)
    futs = []
    for s in (5, 6, 7):
        helpers.train(state, 1, data)
        futs.append(g.save(state, step=s, blocking=False))
    g.close()
    return {
        "committed": [f.result().committed for f in futs],
        "weights": {k: float(v.double().sum()) for k, v in state["model"].state_dict().items()},
    }


def test_async_save_on_two_ranks(tmp_path):
    root = str(tmp_path / "ck")
    out = run_ranks(async_two_ranks, 2, root=root)
    assert out.ok(), out.errors
    assert out.results[0]["committed"] == [True, True, True] == out.results[1]["committed"]
    fresh = helpers.make_state(seed=8)
    r = Guardian(stores=[root], run="r").resume(fresh)
    assert r.step == 7
    assert {k: float(v.double().sum()) for k, v in fresh["model"].state_dict().items()} == out.results[0]["weights"]
