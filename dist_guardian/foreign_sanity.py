"""The sanity gate for foreign tensors whose bytes failed a check or cannot be checked at all.

A foreign file carries no saved ``max|x|`` (native manifests do, F03), so a damaged tensor is
judged against the same tensor in the live state, or, where the live state has none (a fresh
optimizer's ``exp_avg``), in the nearest intact sibling file (``foreign_loading`` finds it): finite,
and ``max|x|`` within :data:`FOREIGN_FACTOR` of the reference. With no reference at all the gate
fails, so the attempt fails and the next intact candidate loads instead: a zip CRC mismatch must
never put an Adam moment of 3.5e21 into training. For a DCP checkpoint (no checksums at all)
every floating tensor is judged where the live state bounds it, and must be finite everywhere.
Called by ``staging.accept`` and ``foreign_loading``; no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from . import statetree
from .errors import CheckpointFormatError

log = logging.getLogger(__name__)

# Trained weights drift from their initial values by far less than this (an init of U(+-0.35) would have
# to reach 350); a flipped exponent bit moves a float32 by 2**64 or more.
FOREIGN_FACTOR = 1000.0
ALL = "*"  # ``Staged.damaged`` entry: every floating tensor is unchecked (DCP: no checksums)


def judge(tree: dict[str, Any], state: dict[str, Any], damaged: list[str]) -> list[str]:
    """Raise when a damaged or unchecked tensor is non-finite or over its bound; else what was judged, for the record.

    ``damaged``: tree paths (``"optim/state/0/exp_avg"``) or :data:`ALL`. A named tensor needs a
    bound from the live state; under :data:`ALL` a tensor without one is only checked finite.
    """
    return judge_against(tree, statetree.capture(state), damaged, "the live state")


def judge_against(tree: dict[str, Any], reference: Any, damaged: list[str], source: str) -> list[str]:
    """:func:`judge` with the bound taken from ``reference`` (a plain tree: the live state's, or an intact
    neighbour's), named ``source`` in every message."""
    named = set(damaged) - {ALL}
    every = ALL in damaged
    notes: list[str] = []
    seen: set[str] = set()
    for path, t, ref in _pairs(tree, reference, ""):
        if path not in named and not every:
            continue
        seen.add(path)
        if not t.is_floating_point() or t.numel() == 0:
            continue
        x = _local(t)
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if not bool(torch.isfinite(x).all()) and (path in named or not _has_nonfinite(ref)):
            # An unchecked tensor may hold what its live counterpart holds too (a -inf attention mask).
            raise CheckpointFormatError(f"sanity_gate_failed: tensor {path} holds NaN/Inf ({_why(path, named)})")
        ref_max = _max_abs(ref)
        if not ref_max:
            if path in named:
                raise CheckpointFormatError(
                    f"sanity_gate_failed: tensor {path} is damaged (zip CRC mismatch) and nothing bounds it "
                    f"(no value of it in {source}, no intact sibling file); the next intact candidate is used instead"
                )
            continue
        m = _max_abs(x)  # finite elements: a mask's -inf was judged above
        bound = FOREIGN_FACTOR * ref_max
        if m > bound:
            raise CheckpointFormatError(
                f"sanity_gate_failed: tensor {path} max|x|={m:.3g} > bound {bound:.3g} "
                f"({FOREIGN_FACTOR:g}x {source}'s {ref_max:.3g}; {_why(path, named)})"
            )
        if path in named:
            notes.append(f"sanity_bound: {path} max|x|={m:.3g} within {bound:.3g} (bound from {source})")
    lost = sorted(named - seen)
    if lost:
        raise CheckpointFormatError(f"sanity_gate_failed: damaged tensors {lost[:5]} not found in the staged state")
    return notes


def unbounded(tree: dict[str, Any], state: dict[str, Any], damaged: list[str]) -> list[str]:
    """The named damaged tensors the live state holds no usable bound for (a fresh optimizer's moments)."""
    want = set(damaged) - {ALL}
    live = statetree.capture(state)
    return [p for p, t, ref in _pairs(tree, live, "") if p in want and t.is_floating_point() and not _max_abs(ref)]


def tensors_with_paths(v: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a tree with its path (``"optim/state/0/exp_avg"``), in the order :func:`judge` names them."""
    for p, t, _ in _pairs(v, None, path):
        yield p, t


def _why(path: str, named: set[str]) -> str:
    return "its bytes fail their CRC" if path in named else "a DCP checkpoint has no checksums"


def _pairs(v: Any, live: Any, path: str) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Each staged tensor with its tree path and the live value at the same place (None when there is none)."""
    if isinstance(v, torch.Tensor):
        yield path, v, live if isinstance(live, torch.Tensor) else None
    elif isinstance(v, dict):
        for k, x in v.items():
            sub = live.get(k) if isinstance(live, dict) else None
            yield from _pairs(x, sub, f"{path}/{k}" if path else str(k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            sub = live[i] if isinstance(live, (list, tuple)) and i < len(live) else None
            yield from _pairs(x, sub, f"{path}/{i}" if path else str(i))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (each rank judges what it holds), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _has_nonfinite(ref: Any) -> bool:
    return isinstance(ref, torch.Tensor) and ref.is_floating_point() and not bool(torch.isfinite(_local(ref)).all())


def _max_abs(ref: Any) -> float:
    if not isinstance(ref, torch.Tensor) or not ref.is_floating_point() or ref.numel() == 0:
        return 0.0
    x = _local(ref).detach()
    if x.numel() == 0:
        return 0.0
    x = x.float()
    m = float(x[torch.isfinite(x)].abs().max()) if bool(torch.isfinite(x).any()) else 0.0
    return m
