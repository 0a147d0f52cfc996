"""Byte-level file formats: the native checkpoint file, and sniffing of foreign files.

The native file is a safetensors file (any safetensors tool opens it): an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of 8, then the
tensors packed without gaps, ordered by decreasing element size so each stays aligned.
The state tree (dicts, lists, scalars, tensor references) rides in ``__metadata__`` as a
JSON string. Nothing is ever unpickled.

Checksums are xxh3-128. Each tensor's bytes get their own digest (named in the manifest,
so a damaged tensor can be named), and the file digest is the xxh3-128 of the header bytes
followed by the tensors' 16-byte digests in file order: every byte of the file is covered
and each byte is hashed once.

Foreign files are only sniffed here (torch zip structure, member CRC32s, the globals a
pickle would import, a step number), without torch: discovery and verification must stay
importable and fast for the CLI.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import pickletools
import queue
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

import xxhash

from .errors import CheckpointFormatError, PlanningCapExceeded

NATIVE_SUFFIX = ".dgt"
MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 10_000_000
MAX_DIMS = 64
# safetensors dtype names and their element sizes.
DTYPE_SIZES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
META_KEY = "__metadata__"
TREE_KEY = "dist_guardian.tree"
VERSION_KEY = "dist_guardian.format"
NATIVE_VERSION = "1"
_CHUNK = 64 * 1024 * 1024
# Full verification (``dist-guardian verify``, retention) streams each file through one reused buffer of
# this size: its peak memory is one chunk, whatever the file size (a 1 GiB file read whole raised the
# training process's peak RSS by 1 GB at every save with keep_last). xxh3 runs at memory speed either way.
DIGEST_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor to write: its name, safetensors dtype, shape and raw bytes (C order)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # exactly nbytes long


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the payload (after the header)
    end: int


@dataclass(frozen=True, slots=True)
class NativeHeader:
    header_bytes: bytes  # the 8-byte length and the padded JSON, exactly as on disk
    entries: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]
    payload_size: int

    @property
    def data_start(self) -> int:
        return len(self.header_bytes)

    @property
    def file_size(self) -> int:
        return len(self.header_bytes) + self.payload_size

    @property
    def tree(self) -> object:
        return json.loads(self.metadata.get(TREE_KEY, "null"))


@dataclass(frozen=True, slots=True)
class WrittenFile:
    size: int
    digest: str
    tensor_digests: dict[str, str]
    stats: dict[str, object] = field(default_factory=dict)


def tree_digest(header_bytes: bytes, tensor_digests_in_order: Iterable[bytes]) -> str:
    h = xxhash.xxh3_128(header_bytes)
    for d in tensor_digests_in_order:
        h.update(d)
    return h.hexdigest()


def tree_key_digests(tree: object) -> dict[str, str]:
    """The xxh3-128 of each top-level entry of a JSON state tree, as compact JSON (T10).

    The manifest records them at save time, so damage to the non-tensor part of a file (an
    ``lr``, a scheduler's ``last_epoch``) can be named by key when the file digest disagrees.
    Equal for a tree and ``json.loads`` of its compact dump, so save and load compute the same.
    """
    if not isinstance(tree, dict):
        return {}
    items = list(tree.items())
    if len(tree) == 1 and isinstance(tree.get("__dict__"), list):  # statetree's tag for keys like "__rng__"
        items = [(p[0], p[1]) for p in tree["__dict__"] if isinstance(p, list) and len(p) == 2]
    return {str(k): xxhash.xxh3_128_hexdigest(json.dumps(v, separators=(",", ":")).encode()) for k, v in items}


def encode_header(
    tree_json: str, specs: Sequence[TensorSpec], extra_meta: dict[str, str] | None = None
) -> tuple[bytes, list[TensorSpec]]:
    """The on-disk header and the tensors in file order (decreasing element size, stable)."""
    ordered = sorted(specs, key=lambda s: -DTYPE_SIZES[s.dtype])
    header: dict[str, object] = {META_KEY: {VERSION_KEY: NATIVE_VERSION, TREE_KEY: tree_json, **(extra_meta or {})}}
    off = 0
    for s in ordered:
        n = len(s.data)
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    return struct.pack("<Q", len(blob)) + blob, ordered


def write_native(
    fd: int,
    tree_json: str,
    specs: Sequence[TensorSpec],
    *,
    hook=None,
    stats_fn: Callable[[TensorSpec], object] | None = None,
) -> WrittenFile:
    """Stream a native file to ``fd``, hashing each tensor as it goes out. The caller fsyncs.

    Two stages overlap: this thread hashes a chunk (and runs ``stats_fn`` on each tensor,
    e.g. its ``max|x|``) while a writer thread writes the previous one, so checksums cost
    nothing when the disk is the bottleneck. ``hook(point)`` is called at
    ``mid_data_write`` (half-way through the payload), for tests. Returns the stats in
    ``WrittenFile.stats`` when ``stats_fn`` is given.
    """
    header, ordered = encode_header(tree_json, specs)
    total = sum(len(s.data) for s in ordered)
    pipe = _WritePipe(fd)
    pipe.put(memoryview(header))
    digests: dict[str, str] = {}
    raw_digests: list[bytes] = []
    stats: dict[str, object] = {}
    queued = 0
    mid_called = hook is None
    try:
        for s in ordered:
            if stats_fn is not None:
                stats[s.name] = stats_fn(s)
            h = xxhash.xxh3_128()
            mv = s.data
            for i in range(0, len(mv), _CHUNK):
                chunk = mv[i : i + _CHUNK]
                h.update(chunk)
                pipe.add(chunk)
                queued += len(chunk)
                if not mid_called and queued * 2 >= total:
                    pipe.drain()
                    mid_called = True
                    hook("mid_data_write")
            raw_digests.append(h.digest())
            digests[s.name] = h.hexdigest()
        if not mid_called:
            pipe.drain()
            hook("mid_data_write")
        pipe.flush()
    finally:
        pipe.close()
    return WrittenFile(
        size=len(header) + total, digest=tree_digest(header, raw_digests), tensor_digests=digests, stats=stats
    )


class _WritePipe:
    """A writer thread fed chunks in order; an error in it is raised in the producer.

    Small tensors are batched and written with one ``writev``: one queue hand-off and one
    system call per ~8 MiB instead of one per tensor (100,000 small tensors cost seconds
    of lock hand-offs otherwise).
    """

    BATCH_BYTES = 8 << 20
    BATCH_ITEMS = 512

    def __init__(self, fd: int, depth: int = 4):
        self.fd = fd
        self.q: queue.Queue[list[memoryview] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._batch: list[memoryview] = []
        self._batch_bytes = 0
        self.t = threading.Thread(target=self._run, name="dist_guardian-write", daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            batch = self.q.get()
            try:
                if batch is None:
                    return
                if self.error is None:
                    _writev_all(self.fd, batch)
            except BaseException as e:  # noqa: B036 - handed to the producer
                self.error = e
            finally:
                self.q.task_done()

    def put(self, mv: memoryview) -> None:
        self.add(mv)
        self.flush()

    def add(self, mv: memoryview) -> None:
        self._batch.append(mv)
        self._batch_bytes += len(mv)
        if self._batch_bytes >= self.BATCH_BYTES or len(self._batch) >= self.BATCH_ITEMS:
            self.flush()

    def flush(self) -> None:
        if self.error is not None:
            raise self.error
        if self._batch:
            self.q.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def drain(self) -> None:
        self.flush()
        self.q.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error


def _writev_all(fd: int, bufs: list[memoryview]) -> None:
    if len(bufs) == 1:
        _write_all(fd, bufs[0])
        return
    total = sum(len(b) for b in bufs)
    n = os.writev(fd, bufs)
    if n == total:
        return
    for b in bufs:  # a short writev: finish the rest piece by piece
        if n >= len(b):
            n -= len(b)
            continue
        _write_all(fd, b[n:])
        n = 0


def _write_all(fd: int, mv: memoryview) -> None:
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


class _ReadInto(Protocol):
    """What the streaming readers need of a file (typeshed's ``BinaryIO`` has no ``readinto``)."""

    def readinto(self, b: Any, /) -> int | None: ...


def parse_header(f: BinaryIO, file_size: int, *, name: str = "file") -> NativeHeader:
    """Read and check a native header: caps, dtypes, shapes and offsets against the file size.

    Raises :class:`CheckpointFormatError` naming the file and the problem. Reads only the
    header, so a structurally broken file is rejected before its data is touched (F49).
    """
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointFormatError(f"{name}: truncated ({file_size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointFormatError(f"{name}: header length {n} impossible for a {file_size}-byte file")
    blob = f.read(n)
    if len(blob) != n:
        raise CheckpointFormatError(f"{name}: truncated header ({len(blob)} of {n} bytes)")
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{name}: header is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{name}: header is not a JSON object")
    meta = doc.pop(META_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{name}: __metadata__ must map strings to strings")
    if len(doc) > MAX_TENSORS:
        raise CheckpointFormatError(f"{name}: {len(doc)} tensors > cap {MAX_TENSORS}")
    entries = []
    for tname, ent in doc.items():
        if not isinstance(ent, dict):
            raise CheckpointFormatError(f"{name}: tensor {tname!r} entry is not an object")
        dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or dict would be unhashable here
            raise CheckpointFormatError(f"{name}: tensor {tname!r} has unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape)
        ):
            raise CheckpointFormatError(f"{name}: tensor {tname!r} has a bad shape {str(shape)[:80]}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise CheckpointFormatError(f"{name}: tensor {tname!r} has bad data_offsets")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != nbytes or offs[0] < 0:
            raise CheckpointFormatError(
                f"{name}: tensor {tname!r} declares {nbytes} bytes ({dtype} {shape}) but spans {offs[0]}..{offs[1]}"
            )
        entries.append(TensorEntry(name=tname, dtype=dtype, shape=tuple(shape), begin=offs[0], end=offs[1]))
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in entries:
        if t.begin != pos:
            raise CheckpointFormatError(
                f"{name}: tensor {t.name!r} starts at {t.begin}, expected {pos} (gap or overlap)"
            )
        pos = t.end
    payload = file_size - 8 - n
    if pos != payload:
        raise CheckpointFormatError(f"{name}: tensors cover {pos} bytes but the file holds {payload} after the header")
    return NativeHeader(header_bytes=head + blob, entries=tuple(entries), metadata=meta, payload_size=payload)


def read_and_hash(
    fd: int,
    header: NativeHeader,
    buf: memoryview,
    *,
    name: str = "file",
    threads: int = 4,
    chunk: int = 32 * 1024 * 1024,
) -> tuple[str, dict[str, str]]:
    """Read the payload into ``buf`` with parallel ``pread`` calls while this thread hashes what has arrived.

    Staging must be fresh memory (nothing live may change before the vote), and on this
    machine faulting it in costs more than the copy itself: 2.1 GB read into touched memory
    took 0.41 s, into fresh memory 1.69 s with 2 readers and 1.46 s with 4 (benchmarks/README.md).
    Several readers fault pages in parallel; hashing each chunk right after it lands (hot in
    cache, on this thread, the GIL released by xxhash) costs no extra pass. Returns the file digest
    and the per-tensor digests, as :func:`payload_digests` would.
    """
    n = header.payload_size
    if len(buf) != n:
        raise ValueError("buffer size does not match the payload")
    start = header.data_start
    spans = [(o, min(o + chunk, n)) for o in range(0, n, chunk)]

    def read(lo: int, hi: int) -> None:
        pos = lo
        while pos < hi:
            got = os.preadv(fd, [buf[pos:hi]], start + pos)
            if got <= 0:
                raise CheckpointFormatError(f"{name}: truncated payload ({pos} of {n} bytes)")
            pos += got

    hasher = _TensorHasher(header)
    if not spans:
        return hasher.finish()
    with cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dist_guardian-read") as ex:
        futs = [ex.submit(read, lo, hi) for lo, hi in spans]
        try:
            for (lo, hi), fut in zip(spans, futs, strict=True):
                fut.result()
                hasher.feed(buf, lo, hi)
        except BaseException:
            for fut in futs:
                fut.cancel()
            raise
    return hasher.finish()


class _TensorHasher:
    """Per-tensor xxh3-128 over a payload fed in order, in chunks that ignore tensor boundaries."""

    def __init__(self, header: NativeHeader):
        self.header = header
        self.entries = [e for e in header.entries]
        self.i = 0
        self.h = xxhash.xxh3_128()
        self.raw: list[bytes] = []
        self.per: dict[str, str] = {}
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self.i < len(self.entries) and self.entries[self.i].end == self.entries[self.i].begin:
            self._close()

    def _close(self) -> None:
        e = self.entries[self.i]
        self.raw.append(self.h.digest())
        self.per[e.name] = self.h.hexdigest()
        self.h = xxhash.xxh3_128()
        self.i += 1

    def feed(self, buf: memoryview, lo: int, hi: int, base: int = 0) -> None:
        """Hash payload bytes ``lo..hi``, held in ``buf`` from payload offset ``base`` on."""
        pos = lo
        while pos < hi and self.i < len(self.entries):
            e = self.entries[self.i]
            take = min(hi, e.end)
            self.h.update(buf[pos - base : take - base])
            pos = take
            if pos == e.end:
                self._close()
                self._skip_empty()

    def finish(self) -> tuple[str, dict[str, str]]:
        while self.i < len(self.entries):
            self._close()
        return tree_digest(self.header.header_bytes, self.raw), self.per


def header_damage(
    header: NativeHeader, per: dict[str, str], expected: dict[str, str] | None, trees: dict[str, str] | None
) -> str | None:
    """Why a file whose digest disagrees is damaged outside its tensors, or None when only tensors are (T10).

    ``per``: the tensor digests as read; ``expected``: the manifest's (None: unknown); ``trees``:
    the manifest's :func:`tree_key_digests` (absent in older manifests). With ``trees`` the
    damaged keys are named; otherwise a mismatch while every tensor digest matches can only be
    the header (the state tree or the tensor index).
    """
    if trees:
        try:
            got = tree_key_digests(header.tree)
        except (ValueError, RecursionError):
            return "the state tree is not valid JSON"
        keys = sorted(k for k in set(trees) | set(got) if trees.get(k) != got.get(k))
        if keys:
            return f"state tree damaged in key {', '.join(map(repr, keys[:10]))} (not checkable by the sanity gate)"
    if expected is not None and per == expected:
        return "header damaged outside the tensors (every tensor digest matches)"
    return None


def payload_digests(header: NativeHeader, buf: memoryview) -> tuple[str, dict[str, str]]:
    """The file digest and per-tensor digests of a payload held in memory."""
    raw = []
    per = {}
    for t in header.entries:
        h = xxhash.xxh3_128(buf[t.begin : t.end])
        raw.append(h.digest())
        per[t.name] = h.hexdigest()
    return tree_digest(header.header_bytes, raw), per


def stream_digests(f: BinaryIO, header: NativeHeader, *, name: str = "file") -> tuple[str, dict[str, str]]:
    """The file digest and per-tensor digests of the payload ``f`` is positioned at, read in
    :data:`DIGEST_CHUNK` pieces into one buffer (a tensor larger than a chunk is hashed incrementally)."""
    n = header.payload_size
    buf = memoryview(bytearray(min(DIGEST_CHUNK, n)))
    hasher = _TensorHasher(header)
    pos = 0
    while pos < n:
        got = cast(_ReadInto, f).readinto(buf[: min(len(buf), n - pos)])
        if not got:
            raise CheckpointFormatError(f"{name}: truncated payload ({pos} of {n} bytes)")
        hasher.feed(buf, pos, pos + got, base=pos)
        pos += got
    return hasher.finish()


def file_digest_stream(f: BinaryIO) -> tuple[int, str]:
    """Plain xxh3-128 and size of a whole stream (foreign files, mirrors), read in :data:`DIGEST_CHUNK` pieces."""
    h = xxhash.xxh3_128()
    buf = memoryview(bytearray(DIGEST_CHUNK))
    n = 0
    while True:
        got = cast(_ReadInto, f).readinto(buf)
        if not got:
            return n, h.hexdigest()
        h.update(buf[:got])
        n += got


# ----------------------------------------------------------------------------- foreign files

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Planning caps per foreign candidate (T08). Planning verifies every candidate of every store on rank 0
# before anything loads, and the crash-loop journal does not cover it: what a file declares must not set
# what it costs. What is over a cap is tier R (``planning_cap_exceeded``).
# A pickle (torch.save's data.pkl, a DCP .metadata) is read whole: real ones are small (a DCP .metadata
# measured 210 bytes per tensor chunk, so 64 MiB is 300,000 chunks), while a 1 MB zip bomb whose data.pkl
# inflated to 1 GiB drove ``ls`` to 2 GB RSS. Declared sizes are checked before anything is inflated.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Walking a pickle's opcodes (pickletools.genops, linear) costs 0.5-1 us per opcode here: a 16 MB .metadata
# of one-byte opcodes took 14 s, a real DCP .metadata scans at about 2 MB/s (5 s: 10 MB, ~50,000 chunks).
# Past this a candidate is R.
PLANNING_SCAN_SECONDS = 5.0
# Zip CRCs checked at planning, per torch.save file, in bytes and seconds. Reading and CRC32 run at
# 250-900 MB/s here: a sparse 4 GiB file cost 7-18 s of every listing (16 GiB: 115 s). Past the budget the
# rest is left unchecked (tier L, ``crc_unchecked``): the load reads every byte and checks every CRC.
PLANNING_CRC_BYTES = 256 * 1024 * 1024
PLANNING_CRC_SECONDS = 1.0
# zipfile reads the whole central directory and makes an object per entry: 65,000 entries (7 MB) took
# 0.33 s and 13 MB here, so 16 MiB is at most ~1.5 s, and still ~150,000 members (tensors) of torch.save.
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024 * 1024
# A step is taken from a foreign name only where the name says it is one (``step_300``,
# ``checkpoint-300``, ``global_step300``, ``iter_300``, ``epoch=3-step=900``): a bare number
# (``model_7.pt``) or a date (``export_20240501.pt``) would outrank every native checkpoint.
_STEP_RE = re.compile(r"(?:global_step|step|checkpoint|ckpt|iteration|iter)[_\-.=]?(\d{1,15})(?!\d)", re.IGNORECASE)
_DATE_RE = re.compile(
    r"(?:(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])|(?:19|20)\d\d[_\-.]\d\d?[_\-.]\d\d?)(?!\d)"
)
# Globals torch's weights_only unpickler accepts. Anything else makes a file R before load
# (the final judge is still torch's own weights_only unpickler: we never load unsafely).
_TORCH_PLAIN = (
    r"Size|device|strided|sparse_(coo|csr|csc|bsr|bsc)|serialization\._get_layout|"
    r"(float|bfloat|int|uint|complex)(8|16|32|64|128)?|half|double|long|short|bool|cfloat|cdouble|chalf|"
    r"float8_\w+|q(u)?int\w*"
)
_TORCH_SAFE_RE = re.compile(
    r"^torch\.(_utils\._rebuild_\w+|_tensor\._rebuild_from_type(_v2)?|\w*Storage|nn\.parameter\.Parameter|"
    + _TORCH_PLAIN
    + r")\Z"
)
# A DCP .metadata holds plain values and DCP's own metadata classes: none of torch.save's tensor
# rebuilders or storage classes, and no bytearray, either of which lets a planted file allocate any
# size (``torch.UntypedStorage(2**40)``) while it is being unpickled.
_DCP_TORCH_RE = re.compile(r"^torch\.(" + _TORCH_PLAIN + r")\Z")
SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.defaultdict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.slice",
        "builtins.range",
        "_codecs.encode",
    }
)


# What a PyTorch DCP ``.metadata`` pickle may import. torch's own FileSystemReader unpickles that
# file with plain ``pickle.load`` (any global: code execution), so dist_guardian checks it against
# this list before a DCP directory becomes a candidate, and loads it with an unpickler limited to
# the same list (together with plain containers and torch's dtype/Size/layout globals, never its
# tensor rebuilders, storages or bytearray: see _DCP_TORCH_RE).
DCP_SAFE_GLOBALS = frozenset(
    {
        f"torch.distributed.checkpoint.metadata.{n}"
        for n in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib._local.PosixPath",
        "pathlib._local.PurePosixPath",
    }
)
_DCP_PLAIN_GLOBALS = SAFE_GLOBALS - {"builtins.bytearray"}


def is_safe_global(qualname: str, extra_safe: Iterable[str] = (), *, dcp: bool = False) -> bool:
    """Whether a pickle global is on the weights-only allowlist (or the caller's extra names).

    With ``dcp`` the list is the narrower one of a DCP ``.metadata`` (:data:`DCP_SAFE_GLOBALS`).
    """
    if qualname in extra_safe:
        return True
    if dcp:
        return qualname in DCP_SAFE_GLOBALS or qualname in _DCP_PLAIN_GLOBALS or bool(_DCP_TORCH_RE.match(qualname))
    return qualname in SAFE_GLOBALS or bool(_TORCH_SAFE_RE.match(qualname))


def step_from_name(name: str) -> int | None:
    """The step a foreign file or directory name states, or None (no step word, or a date)."""
    base = name.rsplit("/", 1)[-1]
    m = _STEP_RE.search(base)
    if m is None or _DATE_RE.match(base, m.start(1)):
        return None
    return int(m.group(1))


@dataclass(frozen=True, slots=True)
class TorchFileReport:
    """What sniffing a torch.save file found, without unpickling it."""

    ok: bool  # structurally loadable (may still be suspect)
    crc: str  # "ok" | "mismatch" | "off" | "none" | "partial" (clean as far as the planning budget went)
    problems: tuple[str, ...]
    unsafe_globals: tuple[str, ...]
    step_key: int | None  # the top-level step/global_step value, when the pickle shows one
    crc_unchecked: int = 0  # member bytes whose CRC the planning budget left unchecked
    over_cap: str | None = None  # what is over a planning cap (then ok is False)


def sniff_torch_file(
    f: BinaryIO, size: int, name: str, extra_safe: Iterable[str] = (), *, planning: bool = True
) -> TorchFileReport:
    """Check a torch.save zip: central directory, member CRC32s, and the globals its pickle needs.

    ``torch.load`` ignores zip CRCs, so a flipped bit loads silently in most cases; this
    catches it. All-zero CRCs mean CRC computation was switched off at save time ("off").
    Never raises for a damaged file: ``zipfile`` has many ways to fail on garbage (a bad local
    header, an encrypted flag, an unknown compression method); each is a report with ``ok=False``.
    The pickle is capped at :data:`MAX_PICKLE_BYTES` (declared size, then bytes read). With
    ``planning`` the CRC check stops at :data:`PLANNING_CRC_BYTES` / :data:`PLANNING_CRC_SECONDS`
    (``crc="partial"``) and the pickle walk at :data:`PLANNING_SCAN_SECONDS`; the load passes
    ``planning=False``: it holds every byte already, and checks every CRC.
    """
    try:
        return _sniff_torch_file(f, size, name, extra_safe, planning)
    except PlanningCapExceeded as e:
        return TorchFileReport(False, "none", (f"{name}: {e}",), (), None, over_cap=str(e))
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        OverflowError,
        struct.error,
        zlib.error,
    ) as e:
        return TorchFileReport(
            False, "none", (f"{name}: broken zip structure ({type(e).__name__}: {str(e)[:100]})",), (), None
        )


def _sniff_torch_file(f: BinaryIO, size: int, name: str, extra_safe: Iterable[str], planning: bool) -> TorchFileReport:
    head = f.read(4)
    f.seek(0)
    if head != b"PK\x03\x04":
        return TorchFileReport(
            False, "none", (f"{name}: not a torch zip archive (legacy or foreign format)",), (), None
        )
    end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the end record ZipFile trusts next (private, unchanged since Python 2.6)
    ecd_size = zipfile._ECD_SIZE  # type: ignore[attr-defined]
    if end and end[ecd_size] > MAX_ZIP_DIRECTORY_BYTES:
        raise PlanningCapExceeded(f"a {end[ecd_size]}-byte zip central directory", f"{MAX_ZIP_DIRECTORY_BYTES} bytes")
    f.seek(0)
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return TorchFileReport(False, "none", (f"{name}: broken zip structure ({e})",), (), None)
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if not pkl:
        return TorchFileReport(False, "none", (f"{name}: no data.pkl in the archive",), (), None)
    if pkl[0].file_size > MAX_PICKLE_BYTES:
        raise PlanningCapExceeded(f"{pkl[0].filename} (declared {pkl[0].file_size} bytes)", f"{MAX_PICKLE_BYTES} bytes")
    problems: list[str] = []
    crcs_off = all(i.CRC == 0 for i in infos if i.file_size > 0)
    mismatched: list[str] = []
    budget = PLANNING_CRC_BYTES if planning else None
    deadline = time.monotonic() + PLANNING_CRC_SECONDS if planning else None
    unchecked = 0
    buf = memoryview(bytearray(DIGEST_CHUNK))
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            problems.append(f"{name}: member {info.filename} is compressed (not written by torch.save)")
            continue
        if info.header_offset + info.file_size > size:
            return TorchFileReport(
                False, "none", (f"{name}: member {info.filename} extends past the end of the file",), (), None
            )
        if crcs_off:
            continue
        if budget is not None and (info.file_size > budget or (deadline is not None and time.monotonic() > deadline)):
            unchecked += info.file_size  # a member's CRC is checked whole or not at all
            continue
        try:
            with zf.open(info) as m:
                crc, complete = 0, True
                while got := cast(_ReadInto, m).readinto(buf):
                    crc = zlib.crc32(buf[:got], crc)
                    if deadline is not None and time.monotonic() > deadline:
                        complete = False
                        break
        except zipfile.BadZipFile:
            mismatched.append(info.filename)
            continue
        except (OSError, EOFError, ValueError) as e:
            return TorchFileReport(False, "none", (f"{name}: member {info.filename} unreadable ({e})",), (), None)
        if not complete:
            unchecked += info.file_size
            continue
        if budget is not None:
            budget -= info.file_size
        if crc != info.CRC:
            mismatched.append(info.filename)
    try:
        pickle_bytes = zf.read(pkl[0])
    except zipfile.BadZipFile:
        # CRC mismatch inside data.pkl itself: read it raw to still name its globals.
        with zf.open(pkl[0]) as m:
            m._expected_crc = None  # type: ignore[attr-defined]
            pickle_bytes = m.read()
    except (OSError, EOFError, ValueError) as e:
        return TorchFileReport(False, "none", (f"{name}: data.pkl unreadable ({e})",), (), None)
    unsafe, step_key, pk_problem = scan_pickle(pickle_bytes, extra_safe, PLANNING_SCAN_SECONDS if planning else None)
    if pk_problem:
        return TorchFileReport(False, "none", (f"{name}: {pk_problem}",), unsafe, step_key)
    crc_state = "off" if crcs_off else "mismatch" if mismatched else "partial" if unchecked else "ok"
    if mismatched:
        problems.append(f"{name}: zip CRC32 mismatch in {', '.join(mismatched[:5])}")
    return TorchFileReport(True, crc_state, tuple(problems), unsafe, step_key, crc_unchecked=unchecked)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG", "LONG4"}


def scan_pickle(
    data: bytes, extra_safe: Iterable[str] = (), deadline_s: float | None = None, *, dcp: bool = False
) -> tuple[tuple[str, ...], int | None, str | None]:
    """The globals a pickle would import (those outside the weights-only allowlist) and a top-level step.

    Walks opcodes with ``pickletools.genops``: nothing is executed or imported. A walk longer than
    ``deadline_s`` seconds raises :class:`PlanningCapExceeded` (checked every 65,536 opcodes).
    """
    extra = frozenset(extra_safe)
    unsafe: list[str] = []
    recent: list[object] = []  # values of recent pushes, enough to resolve STACK_GLOBAL
    memo: dict[int, object] = {}
    step_key = None
    pending_step = False
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        for k, (op, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data))):
            if deadline is not None and not k & 0xFFFF and time.monotonic() > deadline:
                raise PlanningCapExceeded(f"walking a {len(data)}-byte pickle", f"{deadline_s:g} s")
            nm = op.name
            if nm in _STRING_OPS:
                recent.append(arg)
                if pending_step:
                    pending_step = False
                pending_step = arg in ("step", "global_step") and step_key is None
                continue
            if nm in _INT_OPS and pending_step:
                if isinstance(arg, int):
                    step_key = arg
                pending_step = False
                recent.append(arg)
                continue
            if nm in ("BINPUT", "LONG_BINPUT", "PUT"):  # memoizing the key does not end "key, then value"
                memo[int(cast(int, arg))] = recent[-1] if recent else None
                continue
            if nm == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            pending_step = False
            if nm in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(cast(int, arg))))
            elif nm in ("GLOBAL", "INST"):
                mod, _, attr = str(arg).partition(" ")
                _judge(f"{mod}.{attr}", extra, unsafe, dcp)
            elif nm == "STACK_GLOBAL":
                smod, sattr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                _judge(f"{smod}.{sattr}", extra, unsafe, dcp)
            else:
                recent.append(None)
            if len(recent) > 64:
                del recent[:32]
    except PlanningCapExceeded:
        raise
    except (ValueError, EOFError, KeyError, IndexError) as e:
        return tuple(unsafe), step_key, f"pickle stream is corrupt ({str(e)[:100]})"
    return tuple(dict.fromkeys(unsafe)), step_key, None


def _judge(qualname: str, extra: frozenset[str], unsafe: list[str], dcp: bool) -> None:
    if not is_safe_global(qualname, extra, dcp=dcp):
        unsafe.append(qualname)
