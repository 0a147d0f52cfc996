"""The manifest: build it, and parse it strictly without ever crashing on garbage.

``manifest.json`` is written last; its presence is the commit. A manifest comes from a
store we do not control (a remote bucket, a shared dir), so parsing caps its size, checks
every field's type and range, refuses duplicate keys, and refuses any file name that could
escape the checkpoint directory (F06, F32, F47, F49). A bad manifest is a reason
(:class:`ManifestError`), never an unexpected exception.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import CheckpointFormatError
from .layout import FILE_NAME_RE, MANIFEST_NAME, NAME_RE  # noqa: F401 (re-exported)
from .layout import NAME_RE as RUN_NAME_RE  # noqa: F401
from .tables import TableError, TensorStat, TensorTable

FORMAT = "dist_guardian/1"
FORMAT_PREFIX = "dist_guardian/"
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_STEP = 10**15 - 1  # step directory names carry 12+ digits; anything larger is absurd (F49)
MAX_WORLD_SIZE = 1 << 20
MAX_FILES = 1 << 20
MAX_FILE_SIZE = 1 << 50
MAX_GENERATION = 1 << 40
DIGEST_RE = re.compile(r"^[0-9a-f]{32}\Z")


class ManifestError(CheckpointFormatError):
    """A manifest that cannot be trusted; ``reason`` is a short token for logs and records."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    name: str
    size: int
    digest: str
    rank: int | None = None  # None: replicated (read by every rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One saved box of a sharded tensor: where its bytes are, and what they hash to."""

    file: str  # a listed file
    begin: int  # byte range in that file (absolute)
    end: int
    offsets: tuple[int, ...]  # global offsets and lengths of the box
    lengths: tuple[int, ...]
    digest: str  # xxh3-128 of bytes [begin, end)
    max_abs: float | None = None
    finite: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardedTensor:
    """A tensor of a sharded checkpoint: global shape and dtype, and the chunks that tile it."""

    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    run: str
    step: int
    generation: int
    world_size: int
    created_unix: float
    compat: dict[str, Any]
    compat_fingerprint: str
    metrics: dict[str, Any]
    files: tuple[FileEntry, ...]
    # file -> tensor -> stat: a dict per tensor in older manifests, a TensorTable (columns) from format 2 files on
    tensors: dict[str, Mapping[str, TensorStat]] = field(default_factory=dict)
    torch: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    layout: dict[str, str] = field(default_factory=dict)  # state key -> fingerprint of its (name, shape, dtype) list
    # file -> top-level key of its state tree -> digest (formats.tree_key_digests); empty in older manifests
    trees: dict[str, dict[str, str]] = field(default_factory=dict)
    # tensor name (as the state tree references it) -> its chunks; empty unless saved sharded
    sharded: dict[str, ShardedTensor] = field(default_factory=dict)


def check_file_name(name: object) -> str:
    """A file name from a manifest: one safe path component, or ManifestError (F47)."""
    if not isinstance(name, str):
        raise ManifestError("path_escape", f"file name {name!r} is not a string")
    if "\x00" in name or "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise ManifestError("path_escape", f"file name {name!r} could leave the checkpoint directory")
    if not FILE_NAME_RE.match(name):
        raise ManifestError("bad_file_name", f"file name {name!r} is not a plain checkpoint file name")
    return name


def compat_fingerprint(compat: dict[str, Any]) -> str:
    """A stable hash of the compatibility dict (sorted JSON), so a mismatch is found before any data is read."""
    blob = json.dumps(compat, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def layout_fingerprint(layout: dict[str, str]) -> str:
    """A stable hash of a whole layout (state key -> module fingerprint): equal only for the same state structure."""
    return compat_fingerprint(layout)


def _finite_float(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestDraft:
    """What the writer knows of a checkpoint before its manifest exists: :func:`build` turns it into bytes.

    The same fields as :class:`Manifest`, less the ones :func:`build` derives (the format and
    the compat fingerprint); ``torch_version`` becomes ``Manifest.torch``.
    """

    run: str
    step: int
    generation: int
    world_size: int
    created_unix: float
    compat: dict[str, Any]
    metrics: dict[str, Any]
    files: list[FileEntry]
    tensors: dict[str, Mapping[str, TensorStat]]
    torch_version: str
    writer: dict[str, Any]
    layout: dict[str, str] = field(default_factory=dict)
    trees: dict[str, dict[str, str]] = field(default_factory=dict)
    sharded: dict[str, ShardedTensor] = field(default_factory=dict)


def build(draft: ManifestDraft) -> bytes:
    """The manifest bytes (canonical JSON). Validated by parsing it back, so we never commit one we would reject."""
    doc = {
        "format": FORMAT,
        "run": draft.run,
        "step": draft.step,
        "generation": draft.generation,
        "world_size": draft.world_size,
        "created_unix": draft.created_unix,
        "compat": draft.compat,
        "compat_fingerprint": compat_fingerprint(draft.compat),
        "metrics": {k: (_finite_float(v) if isinstance(v, float) else v) for k, v in draft.metrics.items()},
        "files": {
            f.name: ({"size": f.size, "xxh3_128": f.digest} | ({"rank": f.rank} if f.rank is not None else {}))
            for f in draft.files
        },
        "tensors": {
            fname: {
                tname: {"xxh3_128": s.digest, "max_abs": s.max_abs, "finite": s.finite} for tname, s in stats.items()
            }
            for fname, stats in draft.tensors.items()
            if not isinstance(stats, TensorTable)
        },
        "tables": {fname: t.to_json() for fname, t in draft.tensors.items() if isinstance(t, TensorTable)},
        "torch": draft.torch_version,
        "writer": draft.writer,
        "layout": draft.layout,
        "trees": draft.trees,
    }
    if draft.sharded:
        doc["sharded"] = {n: sharded_to_json(t) for n, t in draft.sharded.items()}
    data = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode()
    parse(data)
    return data


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError("duplicate_key", f"key {k!r} appears twice")
        out[k] = v
    return out


def _int(doc: dict, key: str, lo: int, hi: int) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ManifestError("bad_field", f"{key!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ManifestError("bad_field", f"{key!r}={v} is outside [{lo}, {hi}]")
    return v


def parse(data: bytes) -> Manifest:
    """Parse manifest bytes. Raises :class:`ManifestError` (only) for anything we would not trust.

    Each step below checks one part of the document and names the field it refuses.
    """
    doc = _decode(data)
    fmt = _format(doc)
    run = doc.get("run")
    if not isinstance(run, str) or not NAME_RE.match(run):
        raise ManifestError("bad_field", f"run {run!r} is not a run name")
    step = _int(doc, "step", 0, MAX_STEP)
    generation = _int(doc, "generation", 0, MAX_GENERATION)
    world_size = _int(doc, "world_size", 1, MAX_WORLD_SIZE)
    created = doc.get("created_unix", 0.0)
    if not _finite_number(created):
        raise ManifestError("bad_field", "created_unix must be a finite number")
    compat = doc.get("compat", {})
    metrics = doc.get("metrics", {})
    if not isinstance(compat, dict) or not isinstance(metrics, dict):
        raise ManifestError("bad_field", "compat and metrics must be objects")
    fp = doc.get("compat_fingerprint")
    if not isinstance(fp, str) or len(fp) > 128:
        raise ManifestError("bad_field", "compat_fingerprint must be a short string")
    files_doc = doc.get("files") or {}  # None, [] or 0 are refused as {} is: "must be a non-empty object"
    files = _files(files_doc, world_size)
    tensors: dict[str, Mapping[str, TensorStat]] = {**_tensors(doc.get("tensors", {}), files_doc)}
    tensors.update(_tables(doc.get("tables", {}), files_doc))
    writer = doc.get("writer", {})
    return Manifest(
        run=run,
        step=step,
        generation=generation,
        world_size=world_size,
        created_unix=float(created),
        compat=compat,
        compat_fingerprint=fp,
        metrics=metrics,
        files=files,
        tensors=tensors,
        torch=str(doc.get("torch", "")),
        writer=writer if isinstance(writer, dict) else {},
        format=fmt,
        layout=_layout(doc.get("layout", {})),
        trees=_trees(doc.get("trees", {}), files_doc),
        sharded=_sharded(doc.get("sharded", {}), {f.name: f.size for f in files}),
    )


def _decode(data: bytes) -> dict[str, Any]:
    """The manifest's JSON object: size capped, UTF-8, no duplicate keys, no NaN/Infinity constants."""
    if len(data) == 0:
        raise ManifestError("empty_manifest", "manifest.json is empty")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest_too_large", f"{len(data)} bytes > cap {MAX_MANIFEST_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError("bad_json", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (ValueError, RecursionError) as e:
        raise ManifestError("bad_json", str(e)[:200]) from None
    if not isinstance(doc, dict):
        raise ManifestError("bad_json", "top level is not an object")
    return doc


def _format(doc: dict[str, Any]) -> str:
    """The schema this reader knows, or ``unsupported_schema`` (a newer writer's manifest is refused, not guessed)."""
    fmt = doc.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise ManifestError("unsupported_schema", f"format {fmt!r} is not a dist_guardian manifest")
    if fmt != FORMAT:
        raise ManifestError("unsupported_schema", f"format {fmt!r} is newer or unknown; this reader knows {FORMAT}")
    return fmt


def _files(files_doc: object, world_size: int) -> tuple[FileEntry, ...]:
    """The listed files: safe names (F47), bounded sizes, digests, and ranks inside the world."""
    if not isinstance(files_doc, dict) or not files_doc:
        raise ManifestError("bad_field", "files must be a non-empty object")
    if len(files_doc) > MAX_FILES:
        raise ManifestError("too_many_files", f"{len(files_doc)} files > cap {MAX_FILES}")
    files = []
    for name, entry in files_doc.items():
        check_file_name(name)
        if name == MANIFEST_NAME:
            raise ManifestError("bad_file_name", "the manifest cannot list itself")
        if not isinstance(entry, dict):
            raise ManifestError("bad_field", f"files[{name!r}] must be an object")
        size = _int(entry, "size", 0, MAX_FILE_SIZE)
        digest = entry.get("xxh3_128")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ManifestError("bad_field", f"files[{name!r}].xxh3_128 is not a 128-bit hex digest")
        rank = entry.get("rank")
        if rank is not None:
            rank = _int(entry, "rank", 0, world_size - 1)
        files.append(FileEntry(name=name, size=size, digest=digest, rank=rank))
    return tuple(files)


def _tensors(tensors_doc: object, files_doc: dict[str, Any]) -> dict[str, dict[str, TensorStat]]:
    """Per-tensor digests and save-time statistics, only for listed files."""
    if not isinstance(tensors_doc, dict):
        raise ManifestError("bad_field", "tensors must be an object")
    tensors: dict[str, dict[str, TensorStat]] = {}
    for fname, stats in tensors_doc.items():
        if fname not in files_doc or not isinstance(stats, dict):
            raise ManifestError("bad_field", f"tensors[{fname!r}] does not match a listed file")
        per: dict[str, TensorStat] = {}
        for tname, s in stats.items():
            if not isinstance(s, dict) or not isinstance(s.get("xxh3_128"), str):
                raise ManifestError("bad_field", f"tensors[{fname!r}][{tname!r}] is malformed")
            m = s.get("max_abs")
            if m is not None and not _finite_number(m):
                raise ManifestError("bad_field", f"tensors[{fname!r}][{tname!r}].max_abs is not a finite number")
            per[tname] = TensorStat(digest=s["xxh3_128"], max_abs=m, finite=bool(s.get("finite", True)))
        tensors[fname] = per
    return tensors


def _tables(tables_doc: object, files_doc: dict[str, Any]) -> dict[str, TensorTable]:
    """The columnar per-tensor stats of listed files (``tables.TensorTable``), checked column by column."""
    if not isinstance(tables_doc, dict):
        raise ManifestError("bad_field", "tables must be an object")
    out = {}
    for fname, doc in tables_doc.items():
        if fname not in files_doc:
            raise ManifestError("bad_field", f"tables[{fname!r}] does not match a listed file")
        try:
            out[fname] = TensorTable.from_json(doc)
        except TableError as e:
            raise ManifestError("bad_field", f"tables[{fname!r}]: {e}") from None
    return out


def _layout(layout: object) -> dict[str, str]:
    """State key -> structure fingerprint, each a short string."""
    if not isinstance(layout, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= 128 for k, v in layout.items()
    ):
        raise ManifestError("bad_field", "layout must map state keys to short fingerprints")
    return layout


def _trees(trees: object, files_doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Listed file -> top-level state key -> digest (T10)."""
    if not isinstance(trees, dict) or not all(
        fname in files_doc
        and isinstance(per, dict)
        and all(isinstance(k, str) and isinstance(d, str) and DIGEST_RE.fullmatch(d) for k, d in per.items())
        for fname, per in trees.items()
    ):
        raise ManifestError("bad_field", "trees must map listed files to {state key: 128-bit hex digest}")
    return trees


def sharded_to_json(t: ShardedTensor) -> dict[str, Any]:
    return {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "chunks": [
            {
                "file": c.file,
                "begin": c.begin,
                "end": c.end,
                "offsets": list(c.offsets),
                "lengths": list(c.lengths),
                "xxh3_128": c.digest,
                "max_abs": c.max_abs,
                "finite": c.finite,
            }
            for c in t.chunks
        ],
    }


MAX_CHUNKS = 1 << 22
_DTYPE_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,15}\Z")


def _sharded(doc: object, sizes: dict[str, int]) -> dict[str, ShardedTensor]:
    """Sharded tensors: chunks in listed files, inside the file and the tensor, tiling it without overlap."""
    if not isinstance(doc, dict):
        raise ManifestError("bad_field", "sharded must be an object")
    out: dict[str, ShardedTensor] = {}
    total = 0
    for name, t in doc.items():
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or not _DTYPE_RE.match(t["dtype"]):
            raise ManifestError("bad_field", f"sharded[{name[:200]!r}] lacks a dtype")
        shape = _dims(t.get("shape"), f"sharded[{name[:200]!r}].shape")
        chunks_doc = t.get("chunks")
        if not isinstance(chunks_doc, list):
            raise ManifestError("bad_field", f"sharded[{name[:200]!r}].chunks must be a list")
        total += len(chunks_doc)
        if total > MAX_CHUNKS:
            raise ManifestError("too_many_chunks", f"more than {MAX_CHUNKS} chunks")
        chunks = tuple(_chunk(c, name, shape, sizes) for c in chunks_doc)
        _check_tiling(name, shape, chunks)
        out[name] = ShardedTensor(dtype=t["dtype"], shape=shape, chunks=chunks)
    return out


def _dims(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) for d in v):
        raise ManifestError("bad_field", f"{what} must be a list of integers")
    if any(not 0 <= d < 1 << 48 for d in v):
        raise ManifestError("bad_field", f"{what} is out of range")
    return tuple(v)


def _chunk(c: object, name: str, shape: tuple[int, ...], sizes: dict[str, int]) -> Chunk:
    where = f"sharded[{name[:200]!r}] chunk"
    if not isinstance(c, dict) or c.get("file") not in sizes:
        raise ManifestError("bad_field", f"{where} does not name a listed file")
    begin = _int(c, "begin", 0, MAX_FILE_SIZE)
    end = _int(c, "end", begin, sizes[c["file"]])
    offsets = _dims(c.get("offsets"), f"{where} offsets")
    lengths = _dims(c.get("lengths"), f"{where} lengths")
    if len(offsets) != len(shape) or len(lengths) != len(shape):
        raise ManifestError("bad_field", f"{where} has {len(offsets)} dims, the tensor {len(shape)}")
    if any(o + n > d for o, n, d in zip(offsets, lengths, shape, strict=True)):
        raise ManifestError("bad_field", f"{where} {offsets}+{lengths} lies outside the shape {list(shape)}")
    digest, m = c.get("xxh3_128"), c.get("max_abs")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ManifestError("bad_field", f"{where} has no 128-bit hex digest")
    if m is not None and not _finite_number(m):
        raise ManifestError("bad_field", f"{where} max_abs is not a finite number")
    return Chunk(
        file=c["file"],
        begin=begin,
        end=end,
        offsets=offsets,
        lengths=lengths,
        digest=digest,
        max_abs=m,
        finite=bool(c.get("finite", True)),
    )


def _check_tiling(name: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> None:
    """The chunks cover the tensor exactly: their volumes add up and no two overlap (a sweep along dim 0)."""
    vol = sum(math.prod(c.lengths) for c in chunks)
    if vol != math.prod(shape):
        raise ManifestError("bad_field", f"sharded[{name[:200]!r}]: chunks cover {vol} of {math.prod(shape)} elements")
    if not shape:
        return
    boxes = sorted((c for c in chunks if math.prod(c.lengths)), key=lambda c: c.offsets[0])
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if b.offsets[0] >= a.offsets[0] + a.lengths[0]:
                break
            if all(
                max(ao, bo) < min(ao + al, bo + bl)
                for ao, al, bo, bl in zip(a.offsets, a.lengths, b.offsets, b.lengths, strict=True)
            ):
                raise ManifestError(
                    "bad_field", f"sharded[{name[:200]!r}]: chunks at {a.offsets} and {b.offsets} overlap"
                )


def _finite_number(v: object) -> bool:
    """A JSON number usable as a float: 10**400 would raise OverflowError in float(), 1e400 parses as inf."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _reject_constant(name: str) -> Any:
    raise ManifestError("bad_json", f"non-standard JSON constant {name}")
