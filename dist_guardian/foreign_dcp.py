"""Stage PyTorch DCP directories on this rank (``foreign_loading`` re-exports what callers use).

Belongs here: reading a DCP directory without running its code (an allowlisting unpickler for
``.metadata``, a planner that loads every non-tensor item ``weights_only=True``), the checks its
files allow (byte ranges, chunk sizes), and running ``dcp.load`` into the target ``dcp_state``
maps. Native files are ``loading``'s; what a staged load must pass is ``staging``'s.
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

from . import dcp_state, foreign_sanity, formats, stores
from .candidate import Candidate
from .errors import CheckpointFormatError
from .layout import DCP_METADATA  # noqa: F401 (re-exported)
from .staging import Staged
from .stores import Store

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- DCP directories


def load_dcp(
    c: Candidate,
    store: Store,
    state: dict[str, Any],
    *,
    extra_safe_globals: Iterable[Any] = (),
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    required: Iterable[str] = (),
) -> Staged:
    """Stage a PyTorch DCP directory through ``torch.distributed.checkpoint`` (which reshards).

    Keys are mapped with ``set_state_dict`` semantics (``dcp_state``): a fresh optimizer gets every
    saved tensor, either saved layout loads, and extra scheduler or param-group keys fail nothing.
    With ``foreign_loader`` the whole saved tree is loaded and handed to it, as for a torch.save file.
    torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load``, and its
    ``DefaultLoadPlanner`` every non-tensor item with an unrestricted ``torch.load``: a planted
    DCP directory would run code. Here ``.metadata`` goes through :class:`_DCPMetadataUnpickler`
    (:data:`formats.DCP_SAFE_GLOBALS`; every file it names must lie in the directory) and each
    non-tensor item through ``torch.load(weights_only=True)``, both with ``extra_safe_globals``.
    The format has no checksums: the files are checked against the metadata's byte ranges, and
    every floating tensor staged must pass ``foreign_sanity`` (finite, bounded by the live state).
    """
    import torch.distributed.checkpoint as dcp

    if not store.is_local:
        raise CheckpointFormatError(f"{c.path}: DCP directories are loaded from local stores only")
    names, objs = split_safe_globals(extra_safe_globals)
    stores.check_dirs_no_symlink(store.root, f"{c.rel}/{DCP_METADATA}")
    md = read_dcp_metadata(os.path.join(store.join(c.rel), DCP_METADATA), names)  # a clear error first
    check_dcp_files(store.join(c.rel), md, c.path)
    mapping = dcp_state.map_whole(md) if foreign_loader is not None else dcp_state.map_state(md, state)
    planner = _safe_dcp_planner(c.path, names, objs, flatten=False)
    try:
        # Every byte DCP unpickles here is allowlisted: .metadata by the reader (already parsed above),
        # non-tensor items by the planner (sniffed, then weights-only); tensor items are raw bytes.
        dcp.load(mapping.target, storage_reader=_safe_dcp_reader(store.join(c.rel), names, md), planner=planner)
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise
        if planner.refused is not None:  # DCP wraps it with a traceback: the refusal itself is the reason
            raise planner.refused from None
        raise CheckpointFormatError(f"dcp_load_failed: {c.path}: {_first_failure(e)}") from None
    tree = mapping.tree()
    warnings: list[str] = []
    if foreign_loader is not None:
        mapped = foreign_loader(tree[""], state)
        if not isinstance(mapped, dict):
            raise CheckpointFormatError(f"{c.path}: foreign_loader returned {type(mapped).__name__}, not a dict")
        tree = mapped
    else:
        req = set(required)
        lacking = [k for k in mapping.missing if k in req]
        if lacking:
            tops = sorted({str(p[0]) for p in dcp_state.paths_of(md).values()})[:10]
            raise CheckpointFormatError(
                f"dcp_keys_missing: {c.path} has nothing for {lacking} (top-level names {tops}); "
                "pass foreign_loader= to map them"
            )
        warnings = [f"missing_optional_key: {c.path} has no {k!r}; it keeps its current value" for k in mapping.missing]
        log.debug("DCP %s: tensors restored per key %s", c.path, mapping.restored)
    return Staged(tree=tree, rng=None, step=c.step, warnings=warnings, damaged=[foreign_sanity.ALL])


def _first_failure(e: BaseException) -> str:
    """One line for a failed ``dcp.load``: the first rank's error, not DCP's wrapped traceback."""
    failures = getattr(e, "failures", None)
    inner = next(iter(failures.values()), e) if isinstance(failures, dict) and failures else e
    if isinstance(inner, tuple):  # (exception, traceback) in some torch versions
        inner = inner[0]
    text = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {text[:240]}"


def check_dcp_files(root: str, md: Any, where: str) -> None:
    """Every byte range the metadata names lies inside its file, and every tensor's chunks add up to its
    size: a truncated or swapped shard fails here, named, before DCP reads a byte of it."""
    sizes: dict[str, int] = {}
    for idx, info in getattr(md, "storage_data", {}).items():
        rp = info.relative_path
        if rp not in sizes:
            try:
                sizes[rp] = os.lstat(os.path.join(root, rp)).st_size
            except OSError as e:
                raise CheckpointFormatError(f"missing: {where}/{rp}: {e.strerror}") from None
        end = int(info.offset) + int(info.length)
        if end > sizes[rp]:
            raise CheckpointFormatError(
                f"truncated: {where}/{rp} is {sizes[rp]} bytes, the metadata puts {getattr(idx, 'fqn', '?')!r} at "
                f"{info.offset}..{end}"
            )
    for fqn, meta in getattr(md, "state_dict_metadata", {}).items():
        size = getattr(meta, "size", None)
        if size is None:
            continue
        total = 1
        for d in size:
            total *= int(d)
        covered = 0
        for ch in meta.chunks:
            n = 1
            for d in ch.sizes:
                n *= int(d)
            covered += n
        if covered != total:
            raise CheckpointFormatError(
                f"metadata_inconsistent: {where}: tensor {fqn!r} of {total} elements has chunks of {covered}"
            )


def split_safe_globals(extra_safe_globals: Iterable[Any]) -> tuple[list[str], list[Any]]:
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


def _safe_dcp_planner(path: str, names: list[str], safe: list[Any], *, flatten: bool = True) -> Any:
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
                self.original_state_dict[fqn] = obj  # the caller's dict (self.state_dict is a copy)

    return _SafePlanner(flatten_state_dict=flatten)


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


def full_check_dcp(root: str) -> tuple[str, list[str]]:
    """``dist-guardian verify`` of a local DCP directory: the metadata (allowlisted), every byte range inside
    its file, every tensor's chunks adding up. DCP holds no checksums, so L is the best it can be."""
    try:
        md = read_dcp_metadata(os.path.join(root, DCP_METADATA))
        check_dcp_files(root, md, root)
    except CheckpointFormatError as e:
        return "R", [str(e)]
    except OSError as e:
        return "R", [f"unreadable: {root}: {e.strerror or e}"]
    n = len(getattr(md, "state_dict_metadata", {}))
    files = {i.relative_path for i in md.storage_data.values()}
    return "L", [
        f"legacy_unverified: PyTorch DCP directory, {n} items in {len(files)} files, every byte range inside "
        "its file (the format holds no checksums)"
    ]
