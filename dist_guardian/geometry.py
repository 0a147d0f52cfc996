"""Chunk geometry of sharded tensors: boxes in global coordinates, who writes which, what overlaps.

A saved tensor is its global shape plus chunks, each a box (global offsets and lengths) of
the tensor. Belongs here: the box arithmetic (overlap, volume, splitting into row blocks), the
box a ``DTensor`` holds on this rank (torch's own helper computes it, for every placement
including ``_StridedShard``). Pure arithmetic, no I/O: the writers and readers in
``sharded_io`` act on what it computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# A saved chunk is split into row blocks of about this size, each its own verified unit: a
# rank that needs part of a chunk reads (and hashes) only the blocks it overlaps.
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class Box:
    """A box of a tensor in global coordinates (a 0-dim tensor is the empty box ``((), ())``)."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def volume(self) -> int:
        return math.prod(self.lengths)

    def slices(self, origin: Box | None = None) -> tuple[slice, ...]:
        """This box as slices of a tensor holding ``origin`` (default: the global tensor)."""
        base = origin.offsets if origin is not None else (0,) * len(self.offsets)
        return tuple(slice(o - b, o - b + n) for o, b, n in zip(self.offsets, base, self.lengths, strict=True))


def whole(shape: Sequence[int]) -> Box:
    return Box(offsets=(0,) * len(shape), lengths=tuple(int(d) for d in shape))


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of the same tensor, or None when it is empty."""
    offs, lens = [], []
    for ao, al, bo, bl in zip(a.offsets, a.lengths, b.offsets, b.lengths, strict=True):
        lo, hi = max(ao, bo), min(ao + al, bo + bl)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return Box(offsets=tuple(offs), lengths=tuple(lens))


def row_blocks(box: Box, row_bytes: int, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, Box]]:
    """(first local row, box) of each row block of ``box``: contiguous pieces of a C-order chunk."""
    if not box.lengths or box.lengths[0] == 0:
        return [(0, box)]
    rows = box.lengths[0]
    per = max(1, block_bytes // max(row_bytes, 1))
    out = []
    for r in range(0, rows, per):
        n = min(per, rows - r)
        out.append((r, Box(offsets=(box.offsets[0] + r, *box.offsets[1:]), lengths=(n, *box.lengths[1:]))))
    return out


def dtensor_class() -> Any:
    """``torch.distributed.tensor.DTensor``, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_box(global_shape: Sequence[int], mesh: Any, placements: Sequence[Any]) -> Box:
    """The box this rank holds of a tensor laid out as ``placements`` on ``mesh`` (torch computes it)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(tuple(global_shape), mesh, tuple(placements))
    return Box(offsets=tuple(int(o) for o in offsets), lengths=tuple(int(s) for s in shape))
