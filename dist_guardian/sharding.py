"""Sharded state (FSDP2, tensor parallel: ``DTensor`` parameters) in fully-qualified-name form.

A module whose parameters are ``DTensor``s is captured with
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` and its optimizer with
``get_optimizer_state_dict`` (state keyed by parameter FQN, lazily created Adam state
initialized), and applied with ``set_model_state_dict`` / ``set_optimizer_state_dict``, so a
checkpoint loads into a freshly built model and an optimizer that has not stepped. These calls
act on live objects only: they never see checkpoint bytes, so nothing is unpickled.

Belongs here: which keys of ``state`` are sharded and which optimizer goes with which module,
the capture and the apply, and the layout each live tensor wants on load (:func:`targets`).
The geometry is ``geometry``'s, the bytes ``sharded_io``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import geometry, statetree
from .errors import CheckpointFormatError

log = logging.getLogger(__name__)


def sharded_modules(state: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The module values of ``state`` that hold ``DTensor`` parameters or buffers (FSDP2, TP)."""
    if geometry.dtensor_class() is None:
        return {}
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.nn.Module) and any(geometry.is_dtensor(t) for t in (*v.parameters(), *v.buffers())):
            out[k] = v
    return out


def optimizer_pairs(state: dict[str, Any], modules: dict[str, torch.nn.Module]) -> dict[str, str]:
    """Optimizer key -> the key of the sharded module that owns all of its parameters."""
    owners = {k: {id(p) for p in m.parameters()} for k, m in modules.items()}
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.optim.Optimizer):
            continue
        ids = {id(p) for g in v.param_groups for p in g["params"]}
        owner = next((mk for mk, have in owners.items() if ids and ids <= have), None)
        if owner is not None:
            out[k] = owner
    return out


def fqn_keys(state: dict[str, Any]) -> dict[str, str | None]:
    """Keys applied in FQN form: a sharded module (None) or an optimizer (its module's key)."""
    mods = sharded_modules(state)
    return {**dict.fromkeys(mods), **optimizer_pairs(state, mods)}


def apply_keys(state: dict[str, Any], tree: dict[str, Any]) -> dict[str, str | None]:
    """The keys of a staged sharded checkpoint to apply in FQN form: a sharded live module and its optimizer,
    and any optimizer saved in FQN form (its parameter names are strings) with the module that owns it.

    So an FSDP2 job's checkpoint also loads into a plain model, e.g. one process for evaluation.
    """
    modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
    out: dict[str, str | None] = dict.fromkeys(sharded_modules(state))
    for ok, mk in optimizer_pairs(state, modules).items():
        if mk in out or _fqn_form(tree.get(ok)):
            out[ok] = mk
            out.setdefault(mk, None)
    return out


def _fqn_form(saved: Any) -> bool:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    return isinstance(groups, list) and any(
        isinstance(g, dict) and any(isinstance(p, str) for p in g.get("params", ())) for g in groups
    )


def capture(state: dict[str, Any]) -> dict[str, Any]:
    """The plain tree of ``state`` (as ``statetree.capture``), sharded modules and their optimizers in FQN form."""
    keys = fqn_keys(state)
    if not keys:
        return statetree.capture(state)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    plain = statetree.capture({k: v for k, v in state.items() if k not in keys})
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k not in keys:
            out[k] = plain[k]
            continue
        owner = keys[k]
        out[k] = get_model_state_dict(v) if owner is None else get_optimizer_state_dict(state[owner], v)
    return out


def holds_dtensor(tree: Any) -> bool:
    """Whether a captured tree holds any ``DTensor`` (then it is saved in the sharded layout).

    One walk, the class looked up once and the values judged by their set of types: a recursive
    ``isinstance`` per value cost 0.3 s of every save of a 100,000-tensor state.
    """
    cls = geometry.dtensor_class()
    if cls is None:
        return False
    stack = [tree]
    while stack:
        v = stack.pop()
        if isinstance(v, cls):
            return True
        vals = list(v.values()) if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
        types = set(map(type, vals))  # a state_dict's 100,000 values are of one or two types
        if any(issubclass(t, cls) for t in types):
            return True
        if any(issubclass(t, (dict, list, tuple)) for t in types):
            stack.extend(x for x in vals if isinstance(x, (dict, list, tuple)))
    return False


@dataclass(frozen=True, slots=True)
class Target:
    """How a live tensor is laid out: its mesh, placements and global shape (a ``DTensor``'s)."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: tuple[int, ...]


class Targets:
    """The layout each tensor of a checkpoint takes on this rank, looked up by its name in the state tree.

    A sharded module's tensor takes its live parameter's layout; an optimizer state tensor
    (``<optim>/state/<fqn>/<key>``) takes its parameter's layout when it has the parameter's
    global shape (Adam's moments), and is whole otherwise (a ``step``). Everything else is
    loaded whole. Derived from the parameters, not the optimizer, so nothing live changes.
    """

    def __init__(self, state: dict[str, Any]):
        self.by_name: dict[str, Target] = {}
        self.params: dict[str, dict[str, Target]] = {}  # optimizer key -> fqn -> its parameter's layout
        mods = sharded_modules(state)
        if not mods:
            return
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        live: dict[str, dict[str, Target]] = {}
        for k, m in mods.items():
            live[k] = {
                fqn: Target(t.device_mesh, tuple(t.placements), tuple(t.shape))
                for fqn, t in get_model_state_dict(m).items()
                if geometry.is_dtensor(t)
            }
            self.by_name.update({f"{k}/{fqn}": t for fqn, t in live[k].items()})
        for ok, mk in optimizer_pairs(state, mods).items():
            self.params[ok] = live[mk]

    def get(self, name: str, shape: tuple[int, ...]) -> Target | None:
        t = self.by_name.get(name)
        if t is None:
            key, sep, rest = name.partition("/state/")
            fqn, _, _ = rest.rpartition("/")
            t = self.params.get(key, {}).get(fqn) if sep else None
        if t is not None and t.shape != shape:
            if name in self.by_name:
                raise CheckpointFormatError(f"{name}: checkpoint shape {list(shape)} != live {list(t.shape)}")
            return None
        return t


def wrap(local: torch.Tensor, target: Target) -> Any:
    """A staged local shard as a ``DTensor`` of the live layout (no collective: the geometry is known)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        target.mesh,
        target.placements,
        run_check=False,
        shape=torch.Size(target.shape),
        stride=_stride(target.shape),
    )


def _stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def apply(state: dict[str, Any], key: str, owner: str | None, value: Any) -> None:
    """Make one FQN-form value live: ``set_model_state_dict`` or ``set_optimizer_state_dict`` (strict)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(strict=True)
    if owner is None:
        set_model_state_dict(state[key], value, options=opts)
    elif not _load_by_index(state[owner], state[key], value):
        set_optimizer_state_dict(state[owner], state[key], value, options=opts)


def _load_by_index(model: torch.nn.Module, optim: torch.optim.Optimizer, value: Any) -> bool:
    """``set_optimizer_state_dict``'s mapping (parameter FQN -> this optimizer's index), done directly.

    torch's call first runs a zero-gradient step on a fresh optimizer, to create the state it
    then replaces: for a large model that is a full optimizer step of allocations. When every
    saved name is a parameter name of the module (FSDP2 and TP keep them), the state is loaded
    by index instead, taking the staged tensors as they are. False: torch's call does it.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    index: dict[str, int] = {}
    for g in optim.param_groups:
        for p in g["params"]:
            n = names.get(id(p))
            if n is None or n in index:
                return False
            index[n] = len(index)
    groups = value.get("param_groups") if isinstance(value, dict) else None
    saved = value.get("state") if isinstance(value, dict) else None
    if not isinstance(groups, list) or not isinstance(saved, dict):
        return False
    listed = [n for g in groups for n in g.get("params", ())]
    # torch pairs saved and live parameters by position, so the saved order must be the live one
    if listed != list(index) or not set(saved) <= set(index):
        return False
    optim.load_state_dict(
        {
            "state": {index[n]: v for n, v in saved.items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
        }
    )
    return True
