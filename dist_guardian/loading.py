"""Load one candidate into staging on this rank: one dispatch over native files, torch.save files, DCP.

Belongs here: :func:`load_candidate` (the dispatch), :func:`load_and_check` (dispatch, then
``staging.accept``) and reading native files. Foreign formats are read in ``foreign_loading``;
the acceptance rules and ``apply`` live in ``staging``.

Staging is fresh memory that nothing live points to, so a failed attempt is dropped without
touching the model (F29). Native files are read with large ``readinto`` calls into one
preallocated buffer per file, tensors are zero-copy views into it, and checksums are
computed from that buffer: each byte is read once and hashed once.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import torch
import xxhash

from . import _faults, completeness, formats, manifest, nodeshare, sharded_io, sharding, statetree, stores
from .bulk import gc_paused
from .candidate import Candidate, FileRef, Loaded
from .errors import CheckpointFormatError
from .foreign_loading import load_dcp, load_safetensors, load_torch_file
from .hf_loading import load_hf
from .layout import MANIFEST_NAME, SHARD_FILE_RE
from .manifest import Manifest
from .staging import Staged, accept
from .stores import Store

log = logging.getLogger(__name__)

# How long a rank waits for the rank of its node that fetches the replicated file (while that rank lives).
NODE_SHARE_WAIT_S = 3600.0

# One native file read: its header, the payload buffer, the file digest, and the digest of each tensor.
NativeRead = tuple[formats.NativeHeader, torch.Tensor, str, dict[str, str]]

__all__ = [
    "LoadOptions",
    "NativeRead",
    "load_and_check",
    "load_candidate",
    "load_native",
    "read_manifest",
    "read_native_file",
    "staging_buffer",
]

# ----------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """How this rank loads a candidate: who it is, and the caller's knobs for foreign files."""

    rank: int = 0
    world_size: int = 1
    concurrency: int | None = None  # parallel reads of a remote native file (None: the store decides)
    progress: bool | None = False  # a progress line for a slow remote load (None: only on a TTY)
    extra_safe_globals: tuple[Any, ...] = ()  # classes or qualnames a foreign pickle may name
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    required: tuple[str, ...] = ()  # top-level keys a checkpoint must hold
    partial_ok: bool = False  # a foreign checkpoint may leave parts of state unrestored (warned, not failed)


def load_candidate(c: Candidate, store: Store, state: dict[str, Any], options: LoadOptions) -> Staged:
    """Stage any candidate on this rank, whatever its kind; nothing live is touched."""
    if c.kind == "native":
        return load_native(
            c,
            store,
            rank=options.rank,
            world_size=options.world_size,
            concurrency=options.concurrency,
            progress=options.progress,
            state=state,
        )
    if c.kind == "torch":
        staged = load_torch_file(
            c,
            store,
            state,
            extra_safe_globals=options.extra_safe_globals,
            foreign_loader=options.foreign_loader,
            required=options.required,
        )
    elif c.kind == "safetensors":
        staged = load_safetensors(c, store, state, foreign_loader=options.foreign_loader, required=options.required)
    elif c.kind == "hf":
        staged = load_hf(
            c,
            store,
            state,
            rank=options.rank,
            world_size=options.world_size,
            extra_safe_globals=options.extra_safe_globals,
        )
    else:
        staged = load_dcp(
            c,
            store,
            state,
            extra_safe_globals=options.extra_safe_globals,
            foreign_loader=options.foreign_loader,
            required=options.required,
        )
    # Foreign: resumed only when all of state is restored (or partial_ok, with a warning naming the rest).
    completeness.judge(staged, state, path=c.path, partial_ok=options.partial_ok, required=options.required)
    return staged


def load_and_check(c: Candidate, store: Store, state: dict[str, Any], options: LoadOptions) -> Loaded:
    """Stage ``c`` and judge it (:func:`staging.accept`): what a resume's load function returns.

    Raises when this rank must vote no; otherwise the vote (intact, suspect or last resort).
    Apply the result with :func:`staging.apply` only after every rank voted yes.
    """
    return accept(load_candidate(c, store, state, options), state, options.required)


# ----------------------------------------------------------------------------- native


def staging_buffer(nbytes: int) -> torch.Tensor:
    """A fresh buffer for one file's payload: pinned when CUDA is present, so applying it to
    device parameters is a DMA copy (set DIST_GUARDIAN_PIN_MEMORY=0 to turn that off)."""
    pin = torch.cuda.is_available() and os.environ.get("DIST_GUARDIAN_PIN_MEMORY", "1") != "0"
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def read_manifest(c: Candidate, store: Store) -> Manifest:
    data = stores.read_small(store, f"{c.rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
    from .manifest import digest_bytes

    if c.manifest_digest and digest_bytes(data) != c.manifest_digest:
        raise CheckpointFormatError(f"{c.path}: manifest.json changed since the plan was made")
    return manifest.parse(data)


def read_native_file(
    store: Store,
    rel: str,
    expected_size: int,
    *,
    concurrency: int | None = None,
    transfer: stores.Transfer | None = None,
) -> NativeRead:
    """One native file into a fresh uint8 buffer, with its file and per-tensor digests.

    Local: secure open, parallel ``pread`` into the buffer with hashing overlapped. Remote:
    straight into the buffer, hashed as bytes arrive (:func:`_read_native_remote`).
    """
    if store.is_local:
        stores.check_dirs_no_symlink(store.root, rel)
        return _read_native_local(store.join(rel), expected_size, store.uri(rel))
    return _read_native_remote(store, rel, expected_size, concurrency=concurrency, transfer=transfer)


def _read_native_local(path: str, expected_size: int, name: str) -> NativeRead:
    fd = stores.open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if expected_size and size != expected_size:
            raise CheckpointFormatError(f"{name}: size_mismatch expected={expected_size} got={size}")
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            header = formats.parse_header(f, size, name=name)
        buf = staging_buffer(header.payload_size)
        digest, per = formats.read_and_hash(fd, header, buf.numpy().data, name=name)
    finally:
        os.close(fd)
    return header, buf, digest, per


def _read_replicated(
    store: Store, rel: str, f: FileRef, *, concurrency: int | None, transfer: stores.Transfer | None
) -> NativeRead:
    """The replicated file of a remote store, fetched by one rank per node (``nodeshare``), read by the others
    from the node's shared memory and verified again; a local store's file each rank reads itself."""

    def fetch() -> NativeRead:
        return read_native_file(store, rel, f.size, concurrency=concurrency, transfer=transfer)

    def publish(got: NativeRead, fd: int) -> bool:
        header, buf, digest, _ = got
        if f.digest and digest != f.digest:
            return False  # damaged: every rank reads and judges it for itself
        formats.write_all(fd, memoryview(header.header_bytes))
        if buf.numel():
            formats.write_all(fd, buf.numpy().data)
        return True

    if store.is_local:
        return fetch()
    return nodeshare.fetch_once(
        (store.uri(rel), f.digest or "", str(f.size)),
        fetch,
        publish,
        lambda path: _read_native_local(path, f.size, store.uri(rel)),
        wait_s=NODE_SHARE_WAIT_S,
    )


class _StreamDigests:
    """Per-unit xxh3-128 digests (``formats.unit_spans``) computed while a payload arrives (DESIGN 4, step 6).

    The downloader reports each piece that landed (``ready(lo, hi)``, any order, any
    thread); a hasher thread follows the contiguous filled prefix, so hashing overlaps the
    network and each byte is hashed once, while it is still hot in cache.
    """

    def __init__(self, header: formats.NativeHeader, mv: memoryview):
        self.units = formats.unit_spans(header)  # regions (format 2) or tensors (format 1)
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
        for key, _, end in self.units:
            h = xxhash.xxh3_128()
            while pos < end:
                with self.cv:
                    while self.prefix <= pos and not self.stopped:
                        self.cv.wait()
                    if self.stopped and self.prefix <= pos:
                        return
                    upto = min(self.prefix, end)
                h.update(self.mv[pos:upto])
                pos = upto
            self.raw.append(h.digest())
            self.per[key] = h.hexdigest()

    def finish(self) -> tuple[str, dict[str, str]]:
        self.thread.join()
        if len(self.raw) != len(self.units):
            raise CheckpointFormatError("payload incomplete: not every region was hashed")
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


def _read_native_remote(
    store: Store, rel: str, expected_size: int, *, concurrency: int | None, transfer: stores.Transfer | None
) -> NativeRead:
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
            header = formats.parse_header(cast(BinaryIO, r), size, name=name)
            buf = staging_buffer(header.payload_size)
            _prefault(buf)
            mv = buf.numpy().data
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
    mv = buf.numpy().data
    hasher = _StreamDigests(header, mv)
    try:
        if header.payload_size:
            stores.read_range_into(
                store, rel, header.data_start, mv, concurrency=conc, on_chunk=hasher.ready, transfer=transfer
            )
    except BaseException:
        hasher.stop()
        raise
    digest, per = hasher.finish()
    return header, buf, digest, per


def _assemble(
    mf: Manifest | None, c: Candidate, store: Store, state: dict[str, Any] | None, concurrency: int | None
) -> sharded_io.Assembled | None:
    """A sharded checkpoint's tensors in the live layout (None for a checkpoint without sharded tensors)."""
    if mf is None or not mf.sharded:
        if state and sharding.sharded_modules(state):  # refused before the vote, never half-applied
            raise CheckpointFormatError(
                f"{c.path}: saved without DTensors; a sharded (FSDP2/TP) model resumes from sharded checkpoints only"
            )
        return None
    return sharded_io.assemble(mf, c.rel, store, sharding.Targets(state or {}), concurrency=concurrency)


def _mismatch(
    uri: str, f: Any, mf: Manifest | None, header: formats.NativeHeader, digest: str, per: dict[str, str], payload: Any
) -> tuple[list[str], bool]:
    """What a file whose digest differs tells: the damaged tensors (a second pass over the damaged regions only),
    and whether its tree is damaged too."""
    expected = mf.tensors.get(f.name) if mf else None
    damaged = formats.damaged_tensors(header, per, expected, lambda lo, hi: payload[lo:hi])
    out = [
        f"checksum_mismatch: {uri}"
        + (f" damaged_tensors={damaged[:10]}" if damaged else "")
        + f" expected={f.digest} got={digest}"
    ]
    known = formats.expected_units(header, expected)
    why = formats.header_damage(header, per, known, mf.trees.get(f.name) if mf else None)
    if why:
        out.append(f"tree_damaged: {uri}: {why}")
    return out, bool(why)


def load_native(
    c: Candidate,
    store: Store,
    *,
    rank: int,
    world_size: int,
    concurrency: int | None = None,
    progress: bool | None = False,
    state: dict[str, Any] | None = None,
) -> Staged:
    """Stage a native checkpoint on this rank: the replicated file, this rank's per-rank file, and a sharded
    checkpoint's tensors from their chunks in the layout of the live ``state`` (``sharded_io.assemble``).

    ``progress``: a progress line on stderr for a remote load over a second (``None``: only on a TTY).
    """
    with gc_paused():  # 100,000 tensors: see bulk
        return _load_native(
            c, store, rank=rank, world_size=world_size, concurrency=concurrency, progress=progress, state=state
        )


def _load_native(
    c: Candidate,
    store: Store,
    *,
    rank: int,
    world_size: int,
    concurrency: int | None,
    progress: bool | None,
    state: dict[str, Any] | None,
) -> Staged:
    mf = read_manifest(c, store) if c.tier != "L" else None
    wanted = c.files_for_rank(rank, world_size)
    assembled = _assemble(mf, c, store, state, concurrency)
    if assembled is not None:  # the shard files are read chunk by chunk, never whole
        wanted = tuple(f for f in wanted if not SHARD_FILE_RE.match(f.name))
    extra = assembled.tensors if assembled is not None else {}
    transfer = None
    if not store.is_local:
        transfer = stores.Transfer(sum(f.size for f in wanted), f"load step {c.step} from {store.url}", show=progress)
    tree: dict[str, Any] = {}
    rng = None
    suspect: list[str] = []
    warnings: list[str] = []
    tables: list[Mapping[str, manifest.TensorStat]] = []  # the manifest's tables as they are, never copied
    names: dict[int, str] = {}
    tree_damaged = False
    saved_ws = c.world_size or world_size
    for f in wanted:
        rel = f"{c.rel}/{f.name}"
        if f.rank is None:
            header, buf, digest, per = _read_replicated(store, rel, f, concurrency=concurrency, transfer=transfer)
        else:
            header, buf, digest, per = read_native_file(store, rel, f.size, concurrency=concurrency, transfer=transfer)
        if _faults.hit("load_file", rank=rank, step=c.step) == "corrupt" and buf.numel():
            buf[buf.numel() // 2] ^= 0x10
            digest, per = formats.payload_digests(header, buf.numpy().data)
        if f.digest and digest != f.digest:
            found, damaged_tree = _mismatch(store.uri(rel), f, mf, header, digest, per, buf.numpy().data)
            suspect += found
            tree_damaged = tree_damaged or damaged_tree
        if mf and f.name in mf.tensors:
            tables.append(mf.tensors[f.name])
        tensors = {**extra, **statetree.tensors_from_buffer(header.entries, buf)}
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
                warnings.append(
                    f"world_size_changed from={saved_ws} to={world_size}: rank {rank} took per-rank "
                    f"state of rank {f.rank}" + (" with a re-derived RNG" if rank >= saved_ws else "")
                )
        tree.update(sub)
    if transfer is not None:
        transfer.close()
    if assembled is not None:
        suspect += assembled.suspect
        tables.append(assembled.stats)
        if saved_ws != world_size and rng is None:  # otherwise the per-rank file's warning says it
            warnings.append(f"world_size_changed from={saved_ws} to={world_size}: sharded tensors resharded")
    return Staged(
        tree=tree,
        rng=rng,
        step=c.step,
        suspect=suspect,
        warnings=warnings,
        stats=ChainMap(*tables),  # type: ignore[arg-type]  # read-only use
        names=names,
        tree_damaged=tree_damaged,
        fqn=sharding.apply_keys(state or {}, tree) if assembled is not None else {},
    )
