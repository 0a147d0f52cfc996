"""Resharding on resume: a sharded checkpoint written at one world size (or mesh) loads at another.

Each resumed rank compares the gathered full tensors (``full_tensor()``) of its model and AdamW
state (``step``, ``exp_avg``, ``exp_avg_sq``) with what the writer held at the saved step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import sharded_rank_fns as srf
from dg_harness import run_ranks

pytestmark = pytest.mark.timeout(180)


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _save(root: str, world: int, **kw) -> dict:
    out = run_ranks(srf.save_run, world, timeout=120, root=root, run="r", saves=[1], total=2, **kw)
    assert out.ok(), out.errors
    assert out.results[0]["committed"] == [True]
    return out.results[0]["at"][1]


def _resume(root: str, world: int, **kw) -> dict:
    out = run_ranks(srf.resume_run, world, timeout=120, root=root, run="r", **kw)
    assert out.ok(), out.errors
    for r in range(world):
        assert out.results[r]["resumed"] and out.results[r]["step"] == 1
    return out.results


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (2, 4)])
def test_F30_sharded_reshard_from_2_ranks(tmp_path, saved, resumed):
    root = str(tmp_path)
    want = _save(root, saved, replicate=True)
    got = _resume(root, resumed, replicate=True)
    for r in range(resumed):
        _equal(got[r]["loaded"], want)
        assert any(f"world_size_changed from={saved} to={resumed}" in w for w in got[r]["warnings"])
    # per-rank state: rank r takes rank r % saved's data position; new ranks re-derive their RNG
    assert [got[r]["data"]["position"] for r in range(resumed)] == [2 + 100 * (r % saved) for r in range(resumed)]


@pytest.mark.parametrize(("saved", "resumed"), [(4, 2), (1, 2)])
def test_F30_sharded_reshard_to_2_ranks(tmp_path, saved, resumed):
    root = str(tmp_path)
    want = _save(root, saved, replicate=True)
    got = _resume(root, resumed, replicate=True)
    for r in range(resumed):
        _equal(got[r]["loaded"], want)


def test_sharded_2x2_fsdp_tp_mesh_resumes_on_1d_mesh_of_2(tmp_path):
    root = str(tmp_path)
    want = _save(root, 4, mesh_shape=(2, 2))
    got = _resume(root, 2)
    for r in range(2):
        _equal(got[r]["loaded"], want)


def test_sharded_replicated_written_once_and_by_several_ranks(tmp_path):
    root = str(tmp_path)
    want = _save(root, 2, replicate=True)
    step = os.path.join(root, "r", "step-000000000001")
    sizes = srf.shard_file_sizes(step)
    shard_bytes = sum(n for f, n in sizes.items() if f.startswith("shards-"))
    model_bytes = sum(a.nbytes for a in want.values())
    assert model_bytes <= shard_bytes < model_bytes * 1.1 + 64 * 1024, (sizes, model_bytes)
    import json

    with open(os.path.join(step, "manifest.json")) as f:
        mf = json.load(f)
    table = mf["sharded"]["model/table"]["chunks"]
    assert len(table) == 1  # a Replicate() tensor: one chunk, not one per rank
    replicated = [t for n, t in mf["sharded"].items() if n == "model/table" or t["shape"] == []]  # + AdamW steps
    assert len(replicated) == 1 + 3 * 2 and all(len(t["chunks"]) == 1 for t in replicated)
    writers = {c["file"] for t in replicated for c in t["chunks"]}
    assert len(writers) == 2  # replicated state is spread over both ranks, none writes it all


def test_sharded_checkpoint_loads_into_a_plain_model_and_the_reverse_is_refused_before_the_vote(tmp_path):
    """An FSDP2 job's checkpoint resumes one plain (unsharded) process, e.g. for evaluation; a plain
    checkpoint is refused by a sharded model on every rank before anything is applied (fresh start)."""
    root = str(tmp_path / "a")
    want = _save(root, 2)
    got = _resume(root, 1, plain=True)
    _equal(got[0]["loaded"], want)
    plain_root = str(tmp_path / "b")
    _save(plain_root, 2, plain=True)
    out = run_ranks(srf.resume_run, 2, timeout=120, root=plain_root, run="r")
    assert out.ok(), out.errors
    for r in range(2):
        assert not out.results[r]["resumed"]
        (step, outcome, reasons), *_ = out.results[r]["attempts"]
        assert (step, outcome) == (1, "failed") and len(reasons) == 2
        assert all("saved without DTensors" in w for w in reasons)
