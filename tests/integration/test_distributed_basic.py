"""Multi-rank save and resume with real gloo process groups (2 and 4 ranks)."""

from __future__ import annotations

import json

import pytest
import rank_fns
from dg_harness import run_ranks
from helpers import committed


@pytest.mark.parametrize("world", [2, 4])
def test_multirank_save_resume_round_trip_with_per_rank_rng(tmp_path, world):
    ck = str(tmp_path / "ck")
    out = run_ranks(rank_fns.save_steps, world, stores=[ck], run="r", steps=[10, 20])
    assert out.ok(), out.errors
    assert sorted(committed(ck, "r")) == ["step-000000000010", "step-000000000020"]
    back = run_ranks(rank_fns.resume_state, world, stores=[ck], run="r")
    assert back.ok(), back.errors
    for r in range(world):
        got = back.results[r]
        assert got["resumed"] and got["step"] == 20 and got["tier"] == "V"
        assert got["data"] == {"position": 100 * r + 2}
        # The per-rank RNG continues exactly where that rank's saved stream was.
        assert got["next"] == out.results[r]["next"]
    # Identical decision and identical replicated weights on every rank.
    assert len({json.dumps(back.results[r]["weights"], sort_keys=True) for r in range(world)}) == 1
    assert len({back.results[r]["path"] for r in range(world)}) == 1
