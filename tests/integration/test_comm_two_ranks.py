"""Two real gloo ranks: a peer that hangs gives AgreementTimeout, a peer that dies a CoordinationError (exactly)."""

from __future__ import annotations

import comm_rank_fns
from dg_harness import run_ranks


def test_a_hanging_peer_is_an_agreement_timeout():
    out = run_ranks(comm_rank_fns.vote_with_a_missing_peer, 2, timeout=60, peer="hang")
    got = out.results[0]
    assert got["type"] == "AgreementTimeout", got
    assert "no answer from every rank within 2.0s" in got["error"] and got["broken"] == "the vote"


def test_a_dead_peer_is_a_coordination_error():
    out = run_ranks(comm_rank_fns.vote_with_a_missing_peer, 2, timeout=60, peer="die")
    got = out.results[0]
    assert got["type"] == "CoordinationError", got
    assert "a peer failed or died" in got["error"] and got["broken"] == "the vote"
