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
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash

from ..errors import CheckpointFormatError
from ..layout import NATIVE_SUFFIX  # noqa: F401 (re-exported)

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
    stats: dict[str, tuple[float | None, bool]] = field(default_factory=dict)  # name -> (max|x|, finite)


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
