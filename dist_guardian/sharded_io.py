"""Sharded tensors on disk: each rank writes its chunks, each rank reads back only what it needs.

Saving: the ranks agree on one writer per distinct box (:func:`agree`), then every rank writes
the boxes it was given into one native file,
``shards-<rank>-of-<world>.dgt``, one row block per tensor entry; the manifest lists each
chunk's global box, byte range, xxh3-128 and ``max|x|`` (``manifest.ShardedTensor``).

Loading: for each tensor the state tree references, this rank computes the box its live
layout needs (``sharding.Targets``), reads the byte ranges of the chunks that overlap it
(ranged reads, local ``pread`` or remote), hashes each against the manifest, and assembles
its local shard in fresh staging memory. A chunk whose bytes differ makes the candidate
suspect (the sanity gate then judges it, as for any checksum mismatch); a chunk that cannot
be read fails the attempt. Nothing live is touched (F29).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from . import formats, geometry, manifest, sharding, statetree, stores
from .comm import Comm
from .commit import WrittenEntry, write_file
from .errors import CheckpointFormatError
from .geometry import Box
from .layout import shard_file_name
from .stores import Store

log = logging.getLogger(__name__)

READ_THREADS = 4

# ----------------------------------------------------------------------------- save


@dataclass
class _Piece:
    entry: str  # tensor entry name in the shard file
    name: str  # tensor name in the state tree
    box: Box
    tensor: torch.Tensor  # the contiguous CPU bytes to write


@dataclass
class ShardPlan:
    """One save's sharded layout on this rank: the tree (tensors by reference) and the chunks it writes."""

    encoded: Any  # the replicated state tree, JSON-able, tensors referenced by name
    tensors: dict[str, torch.Tensor]  # name -> the tensor (a DTensor or a plain one) as this rank holds it
    mine: set[tuple[str, tuple[int, ...]]]  # (name, global offsets) of the boxes this rank writes


def agree(comm: Comm, replicated: dict[str, Any], step: int) -> ShardPlan:
    """Collective: every rank offers the boxes it holds; each distinct box gets one writer.

    The holders of a box are the ranks that offered it (a ``Replicate()`` mesh dim, a parameter
    on a sub-mesh, a plain tensor every rank holds); the largest boxes go first, each to its
    least loaded holder, so replicated state is written once and spread over the ranks (DCP
    dedups its save plans centrally for the same reason). A rank that cannot offer (a
    ``Partial()`` placement, a dtype the format lacks) fails the save on every rank.
    """
    enc = statetree.Encoder()
    doc: dict[str, Any] = {}
    try:
        encoded = enc.encode(replicated, "")
        doc = {"offer": _offer(enc.tensors)}
    except Exception as e:  # travels as data: every rank reaches the gather
        doc = {"error": f"{type(e).__name__}: {e}"}
    texts = comm.gather_strings(json.dumps(doc), f"gather chunk offers of step {step}", max_len=1 << 26)
    docs = [json.loads(t) for t in texts]
    bad = [f"rank {r}: {d['error']}" for r, d in enumerate(docs) if "error" in d]
    if bad:
        raise CheckpointFormatError("; ".join(bad))
    return ShardPlan(encoded=encoded, tensors=enc.tensors, mine=_assign([d["offer"] for d in docs], comm.rank))


def _offer(tensors: dict[str, torch.Tensor]) -> list[list[Any]]:
    """[name, offsets, lengths, bytes] of every non-empty box this rank holds."""
    out = []
    for name, t in tensors.items():
        if t.dtype not in statetree.TO_ST:
            raise CheckpointFormatError(f"tensor {name!r}: dtype {t.dtype} is not supported by the native format")
        box = _box_of(name, t)
        if box is not None and box.volume:
            out.append([name, list(box.offsets), list(box.lengths), box.volume * t.element_size()])
    return out


def _box_of(name: str, t: torch.Tensor) -> Box | None:
    """The global box this rank holds of ``t`` (None: none, a rank outside its mesh)."""
    if not geometry.is_dtensor(t):
        return geometry.whole(t.shape)
    if any(p.is_partial() for p in t.placements):
        raise CheckpointFormatError(f"tensor {name!r}: a Partial() DTensor cannot be saved; reduce it first")
    if t.device_mesh.get_coordinate() is None:
        return None
    box = geometry.local_box(t.shape, t.device_mesh, t.placements)
    if tuple(t.to_local().shape) != box.lengths:
        raise CheckpointFormatError(f"tensor {name!r}: local shard {tuple(t.to_local().shape)} != box {box.lengths}")
    return box


def _assign(offers: list[list[list[Any]]], rank: int) -> set[tuple[str, tuple[int, ...]]]:
    """The boxes ``rank`` writes: the same answer on every rank, from the same gathered offers."""
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    size: dict[tuple[str, tuple[int, ...]], int] = {}
    for r, offer in enumerate(offers):
        for name, offsets, _lengths, nbytes in offer:
            key = (name, tuple(offsets))
            holders.setdefault(key, []).append(r)
            size[key] = nbytes
    load = [0] * len(offers)
    mine = set()
    for key in sorted(holders, key=lambda k: (-size[k], k)):
        w = min(holders[key], key=lambda r: (load[r], r))
        load[w] += size[key]
        if w == rank:
            mine.add(key)
    return mine


def write_shards(
    staging: str, plan: ShardPlan, *, rank: int, world: int, step: int
) -> tuple[WrittenEntry | None, dict[str, Any]]:
    """Write this rank's chunks; (its file entry or None when it writes none, chunk records by tensor name)."""
    pieces, records = _pieces(plan)
    if not pieces:
        return None, records
    by_entry = {p.entry: p for p in pieces}
    specs = [statetree.tensor_spec(p.entry, p.tensor) for p in pieces]
    spec_of = {s.name: s for s in specs}
    path = os.path.join(staging, shard_file_name(rank, world))
    written = write_file(
        path, "{}", specs, lambda s: statetree.max_abs(by_entry[s.name].tensor), rank=rank, step=step, file_rank=None
    )
    header = _header_of(path)
    for e in header.entries:
        p = by_entry[e.name]
        st = written.stats[e.name]
        records[p.name]["chunks"].append(
            {
                "file": written.entry.name,
                "begin": header.data_start + e.begin,
                "end": header.data_start + e.end,
                "offsets": list(p.box.offsets),
                "lengths": list(p.box.lengths),
                # A native file's per-tensor digest is 64-bit for packed small tensors (format 2): a chunk
                # is read and checked on its own, so it gets its own 128-bit digest of exactly its bytes.
                "xxh3_128": xxhash.xxh3_128_hexdigest(spec_of[e.name].data),
                "max_abs": st.max_abs,
                "finite": st.finite,
            }
        )
    return written, records


def _pieces(plan: ShardPlan) -> tuple[list[_Piece], dict[str, Any]]:
    """The row blocks this rank writes, and an empty chunk record for every tensor."""
    pieces: list[_Piece] = []
    records: dict[str, Any] = {}
    for name, t in plan.tensors.items():
        records[name] = {"dtype": statetree.TO_ST[t.dtype], "shape": list(t.shape), "chunks": []}
        box = _box_of(name, t)
        if box is None or (name, box.offsets) not in plan.mine:
            continue
        local = (t.to_local() if geometry.is_dtensor(t) else t).detach().cpu().contiguous()
        row_bytes = local[0].numel() * local.element_size() if local.dim() else local.element_size()
        for r, b in geometry.row_blocks(box, row_bytes):
            part = local[r : r + b.lengths[0]] if local.dim() else local
            pieces.append(_Piece(entry=f"{name}@{','.join(map(str, b.offsets))}", name=name, box=b, tensor=part))
    return pieces, records


def _header_of(path: str) -> formats.NativeHeader:
    """The header of a file this rank just wrote: where each entry's bytes landed."""
    fd = stores.open_regular(path)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return formats.parse_header(f, os.fstat(fd).st_size, name=path)
    finally:
        os.close(fd)


def merge(docs: list[dict[str, Any]]) -> dict[str, manifest.ShardedTensor]:
    """Rank 0: every rank's chunk records into the manifest's tensors (dtype and shape must agree)."""
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        for name, rec in d.items():
            have = out.setdefault(name, {"dtype": rec["dtype"], "shape": rec["shape"], "chunks": []})
            if have["dtype"] != rec["dtype"] or have["shape"] != rec["shape"]:
                raise CheckpointFormatError(f"tensor {name!r}: ranks disagree on its dtype or global shape")
            have["chunks"] += rec["chunks"]
    return {
        n: manifest.ShardedTensor(
            dtype=r["dtype"],
            shape=tuple(r["shape"]),
            chunks=tuple(
                manifest.Chunk(
                    file=c["file"],
                    begin=c["begin"],
                    end=c["end"],
                    offsets=tuple(c["offsets"]),
                    lengths=tuple(c["lengths"]),
                    digest=c["xxh3_128"],
                    max_abs=c["max_abs"],
                    finite=c["finite"],
                )
                for c in r["chunks"]
            ),
        )
        for n, r in out.items()
    }


# ----------------------------------------------------------------------------- load


@dataclass
class Assembled:
    """What this rank assembled from chunks: tensors by tree name, and what verification found."""

    tensors: dict[str, Any] = field(default_factory=dict)
    suspect: list[str] = field(default_factory=list)
    stats: dict[str, manifest.TensorStat] = field(default_factory=dict)
    bytes_read: int = 0


@dataclass
class _Read:
    chunk: manifest.Chunk
    into: torch.Tensor  # a uint8 view the chunk's bytes land in
    then: Callable[[torch.Tensor], None] | None  # copies the overlap out of ``into`` (None: read in place)
    name: str


def assemble(
    mf: manifest.Manifest, c_rel: str, store: Store, targets: sharding.Targets, *, concurrency: int | None = None
) -> Assembled:
    """Stage every sharded tensor on this rank: the overlapping chunks read, verified and placed."""
    out = Assembled()
    reads: list[_Read] = []
    for name, st in mf.sharded.items():
        dt = statetree.FROM_ST.get(st.dtype)
        if dt is None or st.dtype not in formats.DTYPE_SIZES:
            raise CheckpointFormatError(f"tensor {name!r}: dtype {st.dtype} is not supported by this torch")
        target = targets.get(name, st.shape)
        box = geometry.local_box(st.shape, target.mesh, target.placements) if target else geometry.whole(st.shape)
        local = torch.empty(box.lengths, dtype=dt)
        reads += _plan_reads(name, st, box, local)
        out.tensors[name] = sharding.wrap(local, target) if target else local
        finite = all(ch.finite for ch in st.chunks)
        maxes = [ch.max_abs for ch in st.chunks if ch.max_abs is not None]
        out.stats[name] = manifest.TensorStat(digest="", max_abs=max(maxes) if maxes else None, finite=finite)
    out.bytes_read = sum(r.chunk.end - r.chunk.begin for r in reads)
    out.suspect = _run_reads(store, c_rel, reads, concurrency)
    return out


def _plan_reads(name: str, st: manifest.ShardedTensor, box: Box, local: torch.Tensor) -> list[_Read]:
    """The chunks overlapping ``box``, each read straight into ``local`` when it is a row range of it."""
    esize = formats.DTYPE_SIZES[st.dtype]
    reads, covered = [], 0
    for ch in st.chunks:
        cbox = Box(offsets=ch.offsets, lengths=ch.lengths)
        ov = geometry.overlap(cbox, box) if box.lengths else (box if not ch.lengths else None)
        if ov is None or ov.volume == 0:
            continue
        if ch.end - ch.begin != cbox.volume * esize:
            raise CheckpointFormatError(f"tensor {name!r}: chunk at {list(ch.offsets)} spans the wrong byte count")
        covered += ov.volume
        if ov == cbox and cbox.lengths[1:] == box.lengths[1:]:
            dst = local[ov.slices(box)] if box.lengths else local
            reads.append(_Read(ch, dst.reshape(-1).view(torch.uint8), None, name))
            continue
        buf = torch.empty(ch.end - ch.begin, dtype=torch.uint8)
        dst = local[ov.slices(box)]
        src_slices = ov.slices(cbox)

        def then(b: torch.Tensor, dst=dst, src_slices=src_slices, lengths=ch.lengths) -> None:
            dst.copy_(b.view(local.dtype).view(lengths)[src_slices])

        reads.append(_Read(ch, buf, then, name))
    if covered != box.volume:
        raise CheckpointFormatError(
            f"tensor {name!r}: saved chunks cover {covered} of the {box.volume} elements needed"
        )
    return reads


def _run_reads(store: Store, c_rel: str, reads: list[_Read], concurrency: int | None) -> list[str]:
    """Read every planned chunk (threads), hash it against the manifest; the mismatches found."""
    fds: dict[str, int] = {}
    try:
        if store.is_local:
            for f in sorted({r.chunk.file for r in reads}):
                stores.check_dirs_no_symlink(store.root, f"{c_rel}/{f}")
                fds[f] = stores.open_regular(store.join(c_rel, f))

        def one(r: _Read) -> str | None:
            _MEMORY.prepare(r.into)
            mv = r.into.numpy().data
            if r.chunk.file in fds:
                _pread_all(fds[r.chunk.file], mv, r.chunk.begin, store.uri(c_rel, r.chunk.file))
            else:
                stores.read_range_into(store, f"{c_rel}/{r.chunk.file}", r.chunk.begin, mv, concurrency=concurrency)
            got = xxhash.xxh3_128(mv).hexdigest()  # hashes outside the GIL (xxh3_128_hexdigest holds it)
            if r.then is not None:
                r.then(r.into)
            if got != r.chunk.digest:
                return (
                    f"checksum_mismatch: {store.uri(c_rel, r.chunk.file)} chunk of {r.name} at "
                    f"{list(r.chunk.offsets)} expected={r.chunk.digest} got={got}"
                )
            return None

        with cf.ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="dist_guardian-chunks") as ex:
            found = list(ex.map(one, reads))
    finally:
        for fd in fds.values():
            os.close(fd)
    return [f for f in found if f]


class _Memory:
    """Fresh staging memory populated for a chunk's bytes in one system call, not one fault per page.

    Every staged byte lands in memory never touched before (nothing live changes before the vote,
    F29); on this VM each 4 KiB page that ``preadv`` faults in costs about as much as the copy
    into it (1 GiB from the page cache: 0.8-1.0 s into fresh memory, 0.2 s into touched memory).
    ``MADV_POPULATE_WRITE`` faults a destination's pages in at once, in the read thread and
    outside the GIL, so the four readers overlap it with each other's copies and hashes
    (measured, fresh processes: read + hash of 1 GiB in 8 MiB tensors 0.67-0.79 -> 0.55-0.70 CPU
    seconds). Contents are never written by it; a kernel without it (or not Linux) leaves the
    faults to the read, as before. (``MADV_HUGEPAGE`` was slower: the kernel compacts memory to
    find huge pages, and found none under load.)
    """

    POPULATE_WRITE = 23  # Linux 5.14+
    MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self._madvise: Any = None
        self._page = 0
        self._tried = False

    def _load(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._page = os.sysconf("SC_PAGE_SIZE")
                self._madvise = fn
            except (OSError, AttributeError, ValueError):
                self._madvise = None
        return self._madvise

    def prepare(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        madvise = self._load() if n >= self.MIN_BYTES else None
        if madvise is None:
            return
        ptr = t.data_ptr()
        lo, hi = -(-ptr // self._page) * self._page, (ptr + n) // self._page * self._page
        if hi > lo and madvise(lo, hi - lo, self.POPULATE_WRITE) != 0:
            self._madvise = None  # unsupported here (EINVAL): the reads fault the pages in


_MEMORY = _Memory()


def _pread_all(fd: int, mv: memoryview, start: int, name: str) -> None:
    pos, n = 0, len(mv)
    while pos < n:
        got = os.preadv(fd, [mv[pos:]], start + pos)
        if got <= 0:
            raise CheckpointFormatError(f"{name}: truncated: chunk bytes {start}..{start + n} not all present")
        pos += got
