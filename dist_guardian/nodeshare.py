"""The replicated file fetched once per node: one rank reads it from the store, the others from shared memory.

Every rank needs the replicated state, so with ``k`` ranks per node a remote store served
``k`` GETs of the same bytes per node. Here the ranks of a node elect one reader without any
collective (the first to create a lock file in a private directory of ``/dev/shm``); it
fetches and verifies the file as before and, only when its digest matches the manifest,
publishes the bytes there (write, then rename). The other ranks wait for it and read the
published copy as a local file at memory speed, hashing it again (cheap from memory, and a
copy another local process could have touched is never trusted unchecked). Any trouble (the
reader failed, died, or the digest disagreed) sends every other rank back to the store, as
if there were no sharing: a failure here can cost time, never correctness.

Belongs here: the election, the publish, the wait and the cleanup (the last rank of the node
to finish removes the files). Enabled when the launcher says how many ranks share the node
(``LOCAL_WORLD_SIZE``, set by torchrun) and ``/dev/shm`` (or ``DIST_GUARDIAN_SHM_DIR``) is usable.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TypeVar

import xxhash

from . import formats, stores

log = logging.getLogger(__name__)

SHM_ENV = "DIST_GUARDIAN_SHM_DIR"
POLL_S = 0.01
STALE_S = 3600.0  # files of a node share older than this are leftovers of a dead job

T = TypeVar("T")
_uses: dict[str, int] = {}  # key -> how many times this process has fetched it (the same on every rank)


def local_world() -> tuple[int, int]:
    """(local rank, ranks on this node) as the launcher set them; (0, 1) when it did not."""
    try:
        n, r = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0, 1
    return (r, n) if 0 <= r < n else (0, 1)


def share_dir() -> str | None:
    """This user's private directory under ``/dev/shm``, created 0700; None when it cannot be trusted."""
    base = os.environ.get(SHM_ENV) or "/dev/shm"
    path = os.path.join(base, f"dist_guardian-{os.getuid()}")
    try:
        if not os.path.isdir(base):
            return None
        try:
            stores.mkdir_private(path)
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError as e:
        log.debug("node share unavailable at %s: %s", path, e)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        log.warning("node share %s is not a private directory of this user: every rank reads for itself", path)
        return None
    return path


def fetch_once(
    key_parts: tuple[str, ...],
    fetch: Callable[[], T],
    publish: Callable[[T, int], bool],
    read_published: Callable[[str], T],
    *,
    wait_s: float,
) -> T:
    """``fetch()`` on one rank of the node, ``read_published(path)`` on the others.

    ``publish(result, fd)`` writes the fetched file to ``fd`` and returns True, or returns
    False to keep it private (its digest disagreed): the other ranks then fetch it themselves.
    ``key_parts`` name the file and its expected digest; every rank passes the same ones.
    """
    local_rank, n = local_world()
    d = share_dir() if n > 1 else None
    if d is None:
        return fetch()
    base = "\0".join(key_parts)
    _uses[base] = _uses.get(base, 0) + 1
    ident = os.environ.get("TORCHELASTIC_RUN_ID", "") + "/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    key = xxhash.xxh3_128_hexdigest(f"{base}\0{ident}\0{os.environ.get('MASTER_PORT', '')}\0{_uses[base]}".encode())
    path = os.path.join(d, key)
    try:
        if _elect(path):
            return _lead(path, fetch, publish)
        got = _follow(path, read_published, wait_s)
        return fetch() if got is None else got
    finally:
        _done(d, path, local_rank, n)


def _elect(path: str) -> bool:
    """True on the one rank that creates the lock (it holds the reader's pid, for the others' liveness check)."""
    _sweep(os.path.dirname(path))
    try:
        fd = stores.create_exclusive(path + ".lock")
    except FileExistsError:
        return False
    try:
        formats.write_all(fd, memoryview(str(os.getpid()).encode()))
    finally:
        os.close(fd)
    return True


def _lead(path: str, fetch: Callable[[], T], publish: Callable[[T, int], bool]) -> T:
    try:
        result = fetch()
    except BaseException:
        _mark(path + ".failed")
        raise
    tmp = f"{path}.tmp"
    try:
        fd = stores.create_exclusive(tmp)
        try:
            ok = publish(result, fd)
        finally:
            os.close(fd)
        if ok:
            os.rename(tmp, path + ".dgt")
        else:
            _mark(path + ".failed")
    except OSError as e:  # /dev/shm full, say: the others read for themselves
        log.warning("could not share the replicated file on this node (%s); every rank reads it", e)
        _mark(path + ".failed")
    return result


def _follow(path: str, read_published: Callable[[str], T], wait_s: float) -> T | None:
    """The published copy, or None when the reader failed, died or took longer than ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.path.lexists(path + ".dgt"):
            return read_published(path + ".dgt")
        if os.path.lexists(path + ".failed") or not _reader_alive(path + ".lock"):
            return None
        time.sleep(POLL_S)
    log.warning("the node's reader of the replicated file took over %.0fs; reading it from the store", wait_s)
    return None


def _reader_alive(lock: str) -> bool:
    try:
        with stores.open_reader(lock) as f:
            raw = f.read(32)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep waiting until the deadline
    if not raw.isdigit():
        return True  # the reader has created the lock but not yet written its pid
    try:
        os.kill(int(raw), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _mark(path: str) -> None:
    try:
        os.close(stores.create_exclusive(path))
    except OSError:
        pass


def _done(d: str, path: str, local_rank: int, n: int) -> None:
    """Count this rank out; the last of the node removes the share's files."""
    _mark(f"{path}.done{local_rank}")
    prefix = os.path.basename(path)
    try:
        names = [x for x in os.listdir(d) if x.startswith(prefix)]
    except OSError:
        return
    if sum(1 for x in names if x.startswith(prefix + ".done")) < n:
        return
    for x in names:
        try:
            os.unlink(os.path.join(d, x))
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("could not remove %s: %s", x, e)


def _sweep(d: str) -> None:
    """Remove leftovers of dead jobs (older than :data:`STALE_S`), so /dev/shm does not fill up."""
    now = time.time()
    try:
        for x in os.listdir(d):
            p = os.path.join(d, x)
            try:
                if now - os.lstat(p).st_mtime > STALE_S:
                    os.unlink(p)
            except OSError:
                pass
    except OSError:
        pass
