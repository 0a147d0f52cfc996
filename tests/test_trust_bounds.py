"""T04: no hang and no quadratic or unbounded work in the resume path, whatever a store holds.

Real files and real processes throughout: FIFOs where helper files are written, thousands
of small foreign files, a manifest naming 20,000 files.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import stat
import threading
import time

import pytest
import torch

import helpers
from dist_guardian import Guardian, cli, coordinator, journal, manifest, planning, stores
from dist_guardian.errors import InsecurePathError
from helpers import make_state, same, snapshot

RUN = "r"
PKG = pathlib.Path(__file__).resolve().parent.parent / "dist_guardian"


def _save_b(root: str) -> dict:
    """One committed checkpoint (step 200) in ``root``; returns its snapshot."""
    state = make_state(seed=0)
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=200).committed
    g.close()
    return snapshot(state)


def _resume(root: str, **kw):
    state = make_state(seed=42)
    g = Guardian(stores=[root], run=RUN, **kw)
    try:
        return g.resume(state), state
    finally:
        g.close()


def _journal_path(root: str, step: int) -> str:
    plan = planning.make_plan(planning.resolve_stores([root], None)[0], run=RUN, compat=None,
                              suspect="after_same_step", use_journal=False)
    (c,) = [c for c in plan.candidates if c.step == step]
    return os.path.join(root, journal._rel(RUN, c))


# ----------------------------------------------------------------------------- (d) one manifest, many files


def test_T04_ls_of_a_20k_file_manifest_is_linear(tmp_path, capsys):
    n = 20_000
    d = helpers.step_dir(str(tmp_path), RUN, 100)
    os.makedirs(d)
    files = []
    for i in range(n):
        name = f"rank-{i:05d}-of-{n:05d}.dgt"
        open(os.path.join(d, name), "wb").close()
        files.append(manifest.FileEntry(name=name, size=1, digest="0" * 32, rank=i))
    data = manifest.build(run=RUN, step=100, generation=1, world_size=n, created_unix=time.time(), compat={},
                          metrics={}, files=files, tensors={}, torch_version="x", writer={})
    pathlib.Path(d, manifest.MANIFEST_NAME).write_bytes(data)
    t0 = time.perf_counter()
    rc = cli.main(["ls", str(tmp_path), "--run", RUN])
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    # Every file is checked (each is 0 bytes, the manifest says 1), and the whole listing is linear:
    # a scan of the directory's children per manifest file took 6 s here (O(files^2)).
    assert rc == 1 and f"empty: rank-{n - 1:05d}-of-{n:05d}.dgt is 0 bytes" in out
    assert took < 3.0, f"ls of a {n}-file manifest took {took:.1f}s"
