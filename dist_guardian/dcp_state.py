"""Map a PyTorch DCP checkpoint's keys onto the live ``state`` with ``get_state_dict``/``set_state_dict`` semantics.

Belongs here: deciding, from a DCP ``.metadata`` and the live objects alone, which saved item
fills which live value, and building the flat target ``dcp.load`` reads into. The semantics are
those of ``torch.distributed.checkpoint.state_dict``: module keys compared by canonical FQN
(``module.`` of DDP and ``_orig_mod.`` of ``torch.compile`` removed on both sides); an optimizer
restored into a FRESH instance (its state targets come from the checkpoint's metadata and the
live parameters, never from the live, empty ``state``), saved keyed by parameter index
(``optim.state_dict()``) or by FQN (``get_state_dict``); param-group and scheduler keys that only
one side has (a StepLR's ``initial_lr``) neither fail the load nor go missing. A sharded live
parameter (``DTensor``) gets a ``DTensor`` target, so DCP reshards into it. Nothing here reads a
data file or touches live state; ``foreign_loading`` runs the load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointFormatError

log = logging.getLogger(__name__)

ALIASES = {
    "module": ("model_state_dict", "state_dict", "model", "module", "net"),
    "optimizer": ("optimizer_state_dict", "optimizer", "optim", "opt"),
    "scheduler": ("scheduler_state_dict", "lr_scheduler", "scheduler", "sched"),
}
_WRAPPER_RE = re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod)\.")
Path = tuple[Any, ...]


def role(v: Any) -> str | None:
    """What a live value is, for the aliases a checkpoint may file it under."""
    if isinstance(v, torch.nn.Module):
        return "module"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    if hasattr(v, "state_dict") and type(v).__module__.startswith("torch.optim.lr_scheduler"):
        return "scheduler"
    return None


def canonical(fqn: str) -> str:
    """A parameter name without DDP's ``module.`` and torch.compile's ``_orig_mod.`` segments."""
    return _WRAPPER_RE.sub("", fqn)


@dataclass
class Mapping:
    """The flat target ``dcp.load`` fills (checkpoint key -> tensor or placeholder) and how to build the tree."""

    target: dict[str, Any] = field(default_factory=dict)
    builders: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)  # state key -> tree value
    missing: list[str] = field(default_factory=list)  # state keys the checkpoint has nothing for
    restored: dict[str, int] = field(default_factory=dict)  # state key -> tensors it fills

    def tree(self) -> dict[str, Any]:
        return {k: build(self.target) for k, build in self.builders.items()}


def paths_of(md: Any) -> dict[str, Path]:
    """Each saved key's path in the saved tree (``planner_data`` of the default planner), by flat key."""
    pd = getattr(md, "planner_data", None)
    keys = getattr(md, "state_dict_metadata", {})
    if isinstance(pd, dict) and all(isinstance(pd.get(k), (tuple, list)) for k in keys):
        return {k: tuple(pd[k]) for k in keys}
    return {k: tuple(k.split(".")) for k in keys}


def map_state(md: Any, state: dict[str, Any]) -> Mapping:
    """Which saved items fill which live value; a value the checkpoint lacks is listed in ``missing``."""
    paths = paths_of(md)
    meta = md.state_dict_metadata
    out = Mapping()
    for k, v in state.items():
        prefix = _prefix(k, v, paths)
        if prefix is None:
            out.missing.append(k)
            continue
        under = {fk: p[len(prefix) :] for fk, p in paths.items() if p[: len(prefix)] == prefix and len(p) > len(prefix)}
        exact = next((fk for fk, p in paths.items() if p == prefix), None)
        r = role(v)
        if r == "module":
            _map_module(k, v, under, meta, out)
        elif r == "optimizer":
            _map_optimizer(k, v, _owner(v, state), under, meta, out)
        elif isinstance(v, torch.Tensor):
            if exact is None:
                out.missing.append(k)
                continue
            out.target[exact] = _tensor_target(exact, meta[exact], v)
            out.builders[k] = _pick(exact)
            out.restored[k] = 1
        else:
            _map_plain(k, v, under, meta, out)
    return out


def _pick(fk: str) -> Callable[[dict[str, Any]], Any]:
    return lambda t: t[fk]


def map_whole(md: Any) -> Mapping:
    """Every saved item, as the nested tree it was saved from (what a ``foreign_loader`` is given)."""
    out = Mapping()
    paths = paths_of(md)
    for fk in paths:
        out.target[fk] = _tensor_target(fk, md.state_dict_metadata[fk], None)
    out.builders[""] = lambda t: _assemble({paths[fk]: t[fk] for fk in paths})
    return out


def _prefix(k: str, v: Any, paths: dict[str, Path]) -> Path | None:
    """Where ``state[k]`` is in the saved tree: its own name or an alias, at the top or under one wrapper."""
    names = (k, f"{k}_state_dict") + ALIASES.get(role(v) or "", ())
    tops = {p[0] for p in paths.values()}
    hit = next((n for n in names if n in tops), None)
    if hit is not None:
        return (hit,)
    # Under one Stateful wrapper (``{"app": AppState(model, optim)}`` of the DCP tutorial): the name one level down.
    for n in names:
        under = {p[0] for p in paths.values() if len(p) > 2 and p[1] == n}
        if len(under) == 1:
            return (under.pop(), n)
    return None


def _tensor_target(fk: str, m: Any, like: torch.Tensor | None, *, check_dtype: bool = True) -> Any:
    """What DCP reads one saved item into: a tensor shaped like the saved one (``like``'s placement if sharded)."""
    size = getattr(m, "size", None)
    if size is None:
        return None  # a bytes item: DCP replaces the placeholder with the unpickled value
    dtype = m.properties.dtype
    if like is not None and tuple(like.shape) == tuple(size):
        if check_dtype and like.dtype != dtype:  # DCP would cast silently: bf16 weights into an fp32 model (T05)
            raise CheckpointFormatError(
                f"dtype_mismatch: tensor {fk!r} is {dtype} {tuple(size)} in the DCP checkpoint, "
                f"{like.dtype} {tuple(like.shape)} in the live state; convert the checkpoint or the model first"
            )
        if type(like).__name__ == "DTensor":  # sharded: DCP reads only this rank's shard, resharding if needed
            return torch.empty_like(like, dtype=dtype)
        return torch.empty(tuple(size), dtype=dtype)
    if like is not None:
        raise CheckpointFormatError(
            f"shape_mismatch: tensor {fk!r} is {dtype} {tuple(size)} in the DCP checkpoint, "
            f"{like.dtype} {tuple(like.shape)} in the live state; convert the checkpoint or the model first"
        )
    return torch.empty(tuple(size), dtype=dtype)


def _map_module(k: str, module: torch.nn.Module, under: dict[str, Path], meta: Any, out: Mapping) -> None:
    saved = {canonical(".".join(map(str, rest))): fk for fk, rest in under.items()}
    live = module.state_dict()
    lack = [n for n in live if canonical(n) not in saved]
    if lack:
        out.missing.append(k)
        log.debug("DCP checkpoint lacks %d keys of %r, e.g. %s", len(lack), k, lack[:5])
        return
    names = {}
    for n, t in live.items():
        fk = saved[canonical(n)]
        names[n] = fk
        out.target[fk] = _tensor_target(fk, meta[fk], t if isinstance(t, torch.Tensor) else None)
    out.builders[k] = lambda tgt: {n: tgt[fk] for n, fk in names.items()}
    out.restored[k] = sum(isinstance(t, torch.Tensor) for t in live.values())


def _owner(optim: torch.optim.Optimizer, state: dict[str, Any]) -> dict[int, str]:
    """FQN of each parameter of ``optim``, from the module in ``state`` that holds them ({} when none does)."""
    ids = {id(p) for g in optim.param_groups for p in g["params"]}
    for v in state.values():
        if isinstance(v, torch.nn.Module):
            fqn = {id(p): canonical(n) for n, p in v.named_parameters(remove_duplicate=False)}
            if ids <= set(fqn):
                return fqn
    return {}


def _map_optimizer(
    k: str, optim: torch.optim.Optimizer, fqn: dict[int, str], under: dict[str, Path], meta: Any, out: Mapping
) -> None:
    """``set_optimizer_state_dict`` semantics: every saved per-parameter tensor, whatever the live state holds."""
    per: dict[str, dict[str, str]] = {}
    groups: dict[int, dict[str, str]] = {}
    for fk, rest in under.items():
        if rest[0] == "state" and len(rest) >= 3:
            per.setdefault(str(rest[1]), {})[".".join(map(str, rest[2:]))] = fk
        elif rest[0] == "param_groups" and len(rest) >= 3 and str(rest[1]).isdigit():
            groups.setdefault(int(rest[1]), {})[".".join(map(str, rest[2:]))] = fk
    live_groups = optim.param_groups
    if len(groups) != len(live_groups):
        raise CheckpointFormatError(
            f"{k!r}: optimizer param groups differ: the DCP checkpoint has {len(groups)}, "
            f"the live optimizer {len(live_groups)}"
        )
    by_fqn = bool(fqn) and any(sid in fqn.values() for sid in per)
    params = [p for g in live_groups for p in g["params"]]
    state_keys: dict[int, dict[str, str]] = {}
    for i, p in enumerate(params):
        sid = fqn.get(id(p), "") if by_fqn else str(i)
        if sid in per:
            state_keys[i] = per.pop(sid)
            for fk in state_keys[i].values():
                m = meta[fk]
                sharded = type(p).__name__ == "DTensor" and tuple(getattr(m, "size", ()) or ()) == tuple(p.shape)
                out.target[fk] = _tensor_target(fk, m, p.detach() if sharded else None, check_dtype=False)
    if per:
        raise CheckpointFormatError(
            f"{k!r}: the DCP checkpoint holds optimizer state for parameters the live optimizer does not have "
            f"({sorted(per)[:5]})"
        )
    for g in groups.values():
        for name, fk in g.items():
            if name != "params":
                out.target[fk] = None

    def build(tgt: dict[str, Any]) -> dict[str, Any]:
        st = {i: {n: tgt[fk] for n, fk in keys.items()} for i, keys in state_keys.items()}
        pgs, start = [], 0
        for gi, live in enumerate(live_groups):
            saved = {n: tgt[fk] for n, fk in groups[gi].items() if n != "params"}
            n = len(live["params"])
            pgs.append(
                {**{a: b for a, b in live.items() if a != "params"}, **saved, "params": list(range(start, start + n))}
            )
            start += n
        return {"state": st, "param_groups": pgs}

    out.builders[k] = build
    out.restored[k] = sum(len(v) for v in state_keys.values())


def _map_plain(k: str, v: Any, under: dict[str, Path], meta: Any, out: Mapping) -> None:
    """A scheduler, any other stateful object, or a plain tree: every saved item under its name; keys only
    the live side has keep their live value (a newer scheduler field, an ``initial_lr``)."""
    live = v.state_dict() if hasattr(v, "state_dict") and hasattr(v, "load_state_dict") else v
    if not under:
        out.missing.append(k)
        return
    for fk, rest in under.items():
        like = _at(live, rest)
        out.target[fk] = _tensor_target(fk, meta[fk], like if isinstance(like, torch.Tensor) else None)

    def build(tgt: dict[str, Any]) -> Any:
        got = _assemble({rest: tgt[fk] for fk, rest in under.items()})
        return {**live, **got} if isinstance(live, dict) and isinstance(got, dict) else got

    out.builders[k] = build
    out.restored[k] = sum(getattr(meta[fk], "size", None) is not None for fk in under)


def _at(tree: Any, path: Path) -> Any:
    for part in path:
        if isinstance(tree, dict):
            tree = tree.get(part, tree.get(str(part)) if not isinstance(part, str) else None)
        elif isinstance(tree, (list, tuple)) and str(part).isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _assemble(items: dict[Path, Any]) -> Any:
    """Nested dicts from (path, value) pairs; a level whose keys are the ints 0..n-1 becomes a list."""
    root: dict[Any, Any] = {}
    for path, value in items.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {a: _lists(b) for a, b in node.items()}
    if node and all(isinstance(a, int) for a in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node
