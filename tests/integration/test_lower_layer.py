"""The lower layer alone: ``dist_guardian.resume(load_fn, stores=[...])`` for checkpoints another library wrote."""

from __future__ import annotations

import os

import rank_fns
import torch
from dg_harness import run_ranks


def _write(run_dir: str, step: int, fill: float) -> None:
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(fill)
    torch.save({"model": model.state_dict(), "step": step}, os.path.join(run_dir, f"checkpoint_step_{step}.pt"))


def _store(tmp_path) -> str:
    store = tmp_path / "ck"
    (store / "r").mkdir(parents=True)
    _write(str(store / "r"), 100, 1.0)
    _write(str(store / "r"), 200, 2.0)
    return str(store)


def test_lower_layer_resume_one_rank_with_a_torch_load_load_fn(tmp_path):
    got = rank_fns.lower_layer_resume(0, 1, store=_store(tmp_path), run="r")
    assert got["resumed"] and got["step"] == 200 and got["applied"] == [200]
    assert got["weight_sum"] == 2.0 * 8


def test_lower_layer_resume_two_ranks_move_on_together_when_one_rank_fails(tmp_path):
    out = run_ranks(rank_fns.lower_layer_resume, 2, store=_store(tmp_path), run="r", fail_step_on_rank1=200)
    assert out.ok(), out.errors
    for rank in (0, 1):
        got = out.results[rank]
        assert got["resumed"] and got["step"] == 100 and got["applied"] == [100], got
        assert got["weight_sum"] == 1.0 * 8
        assert got["attempts"][0] == (200, "failed")
