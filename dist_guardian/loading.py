"""Load one candidate into staging on this rank: native files, torch.save files, DCP directories.

Staging is fresh memory that nothing live points to, so a failed attempt is dropped without
touching the model (F29). Native files are read with large ``readinto`` calls into one
preallocated buffer per file, tensors are zero-copy views into it, and checksums are
computed from that buffer: each byte is read once and hashed once. Foreign ``torch.save``
files are loaded with ``weights_only=True`` only, never falling back to unsafe loading.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import xxhash

from . import _faults, formats, manifest, statetree, stores
from .candidate import Candidate
from .errors import CheckpointFormatError
from .manifest import Manifest
from .stores import Store

log = logging.getLogger(__name__)

SANITY_FACTOR = 10.0


@dataclass
class Staged:
    """What one rank loaded: the decoded trees, and what verification found on the way."""

    tree: dict[str, Any]  # top-level key -> value (state_dict trees, tensors, plain values)
    rng: dict[str, Any] | None
    step: int
    suspect: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, manifest.TensorStat] = field(default_factory=dict)  # tensor name -> saved stats
    names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> name, to name a damaged tensor
    # Damage outside the tensors (state tree, tensor index): the sanity gate cannot judge it (T10).
    tree_damaged: bool = False


# ----------------------------------------------------------------------------- native


def staging_buffer(nbytes: int) -> torch.Tensor:
    """A fresh buffer for one file's payload: pinned when CUDA is present, so applying it to
    device parameters is a DMA copy (set DIST_GUARDIAN_PIN_MEMORY=0 to turn that off)."""
    pin = torch.cuda.is_available() and os.environ.get("DIST_GUARDIAN_PIN_MEMORY", "1") != "0"
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def read_manifest(c: Candidate, store: Store) -> Manifest:
    data = stores.read_small(store, f"{c.rel}/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
    from .manifest import digest_bytes

    if c.manifest_digest and digest_bytes(data) != c.manifest_digest:
        raise CheckpointFormatError(f"{c.path}: manifest.json changed since the plan was made")
    return manifest.parse(data)


def read_native_file(store: Store, rel: str, expected_size: int, *, concurrency: int | None = None,
                     transfer: stores.Transfer | None = None) -> tuple[formats.NativeHeader, torch.Tensor, str, dict[str, str]]:
    """One native file into a fresh uint8 buffer, with its file and per-tensor digests.

    Local: secure open, parallel ``pread`` into the buffer with hashing overlapped. Remote:
    straight into the buffer, hashed as bytes arrive (:func:`_read_native_remote`).
    """
    if store.is_local:
        stores.check_dirs_no_symlink(store.root, rel)
        fd = stores.open_regular(store.join(rel))
        try:
            size = os.fstat(fd).st_size
            if expected_size and size != expected_size:
                raise CheckpointFormatError(f"{store.uri(rel)}: size_mismatch expected={expected_size} got={size}")
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                header = formats.parse_header(f, size, name=store.uri(rel))
            buf = staging_buffer(header.payload_size)
            digest, per = formats.read_and_hash(fd, header, memoryview(buf.numpy()), name=store.uri(rel))
        finally:
            os.close(fd)
        return header, buf, digest, per
    return _read_native_remote(store, rel, expected_size, concurrency=concurrency, transfer=transfer)


class _StreamDigests:
    """Per-tensor xxh3-128 digests computed while a payload arrives (DESIGN 4, step 6).

    The downloader reports each piece that landed (``ready(lo, hi)``, any order, any
    thread); a hasher thread follows the contiguous filled prefix, so hashing overlaps the
    network and each byte is hashed once, while it is still hot in cache.
    """

    def __init__(self, header: formats.NativeHeader, mv: memoryview):
        self.entries = header.entries
        self.header_bytes = header.header_bytes
        self.mv = mv
        self.prefix = 0
        self.pending: dict[int, int] = {}
        self.cv = threading.Condition()
        self.stopped = False
        self.raw: list[bytes] = []
        self.per: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, name="dist_guardian-hash", daemon=True)
        self.thread.start()

    def ready(self, lo: int, hi: int) -> None:
        with self.cv:
            self.pending[lo] = hi
            moved = False
            while self.prefix in self.pending:
                self.prefix = self.pending.pop(self.prefix)
                moved = True
            if moved:
                self.cv.notify()

    def _run(self) -> None:
        pos = 0
        for t in self.entries:
            h = xxhash.xxh3_128()
            while pos < t.end:
                with self.cv:
                    while self.prefix <= pos and not self.stopped:
                        self.cv.wait()
                    if self.stopped and self.prefix <= pos:
                        return
                    upto = min(self.prefix, t.end)
                h.update(self.mv[pos:upto])
                pos = upto
            self.raw.append(h.digest())
            self.per[t.name] = h.hexdigest()

    def finish(self) -> tuple[str, dict[str, str]]:
        self.thread.join()
        if len(self.raw) != len(self.entries):
            raise CheckpointFormatError("payload incomplete: not every tensor was hashed")
        return formats.tree_digest(self.header_bytes, self.raw), self.per

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching their contents


def _prefault(buf: torch.Tensor) -> threading.Thread | None:
    """Fault a fresh staging buffer's pages in from another thread, ahead of the download.

    Writing into fresh memory pays a page fault per 4 KiB, inside the thread that copies
    network bytes (holding the GIL); done ahead, on the other core, the copy runs at memory
    speed (measured: one moto GET stream into a fresh buffer 0.42 -> 0.70 GB/s). Contents
    are never written, so racing the download is harmless. A no-op where madvise cannot.
    """
    n = buf.numel() * buf.element_size()
    if n < (8 << 20) or not hasattr(os, "sysconf"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    start = (buf.data_ptr() + page - 1) // page * page
    end = (buf.data_ptr() + n) // page * page

    def run() -> None:
        step = 16 << 20
        for a in range(start, end, step):
            if madvise(a, min(step, end - a), _MADV_POPULATE_WRITE) != 0:
                return  # unsupported here: the copy faults them in as before

    t = threading.Thread(target=run, name="dist_guardian-prefault", daemon=True)
    t.start()
    return t


def _read_native_remote(store: Store, rel: str, expected_size: int, *, concurrency: int | None,
                        transfer: stores.Transfer | None) -> tuple[formats.NativeHeader, torch.Tensor, str, dict[str, str]]:
    """A remote native file straight into a fresh buffer, hashed as bytes arrive.

    One connection (a server that copies the object for every GET, like moto): a single
    GET of the whole file; the header is parsed from the head of the stream and the payload
    streams on into the buffer. Several (real S3): a small ranged read for the header, then
    parallel ranged reads of the payload. ``stores.read_concurrency`` decides.
    """
    size = expected_size or stores.remote_size(store, rel)
    name = store.uri(rel)
    conc = stores.read_concurrency(store, concurrency)
    if conc <= 1:
        with stores.RemoteReader(store, rel, size, transfer=transfer) as r:
            header = formats.parse_header(r, size, name=name)
            buf = staging_buffer(header.payload_size)
            _prefault(buf)
            mv = memoryview(buf.numpy())
            hasher = _StreamDigests(header, mv)
            try:
                if header.payload_size:
                    r.readinto(mv, on_chunk=hasher.ready)
            except BaseException:
                hasher.stop()
                raise
        digest, per = hasher.finish()
        return header, buf, digest, per
    head_len = min(size, 1 << 20)
    head = bytearray(head_len)
    stores.read_range_into(store, rel, 0, memoryview(head), concurrency=1)
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if 8 + n > head_len and 8 + n <= min(size, formats.MAX_HEADER_BYTES + 8):
        head = bytearray(8 + n)
        stores.read_range_into(store, rel, 0, memoryview(head), concurrency=conc)
    header = formats.parse_header(io.BytesIO(bytes(head)), size, name=name)
    buf = staging_buffer(header.payload_size)
    _prefault(buf)
    mv = memoryview(buf.numpy())
    hasher = _StreamDigests(header, mv)
    try:
        if header.payload_size:
            stores.read_range_into(store, rel, header.data_start, mv, concurrency=conc, on_chunk=hasher.ready,
                                   transfer=transfer)
    except BaseException:
        hasher.stop()
        raise
    digest, per = hasher.finish()
    return header, buf, digest, per


def load_native(c: Candidate, store: Store, *, rank: int, world_size: int, concurrency: int | None = None,
                progress: bool | None = False) -> Staged:
    """Stage a native checkpoint on this rank: the replicated file and this rank's per-rank file.

    ``progress``: a progress line on stderr for a remote load that lasts over a second
    (``None``: only on a TTY; the caller passes ``False`` on every rank but 0).
    """
    mf = read_manifest(c, store) if c.tier != "L" else None
    wanted = c.files_for_rank(rank, world_size)
    transfer = None
    if not store.is_local:
        transfer = stores.Transfer(sum(f.size for f in wanted), f"load step {c.step} from {store.url}", show=progress)
    tree: dict[str, Any] = {}
    rng = None
    suspect: list[str] = []
    warnings: list[str] = []
    stats: dict[str, manifest.TensorStat] = {}
    names: dict[int, str] = {}
    tree_damaged = False
    saved_ws = c.world_size or world_size
    for f in wanted:
        rel = f"{c.rel}/{f.name}"
        header, buf, digest, per = read_native_file(store, rel, f.size, concurrency=concurrency, transfer=transfer)
        if _faults.hit("load_file", rank=rank, step=c.step) == "corrupt" and buf.numel():
            buf[buf.numel() // 2] ^= 0x10
            digest, per = formats.payload_digests(header, memoryview(buf.numpy()))
        if f.digest and digest != f.digest:
            expected = mf.tensors.get(f.name, {}) if mf else {}
            damaged = [t for t, d in per.items() if t in expected and expected[t].digest != d]
            suspect.append(
                f"checksum_mismatch: {store.uri(rel)}"
                + (f" damaged_tensors={damaged[:10]}" if damaged else "")
                + f" expected={f.digest} got={digest}"
            )
            known = {t: st.digest for t, st in mf.tensors[f.name].items()} if mf and f.name in mf.tensors else None
            why = formats.header_damage(header, per, known, mf.trees.get(f.name) if mf else None)
            if why:
                tree_damaged = True
                suspect.append(f"tree_damaged: {store.uri(rel)}: {why}")
        if mf:
            stats.update(mf.tensors.get(f.name, {}))
        tensors = statetree.tensors_from_buffer(header.entries, buf)
        names.update({id(t): n for n, t in tensors.items()})
        try:
            sub = statetree.decode(header.tree, tensors)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointFormatError(f"{store.uri(rel)}: state tree unreadable ({e})") from e
        if not isinstance(sub, dict):
            raise CheckpointFormatError(f"{store.uri(rel)}: state tree is not a mapping")
        if f.rank is not None and statetree.RNG_KEY in sub:
            rng = sub.pop(statetree.RNG_KEY)
            if saved_ws != world_size:
                if rank >= saved_ws:
                    rng = statetree.reseed_rng(rng, rank)
                warnings.append(f"world_size_changed from={saved_ws} to={world_size}: rank {rank} took per-rank state of rank {f.rank}"
                                + (" with a re-derived RNG" if rank >= saved_ws else ""))
        tree.update(sub)
    if transfer is not None:
        transfer.close()
    return Staged(tree=tree, rng=rng, step=c.step, suspect=suspect, warnings=warnings, stats=stats, names=names,
                  tree_damaged=tree_damaged)


# ----------------------------------------------------------------------------- torch.save files

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


def load_torch_file(c: Candidate, store: Store, state: dict[str, Any], *, extra_safe_globals: Iterable[Any] = (),
                    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
                    required: Iterable[str] = ()) -> Staged:
    """Stage a bare ``torch.save`` file: checks, then ``weights_only=True`` only, then key matching."""
    extra_names, safe = _split_safe_globals(extra_safe_globals)
    if store.is_local:
        stores.check_dirs_no_symlink(store.root, c.rel)
        fd = stores.open_regular(store.join(c.rel))
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    else:
        size = stores.remote_size(store, c.rel)
        buf = bytearray(size)
        stores.read_range_into(store, c.rel, 0, memoryview(buf))
        data = bytes(buf)
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
        raise CheckpointFormatError(f"{c.path}: torch.load(weights_only=True) refused it: {str(e).splitlines()[0][:300]}") from e
    tree, warnings = match_foreign(obj, state, path=c.path, foreign_loader=foreign_loader, required=required)
    step = c.step
    if step < 0 and isinstance(obj, dict):
        for k in ("step", "global_step"):
            if isinstance(obj.get(k), int):
                step = obj[k]
                break
    return Staged(tree=tree, rng=None, step=step, suspect=suspect, warnings=warnings)


def match_foreign(obj: Any, state: dict[str, Any], *, path: str, foreign_loader=None, required: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """Map a foreign object's top-level keys onto ``state``: same name, then common aliases, or the user's function."""
    if foreign_loader is not None:
        tree = foreign_loader(obj, state)
        if not isinstance(tree, dict):
            raise CheckpointFormatError(f"{path}: foreign_loader returned {type(tree).__name__}, not a dict")
        return tree, []
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
            "pass foreign_loader= to map them")
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
    stores.check_dirs_no_symlink(store.root, f"{c.rel}/{_DCP_METADATA}")
    md = read_dcp_metadata(os.path.join(store.join(c.rel), _DCP_METADATA), names)  # a clear error first
    captured = statetree.capture(state)
    _check_dcp_tensors(md, captured)
    target = _empty_like_tree(captured)
    planner = _safe_dcp_planner(c.path, names, objs)
    try:
        dcp.load(target, storage_reader=_safe_dcp_reader(store.join(c.rel), names), planner=planner)
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


_DCP_METADATA = ".metadata"


class _DCPMetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
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
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, type):
            raise pickle.UnpicklingError(f"state_on_class: BUILD would set attributes of the class "
                                         f"{inst.__module__}.{inst.__qualname__}")
        qual = f"{type(inst).__module__}.{type(inst).__qualname__}"
        if isinstance(inst, enum.Enum):  # a member is one shared object: BUILD would change it for the process
            raise pickle.UnpicklingError(f"state_on_enum_member: BUILD would set attributes of {qual}.{inst.name}")
        if not formats.is_safe_global(qual, self._extra, dcp=True):
            raise pickle.UnpicklingError(f"unsafe_build: BUILD of a {qual[:100]} instance")
        for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
            bad = [k for k in part if not isinstance(k, str) or k.startswith("__")] if isinstance(part, dict) else []
            if bad:
                raise pickle.UnpicklingError(f"unsafe_build_key: BUILD of a {qual} sets {str(bad[0])[:100]!r}")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}  # type: ignore[attr-defined]


def read_dcp_metadata(path: str, extra_safe_globals: Iterable[str] = ()) -> Any:
    """A DCP ``.metadata`` file, unpickled with the allowlist; every file it names must be a plain name."""
    fd = stores.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(formats.MAX_PICKLE_BYTES + 1)
    if len(raw) > formats.MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{path}: DCP metadata larger than {formats.MAX_PICKLE_BYTES} bytes; not read")
    try:
        md = _DCPMetadataUnpickler(io.BytesIO(raw), frozenset(extra_safe_globals)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, RecursionError) as e:
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


def _safe_dcp_reader(path: str, extra_safe_globals: Iterable[str]) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    extra = tuple(extra_safe_globals)

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = _DCP_METADATA if rank is None else f"__{rank}{_DCP_METADATA}"
            md = read_dcp_metadata(os.path.join(path, name), extra)
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
                f"{t.dtype} {tuple(t.shape)} in the live state; convert the checkpoint or the model first")


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


# ----------------------------------------------------------------------------- checks before applying


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
            if not isinstance(got, dict):
                raise CheckpointFormatError(f"{k!r}: checkpoint holds a {type(got).__name__}, not a module state")
            want = live.state_dict()
            miss = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            if miss or extra:
                raise CheckpointFormatError(f"{k!r}: parameter names differ: missing {miss[:10]}, unexpected {extra[:10]}")
            for n, t in want.items():
                g = got[n]
                if isinstance(t, torch.Tensor) and (not isinstance(g, torch.Tensor) or g.shape != t.shape or g.dtype != t.dtype):
                    gdesc = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
                    raise CheckpointFormatError(f"{k!r}.{n}: checkpoint has {gdesc}, model has {tuple(t.shape)} {t.dtype}")
        elif isinstance(live, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != live.shape:
                raise CheckpointFormatError(f"{k!r}: checkpoint tensor does not match the live tensor's shape")
        elif isinstance(live, torch.optim.Optimizer) and isinstance(got, dict):
            groups = got.get("param_groups")
            if not isinstance(groups, list) or len(groups) != len(live.param_groups) or any(
                len(g.get("params", ())) != len(lg["params"]) for g, lg in zip(groups, live.param_groups)
            ):
                raise CheckpointFormatError(f"{k!r}: optimizer param groups differ from the live optimizer's")
            for i, (group, lacks) in enumerate(zip(groups, _groups_as_loaded(live, groups))):
                if lacks:
                    raise CheckpointFormatError(
                        f"{k!r}: optimizer param_groups[{i}] lacks {lacks[:10]} that {type(live).__name__} uses "
                        f"(it has {sorted(map(str, group))[:12]}): saved by another optimizer class?")


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
        if not t.is_floating_point() or t.numel() == 0:
            continue
        tname = staged.names.get(id(t), name)
        st = staged.stats.get(tname)
        x = t.float() if t.dtype in (torch.float16, torch.bfloat16) or t.dtype not in (torch.float32, torch.float64) else t
        if not bool(torch.isfinite(x).all()):
            if st is not None and not st.finite:
                continue  # it was already non-finite when saved
            raise CheckpointFormatError(f"sanity_gate_failed: tensor {tname} holds NaN/Inf")
        if st is not None and st.max_abs is not None:
            m = float(x.abs().max())
            bound = SANITY_FACTOR * st.max_abs if st.max_abs > 0 else 1e-30
            if m > bound:
                raise CheckpointFormatError(f"sanity_gate_failed: tensor {tname} max|x|={m:.3g} > {SANITY_FACTOR:g}x saved {st.max_abs:.3g}")


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
        if hasattr(live, "load_state_dict") and not isinstance(live, torch.Tensor):
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
