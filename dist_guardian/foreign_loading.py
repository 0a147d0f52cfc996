"""Stage foreign checkpoints on this rank: bare ``torch.save`` files and PyTorch DCP directories.

Belongs here: reading a foreign file or directory without running its code (an allowlisting
unpickler for DCP ``.metadata``, ``weights_only=True`` for every ``torch.load``) and mapping
its keys onto the live state. Native files are ``loading``'s; what a staged load must pass
is ``staging``'s.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import formats, statetree, stores
from .candidate import Candidate
from .errors import CheckpointFormatError
from .layout import DCP_METADATA  # noqa: F401 (re-exported)
from .staging import Staged
from .stores import Store

log = logging.getLogger(__name__)

ALIASES = {
    "module": ("model_state_dict", "state_dict", "model", "module", "net"),
    "optimizer": ("optimizer_state_dict", "optimizer", "optim", "opt"),
    "scheduler": ("scheduler_state_dict", "lr_scheduler", "scheduler", "sched"),
}


def _role(v: Any) -> str | None:
    if isinstance(v, torch.nn.Module):
        return "module"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    if hasattr(v, "state_dict") and type(v).__module__.startswith("torch.optim.lr_scheduler"):
        return "scheduler"
    return None


def load_torch_file(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    *,
    extra_safe_globals: Iterable[Any] = (),
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    required: Iterable[str] = (),
) -> Staged:
    """Stage a bare ``torch.save`` file: checks, then ``weights_only=True`` only, then key matching."""
    extra_names, safe = _split_safe_globals(extra_safe_globals)
    data = stores.read_whole(store, c.rel)
    if not data:
        raise CheckpointFormatError(f"{c.path}: empty file")
    # Every CRC: the whole file is in memory anyway; planning checked only up to its budget.
    rep = formats.sniff_torch_file(io.BytesIO(data), len(data), c.path, extra_names, planning=False)
    if rep.unsafe_globals:
        log.warning("security_event: %s needs unsafe_globals=%s; never loaded", c.path, list(rep.unsafe_globals))
        raise CheckpointFormatError(f"{c.path}: unsafe_globals={list(rep.unsafe_globals)}; loading it would run code")
    if not rep.ok:
        raise CheckpointFormatError("; ".join(rep.problems))
    suspect = [f"checksum_mismatch: {p}" for p in rep.problems] if rep.crc == "mismatch" else []
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        why = str(e).splitlines()[0][:300]
        raise CheckpointFormatError(f"{c.path}: torch.load(weights_only=True) refused it: {why}") from e
    tree, warnings = match_foreign(obj, state, path=c.path, foreign_loader=foreign_loader, required=required)
    step = c.step
    if step < 0 and isinstance(obj, dict):
        for k in ("step", "global_step"):
            if isinstance(obj.get(k), int):
                step = obj[k]
                break
    return Staged(tree=tree, rng=None, step=step, suspect=suspect, warnings=warnings)


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


# ----------------------------------------------------------------------------- DCP directories


def load_dcp(c: Candidate, store: Store, state: dict[str, Any], *, extra_safe_globals: Iterable[Any] = ()) -> Staged:
    """Stage a PyTorch DCP directory through ``torch.distributed.checkpoint`` (which reshards).

    torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load``, and its
    ``DefaultLoadPlanner`` every non-tensor item with an unrestricted ``torch.load``: a planted
    DCP directory would run code. Here ``.metadata`` goes through :class:`_DCPMetadataUnpickler`
    (:data:`formats.DCP_SAFE_GLOBALS`; every file it names must lie in the directory) and each
    non-tensor item through ``torch.load(weights_only=True)``, both with ``extra_safe_globals``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not store.is_local:
        raise CheckpointFormatError(f"{c.path}: DCP directories are loaded from local stores only")
    names, objs = _split_safe_globals(extra_safe_globals)
    stores.check_dirs_no_symlink(store.root, f"{c.rel}/{DCP_METADATA}")
    md = read_dcp_metadata(os.path.join(store.join(c.rel), DCP_METADATA), names)  # a clear error first
    captured = statetree.capture(state)
    _check_dcp_tensors(md, captured)
    target = _empty_like_tree(captured)
    planner = _safe_dcp_planner(c.path, names, objs)
    try:
        # Every byte DCP unpickles here is allowlisted: .metadata by the reader (already parsed above),
        # non-tensor items by the planner (sniffed, then weights-only); tensor items are raw bytes.
        dcp.load(target, storage_reader=_safe_dcp_reader(store.join(c.rel), names, md), planner=planner)
    except CheckpointException:
        if planner.refused is not None:  # DCP wraps it with a traceback: the refusal itself is the reason
            raise planner.refused from None
        raise
    return Staged(tree=target, rng=None, step=c.step)


def _split_safe_globals(extra_safe_globals: Iterable[Any]) -> tuple[list[str], list[Any]]:
    """The caller's extra safe globals as qualnames (for our allowlists) and as objects (for ``torch.load``)."""
    extra = list(extra_safe_globals)
    names = [g if isinstance(g, str) else f"{g.__module__}.{g.__qualname__}" for g in extra]
    return names, [g for g in extra if not isinstance(g, str)]


class _DCPMetadataUnpickler(pickle._Unpickler):
    """Resolves only allowlisted globals; anything else (``posix.system``...) is refused before it is imported.

    The pure-Python unpickler, because its ``BUILD`` can be overridden (the C one's cannot): state
    is set only on instances of allowlisted classes, never on a class (``setattr(PosixPath, ...)``) or
    an enum member (both shared by the whole process), and never under a ``__`` key (``__class__``...).
    """

    def __init__(self, f: Any, extra: frozenset[str]):
        super().__init__(f)
        self._extra = extra

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        if not formats.is_safe_global(qual, self._extra, dcp=True):
            raise pickle.UnpicklingError(f"unsafe_global {qual}")
        return super().find_class(module, name)

    def _load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]  # type: ignore[attr-defined]
        if isinstance(inst, type):
            raise pickle.UnpicklingError(
                f"state_on_class: BUILD would set attributes of the class {inst.__module__}.{inst.__qualname__}"
            )
        qual = f"{type(inst).__module__}.{type(inst).__qualname__}"
        if isinstance(inst, enum.Enum):  # a member is one shared object: BUILD would change it for the process
            raise pickle.UnpicklingError(f"state_on_enum_member: BUILD would set attributes of {qual}.{inst.name}")
        if not formats.is_safe_global(qual, self._extra, dcp=True):
            raise pickle.UnpicklingError(f"unsafe_build: BUILD of a {qual[:100]} instance")
        for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
            bad = [k for k in part if not isinstance(k, str) or k.startswith("__")] if isinstance(part, dict) else []
            if bad:
                raise pickle.UnpicklingError(f"unsafe_build_key: BUILD of a {qual} sets {str(bad[0])[:100]!r}")
        super().load_build()  # type: ignore[misc]

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}  # type: ignore[dict-item]


def read_dcp_metadata(path: str, extra_safe_globals: Iterable[str] = ()) -> Any:
    """A DCP ``.metadata`` file, unpickled with the allowlist; every file it names must be a plain name."""
    fd = stores.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(formats.MAX_PICKLE_BYTES + 1)
    if len(raw) > formats.MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{path}: DCP metadata larger than {formats.MAX_PICKLE_BYTES} bytes; not read")
    try:
        md = _DCPMetadataUnpickler(io.BytesIO(raw), frozenset(extra_safe_globals)).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        RecursionError,
    ) as e:
        if isinstance(e, pickle.UnpicklingError):
            log.warning("security_event: %s: DCP metadata refused: %s", path, e)
        raise CheckpointFormatError(f"{path}: DCP metadata refused: {type(e).__name__}: {str(e)[:200]}") from None
    data = getattr(md, "storage_data", None)
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: DCP metadata without a storage_data mapping")
    for info in data.values():
        rp = getattr(info, "relative_path", None)
        if not isinstance(rp, str) or not rp or rp in (".", "..") or "/" in rp or "\\" in rp or "\x00" in rp:
            raise CheckpointFormatError(f"{path}: DCP metadata names a file outside its directory: {str(rp)[:100]!r}")
    return md


def _safe_dcp_planner(path: str, names: list[str], safe: list[Any]) -> Any:
    """A ``DefaultLoadPlanner`` whose non-tensor items are checked as a ``torch.save`` file and loaded weights-only.

    DCP writes each non-tensor value with ``torch.save(obj, BytesIO)``; torch's planner reads it
    back with weights-only off, which runs any pickle planted in a ``.distcp`` file. Here its
    globals are checked first (nothing unpickled), then ``torch.load(weights_only=True)`` decides.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class _SafePlanner(DefaultLoadPlanner):
        refused: CheckpointFormatError | None = None

        def _refuse(self, why: str) -> CheckpointFormatError:
            self.refused = CheckpointFormatError(why)
            return self.refused

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            where = f"{path}: DCP item {fqn!r}"
            rep = formats.sniff_torch_file(value, len(value.getbuffer()), where, names)
            if rep.unsafe_globals:
                log.warning("security_event: %s needs unsafe_globals=%s; never loaded", where, list(rep.unsafe_globals))
                raise self._refuse(f"{where}: unsafe_globals={list(rep.unsafe_globals)}; loading it would run code")
            if not rep.ok or rep.crc == "mismatch":
                raise self._refuse("; ".join(rep.problems))
            value.seek(0)
            try:
                with torch.serialization.safe_globals(safe):
                    obj = torch.load(value, weights_only=True, map_location="cpu")
            except Exception as e:
                why = (str(e).splitlines() or [type(e).__name__])[0][:300]
                raise self._refuse(f"{where}: torch.load(weights_only=True) refused it: {why}") from e
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _SafePlanner()


def _safe_dcp_reader(path: str, extra_safe_globals: Iterable[str], metadata: Any = None) -> Any:
    """torch's ``FileSystemReader`` with every ``.metadata`` unpickled through :func:`read_dcp_metadata`.

    ``metadata`` is the directory's ``.metadata`` when the caller has read it already: the
    allowlisting unpickler is pure Python (about 3x the C one), so it is not run twice.
    """
    from torch.distributed.checkpoint import FileSystemReader

    extra = tuple(extra_safe_globals)

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
            md = (
                metadata
                if rank is None and metadata is not None
                else read_dcp_metadata(os.path.join(path, name), extra)
            )
            if hasattr(md, "storage_meta"):
                from torch.distributed.checkpoint.metadata import StorageMeta

                if md.storage_meta is None:
                    md.storage_meta = StorageMeta()
                if hasattr(self, "load_id"):
                    md.storage_meta.load_id = self.load_id
            return md

    return _SafeReader(path)


def _check_dcp_tensors(md: Any, captured: dict[str, Any]) -> None:
    """Each saved tensor's dtype and shape against the live one it would load into, before ``dcp.load``.

    DCP loads into tensors shaped like the live state and casts silently: bf16 weights would
    become an fp32 model's weights without a word (T05). Keys are DCP's flattened names.
    """
    live = dict(_flat_tensors(captured, ()))
    for fqn, meta in getattr(md, "state_dict_metadata", {}).items():
        t, props = live.get(fqn), getattr(meta, "properties", None)
        if t is None or props is None:
            continue
        saved_shape = tuple(getattr(meta, "size", ()))
        if props.dtype != t.dtype or saved_shape != tuple(t.shape):
            what = "dtype_mismatch" if props.dtype != t.dtype else "shape_mismatch"
            raise CheckpointFormatError(
                f"{what}: tensor {fqn!r} is {props.dtype} {saved_shape} in the DCP checkpoint, "
                f"{t.dtype} {tuple(t.shape)} in the live state; convert the checkpoint or the model first"
            )


def _flat_tensors(v: Any, path: tuple[str, ...]):
    if isinstance(v, torch.Tensor):
        yield ".".join(path), v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _flat_tensors(x, path + (str(k),))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _flat_tensors(x, path + (str(i),))


def _empty_like_tree(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, device="cpu")
    if isinstance(v, dict):
        return {k: _empty_like_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_empty_like_tree(x) for x in v]
    return v
