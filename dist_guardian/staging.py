"""What a rank staged, and the rules it must pass before every rank applies it.

Belongs here: the :class:`Staged` value, the structure check (keys, shapes, dtypes, optimizer
groups against the live state), the sanity gate for suspect candidates (F03), the one rule
that turns a staged load into a vote (:func:`accept`), and :func:`apply`. Reading bytes
belongs in ``loading``; nothing here does I/O, so every acceptance rule is in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import foreign_sanity, geometry, manifest, sharding, statetree
from .candidate import Loaded
from .errors import CheckpointFormatError

log = logging.getLogger(__name__)

# A suspect tensor whose max|x| grew past 10x its saved value is taken as damaged, not as training drift.
SANITY_FACTOR = 10.0


@dataclass
class Staged:
    """What one rank loaded: the decoded trees, and what verification found on the way."""

    tree: dict[str, Any]  # top-level key -> value (state_dict trees, tensors, plain values)
    rng: dict[str, Any] | None
    step: int
    suspect: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: Mapping[str, manifest.TensorStat] = field(default_factory=dict)  # tensor name -> saved stats
    names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> name, to name a damaged tensor
    # Damage outside the tensors (state tree, tensor index): the sanity gate cannot judge it (T10).
    tree_damaged: bool = False
    # Keys applied in fully-qualified-name form (a sharded checkpoint): module key -> None, optimizer -> its module.
    fqn: dict[str, str | None] = field(default_factory=dict)
    # Foreign tensors whose bytes failed a check (tree paths) or foreign_sanity.ALL (no checksums to check):
    # judged against the live state before a vote (foreign_sanity), None for a native candidate.
    damaged: list[str] | None = None
    # A foreign load's parts of ``state`` it could not restore, each named with why ("'sched': no scheduler.pt");
    # ``completeness.judge`` fails the attempt on them (or, with ``partial_ok``, warns).
    not_restored: list[str] = field(default_factory=list)


def accept(staged: Staged, state: dict[str, Any], required: Iterable[str]) -> Loaded:
    """This rank's verdict on what it staged: raises when it must not be applied, else its vote.

    The structure check runs on every candidate; the sanity gate only on a suspect one (a
    checksum mismatch), where its failure names the mismatch as well as the tensor.
    """
    check_structure(staged, state, required)
    if staged.suspect or staged.damaged is not None:
        try:
            if staged.suspect:
                sanity_gate(staged)
            if staged.damaged is not None:
                staged.warnings += foreign_sanity.judge(staged.tree, state, staged.damaged)
        except CheckpointFormatError as e:
            raise CheckpointFormatError("; ".join([*staged.suspect, str(e)])) from None
    return Loaded(
        staged=staged, suspect=tuple(staged.suspect), warnings=tuple(staged.warnings), last_resort=staged.tree_damaged
    )


def check_structure(staged: Staged, state: dict[str, Any], required: Iterable[str]) -> None:
    """Keys, shapes and dtypes of module state against the live state, before any vote to apply."""
    for k in required:
        if k not in staged.tree:
            raise CheckpointFormatError(f"missing key {k!r} in the checkpoint (it has {sorted(staged.tree)[:20]})")
    for k, live in state.items():
        if k not in staged.tree:
            staged.warnings.append(f"missing_optional_key: {k!r} not in the checkpoint; it keeps its current value")
            continue
        got = staged.tree[k]
        if isinstance(live, torch.nn.Module):
            _check_module(k, live, got)
        elif isinstance(live, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != live.shape:
                raise CheckpointFormatError(f"{k!r}: checkpoint tensor does not match the live tensor's shape")
        elif isinstance(live, torch.optim.Optimizer) and isinstance(got, dict):
            _check_optimizer(k, live, got)


def _check_module(k: str, live: torch.nn.Module, got: Any) -> None:
    """Same parameter and buffer names as the live module, each tensor of the same shape and dtype."""
    if not isinstance(got, dict):
        raise CheckpointFormatError(f"{k!r}: checkpoint holds a {type(got).__name__}, not a module state")
    want = live.state_dict()
    miss = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if miss or extra:
        raise CheckpointFormatError(f"{k!r}: parameter names differ: missing {miss[:10]}, unexpected {extra[:10]}")
    for n, t in want.items():
        g = got[n]
        if not isinstance(t, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != t.shape or g.dtype != t.dtype:
            gdesc = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise CheckpointFormatError(f"{k!r}.{n}: checkpoint has {gdesc}, model has {tuple(t.shape)} {t.dtype}")


def _check_optimizer(k: str, live: torch.optim.Optimizer, got: dict[str, Any]) -> None:
    """As many param groups as the live optimizer, each as long, with every hyperparameter its class uses."""
    groups = got.get("param_groups")
    if (
        not isinstance(groups, list)
        or len(groups) != len(live.param_groups)
        or any(len(g.get("params", ())) != len(lg["params"]) for g, lg in zip(groups, live.param_groups, strict=True))
    ):
        raise CheckpointFormatError(f"{k!r}: optimizer param groups differ from the live optimizer's")
    for i, (group, lacks) in enumerate(zip(groups, _groups_as_loaded(live, groups), strict=True)):
        if lacks:
            raise CheckpointFormatError(
                f"{k!r}: optimizer param_groups[{i}] lacks {lacks[:10]} that {type(live).__name__} uses "
                f"(it has {sorted(map(str, group))[:12]}): saved by another optimizer class?"
            )


def _groups_as_loaded(live: torch.optim.Optimizer, groups: list[Any]) -> list[list[str]]:
    """Per saved param group, the hyperparameters of the live optimizer's class it would still lack once loaded.

    ``load_state_dict`` keeps the saved groups' hyperparameters, so a group saved by SGD makes
    AdamW's first step raise ``KeyError: 'betas'`` (T05). The class's own ``__setstate__`` runs
    on a blank instance first (a dry probe, no tensors): it fills the keys newer torch versions
    added, so only what a checkpoint of another class lacks is reported.
    """
    probe_groups = [{**g, "params": []} for g in groups]
    try:
        probe = object.__new__(type(live))
        probe.__setstate__({"defaults": dict(live.defaults), "state": {}, "param_groups": probe_groups})
        probe_groups = probe.param_groups
    except (AttributeError, KeyError, TypeError, ValueError):
        log.debug("optimizer probe of %s failed; comparing the saved groups as they are", type(live).__name__)
    return [sorted(str(n) for n in live.defaults if n not in g) for g in probe_groups]


def sanity_gate(staged: Staged) -> None:
    """Before a suspect candidate is applied: finite floats, ``max|x|`` within 10x of the saved value (F03)."""
    for name, t in _iter_tensors(staged.tree, ""):
        tname = staged.names.get(id(t), name)
        if geometry.is_dtensor(t):
            t = t.to_local()  # this rank's shard: judged locally, no collective
        if not t.is_floating_point() or t.numel() == 0:
            continue
        st = staged.stats.get(tname)
        x = t if t.dtype in (torch.float32, torch.float64) else t.float()
        if not bool(torch.isfinite(x).all()):
            if st is not None and not st.finite:
                continue  # it was already non-finite when saved
            raise CheckpointFormatError(f"sanity_gate_failed: tensor {tname} holds NaN/Inf")
        if st is not None and st.max_abs is not None:
            m = float(x.abs().max())
            bound = SANITY_FACTOR * st.max_abs if st.max_abs > 0 else 1e-30
            if m > bound:
                raise CheckpointFormatError(
                    f"sanity_gate_failed: tensor {tname} max|x|={m:.3g} > {SANITY_FACTOR:g}x saved {st.max_abs:.3g}"
                )


def _iter_tensors(v: Any, path: str):
    if isinstance(v, torch.Tensor):
        yield path, v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _iter_tensors(x, f"{path}/{k}")
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _iter_tensors(x, f"{path}/{i}")


def apply(staged: Staged, state: dict[str, Any]) -> None:
    """Make the staged state live (called on every rank only after a unanimous vote)."""
    for k, v in staged.tree.items():
        if k not in state:
            continue
        live = state[k]
        if k in staged.fqn:
            sharding.apply(state, k, staged.fqn[k], v)
        elif isinstance(live, torch.nn.Module) and isinstance(v, dict) and _copy_module_state(live, v):
            continue
        elif hasattr(live, "load_state_dict") and not isinstance(live, torch.Tensor):
            live.load_state_dict(v)
        elif isinstance(live, torch.Tensor) and isinstance(v, torch.Tensor):
            with torch.no_grad():
                live.copy_(v)
        elif isinstance(live, dict) and isinstance(v, dict):
            live.clear()
            live.update(v)
        elif isinstance(live, list) and isinstance(v, list):
            live[:] = v
        else:
            state[k] = v
    if staged.rng is not None:
        statetree.set_rng_state(staged.rng)


def _copy_module_state(live: torch.nn.Module, staged: dict[str, Any]) -> bool:
    """``live.load_state_dict(staged)`` as one ``torch._foreach_copy_``, when nothing in ``live`` customizes loading.

    ``load_state_dict`` copies tensor by tensor in Python (tens of microseconds each: seconds for
    100,000 parameters); this is one call. Declined (False, nothing touched) when any submodule
    overrides ``_load_from_state_dict`` (BatchNorm, quantized modules), has a state-dict or load
    hook, or the names differ: ``load_state_dict`` then runs as before.
    """
    base = torch.nn.Module
    if type(live).load_state_dict is not base.load_state_dict or type(live).state_dict is not base.state_dict:
        return False
    for m in live.modules():
        if type(m)._load_from_state_dict is not base._load_from_state_dict or any(getattr(m, h, None) for h in _HOOKS):
            return False
    dst = live.state_dict(keep_vars=True)
    if dst.keys() != staged.keys():
        return False
    src = [staged[k] for k in dst]
    if not all(isinstance(t, torch.Tensor) for t in src) or not all(isinstance(t, torch.Tensor) for t in dst.values()):
        return False
    with torch.no_grad():
        torch._foreach_copy_(list(dst.values()), src)
    return True


_HOOKS = (
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
)
