"""The native checkpoint file: its constants, the header encoder, and the header parser.

The native file is a safetensors file (any safetensors tool opens it): an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of 8, then the
tensors packed without gaps, ordered by decreasing element size so each stays aligned.
The state tree (dicts, lists, scalars, tensor references) rides in ``__metadata__`` as a
JSON string. Nothing is ever unpickled.

Belongs here: what a native file is (dtypes, caps, the header values), how its header is
encoded and parsed (every cap and offset check), and the digest that names a whole file
(:func:`tree_digest`, :func:`tree_key_digests`). Writing lives in ``writing``, streaming
digests in ``digests``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import BinaryIO, NamedTuple

import xxhash

from ..bulk import gc_paused
from ..errors import CheckpointFormatError
from ..layout import NATIVE_SUFFIX  # noqa: F401 (re-exported)
from ..tables import TensorTable

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
# "1": the file digest covers each tensor's own xxh3-128. "2" (written from now on): tensors are
# grouped into regions (REGION_KEY) and the file digest covers each region's xxh3-128, so 100,000
# small tensors cost a few dozen hash calls on a load; both are read.
NATIVE_VERSION = "2"
NATIVE_VERSIONS = ("1", "2")
REGION_KEY = "dist_guardian.region_bytes"
# Format 2 also lists its tensors as columns in __metadata__ (names, dtype runs, dims): the per-tensor
# safetensors entries stay for other tools, while our parser decodes only the metadata object (100,000
# entries cost ~0.6 s through json.loads, the columns ~0.1 s). Both come from one list and the file digest
# covers both.
INDEX_KEY = "dist_guardian.index"
_META_PREFIX = '{"' + "__metadata__" + '":'
_DECODER = json.JSONDecoder()
# Small tensors are packed into regions of up to this many bytes, a tensor this large is a region of its own:
# one hash call per region on a load, and a damaged region is small enough to rehash tensor by tensor.
REGION_BYTES = 16 * 1024 * 1024
MAX_REGION_BYTES = 1 << 40


class TensorSpec(NamedTuple):
    """A tensor to write: its name, safetensors dtype, shape and raw bytes (C order).

    A named tuple, like :class:`TensorEntry`: 100,000 of them are made per save or load, and a
    frozen dataclass costs several times a tuple to build.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # exactly nbytes long
    # Packed small tensors: the buffer ``data`` is a slice of, and where in it ``data`` starts, so the
    # writer hashes and writes a run of neighbours with one call instead of one per tensor.
    base: memoryview | None = None
    base_offset: int = 0
    # ``(max|x|, finite)`` when the packer computed it in bulk; None leaves it to the writer's ``stats_fn``.
    stats: tuple[float | None, bool] | None = None


class TensorEntry(NamedTuple):
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

    @property
    def version(self) -> str:
        return self.metadata.get(VERSION_KEY, "1")


@dataclass(frozen=True, slots=True)
class Region:
    """Payload bytes ``begin..end``, holding entries ``first..stop-1`` (file order); one digest each."""

    begin: int
    end: int
    first: int
    stop: int


def region_spans(header: NativeHeader) -> list[Region]:
    """The regions of a file, derived from its header alone (format 1: one region per tensor)."""
    entries = header.entries
    if header.version == "1":
        return [Region(e.begin, e.end, i, i + 1) for i, e in enumerate(entries)]
    raw = header.metadata.get(REGION_KEY, "")
    cap = int(raw) if raw.isdigit() and len(raw) < 16 else 0
    if not 0 < cap <= MAX_REGION_BYTES:
        raise CheckpointFormatError(f"{REGION_KEY} {raw[:20]!r} is not a region size")
    return [
        Region(entries[a].begin, entries[b - 1].end if b > a else entries[a].begin, a, b)
        for a, b in region_bounds([e.end - e.begin for e in entries], cap)
    ]


def region_bounds(sizes: Sequence[int], cap: int) -> list[tuple[int, int]]:
    """Regions as (first, stop) tensor indices over tensors of ``sizes`` bytes in file order.

    A tensor of at least ``cap`` bytes is a region of its own; smaller ones fill the current
    region until the next would take it past ``cap``. Every tensor is in exactly one region.
    """
    out: list[tuple[int, int]] = []
    first, filled = 0, 0
    for i, n in enumerate(sizes):
        if n >= cap or filled + n > cap:
            if i > first:
                out.append((first, i))
            first, filled = i, 0
            if n >= cap:
                out.append((i, i + 1))
                first = i + 1
                continue
        filled += n
    if len(sizes) > first:
        out.append((first, len(sizes)))
    return out


@dataclass(frozen=True, slots=True)
class WrittenFile:
    size: int
    digest: str
    table: TensorTable  # per-tensor digests, stats and region digests, as the manifest lists them


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


def tree_json_and_digests(tree: object) -> tuple[str, dict[str, str]]:
    """``json.dumps(tree)`` (compact, no NaN) and :func:`tree_key_digests` of it, each top-level value dumped once.

    The same strings as the two calls made separately, which dumped a 100,000-tensor tree twice.
    """
    if not isinstance(tree, dict) or (len(tree) == 1 and "__dict__" in tree) or not all(type(k) is str for k in tree):
        return json.dumps(tree, separators=(",", ":"), allow_nan=False), tree_key_digests(tree)
    quote = json.encoder.encode_basestring_ascii
    pieces = {k: json.dumps(v, separators=(",", ":"), allow_nan=False) for k, v in tree.items()}
    text = "{" + ",".join(f"{quote(k)}:{p}" for k, p in pieces.items()) + "}"
    return text, {k: xxhash.xxh3_128_hexdigest(p.encode()) for k, p in pieces.items()}


def encode_header(
    tree_json: str, specs: Sequence[TensorSpec], extra_meta: dict[str, str] | None = None
) -> tuple[bytes, list[TensorSpec]]:
    """The on-disk header and the tensors in file order (decreasing element size, stable).

    A 100,000-tensor header takes about 0.15 s.
    """
    ordered = sorted(specs, key=lambda s: -DTYPE_SIZES[s.dtype])
    # Names are escaped once, by the encoder json.dumps itself uses, for the index and the entries alike.
    quote = json.encoder.encode_basestring_ascii
    names = [s.name for s in ordered]
    quoted = list(map(quote, names))
    stops = _run_stops(ordered)
    meta = {
        VERSION_KEY: NATIVE_VERSION,
        REGION_KEY: str(REGION_BYTES),
        INDEX_KEY: _index_json(ordered, quoted, stops),
        TREE_KEY: tree_json,
        **(extra_meta or {}),
    }
    # One %-template per run of equal dtype and shape (an MoE layer's experts), filled per tensor and joined
    # once: a fraction of the time of a dict per tensor through json.dumps (dtypes and dims are ours).
    parts = [f"{{{quote(META_KEY)}:{json.dumps(meta, separators=(',', ':'))}"]
    ends = list(accumulate(len(s.data) for s in ordered))
    starts = [0, *ends[:-1]]
    i = 0
    for j in stops:
        s = ordered[i]
        dims = ",".join(map(str, s.shape))
        tmpl = f'%s:{{"dtype":"{s.dtype}","shape":[{dims}],"data_offsets":[%d,%d]}}'
        parts.extend(map(tmpl.__mod__, zip(quoted[i:j], starts[i:j], ends[i:j], strict=True)))
        i = j
    if len({*names, META_KEY}) != len(ordered) + 1:
        raise CheckpointFormatError("two tensors share a name (or one is named __metadata__)")
    blob = (",".join(parts) + "}").encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    return struct.pack("<Q", len(blob)) + blob, ordered


def parse_header(f: BinaryIO, file_size: int, *, name: str = "file") -> NativeHeader:
    """Read and check a native header: caps, dtypes, shapes and offsets against the file size.

    Raises :class:`CheckpointFormatError` naming the file and the problem. Reads only the
    header, so a structurally broken file is rejected before its data is touched (F49).
    """
    with gc_paused():
        return _parse_header(f, file_size, name)


# The last headers parsed, by the xxh3-128 of their bytes: planning checks a header and the load parses the
# same bytes again a moment later (0.3 s each for 100,000 tensors). Equal bytes parse to an equal, immutable
# NativeHeader, so a hit is exact; a few entries bound the memory.
_PARSED: dict[tuple[str, int], NativeHeader] = {}
_PARSED_MAX = 4


def _parse_header(f: BinaryIO, file_size: int, name: str) -> NativeHeader:
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointFormatError(f"{name}: truncated ({file_size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointFormatError(f"{name}: header length {n} impossible for a {file_size}-byte file")
    blob = f.read(n)
    if len(blob) != n:
        raise CheckpointFormatError(f"{name}: truncated header ({len(blob)} of {n} bytes)")
    key = (xxhash.xxh3_128_hexdigest(blob), file_size)
    hit = _PARSED.get(key)
    if hit is not None:
        return hit
    try:
        text = blob.decode("utf-8")
        fast = _parse_indexed(text, file_size - 8 - n, name)
        if fast is not None:
            parsed = NativeHeader(head + blob, fast[1], fast[0], file_size - 8 - n)
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.pop(next(iter(_PARSED)))
            _PARSED[key] = parsed
            return parsed
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{name}: header is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{name}: header is not a JSON object")
    meta = doc.pop(META_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{name}: __metadata__ must map strings to strings")
    if len(doc) > MAX_TENSORS:
        raise CheckpointFormatError(f"{name}: {len(doc)} tensors > cap {MAX_TENSORS}")
    entries = [_entry(name, tname, ent) for tname, ent in doc.items()]
    entries.sort(key=_span)
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


def _entry(name: str, tname: str, ent: object) -> TensorEntry:
    """One header entry, every field checked (``type(x) is int`` refuses bools and is the cheap test)."""
    if type(ent) is not dict:
        raise CheckpointFormatError(f"{name}: tensor {tname!r} entry is not an object")
    dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
    size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None  # a list or dict would be unhashable here
    if size is None:
        raise CheckpointFormatError(f"{name}: tensor {tname!r} has unknown dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise CheckpointFormatError(f"{name}: tensor {tname!r} has a bad shape {str(shape)[:80]}")
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d < 1 << 48:
            raise CheckpointFormatError(f"{name}: tensor {tname!r} has a bad shape {str(shape)[:80]}")
        numel *= d
    if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int:
        raise CheckpointFormatError(f"{name}: tensor {tname!r} has bad data_offsets")
    begin, end = offs
    if end - begin != numel * size or begin < 0:
        raise CheckpointFormatError(
            f"{name}: tensor {tname!r} declares {numel * size} bytes ({dtype} {shape}) but spans {begin}..{end}"
        )
    return TensorEntry(tname, str(dtype), tuple(shape), begin, end)


def _span(e: TensorEntry) -> tuple[int, int]:
    return e.begin, e.end


def _run_stops(ordered: Sequence[TensorSpec]) -> list[int]:
    """The stop index of each run of neighbours with equal dtype and shape."""
    keys = [(s.dtype, s.shape) for s in ordered]
    return [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + ([len(keys)] if keys else [])


def _index_json(ordered: Sequence[TensorSpec], quoted: Sequence[str], stops: Sequence[int]) -> str:
    """The columns of :data:`INDEX_KEY`: names, [dtype, count] runs, each tensor's rank, all dims flat.

    The text ``json.dumps`` of those columns gives (compact), written per run of equal dtype and
    shape from the names already escaped (``quoted``) and the runs' ends (``stops``).
    """
    runs: list[list[object]] = []
    ndim: list[str] = []
    dims: list[str] = []
    i = 0
    for j in stops:
        s = ordered[i]
        if runs and runs[-1][0] == s.dtype:
            runs[-1][1] += j - i  # type: ignore[operator]
        else:
            runs.append([s.dtype, j - i])
        ndim.append(",".join([str(len(s.shape))] * (j - i)))
        if s.shape:
            dims.append(",".join([",".join(map(str, s.shape))] * (j - i)))
        i = j
    return (
        f'{{"names":[{",".join(quoted)}],"dtypes":{json.dumps(runs, separators=(",", ":"))},'
        f'"ndim":[{",".join(ndim)}],"dims":[{",".join(dims)}]}}'
    )


def _parse_indexed(text: str, payload: int, name: str) -> tuple[dict[str, str], tuple[TensorEntry, ...]] | None:
    """A format 2 header read from its metadata and :data:`INDEX_KEY` alone; None when it has no index.

    Every check of the full parse holds: known dtypes, bounded dims, tensors that tile the
    payload exactly (offsets follow from the order, so no gap or overlap can be expressed).
    """
    if not text.startswith(_META_PREFIX):
        return None
    start = len(_META_PREFIX)
    while text[start : start + 1] in (" ", "\t", "\n", "\r"):  # raw_decode does not skip whitespace
        start += 1
    meta, _ = _DECODER.raw_decode(text, start)
    if not isinstance(meta, dict) or not isinstance(meta.get(INDEX_KEY), str):
        return None
    if not all(type(v) is str for v in meta.values()):
        raise CheckpointFormatError(f"{name}: __metadata__ must map strings to strings")
    doc = json.loads(meta[INDEX_KEY])
    if type(doc) is not dict:
        raise CheckpointFormatError(f"{name}: {INDEX_KEY} is malformed")
    names, runs, ndim, dims = doc.get("names"), doc.get("dtypes"), doc.get("ndim"), doc.get("dims")
    if (
        type(names) is not list
        or type(runs) is not list
        or type(ndim) is not list
        or type(dims) is not list
        or len(ndim) != len(names)
        or len(names) > MAX_TENSORS
        or not all(type(t) is str for t in names)
        or len(set(names)) != len(names)
        or not all(type(r) is list and len(r) == 2 and r[0] in DTYPE_SIZES and type(r[1]) is int for r in runs)
        or sum(r[1] for r in runs) != len(names)
        or not all(type(k) is int and 0 <= k <= MAX_DIMS for k in ndim)
        or sum(ndim) != len(dims)
        or not all(type(d) is int and 0 <= d < 1 << 48 for d in dims)
    ):
        raise CheckpointFormatError(f"{name}: {INDEX_KEY} is malformed")
    entries: list[TensorEntry] = []
    off = k = i = 0
    for dtype, count in runs:
        size = DTYPE_SIZES[dtype]
        for _ in range(count):
            shape = tuple(dims[k : k + ndim[i]])
            k += ndim[i]
            end = off + math.prod(shape) * size
            entries.append(TensorEntry(names[i], dtype, shape, off, end))
            off = end
            i += 1
    if off != payload:
        raise CheckpointFormatError(f"{name}: tensors cover {off} bytes but the file holds {payload} after the header")
    return meta, tuple(entries)
