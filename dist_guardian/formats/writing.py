"""Writing a native file: one pass that hashes each region while a writer thread writes the previous chunk.

Belongs here: :func:`write_native` and the plain ``write``/``writev`` loops it (and copying)
use to get every byte out. The file layout itself is ``native``'s.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import cast

import xxhash

from ..tables import TENSOR_DIGEST_HEX, TensorTable
from .native import REGION_BYTES, TensorSpec, WrittenFile, encode_header, region_bounds, tree_digest

_CHUNK = 64 * 1024 * 1024


def write_native(
    fd: int,
    tree_json: str,
    specs: Sequence[TensorSpec],
    *,
    hook=None,
    stats_fn: Callable[[TensorSpec], tuple[float | None, bool]] | None = None,
) -> WrittenFile:
    """Stream a native file to ``fd``, hashing each region as it goes out. The caller fsyncs.

    Two stages overlap: this thread hashes a chunk (and runs ``stats_fn`` on each tensor,
    e.g. its ``max|x|``) while a writer thread writes the previous one, so checksums cost
    nothing when the disk is the bottleneck. A region of packed small tensors gets one
    xxh3-128 and each of its tensors an xxh3-64 (to name it if the region is ever damaged);
    a big tensor is a region of its own. ``hook(point)`` is called at ``mid_data_write``
    (half-way through the payload), for tests. The stats land in ``WrittenFile.table``.
    """
    header, ordered = encode_header(tree_json, specs)
    sizes = [len(s.data) for s in ordered]
    total = sum(sizes)
    pipe = _WritePipe(fd)
    pipe.put(memoryview(header))
    pipe.mid_hook, pipe.mid = hook, (total + 1) // 2  # bytes of payload queued when the hook runs
    regions: list[str] = []
    raw_digests: list[bytes] = []
    tensor_digests: list[str] = []
    stats: list[tuple[float | None, bool]] = []
    try:
        for first, stop in region_bounds(sizes, REGION_BYTES):
            h = xxhash.xxh3_128()
            group = ordered[first:stop]
            if stats_fn is not None:
                got = [s.stats for s in group]  # the packed ones came with stats computed in bulk
                if None in got:
                    got = [st if st is not None else stats_fn(s) for s, st in zip(group, got, strict=True)]
                stats.extend(cast(list[tuple[float | None, bool]], got))
            if stop - first == 1:
                mv = ordered[first].data
                pieces = [mv[i : i + _CHUNK] for i in range(0, len(mv), _CHUNK)]
            else:
                tensor_digests.extend(map(xxhash.xxh3_64_hexdigest, [s.data for s in group]))
                pieces = _runs(group)
            for piece in pieces:
                h.update(piece)
                pipe.add_payload(piece)
            if stop - first == 1:
                tensor_digests.append(h.hexdigest()[:TENSOR_DIGEST_HEX])
            raw_digests.append(h.digest())
            regions.append(h.hexdigest())
        pipe.add_payload(memoryview(b""))  # an empty payload still reaches its midpoint
        pipe.flush()
    finally:
        pipe.close()
    table = TensorTable(
        names=[s.name for s in ordered],
        digests="".join(tensor_digests),
        max_abs=[m for m, _ in stats] if stats_fn is not None else [None] * len(ordered),
        nonfinite=frozenset(i for i, (_, ok) in enumerate(stats) if not ok),
        regions=regions,
    )
    return WrittenFile(size=len(header) + total, digest=tree_digest(header, raw_digests), table=table)


def _runs(specs: Sequence[TensorSpec]) -> list[memoryview]:
    """The bytes of consecutive specs as few buffers as possible: neighbours packed into one ``base`` merge."""
    out: list[memoryview] = []
    base: memoryview | None = None
    lo = hi = 0
    for s in specs:
        if s.base is not None and s.base is base and s.base_offset == hi:
            hi += len(s.data)
            continue
        if base is not None:
            out.append(base[lo:hi])
        if s.base is not None:
            base, lo, hi = s.base, s.base_offset, s.base_offset + len(s.data)
        else:
            base = None
            out.append(s.data)
    if base is not None:
        out.append(base[lo:hi])
    return out


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
        self.queued = 0  # payload bytes handed to add_payload
        self.mid = 0
        self.mid_hook: Callable[[str], object] | None = None
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

    def add_payload(self, mv: memoryview) -> None:
        """:meth:`add` for payload bytes: at the midpoint (``mid`` bytes queued), drain and call ``mid_hook``."""
        hook = self.mid_hook
        if hook is not None and self.queued + len(mv) >= self.mid:
            k = self.mid - self.queued
            if k > 0:
                self.add(mv[:k])
                self.queued += k
            self.drain()
            self.mid_hook = None
            hook("mid_data_write")
            mv = mv[max(k, 0) :]
        if len(mv):
            self.add(mv)
            self.queued += len(mv)

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
        write_all(fd, bufs[0])
        return
    total = sum(len(b) for b in bufs)
    n = os.writev(fd, bufs)
    if n == total:
        return
    for b in bufs:  # a short writev: finish the rest piece by piece
        if n >= len(b):
            n -= len(b)
            continue
        write_all(fd, b[n:])
        n = 0


def write_all(fd: int, mv: memoryview) -> None:
    """Write all of ``mv`` to ``fd``: ``os.write`` may write less than asked."""
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]
