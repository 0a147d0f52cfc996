"""Trust round two, the argument and snapshot findings (T06, T07, T09): a save is a snapshot, a typo is a
ConfigError before any collective, and what save accepts resume accepts."""

from __future__ import annotations

import numpy as np
import torch

import helpers
from dist_guardian import Guardian


def test_T06_async_save_snapshots_numpy_arrays_nested_lists_and_metrics(tmp_path, monkeypatch):
    """Every mutable leaf is copied before ``save(blocking=False)`` returns, not only tensors."""
    monkeypatch.setenv("DIST_GUARDIAN_FAULT", "before_data_write:*:sleep-0.5")  # the writer starts late
    state = helpers.make_state(seed=3)
    arr = np.arange(6, dtype=np.float64)
    state["data"] = {"order": arr, "history": [[1, 2], [3]], "nested": {"seen": [0]}}
    metrics = {"losses": [0.5, 0.25]}
    g = Guardian(stores=[str(tmp_path / "ck")], run="r")
    fut = g.save(state, step=5, metrics=metrics, blocking=False)
    arr[:] = -1.0  # training goes on and changes everything in place, right away
    state["data"]["history"][0].append(99)
    state["data"]["nested"]["seen"][0] = 7
    metrics["losses"].append(9.0)
    res = fut.result(timeout=60)
    assert res.committed
    g.close()
    fresh = helpers.make_state(seed=9)
    fresh["data"] = {"order": np.zeros(6), "history": [], "nested": {"seen": [5]}}
    r = Guardian(stores=[str(tmp_path / "ck")], run="r").resume(fresh)
    assert r.step == 5
    got = fresh["data"]
    assert torch.equal(torch.as_tensor(got["order"]), torch.arange(6, dtype=torch.float64))
    assert got["history"] == [[1, 2], [3]] and got["nested"] == {"seen": [0]}
    from dist_guardian import manifest

    mf_path = next((tmp_path / "ck" / "r").glob("step-*")) / manifest.MANIFEST_NAME
    assert manifest.parse(mf_path.read_bytes()).metrics == {"losses": [0.5, 0.25]}
