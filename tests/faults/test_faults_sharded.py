"""Sharded variants of the fault catalog: one rank's chunk of the newest step damaged, truncated or missing.

Every rank must fall back to the previous step together, whatever the world size of the resume,
and what is applied must be exactly the previous step (F29: nothing half-applied).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import sharded_rank_fns as srf
from dg_harness import run_ranks

pytestmark = pytest.mark.timeout(180)

NEW = "step-000000000003"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 3 of a 2-rank FSDP2 run (the writer's full tensors at each), copied per test."""
    root = str(tmp_path_factory.mktemp("sharded"))
    out = run_ranks(srf.save_run, 2, timeout=120, root=root, run="r", saves=[1, 3], total=4)
    assert out.ok(), out.errors
    assert out.results[0]["committed"] == [True, True]
    return root, out.results[0]["at"]


def _copy(saved, tmp_path) -> str:
    import shutil

    root = str(tmp_path / "ck")
    shutil.copytree(saved[0], root)
    return root


def _chunk(root: str, tensor: str, file: str) -> dict:
    with open(os.path.join(root, "r", NEW, "manifest.json")) as f:
        mf = json.load(f)
    return next(c for c in mf["sharded"][tensor]["chunks"] if c["file"] == file)


def _resume(root: str, world: int) -> list[dict]:
    out = run_ranks(srf.resume_run, world, timeout=120, root=root, run="r")
    assert out.ok(), out.errors
    return [out.results[r] for r in range(world)]


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty"])
@pytest.mark.parametrize("world", [2, 1])
def test_F01_F02_F07_F21_sharded_shard_file_of_one_rank_lost_every_rank_falls_back(saved, tmp_path, damage, world):
    root = _copy(saved, tmp_path)
    path = os.path.join(root, "r", NEW, "shards-00001-of-00002.dgt")
    if damage == "missing":
        os.remove(path)
    else:
        os.truncate(path, 0 if damage == "empty" else os.path.getsize(path) // 2)
    got = _resume(root, world)
    for r in range(world):
        assert got[r]["step"] == 1, got[r]["attempts"]
        _equal(got[r]["loaded"], saved[1][1])


@pytest.mark.parametrize("world", [2, 1, 4])
def test_F03_sharded_bit_flip_in_one_ranks_chunk_every_rank_falls_back(saved, tmp_path, world):
    root = _copy(saved, tmp_path)
    c = _chunk(root, "model/0.weight", "shards-00001-of-00002.dgt")
    with open(os.path.join(root, "r", NEW, c["file"]), "r+b") as f:
        f.seek(c["begin"])
        f.write(struct.pack("<f", 3.0e38))  # checksum mismatch, and max|x| far past 10x the saved value
    got = _resume(root, world)
    for r in range(world):
        assert got[r]["step"] == 1, got[r]["attempts"]
        _equal(got[r]["loaded"], saved[1][1])
    first = got[0]["attempts"][0]
    assert first[0] == 3 and first[1] == "failed"
    assert any("checksum_mismatch" in w and "sanity_gate_failed" in w for w in first[2]), first


def test_F29_sharded_optimizer_chunk_damaged_on_rank_1_nothing_half_applied(saved, tmp_path):
    """Rank 1's model chunks are intact, its AdamW exp_avg is not: no rank keeps any of step 3."""
    root = _copy(saved, tmp_path)
    c = _chunk(root, "optim/state/2.weight/exp_avg", "shards-00001-of-00002.dgt")
    with open(os.path.join(root, "r", NEW, c["file"]), "r+b") as f:
        f.seek(c["begin"])
        f.write(struct.pack("<f", float("nan")))
    got = _resume(root, 2)
    for r in range(2):
        assert got[r]["step"] == 1
        _equal(got[r]["loaded"], saved[1][1])  # model, optimizer and per-rank state of step 1, on every rank
        assert got[r]["data"] == {"position": 2 + 100 * r}
    reasons = got[0]["attempts"][0][2]
    assert len(reasons) == 1 and "exp_avg" in reasons[0] and "NaN" in reasons[0], reasons
