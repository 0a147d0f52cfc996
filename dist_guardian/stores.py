"""The storage edge: resolve store URLs, list, read, publish atomically, delete.

Locations are ``str`` end to end. Local stores (a path, ``file://``, ``tmp://NAME``) use
``os`` directly, because atomic commit and safe opens need flags fsspec does not expose
(``O_EXCL``, ``O_NOFOLLOW``, ``O_NONBLOCK``, fsync of files and directories). Every other
URL goes through fsspec, with listing caches invalidated before discovery, a deadline we
own on every call (a frozen endpoint costs seconds, not the minutes of the client's
defaults), and errors translated to builtin ``OSError`` subclasses with the cause kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, TypeVar

from .errors import ConfigError, InsecurePathError, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
NODE_LOCAL_ENV = "DIST_GUARDIAN_NODE_LOCAL_ROOT"
STAGING_PREFIX = ".staging-"
STAGING_RE = re.compile(r"^\.staging-step-(\d{1,20})-([0-9a-f]{8,32})$")
STEP_DIR_RE = re.compile(r"^step-(\d{1,20})(?:-g(\d{1,12}))?$")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
DEFAULT_DEADLINE_S = 30.0
_OPEN_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Store:
    """A resolved store. ``url`` is exactly what the user gave; ``root`` is where it lives."""

    url: str
    index: int
    kind: Literal["local", "tmp", "remote"]
    root: str  # absolute local path, or an fsspec path without protocol
    protocol: str = "file"
    storage_options: dict[str, Any] = field(default_factory=dict)
    deadline_s: float = DEFAULT_DEADLINE_S

    @property
    def is_local(self) -> bool:
        return self.kind != "remote"

    def join(self, *parts: str) -> str:
        if self.is_local:
            return os.path.join(self.root, *parts)
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A location inside the store that a user can read in a log (protocol included)."""
        p = self.join(*parts)
        return p if self.is_local else f"{self.protocol}://{p.lstrip('/')}" if self.protocol != "memory" else f"memory://{p}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed object: a path relative to the listed prefix, its type and size."""

    rel: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int


# ----------------------------------------------------------------------------- resolving


def storage_options_for(url: str, options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The options whose key is the longest prefix of ``url`` (DESIGN section 1)."""
    best, best_len = {}, -1
    for prefix, opts in (options or {}).items():
        if url.startswith(prefix) and len(prefix) > best_len:
            best, best_len = dict(opts), len(prefix)
    return best


def resolve(url: str, index: int = 0, storage_options: dict[str, dict[str, Any]] | None = None) -> Store:
    """Turn a user's store URL into a :class:`Store`. Raises :class:`InsecurePathError` for an unsafe ``tmp://`` root."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"store {url!r} is not a URL or path")
    opts = storage_options_for(url, storage_options)
    deadline = float(opts.pop("deadline_s", DEFAULT_DEADLINE_S))
    if url.startswith("tmp://"):
        name = url[len("tmp://") :].strip("/")
        if not NAME_RE.match(name):
            raise ConfigError(f"store {url!r}: tmp:// takes one plain name, like tmp://run-42")
        base = node_local_base()
        root = os.path.join(base, name)
        _ensure_private_dir(root, what=f"node-local store {url}")
        return Store(url=url, index=index, kind="tmp", root=root, deadline_s=deadline)
    if url.startswith("file://"):
        path = url[len("file://") :]
        return Store(url=url, index=index, kind="local", root=os.path.abspath(path), deadline_s=deadline)
    if "://" not in url:
        return Store(url=url, index=index, kind="local", root=os.path.abspath(url), deadline_s=deadline)
    protocol, _, rest = url.partition("://")
    root = rest.rstrip("/")
    if protocol == "memory":
        root = "/" + root.lstrip("/")
    return Store(url=url, index=index, kind="remote", root=root, protocol=protocol, storage_options=opts, deadline_s=deadline)


def node_local_base() -> str:
    """``$TMPDIR/dist_guardian-<uid>``, or the root named by ``DIST_GUARDIAN_NODE_LOCAL_ROOT`` (one per "node" in tests)."""
    override = os.environ.get(NODE_LOCAL_ENV)
    base = os.path.abspath(override) if override else os.path.join(tempfile.gettempdir(), f"dist_guardian-{os.geteuid()}")
    _ensure_private_dir(base, what="node-local root")
    return base


def _ensure_private_dir(path: str, *, what: str) -> None:
    """Create ``path`` 0700 if missing; refuse it when it is a symlink, foreign-owned or group/world-writable (F37, F48)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"{what} {path}: cannot create it ({e.strerror})") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePathError(f"node_local_root_insecure: {what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError(f"node_local_root_insecure: {what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise InsecurePathError(
            f"node_local_root_insecure: {what} {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
        )
    if st.st_mode & 0o022:
        raise InsecurePathError(
            f"node_local_root_insecure: {what} {path} has mode {stat.S_IMODE(st.st_mode):04o} "
            "(group/world-writable); fix with chmod 700 or remove it"
        )


# ----------------------------------------------------------------------------- fsspec and deadlines

_fs_lock = threading.Lock()
_fs_cache: dict[tuple, Any] = {}
_pool = cf.ThreadPoolExecutor(max_workers=16, thread_name_prefix="dist_guardian-io")


def filesystem(store: Store):
    """The fsspec filesystem of a remote store (one per store, never fsspec's shared instance cache)."""
    key = (store.protocol, repr(sorted(store.storage_options.items())))
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            import fsspec

            opts = dict(store.storage_options)
            if store.protocol in ("s3", "s3a"):
                opts = _s3_defaults(opts)
            retries = opts.pop("retries", None)
            fs = fsspec.filesystem(store.protocol, skip_instance_cache=True, **opts)
            if retries is not None and hasattr(fs, "retries"):
                fs.retries = int(retries)  # s3fs: an attribute, not a constructor argument
            _fs_cache[key] = fs
        return fs


def _s3_defaults(opts: dict[str, Any]) -> dict[str, Any]:
    """Tight, explicit timeouts and retries: a frozen endpoint must cost seconds (413 s with s3fs defaults)."""
    opts = dict(opts)
    cfg = dict(opts.get("config_kwargs") or {})
    cfg.setdefault("connect_timeout", 3)
    cfg.setdefault("read_timeout", 20)
    cfg.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    opts["config_kwargs"] = cfg
    opts.setdefault("retries", 2)
    return opts


def call(store: Store, what: str, fn: Callable[[], T], deadline_s: float | None = None) -> T:
    """Run one remote operation under our deadline, translating errors to ``OSError`` subclasses."""
    limit = store.deadline_s if deadline_s is None else deadline_s
    fut = _pool.submit(fn)
    try:
        return fut.result(timeout=limit)
    except cf.TimeoutError:
        fut.cancel()
        raise StoreUnavailable(errno.ETIMEDOUT, f"store_unreachable store={store.url}: {what} did not answer within {limit:.1f}s") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, StoreError):
        raise
    except PermissionError as e:
        raise StoreUnavailable(errno.EACCES, f"store_auth_failed store={store.url}: {what}: {e}") from e
    except OSError as e:
        raise StoreUnavailable(e.errno or errno.EIO, f"store_unreachable store={store.url}: {what}: {e}") from e
    except Exception as e:  # botocore/aiohttp errors are not OSErrors: translate, keep the cause
        name = type(e).__name__
        if "NoSuchKey" in name or "NotFound" in name:
            raise FileNotFoundError(errno.ENOENT, f"{what}: {e}") from e
        if any(k in name for k in ("Credential", "AccessDenied", "Forbidden", "Signature", "InvalidAccessKey")):
            raise StoreUnavailable(errno.EACCES, f"store_auth_failed store={store.url}: {what}: {name}: {e}") from e
        raise StoreUnavailable(errno.EIO, f"store_unreachable store={store.url}: {what}: {name}: {e}") from e


# ----------------------------------------------------------------------------- local safe opens


def open_regular(path: str) -> int:
    """Open a local file for reading without following a symlink or blocking on a FIFO (F45, F46).

    Returns an fd positioned at 0, or raises ``OSError`` naming the path and what it is.
    """
    try:
        fd = os.open(path, _OPEN_READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InsecurePathError(errno.ELOOP, f"{path} is a symlink; refusing to follow it") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecurePathError(errno.EINVAL, f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        # O_NONBLOCK only guarded the open against a FIFO; reads of a regular file block as usual.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_dirs_no_symlink(root: str, rel: str) -> None:
    """Refuse a relative path whose intermediate components are symlinks (a planted dir link, F45)."""
    cur = root
    for part in rel.split("/")[:-1]:
        if not part:
            continue
        cur = os.path.join(cur, part)
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            raise InsecurePathError(errno.ELOOP, f"{cur} is a symlink; refusing to follow it")


# ----------------------------------------------------------------------------- listing


def list_tree(store: Store, prefix: str, max_depth: int = 2, max_entries: int = 2_000_000) -> list[Entry]:
    """Every entry under ``prefix`` up to ``max_depth`` levels: one listing (one paginated request remotely).

    Raises ``FileNotFoundError`` when the prefix does not exist, :class:`StoreUnavailable`
    when the store does not answer. Symlinks are reported, never followed.
    """
    if store.is_local:
        return _list_local(store.join(prefix), max_depth, max_entries)
    fs = filesystem(store)
    base = store.join(prefix).rstrip("/")

    def run() -> list[Entry]:
        fs.invalidate_cache()
        found = fs.find(base, withdirs=True, detail=True)
        out = []
        for path, info in found.items():
            p = str(path).lstrip("/")
            b = base.lstrip("/")
            if not p.startswith(b + "/"):
                continue
            rel = p[len(b) + 1 :]
            if not rel or rel.count("/") >= max_depth:
                continue
            kind = "dir" if info.get("type") == "directory" else "file"
            out.append(Entry(rel, kind, int(info.get("size") or 0)))
            if len(out) > max_entries:
                raise StoreError(f"listing {store.uri(prefix)} exceeds {max_entries} entries")
        # Object stores have no directories: derive them from the keys.
        dirs = {e.rel.rsplit("/", 1)[0] for e in out if "/" in e.rel}
        known = {e.rel for e in out}
        out += [Entry(d, "dir", 0) for d in sorted(dirs - known)]
        return out

    return call(store, f"list {store.uri(prefix)}", run)


def _list_local(base: str, max_depth: int, max_entries: int) -> list[Entry]:
    out: list[Entry] = []

    def walk(path: str, rel: str, depth: int) -> None:
        with os.scandir(path) as it:
            for de in it:
                r = f"{rel}/{de.name}" if rel else de.name
                st = de.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    kind = "symlink"
                elif stat.S_ISDIR(st.st_mode):
                    kind = "dir"
                elif stat.S_ISREG(st.st_mode):
                    kind = "file"
                else:
                    kind = "other"
                out.append(Entry(r, kind, st.st_size if kind == "file" else 0))
                if len(out) > max_entries:
                    raise StoreError(f"listing {base} exceeds {max_entries} entries")
                if kind == "dir" and depth + 1 < max_depth:
                    try:
                        walk(de.path, r, depth + 1)
                    except PermissionError as e:
                        log.warning("cannot list %s: %s", de.path, e)

    walk(base, "", 0)
    return out


# ----------------------------------------------------------------------------- reading


def read_small(store: Store, rel: str, max_bytes: int) -> bytes:
    """Read a small file (a manifest) whole, refusing one larger than ``max_bytes``."""
    if store.is_local:
        check_dirs_no_symlink(store.root, rel)
        path = store.join(rel)
        fd = open_regular(path)
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise OSError(errno.EFBIG, f"{path} is {size} bytes, over the cap of {max_bytes}")
            return f.read(max_bytes + 1)[: max_bytes + 1]
    fs = filesystem(store)
    path = store.join(rel)

    def run() -> bytes:
        size = int(fs.info(path).get("size") or 0)
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{store.uri(rel)} is {size} bytes, over the cap of {max_bytes}")
        return fs.cat_file(path)

    return call(store, f"read {store.uri(rel)}", run)


def remote_size(store: Store, rel: str) -> int:
    fs = filesystem(store)
    path = store.join(rel)
    return call(store, f"stat {store.uri(rel)}", lambda: int(fs.info(path).get("size") or 0))


def read_range_into(store: Store, rel: str, start: int, buf: memoryview, *, concurrency: int = 1, part_size: int = 16 << 20) -> None:
    """Fill ``buf`` with bytes ``[start, start+len(buf))`` of a remote file, with parallel ranged reads.

    On this machine's moto server one GET stream is faster than many ranged ones
    (research/performance.md); real S3 wants several connections: ``concurrency`` decides.
    The deadline applies to each part, so a hung endpoint costs seconds.
    """
    fs = filesystem(store)
    path = store.join(rel)
    n = len(buf)
    if n == 0:
        return
    parts = [(o, min(o + part_size, n)) for o in range(0, n, part_size)] if concurrency > 1 else [(0, n)]

    def fetch(lo: int, hi: int) -> None:
        data = fs.cat_file(path, start=start + lo, end=start + hi)
        if len(data) != hi - lo:
            raise OSError(errno.EIO, f"{store.uri(rel)}: short read ({len(data)} of {hi - lo} bytes at {start + lo})")
        buf[lo:hi] = data

    limit = store.deadline_s * max(1, (n // part_size) + 1) if concurrency <= 1 else store.deadline_s * 4
    if len(parts) == 1:
        call(store, f"read {store.uri(rel)}", lambda: fetch(0, n), deadline_s=limit)
        return
    with cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dist_guardian-get") as ex:
        futs = [ex.submit(call, store, f"read {store.uri(rel)}[{lo}:{hi}]", (lambda lo=lo, hi=hi: fetch(lo, hi))) for lo, hi in parts]
        for f in futs:
            f.result()


# ----------------------------------------------------------------------------- local commit


def create_exclusive(path: str) -> int:
    """A new file, 0600, never replacing anything and never through a symlink."""
    return os.open(path, _CREATE_FLAGS, 0o600)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_local(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def new_staging_name(step: int) -> str:
    return f"{STAGING_PREFIX}step-{step:012d}-{uuid.uuid4().hex[:16]}"


def step_dir_name(step: int, generation: int | None = None) -> str:
    return f"step-{step:012d}" + (f"-g{generation}" if generation is not None else "")


def rename_commit(staging: str, final: str) -> None:
    """The local commit point: rename the fsynced staging dir to its final name, then fsync the parent.

    Raises ``FileExistsError`` when ``final`` already holds a checkpoint (F38): nothing is replaced.
    """
    parent = os.path.dirname(final)
    fsync_dir(staging)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, f"{final} already exists", final)
    try:
        os.rename(staging, final)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, f"{final} already exists", final) from e
        raise
    fsync_dir(parent)


def remove_tree_local(path: str) -> None:
    """Remove a staging dir or a deleted checkpoint's leftovers without following symlinks."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    shutil.rmtree(path)


def clean_stale_staging(store: Store, run: str, older_than_s: float = 3600.0, now: float | None = None) -> list[str]:
    """Remove our own staging dirs older than the threshold; never anything else (F09)."""
    removed: list[str] = []
    if not store.is_local:
        return removed
    base = store.join(run)
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return removed
    for de in entries:
        if not STAGING_RE.match(de.name):
            continue
        try:
            st = de.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) or now - st.st_mtime < older_than_s:
                continue
            remove_tree_local(de.path)
            removed.append(de.path)
            log.info("removed stale staging dir %s", de.path)
        except OSError as e:
            log.warning("could not remove stale staging dir %s: %s", de.path, e)
    return removed


# ----------------------------------------------------------------------------- remote publish and delete


def put_file(store: Store, local_path: str, rel: str) -> None:
    """Upload a finished local file to its final key (never streamed: a failed stream could publish a partial object)."""
    fs = filesystem(store)
    path = store.join(rel)
    call(store, f"upload {store.uri(rel)}", lambda: fs.put_file(local_path, path), deadline_s=store.deadline_s * 20)


def put_bytes_exclusive(store: Store, rel: str, data: bytes) -> None:
    """Write a small object only if it does not exist (the manifest: the remote commit point, F38).

    S3 gets a conditional PUT (``If-None-Match: *``); other fsspec backends get an
    existence check first (not atomic: documented as best effort).
    """
    fs = filesystem(store)
    path = store.join(rel)

    def run() -> None:
        if store.protocol in ("s3", "s3a"):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except Exception as e:  # 412 Precondition Failed
                if "PreconditionFailed" in repr(e) or "412" in repr(e):
                    raise FileExistsError(errno.EEXIST, f"{store.uri(rel)} already exists") from e
                raise
            return
        if fs.exists(path):
            raise FileExistsError(errno.EEXIST, f"{store.uri(rel)} already exists")
        fs.pipe_file(path, data)

    call(store, f"commit {store.uri(rel)}", run)


def delete_remote(store: Store, rel: str) -> None:
    fs = filesystem(store)
    path = store.join(rel)
    call(store, f"delete {store.uri(rel)}", lambda: fs.rm_file(path))


def iter_chunks(fd: int, size: int, chunk: int = 64 << 20) -> Iterator[bytes]:
    left = size
    while left > 0:
        b = os.read(fd, min(chunk, left))
        if not b:
            break
        left -= len(b)
        yield b
