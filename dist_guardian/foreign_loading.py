"""Stage foreign checkpoints on this rank: bare ``torch.save`` files, Lightning ``.ckpt``, safetensors, DCP.

Belongs here: reading a foreign file without running its code (``weights_only=True`` after our
sniffing), mapping its keys onto the live state (same name, common aliases, Lightning's layout, or
the user's ``foreign_loader``), and naming the tensors whose bytes fail their zip CRC, with a bound
for each from the nearest intact sibling file when the live state has none. PyTorch DCP
directories are ``foreign_dcp``'s (re-exported here); native files are ``loading``'s; what a
staged load must pass is ``staging``'s and ``foreign_sanity``'s.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import dcp_state, foreign_sanity, formats, statetree, stores
from .candidate import Candidate
from .errors import CheckpointFormatError
from .foreign_dcp import (  # noqa: F401 (re-exported: callers and tests say foreign_loading.X)
    DCP_METADATA,
    _safe_dcp_planner,
    _safe_dcp_reader,
    check_dcp_files,
    full_check_dcp,
    load_dcp,
    read_dcp_metadata,
)
from .foreign_dcp import split_safe_globals as _split_safe_globals
from .layout import safetensors_set
from .staging import Staged
from .stores import Store

log = logging.getLogger(__name__)

ALIASES = dcp_state.ALIASES
_role = dcp_state.role


def load_torch_file(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    *,
    extra_safe_globals: Iterable[Any] = (),
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    required: Iterable[str] = (),
) -> Staged:
    """Stage a bare ``torch.save`` file: checks, then ``weights_only=True`` only, then key matching.

    A file whose zip CRCs fail is a suspect: its damaged tensors are named (``Staged.damaged``) and
    judged before any vote, against the live state, or against the nearest intact sibling file
    where the live state has no value to bound them (:func:`_judge_by_neighbour`).
    """
    extra_names, safe = _split_safe_globals(extra_safe_globals)
    obj, rep = _read_torch(store, c.rel, c.path, extra_names, safe)
    suspect = [f"checksum_mismatch: {p}" for p in rep.problems] if rep.crc == "mismatch" else []
    hit = _damaged_tensors(obj, rep.damaged, c.path) if rep.damaged else None
    step = c.step
    if step < 0 and isinstance(obj, dict):
        step = next((obj[k] for k in formats.STEP_KEYS if isinstance(obj.get(k), int)), -1)
    tree, warnings = _map(obj, state, c.path, foreign_loader, required)
    damaged = None
    if hit is not None:
        # Named by their place in the staged tree (the file's names were mapped onto state's).
        damaged = [p for p, t in foreign_sanity.tensors_with_paths(tree) if id(t) in hit]
        suspect = [f"{r} damaged_tensors={(damaged or sorted(hit.values()))[:10]}" for r in suspect]
        lacking = foreign_sanity.unbounded(tree, state, damaged)
        if lacking:
            opts = (extra_names, safe, foreign_loader, required)
            warnings += _judge_by_neighbour(c, store, state, tree, lacking, step, opts)
            damaged = [p for p in damaged if p not in lacking]
    return Staged(tree=tree, rng=None, step=step, suspect=suspect, warnings=warnings, damaged=damaged)


def match_foreign(
    obj: Any,
    state: dict[str, Any],
    *,
    path: str,
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    required: Iterable[str] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Map a foreign object's top-level keys onto ``state``: same name, then common aliases, or the user's function."""
    if foreign_loader is not None:
        mapped = foreign_loader(obj, state)
        if not isinstance(mapped, dict):
            raise CheckpointFormatError(f"{path}: foreign_loader returned {type(mapped).__name__}, not a dict")
        return mapped, []
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a dict of state")
    modules = [k for k, v in state.items() if _role(v) == "module"]
    if len(modules) == 1 and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = {modules[0]: obj}  # a bare model state_dict
    tree: dict[str, Any] = {}
    warnings: list[str] = []
    missing: list[str] = []
    req = set(required)
    for k, v in state.items():
        names = (k, f"{k}_state_dict") + ALIASES.get(_role(v) or "", ())
        hit = next((n for n in names if n in obj), None)
        if hit is not None:
            tree[k] = obj[hit]
        elif k in req:
            missing.append(k)
        else:
            warnings.append(f"missing_optional_key: {path} has no {k!r}; it keeps its current value")
    if missing:
        raise CheckpointFormatError(
            f"{path}: keys do not match: missing {missing} (file has {sorted(map(str, obj))[:20]}); "
            "pass foreign_loader= to map them"
        )
    return tree, warnings


def read_torch_object(
    c: Candidate, store: Store, *, extra_safe_globals: Iterable[Any] = (), data: bytes | None = None
) -> Any:
    """A foreign ``torch.save`` file's object, for a lower-layer ``load_fn`` (the framework adapters use it).

    The same path as a resume: its pickle's globals judged against the allowlist and every zip
    CRC checked before ``torch.load(weights_only=True)``. A CRC mismatch raises: no sanity gate
    judges the damaged tensors on this path. ``data``: the file's bytes when the caller read them already.
    """
    names, safe = _split_safe_globals(extra_safe_globals)
    obj, rep = _read_torch(store, c.rel, c.path, names, safe, data)
    if rep.crc == "mismatch":
        raise CheckpointFormatError("checksum_mismatch: " + "; ".join(rep.problems))
    return obj


def _read_torch(
    store: Store, rel: str, path: str, extra_names: list[str], safe: list[Any], data: bytes | None = None
) -> tuple[Any, Any]:
    """A torch.save file's object and sniff report: every CRC checked, globals judged, then weights-only."""
    if data is None:
        data = stores.read_whole(store, rel)
    if not data:
        raise CheckpointFormatError(f"{path}: empty file")
    # Every CRC: the whole file is in memory anyway; planning checked only up to its budget.
    rep = formats.sniff_torch_file(io.BytesIO(data), len(data), path, extra_names, planning=False)
    if rep.unsafe_globals:
        log.warning("security_event: %s needs unsafe_globals=%s; never loaded", path, list(rep.unsafe_globals))
        raise CheckpointFormatError(f"{path}: unsafe_globals={list(rep.unsafe_globals)}; loading it would run code")
    if not rep.ok:
        raise CheckpointFormatError("; ".join(rep.problems))
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        why = str(e).splitlines()[0][:300]
        raise CheckpointFormatError(f"{path}: torch.load(weights_only=True) refused it: {why}") from e
    return obj, rep


def _map(
    obj: Any, state: dict[str, Any], path: str, foreign_loader: Any, required: Iterable[str]
) -> tuple[dict[str, Any], list[str]]:
    if isinstance(obj, dict) and _is_lightning(obj):
        obj = _lightning_view(obj, state)
    return match_foreign(obj, state, path=path, foreign_loader=foreign_loader, required=required)


# Sibling files sniffed at most when looking for an intact neighbour (each costs a full read).
MAX_NEIGHBOURS = 4


def _judge_by_neighbour(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    tree: dict[str, Any],
    paths: list[str],
    step: int,
    opts: tuple[Any, ...],
) -> list[str]:
    """Judge damaged tensors the live state cannot bound against the same tensors in the nearest intact sibling.

    The sibling is the next candidate a resume would try in the same directory: the newest
    torch.save file of an older step whose every CRC matches. Raises (naming the neighbour)
    when a tensor is over its bound, or when no intact sibling holds it.
    """
    extra_names, safe, foreign_loader, required = opts
    parent, _, own = c.rel.rpartition("/")
    try:
        entries = stores.list_tree(store, parent, max_depth=1)
    except OSError:
        entries = []
    older = []
    for e in entries:
        if e.kind != "file" or e.rel == own or not e.rel.lower().endswith(formats.TORCH_SUFFIXES):
            continue
        name_step = formats.step_from_name(e.rel)
        if name_step is None or step < 0 or name_step < step:
            older.append((-(name_step if name_step is not None else -1), e.rel))
    for _, name in sorted(older)[:MAX_NEIGHBOURS]:  # newest older step first, nameless ones last
        rel = f"{parent}/{name}" if parent else name
        try:
            obj, rep = _read_torch(store, rel, store.uri(rel), extra_names, safe)
            if rep.crc != "ok":
                continue
            ref, _ = _map(obj, state, store.uri(rel), foreign_loader, required)
        except CheckpointFormatError:
            continue
        return foreign_sanity.judge_against(tree, ref, paths, f"the intact neighbour {store.uri(rel)}")
    return foreign_sanity.judge_against(tree, statetree.capture(state), paths, "the live state")


def load_safetensors(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    *,
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    required: Iterable[str] = (),
) -> Staged:
    """Stage a bare safetensors file or a sharded set: each header checked against its file, tensors merged
    and mapped as a model state."""
    from .statetree import tensors_from_buffer

    head, _, name = c.rel.rpartition("/")
    obj: dict[str, Any] = {}
    for shard in safetensors_set(name) or [name]:
        rel = f"{head}/{shard}" if head else shard
        data = stores.read_whole(store, rel)
        header = formats.parse_header(io.BytesIO(data), len(data), name=store.uri(rel))
        buf = torch.frombuffer(bytearray(data[header.data_start :]), dtype=torch.uint8) if header.payload_size else None
        obj.update(tensors_from_buffer(header.entries, buf if buf is not None else torch.empty(0, dtype=torch.uint8)))
    tree, warnings = match_foreign(obj, state, path=c.path, foreign_loader=foreign_loader, required=required)
    return Staged(tree=tree, rng=None, step=c.step, warnings=warnings)


# ----------------------------------------------------------------------------- Lightning and damage


def _is_lightning(obj: dict[str, Any]) -> bool:
    return "state_dict" in obj and ("pytorch-lightning_version" in obj or "optimizer_states" in obj)


def _lightning_view(obj: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A Lightning ``.ckpt`` as ``state`` names things: the model from ``state_dict`` (its attribute
    prefix, ``net.``, dropped when the live model is the inner module), the optimizers from
    ``optimizer_states`` and the schedulers from ``lr_schedulers``, each in order."""
    view: dict[str, Any] = {}
    optims = list(obj.get("optimizer_states") or [])
    scheds = list(obj.get("lr_schedulers") or [])
    for k, v in state.items():
        r = _role(v)
        if r == "module":
            view[k] = _strip_prefix(obj["state_dict"], v.state_dict())
        elif r == "optimizer" and optims:
            view[k] = optims.pop(0)
        elif r == "scheduler" and scheds:
            view[k] = scheds.pop(0)
    for key in ("global_step", "epoch"):
        if isinstance(obj.get(key), int):
            view[key] = obj[key]
    return view


def _strip_prefix(saved: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the one leading attribute path removed that makes its names the live module's, if any."""
    if set(saved) == set(live) or not saved:
        return saved
    first = next(iter(live), "")
    for name in saved:
        if name.endswith("." + first):
            pre = name[: -len(first)]
            cut = {n[len(pre) :]: t for n, t in saved.items() if n.startswith(pre)}
            if set(cut) == set(live):
                return cut
    return saved


def _damaged_tensors(obj: Any, damaged: dict[str, tuple[int, int]], path: str) -> dict[int, str]:
    """The loaded tensors (by id, with their path in the file) whose storage holds a member that failed its CRC.

    A storage's bytes are the member's bytes (``map_location="cpu"``), so equal size and CRC32 name it.
    Damage outside tensor storages (``data.pkl`` that still unpickled: an ``lr``, a step) cannot be
    judged by any bound: the candidate fails.
    """
    storages = {n: v for n, v in damaged.items() if "/data/" in n}
    if len(storages) != len(damaged):
        other = sorted(set(damaged) - set(storages))
        raise CheckpointFormatError(f"tree_damaged: {path}: zip CRC mismatch outside tensor data ({other[:3]})")
    want = set(storages.values())
    sizes = {size for size, _ in want}
    out: dict[int, str] = {}
    crc_of: dict[int, int] = {}
    for p, t in foreign_sanity.tensors_with_paths(obj):
        st = t.untyped_storage()
        if st.nbytes() not in sizes:
            continue
        key = st.data_ptr()
        if key not in crc_of:
            crc_of[key] = zlib.crc32(torch.empty(0, dtype=torch.uint8).set_(st).numpy().tobytes())
        if (st.nbytes(), crc_of[key]) in want:
            out[id(t)] = p
    if not out:
        raise CheckpointFormatError(
            f"tree_damaged: {path}: no loaded tensor holds the damaged bytes of {sorted(storages)[:3]}"
        )
    return out
