"""Listing, stat and reads of any store: local stores go to :mod:`.local`, the rest through fsspec.

Belongs here: :func:`list_tree` (one listing; remote listings bypass fsspec's listing cache,
so other processes' writes and deletes are seen), :func:`read_small`, :func:`stat_object`,
:func:`remote_size`, :func:`read_range_into` (one GET stream or parallel ranged GETs,
straight into the caller's buffer) and how many connections a remote read uses.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import time

from ..errors import StoreError
from . import local, s3
from .base import Entry, EntryKind, Store, is_loopback
from .deadline import acall, call, filesystem, run
from .local import OnChunk
from .progress import Transfer

log = logging.getLogger(__name__)

# Remote reads. A server that copies the whole object for every GET (moto, and most local
# test servers) is 5-30x faster with one GET stream than with parallel ranges
# (research/performance.md); real S3 serves ~50-90 MB/s per connection and wants several.
LOOPBACK_CONCURRENCY = 1
REMOTE_CONCURRENCY = 8
_tuned: dict[tuple, int] = {}  # store.key -> the concurrency tune_read_concurrency measured fastest


def list_tree(store: Store, prefix: str, max_depth: int = 2, max_entries: int = 2_000_000) -> list[Entry]:
    """Every entry under ``prefix`` up to ``max_depth`` levels: one listing (one paginated request remotely).

    A prefix with nothing under it lists as ``[]`` (an object store cannot tell an empty
    prefix from a missing one). Raises :class:`StoreUnavailable` when the store does not
    answer or refuses us. Symlinks are reported, never followed. Remote listings bypass
    fsspec's listing cache, so other processes' writes and deletes are seen.
    """
    if store.is_local:
        try:
            return local.list_local(store.join(prefix), max_depth, max_entries)
        except FileNotFoundError:
            return []
    fs = filesystem(store)
    base = store.join(prefix).rstrip("/")
    what = f"list {store.uri(prefix)}"
    if store.is_s3:
        items = acall(store, what, lambda: s3.list_all(fs, base.lstrip("/")))
    else:

        def find() -> list[dict]:
            fs.invalidate_cache()
            try:
                return list(fs.find(base, withdirs=True, detail=True).values())
            except FileNotFoundError:
                return []

        items = call(store, what, find)
    return _entries(store, prefix, base.lstrip("/"), items, max_depth, max_entries)


def _mtime(info: dict) -> float | None:
    v = info.get("LastModified") or info.get("mtime") or info.get("created")
    if v is None:
        return None
    if hasattr(v, "timestamp"):
        return float(v.timestamp())
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _entries(store: Store, prefix: str, b: str, items: list[dict], max_depth: int, max_entries: int) -> list[Entry]:
    out: list[Entry] = []
    for info in items:
        p = str(info.get("name") or info.get("Key") or "").lstrip("/")
        if not p.startswith(b + "/"):
            continue
        rel = p[len(b) + 1 :].rstrip("/")
        if not rel or rel.count("/") >= max_depth:
            continue
        kind: EntryKind = "dir" if info.get("type") == "directory" else "file"
        out.append(Entry(rel, kind, int(info.get("size") or 0), _mtime(info)))
        if len(out) > max_entries:
            raise StoreError("listing_too_large", f"listing {store.uri(prefix)} exceeds {max_entries} entries")
    # Object stores have no directories: derive them from the keys.
    dirs: set[str] = set()
    for e in out:
        parts = e.rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    known = {e.rel for e in out}
    return out + [Entry(d, "dir", 0) for d in sorted(dirs - known)]


def read_small(store: Store, rel: str, max_bytes: int) -> bytes:
    """Read a small file (a manifest) whole, refusing one larger than ``max_bytes`` (one request remotely)."""
    if store.is_local:
        return local.read_small_local(store, rel, max_bytes)
    fs = filesystem(store)
    path = store.join(rel)
    # A ranged GET one byte past the cap: never more than the cap travels, and one request answers.
    data = run(
        store,
        f"read {store.uri(rel)}",
        lambda: fs.cat_file(path, start=0, end=max_bytes + 1),
        lambda: fs._cat_file(path, start=0, end=max_bytes + 1),
    )
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"{store.uri(rel)} is over the cap of {max_bytes} bytes")
    return bytes(data)


def remote_size(store: Store, rel: str) -> int:
    """The size of one file or object (a HEAD request remotely)."""
    if store.is_local:
        return local.stat_local(store, rel).size
    fs = filesystem(store)
    path = store.join(rel)

    async def a() -> int:
        return int((await fs._info(path, refresh=True)).get("size") or 0)

    return run(store, f"stat {store.uri(rel)}", lambda: int(fs.info(path).get("size") or 0), a)


def stat_object(store: Store, rel: str) -> Entry:
    """One object's size and mtime (a HEAD request remotely); ``FileNotFoundError`` when it is missing."""
    if store.is_local:
        return local.stat_local(store, rel)
    fs = filesystem(store)
    path = store.join(rel)

    def s() -> dict:
        return fs.info(path)

    async def a() -> dict:
        return await fs._info(path, refresh=True)

    info = run(store, f"stat {store.uri(rel)}", s, a)
    return Entry(rel, "dir" if info.get("type") == "directory" else "file", int(info.get("size") or 0), _mtime(info))


def read_range_into(
    store: Store,
    rel: str,
    start: int,
    buf: memoryview,
    *,
    concurrency: int | None = None,
    part_size: int | None = None,
    on_chunk: OnChunk | None = None,
    transfer: Transfer | None = None,
) -> None:
    """Fill ``buf`` with bytes ``[start, start+len(buf))`` of a file, straight into ``buf``.

    Remote reads use one GET stream or ``concurrency`` parallel ranged GETs of
    ``part_size`` (see :func:`read_concurrency`). ``on_chunk(lo, hi)`` is called as each
    piece ``buf[lo:hi]`` lands (in any order, from any thread: keep it cheap), so checksums
    can run while bytes arrive. The deadline counts from the last byte received.
    """
    n = len(buf)
    if n == 0:
        return
    if store.is_local:
        local.read_range_local(store, rel, start, buf, on_chunk, transfer)
        return
    fs = filesystem(store)
    path = store.join(rel)
    conc = read_concurrency(store, concurrency)
    psize = part_size or store.part_size
    parts = [(o, min(o + psize, n)) for o in range(0, n, psize)] if conc > 1 and n > psize else [(0, n)]
    transfer = transfer if transfer is not None else Transfer(n, f"read {store.uri(rel)}", show=False)
    what = f"read {store.uri(rel)}[{start}:{start + n}]"
    if store.is_s3:
        acall(
            store, what, lambda: s3.get_parts(fs, path, start, buf, parts, conc, on_chunk, transfer), transfer=transfer
        )
        return

    def fetch(lo: int, hi: int) -> None:
        data = fs.cat_file(path, start=start + lo, end=start + hi)
        if len(data) != hi - lo:
            raise OSError(errno.EIO, f"{store.uri(rel)}: short read ({len(data)} of {hi - lo} bytes at {start + lo})")
        buf[lo:hi] = data
        if on_chunk is not None:
            on_chunk(lo, hi)
        transfer.add(hi - lo)

    if len(parts) == 1:
        call(store, what, lambda: fetch(0, n), transfer=transfer)
        return
    with cf.ThreadPoolExecutor(max_workers=conc, thread_name_prefix="dist_guardian-get") as ex:
        futs = [ex.submit(call, store, what, (lambda lo=lo, hi=hi: fetch(lo, hi)), None, transfer) for lo, hi in parts]
        try:
            for f in futs:
                f.result()
        except BaseException:
            for f in futs:
                f.cancel()
            raise


def read_concurrency(store: Store, override: int | None = None) -> int:
    """How many connections a remote read uses: the override, the store's ``concurrency``, a
    measured choice (:func:`tune_read_concurrency`), else one stream for a loopback endpoint
    and :data:`REMOTE_CONCURRENCY` ranged parts for a real one."""
    if override:
        return int(override)
    if store.concurrency:
        return store.concurrency
    tuned = _tuned.get(store.key)
    if tuned:
        return tuned
    if store.protocol == "memory":
        return 1
    return LOOPBACK_CONCURRENCY if is_loopback(store) else REMOTE_CONCURRENCY


def tune_read_concurrency(
    store: Store, rel: str, choices: tuple[int, ...] = (1, 2, 4, 8), max_bytes: int = 256 << 20
) -> dict[int, float]:
    """Measure reads of one remote object at each concurrency; remember the fastest for this store.

    Returns {concurrency: bytes per second}. Later reads of the store (in this process)
    use the winner unless the store or the caller overrides it.
    """
    size = min(remote_size(store, rel), max_bytes)
    buf = bytearray(size)
    out: dict[int, float] = {}
    for c in choices:
        t0 = time.perf_counter()
        read_range_into(store, rel, 0, memoryview(buf), concurrency=c)
        out[c] = size / max(time.perf_counter() - t0, 1e-9)
    best = max(out, key=lambda k: out[k])
    _tuned[store.key] = best
    log.info(
        "read concurrency for %s measured: %s -> %d",
        store.url,
        ", ".join(f"{c}: {r / 1e6:.0f} MB/s" for c, r in out.items()),
        best,
    )
    return out
