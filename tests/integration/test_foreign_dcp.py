"""Foreign PyTorch DCP directories are candidates too, loaded through torch.distributed.checkpoint in the same loop."""

from __future__ import annotations

import os

import helpers
from dg_harness import run_ranks

from dist_guardian import Guardian


def _dcp_save(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state["model"].state_dict(), "trainer": dict(state["trainer"])}, checkpoint_id=path)


def test_dcp_directory_loads_as_legacy_and_newer_native_wins(tmp_path):
    root = tmp_path / "ck"
    state = helpers.make_state(seed=3)
    _dcp_save(state, str(root / "r" / "dcp-step-300"))
    want = helpers.model_tensors(state)
    fresh = helpers.make_state(seed=9)
    r = Guardian(stores=[str(root)], run="r").resume({"model": fresh["model"], "trainer": fresh["trainer"]})
    assert r.resumed and r.step == 300 and r.tier == "L"
    assert any(w.startswith("legacy_unverified_loaded") for w in r.warnings)
    assert helpers.same(helpers.model_tensors(fresh), want)
    assert fresh["trainer"] == state["trainer"]
    # A newer native checkpoint is preferred; an older DCP dir never shadows it.
    g = Guardian(stores=[str(root)], run="r")
    g.save({"model": fresh["model"], "trainer": fresh["trainer"]}, step=400)
    g.close()
    r2 = Guardian(stores=[str(root)], run="r").resume({"model": helpers.make_state(1)["model"], "trainer": {}})
    assert r2.step == 400 and r2.tier == "V"


def test_damaged_dcp_directory_falls_back(tmp_path):
    root = tmp_path / "ck"
    state = helpers.make_state(seed=3)
    g = Guardian(stores=[str(root)], run="r")
    g.save({"model": state["model"], "trainer": state["trainer"]}, step=100)
    g.close()
    d = root / "r" / "dcp-step-300"
    _dcp_save(helpers.make_state(seed=4), str(d))
    data = [f for f in os.listdir(d) if f.endswith(".distcp")]
    os.truncate(d / data[0], 10)  # DCP's own reader fails on it (CheckpointException: a BaseException)
    fresh = helpers.make_state(seed=9)
    r = Guardian(stores=[str(root)], run="r").resume({"model": fresh["model"], "trainer": fresh["trainer"]})
    assert r.resumed and r.step == 100, r.to_json()
    failed = [a for a in r.attempts if a.step == 300]
    assert failed and failed[0].outcome in ("failed", "unavailable")


def dcp_two_ranks(rank: int, world: int, *, root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    state = helpers.make_state(seed=5)
    dcp.save(
        {"model": state["model"].state_dict(), "trainer": dict(state["trainer"])},
        checkpoint_id=os.path.join(root, "r", "dcp-step-700"),
    )
    fresh = helpers.make_state(seed=11)
    r = Guardian(stores=[root], run="r", timeout=20).resume({"model": fresh["model"], "trainer": fresh["trainer"]})
    return {
        "step": r.step,
        "tier": r.tier,
        "weights": {k: float(v.double().sum()) for k, v in fresh["model"].state_dict().items()},
        "want": {k: float(v.double().sum()) for k, v in state["model"].state_dict().items()},
    }


def test_dcp_directory_loads_on_two_ranks_in_lockstep(tmp_path):
    out = run_ranks(dcp_two_ranks, 2, root=str(tmp_path / "ck"))
    assert out.ok(), out.errors
    for r in range(2):
        assert out.results[r]["step"] == 700 and out.results[r]["tier"] == "L"
        assert out.results[r]["weights"] == out.results[r]["want"]
