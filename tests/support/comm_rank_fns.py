"""Rank functions for the coordination channel's failure tests: one vote that a peer misses by hanging or dying."""

from __future__ import annotations

import os
import time

from dist_guardian.comm import Comm


def vote_with_a_missing_peer(rank: int, world: int, *, peer: str, timeout_s: float = 2.0) -> dict:
    """Every rank votes once to warm the group; then rank 1 hangs (``peer="hang"``) or dies (``"die"``)."""
    comm = Comm(timeout_s)
    comm.vote_min(rank, "warm-up vote")
    if rank == 1:
        if peer == "die":
            os._exit(0)
        time.sleep(timeout_s * 4)
        return {}
    try:
        comm.vote_min(rank, "the vote")
    except Exception as e:  # reported as data: the test asserts the exact class
        return {"type": type(e).__name__, "error": str(e), "broken": comm.broken}
    return {"type": None}
