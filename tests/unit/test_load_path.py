"""The load path's seams: one dispatch plus acceptance, reasons that carry their transient flag,
no I/O in PlanCursor()."""

from __future__ import annotations

import helpers
import pytest
import torch

from dist_guardian import Guardian, discovery, journal, loading, planning, staging, stores, verify
from dist_guardian.errors import CheckpointFormatError, Reason
from dist_guardian.policy import reason_from_wire, reason_to_wire

RUN = "r"


def _saved(tmp_path, state):
    root = str(tmp_path / "ck")
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=7).committed
    g.close()
    store = stores.resolve(root, 0)
    (c,) = verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
    return store, c


def test_load_and_check_is_dispatch_then_accept(tmp_path):
    state = helpers.make_state(seed=3)
    store, c = _saved(tmp_path, state)
    fresh = helpers.make_state(seed=4)
    loaded = loading.load_and_check(c, store, fresh, loading.LoadOptions(required=("model",)))
    assert loaded.suspect == () and not loaded.last_resort
    assert isinstance(loaded.staged, staging.Staged) and loaded.staged.step == 7
    staging.apply(loaded.staged, fresh)
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(state))


def test_a_missing_required_key_is_refused_before_any_vote(tmp_path):
    store, c = _saved(tmp_path, helpers.make_state(seed=3))
    with pytest.raises(CheckpointFormatError, match="missing key 'nope'"):
        loading.load_and_check(c, store, helpers.make_state(seed=4), loading.LoadOptions(required=("nope",)))


def test_a_suspect_that_fails_the_sanity_gate_names_both():
    t = torch.tensor([1.0, float("nan")])
    staged = staging.Staged(tree={"w": t}, rng=None, step=1, suspect=["checksum_mismatch: f"])
    with pytest.raises(
        CheckpointFormatError, match=r"^checksum_mismatch: f; sanity_gate_failed: tensor /w holds NaN/Inf"
    ):
        staging.accept(staged, {}, ())


def test_the_acceptance_rules_live_in_staging_only():
    # loading no longer re-exports them (they were there for guardian's closures, now one load_and_check call).
    assert all(callable(getattr(staging, n)) for n in ("apply", "accept", "check_structure", "sanity_gate"))
    assert staging.Staged is loading.Staged  # loading's own return type, from its one home
    assert not {"apply", "check_structure", "sanity_gate", "SANITY_FACTOR"} & set(loading.__all__)


def test_reason_wire_keeps_the_transient_flag():
    for r in (Reason("TimeoutError", "timeout: slow", transient=True), Reason("ValueError", "bad")):
        assert reason_from_wire(reason_to_wire(r)) == r
    assert reason_from_wire("") is None and reason_to_wire(None) == ""
    assert reason_to_wire(Reason("TimeoutError", "timeout: slow", transient=True)) == "TTimeoutError: timeout: slow"


def test_plan_cursor_lists_nothing_until_the_first_page(tmp_path, monkeypatch):
    calls = []
    real = discovery.discover
    monkeypatch.setattr(discovery, "discover", lambda *a, **k: calls.append(a) or real(*a, **k))
    cur = planning.PlanCursor([stores.resolve(str(tmp_path), 0)], planning.PlanRequest(run=RUN, use_journal=False))
    assert calls == []
    page = cur.next_page()
    assert len(calls) == 1 and page.candidates == () and not page.more and cur.exhausted


def test_journal_refuses_a_symlinked_run_dir(tmp_path):
    root, elsewhere = tmp_path / "ck", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / RUN).symlink_to(elsewhere)
    store, c = stores.resolve(str(root), 0), _candidate()
    journal.record(store, RUN, c, started=1)  # advisory: logged, not raised
    assert list(elsewhere.iterdir()) == []


def _candidate():
    from dist_guardian.candidate import Candidate

    return Candidate(id="x", store="s", store_index=0, rel=f"{RUN}/step-1", path="p", kind="native", step=1)
