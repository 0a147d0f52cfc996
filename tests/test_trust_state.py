"""Wrong or partial state must never be reported as success (T05), and damage outside the tensors (T10).

Real files only: checkpoints written by ``Guardian.save``, foreign files by ``torch.save`` and
``torch.distributed.checkpoint.save``, damage done to the bytes on disk.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch

import helpers
from dist_guardian import Guardian, formats

RUN = "r"
REPL = "replicated.dgt"


def _save_a_b(root: str) -> tuple[dict, dict]:
    """Native checkpoints A (step 100) and B (step 200); returns their snapshots."""
    state = helpers.make_state(seed=0)
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=100).committed
    snap_a = helpers.snapshot(state)
    helpers.train(state, 1)
    assert g.save(state, step=200).committed
    g.close()
    return snap_a, helpers.snapshot(state)


def _resume(root: str, state: dict | None = None, **kw):
    state = helpers.make_state(seed=42) if state is None else state
    g = Guardian(stores=[root], run=RUN, **kw)
    try:
        return g.resume(state), state
    finally:
        g.close()


# ----------------------------------------------------------------------------- T05a: steps from foreign names


@pytest.mark.parametrize("name, step", [
    ("step_300.pt", 300), ("checkpoint-300.pt", 300), ("global_step300.pt", 300), ("iter_300.pt", 300),
    ("epoch=3-step=900.ckpt", 900), ("dcp-step-300", 300),
    ("eval_export_20240501.pt", None), ("model_7.pt", None), ("checkpoint_20240501.pt", None),
    ("ckpt-2024-05-01.pt", None), ("step_1234567890123456789.pt", None),
])
def test_T05_step_from_name_only_when_the_name_says_step(name, step):
    assert formats.step_from_name(name) == step


def test_T05_dated_foreign_export_does_not_outrank_native(tmp_path):
    root = str(tmp_path / "ck")
    _snap_a, snap_b = _save_a_b(root)
    export = helpers.make_state(seed=7)
    torch.save({"model": export["model"].state_dict()}, os.path.join(root, RUN, "eval_export_20240501.pt"))
    r, state = _resume(root)
    assert r.resumed and r.step == 200 and r.tier == "V" and r.path == helpers.step_dir(root, RUN, 200)
    assert helpers.same(helpers.snapshot(state), snap_b)


def test_T05_step_in_the_content_wins_over_the_name(tmp_path):
    root = str(tmp_path / "ck")
    _snap_a, snap_b = _save_a_b(root)
    other = helpers.make_state(seed=7)
    # The name claims step 900000, the file itself says step 150: it is older than B.
    torch.save({"model": other["model"].state_dict(), "step": 150}, os.path.join(root, RUN, "checkpoint-900000.pt"))
    r, state = _resume(root)
    assert r.step == 200 and r.path == helpers.step_dir(root, RUN, 200)
    assert helpers.same(helpers.snapshot(state), snap_b)
