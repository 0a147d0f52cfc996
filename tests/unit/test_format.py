"""The native format: safetensors-compatible, pickle-free, exact round trips, strict header parsing."""

from __future__ import annotations

import io
import json
import os
import re
import struct

import pytest
import torch
from helpers import make_state, same, snapshot

from dist_guardian import Guardian, formats, statetree
from dist_guardian.errors import CheckpointFormatError


def _write(path, tree):
    from dist_guardian.save import write_tree

    return write_tree(str(path), tree, rank=0, step=1, file_rank=None)


def test_native_file_opens_with_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, dtype=torch.bfloat16),
        "d": torch.tensor([True, False]),
        "e": torch.tensor(3.5, dtype=torch.float64),
        "f": torch.zeros(0, 4),
    }
    w = _write(tmp_path / "x.dgt", {"t": tensors, "meta": {"k": [1, 2.5, "s", None]}})
    assert w.entry.size == os.path.getsize(tmp_path / "x.dgt")
    with safe_open(str(tmp_path / "x.dgt"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {f"t/{k}" for k in tensors}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(f"t/{k}"), v)
        tree = json.loads(f.metadata()[formats.TREE_KEY])
    assert tree["meta"]["k"] == [1, 2.5, "s", None]


def test_alignment_and_no_gaps(tmp_path):
    _write(
        tmp_path / "x.dgt",
        {
            "a": torch.zeros(3, dtype=torch.uint8),
            "b": torch.zeros(5, dtype=torch.float64),
            "c": torch.zeros(3, dtype=torch.float16),
            "d": torch.zeros(2, dtype=torch.float32),
        },
    )
    data = (tmp_path / "x.dgt").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0
    with open(tmp_path / "x.dgt", "rb") as f:
        h = formats.parse_header(f, len(data))
    sizes = [formats.DTYPE_SIZES[e.dtype] for e in h.entries]
    assert sizes == sorted(sizes, reverse=True)
    for e in h.entries:
        assert e.begin % formats.DTYPE_SIZES[e.dtype] == 0


def test_tree_round_trip_is_exact():
    tree = {
        "opt": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0], "foreach": None}],
        },
        "odd": {"__tensor__": "not a tensor", 1.5: "float key", (1, 2): "tuple key"},
        "floats": [float("nan"), float("inf"), -float("inf"), 0.1],
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
    }
    enc = statetree.Encoder()
    j = json.loads(json.dumps(enc.encode(tree, ""), allow_nan=False))
    back = statetree.decode(j, enc.tensors)
    assert back["opt"]["state"][0]["exp_avg"] is enc.tensors["opt/state/0/exp_avg"]
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["odd"] == tree["odd"]
    assert str(back["floats"][:3]) == "[nan, inf, -inf]" and back["floats"][3] == 0.1
    assert back["dtype"] is torch.float16 and back["size"] == torch.Size([2, 3])


def test_unsupported_value_names_its_key():
    with pytest.raises(CheckpointFormatError, match=r"state\['a/b'\].*set"):
        statetree.Encoder().encode({"a": {"b": {1, 2}}}, "")


@pytest.mark.parametrize(
    "damage,expect",
    [
        (lambda d: d[:4], "truncated"),
        (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "header length"),
        (lambda d: d[:8] + b"[" + d[9:], "JSON|object"),
        (lambda d: d[:-1], "cover"),
        (lambda d: d + b"\0" * 8, "cover"),
    ],
)
def test_header_parser_rejects_structural_damage(tmp_path, damage, expect):
    _write(tmp_path / "x.dgt", {"a": torch.randn(10), "b": torch.arange(3)})
    data = damage((tmp_path / "x.dgt").read_bytes())
    with pytest.raises(CheckpointFormatError, match=expect):
        formats.parse_header(io.BytesIO(data), len(data), name="x.dgt")


def test_header_declaring_huge_tensor_is_rejected_without_reading_data():
    header = {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    blob = json.dumps(header).encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * 64
    with pytest.raises(CheckpointFormatError, match="cover"):
        formats.parse_header(io.BytesIO(data), len(data), name="huge.dgt")


def test_no_pickle_in_native_path():
    import dist_guardian

    root = os.path.dirname(dist_guardian.__file__)
    in_formats = sorted(os.listdir(os.path.join(root, "formats")))
    for name in (
        *[os.path.join("formats", n) for n in in_formats if n.endswith(".py")],
        "statetree.py",
        "commit.py",
        "manifest.py",
    ):
        src = open(os.path.join(root, name)).read()
        # pickletools (opcode scanning of foreign files, nothing executed) is fine; pickle is not.
        assert not re.search(r"^import pickle$|\bpickle\.loads?\(|\btorch\.load\(", src, re.M), name


def test_model_optimizer_scheduler_rng_round_trip_bit_identical(tmp_path):
    state = make_state(seed=1)
    import helpers

    g = Guardian(stores=[str(tmp_path / "ck")], run="r")
    assert g.save(state, step=10).committed
    g.close()
    before = snapshot(state)
    saved_rng = statetree.rng_state()
    expected_next = helpers.next_randoms()
    fresh = make_state(seed=99)
    fresh["trainer"] = {}
    g2 = Guardian(stores=[str(tmp_path / "ck")], run="r")
    r = g2.resume(fresh)
    g2.close()
    assert r.resumed and r.step == 10 and r.tier == "V"
    assert same(snapshot(fresh), before)
    assert helpers.next_randoms() == expected_next
    # And training continues identically from there (same data: the same RNG state each time).
    statetree.set_rng_state(saved_rng)
    helpers.train(state, 3)
    statetree.set_rng_state(saved_rng)
    helpers.train(fresh, 3)
    assert same(snapshot(fresh), snapshot(state))
