"""Staging memory of a sharded resume: populating it never changes a byte; its hash is the manifest's."""

from __future__ import annotations

import os
import sys

import torch
import xxhash

from dist_guardian import sharded_io


def test_populate_keeps_every_byte_of_unaligned_and_aligned_tensors() -> None:
    # An odd-sized, odd-offset view into a written buffer: populating its interior pages must
    # leave its bytes and its neighbours' bytes exactly as they were (it only faults pages in).
    base = torch.frombuffer(bytearray(os.urandom((3 << 20) + 12345)), dtype=torch.uint8)
    before = base.clone()
    mem = sharded_io._Memory()
    mem.prepare(base[777 : 777 + (2 << 20) + 4099])
    mem.prepare(base)
    assert torch.equal(base, before)
    fresh = torch.empty(3 << 20, dtype=torch.uint8)
    mem.prepare(fresh)  # fresh memory, then written by the read, as in _run_reads
    fresh.copy_(before[: fresh.numel()])
    assert torch.equal(fresh, before[: fresh.numel()])
    if _kernel() >= (5, 14):  # MADV_POPULATE_WRITE exists: it was used, not given up on
        assert mem._madvise is not None


def _kernel() -> tuple[int, int]:
    if sys.platform != "linux":
        return (0, 0)
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def test_small_tensors_are_left_to_the_read() -> None:
    small = torch.arange(1000, dtype=torch.int32)
    sharded_io._Memory().prepare(small)
    assert torch.equal(small, torch.arange(1000, dtype=torch.int32))


def test_streaming_hash_is_the_one_shot_digest_the_manifest_holds() -> None:
    # Resume hashes with the GIL-releasing xxh3_128 object; save records xxh3_128_hexdigest.
    data = os.urandom((1 << 20) + 3)
    assert xxhash.xxh3_128(memoryview(data)).hexdigest() == xxhash.xxh3_128_hexdigest(data)
