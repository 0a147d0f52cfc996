"""A load failure is transient or lasting by the error's own field, never by its text (F33)."""

from __future__ import annotations

import os

import pytest
import torch

import dist_guardian
from dist_guardian.errors import CheckpointFormatError, ResumeFailed, StoreUnavailable

RUN = "r"


def _one_candidate(tmp_path) -> str:
    store = tmp_path / "ck"
    (store / RUN).mkdir(parents=True)
    torch.save({"step": 5}, os.path.join(str(store / RUN), "checkpoint_step_5.pt"))
    return str(store)


def test_a_store_that_drops_mid_load_raises_resume_failed_not_a_fresh_start(tmp_path):
    def load_fn(candidate, store):
        raise StoreUnavailable("store_unreachable", "read timed out mid-load", store=store.url)

    with pytest.raises(ResumeFailed):
        dist_guardian.resume(load_fn, [_one_candidate(tmp_path)], run=RUN, use_journal=False)


def test_a_lasting_format_error_still_starts_fresh(tmp_path):
    def load_fn(candidate, store):
        raise CheckpointFormatError("not a checkpoint: bad bytes")

    got = dist_guardian.resume(load_fn, [_one_candidate(tmp_path)], run=RUN, use_journal=False)
    assert not got.resumed and got.attempts[0].outcome == "failed"
    assert got.attempts[0].reasons[0][1] == "CheckpointFormatError: not a checkpoint: bad bytes"
