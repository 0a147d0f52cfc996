"""Local stores (a path, ``file://``, ``tmp://NAME``) through ``os``: safe opens, listing, reads and the rename commit.

Belongs here: every open of a local file in the package (:func:`open_regular`,
:func:`create_exclusive`: no-follow, non-blocking, regular files only, T04), small-file
writes and atomic replacement, fsync of files and directories, the local listing and reads,
the staging-dir rename commit and the removal of our own leftovers, and the run-dir checks.
``os`` directly, because atomic commit and safe opens need flags fsspec does not expose
(``O_EXCL``, ``O_NOFOLLOW``, ``O_NONBLOCK``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from typing import BinaryIO

from ..errors import InsecurePathError, StoreError
from .base import STAGING_RE, Entry, EntryKind, Store
from .progress import Transfer

log = logging.getLogger(__name__)

OnChunk = Callable[[int, int], None]
_OPEN_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str) -> int:
    """Open a local file for reading without following a symlink or blocking on a FIFO (F45, F46).

    Returns an fd positioned at 0, or raises ``OSError`` naming the path and what it is.
    """
    return _open_checked(path, _OPEN_READ_FLAGS)


def _open_checked(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` with no-follow, non-blocking ``flags``, then refuse anything but a regular file (T04).

    Every open of a local file in the package comes through here, reads and writes alike: a
    FIFO planted where we read or write must never block the resume.
    """
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InsecurePathError("symlink", f"{path} is a symlink; refusing to follow it", errno=errno.ELOOP) from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecurePathError(
                "not_regular", f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})", errno=errno.EINVAL
            )
        # O_NONBLOCK only guarded the open against a FIFO; I/O on a regular file blocks as usual.
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
            raise InsecurePathError("symlink", f"{cur} is a symlink; refusing to follow it", errno=errno.ELOOP)


def make_run_dir(store: Store, run: str) -> str:
    """Create ``<store>/<run>`` (local) and check it as resume will: save refuses what resume would refuse.

    Resume never follows a symlink below a store's root (F45), so a save through a symlinked
    run dir would commit checkpoints that no resume can load (T09).
    """
    path = store.join(run)
    makedirs_local(path)
    check_run_dir(store, run)
    return path


def check_run_dir(store: Store, run: str) -> None:
    """Raise :class:`InsecurePathError` when ``<store>/<run>`` of a local store exists and is a symlink."""
    path = store.join(run)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePathError(
            "run_dir_symlink",
            f"{path} is a symlink, and resume never follows one below a store's root; "
            f"make the store root the link instead, or give a store whose {run!r} is a real directory",
            errno=errno.ELOOP,
        )


def list_local(base: str, max_depth: int, max_entries: int) -> list[Entry]:
    out: list[Entry] = []

    def walk(path: str, rel: str, depth: int) -> None:
        with os.scandir(path) as it:
            for de in it:
                r = f"{rel}/{de.name}" if rel else de.name
                st = de.stat(follow_symlinks=False)
                kind: EntryKind
                if stat.S_ISLNK(st.st_mode):
                    kind = "symlink"
                elif stat.S_ISDIR(st.st_mode):
                    kind = "dir"
                elif stat.S_ISREG(st.st_mode):
                    kind = "file"
                else:
                    kind = "other"
                out.append(Entry(r, kind, st.st_size if kind == "file" else 0, st.st_mtime))
                if len(out) > max_entries:
                    raise StoreError("listing_too_large", f"listing {base} exceeds {max_entries} entries")
                if kind == "dir" and depth + 1 < max_depth:
                    try:
                        walk(de.path, r, depth + 1)
                    except PermissionError as e:
                        log.warning("cannot list %s: %s", de.path, e)

    walk(base, "", 0)
    return out


def read_small_local(store: Store, rel: str, max_bytes: int) -> bytes:
    """Read a small local file whole through the safe open, refusing one larger than ``max_bytes``."""
    check_dirs_no_symlink(store.root, rel)
    path = store.join(rel)
    fd = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{path} is {size} bytes, over the cap of {max_bytes}")
        return f.read(max_bytes + 1)[: max_bytes + 1]


def stat_local(store: Store, rel: str) -> Entry:
    """One local entry's type, size and mtime, without following a symlink."""
    st = os.lstat(store.join(rel))
    kind: EntryKind = "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"
    return Entry(rel, kind, st.st_size, st.st_mtime)


def read_range_local(
    store: Store, rel: str, start: int, buf: memoryview, on_chunk: OnChunk | None, transfer: Transfer | None
) -> None:
    """Fill ``buf`` from byte ``start`` of a local file with ``preadv`` (64 MiB at a time)."""
    n = len(buf)
    fd = open_regular(store.join(rel))
    try:
        pos = 0
        while pos < n:
            k = os.preadv(fd, [buf[pos : min(n, pos + (64 << 20))]], start + pos)
            if k <= 0:
                raise OSError(errno.EIO, f"{store.join(rel)}: short read ({pos} of {n} bytes at {start})")
            if on_chunk is not None:
                on_chunk(pos, pos + k)
            if transfer is not None:
                transfer.add(k)
            pos += k
    finally:
        os.close(fd)


def create_exclusive(path: str) -> int:
    """A new file, 0600, never replacing anything, never through a symlink, never blocking on a FIFO."""
    return _open_checked(path, _CREATE_FLAGS)


def write_new_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new file (``create_exclusive``) and fsync it: a manifest, a small record."""
    fd = create_exclusive(path)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Atomically replace the small local file ``path`` (a journal entry) with ``data``, fsynced with its directory.

    Refuses (``InsecurePathError``) when ``path`` exists and is not a regular file (a planted
    FIFO, symlink or directory stays untouched, T04). ``data`` goes to a new file of a unique
    name first (:func:`write_new_file`), so nothing already there is ever opened.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise InsecurePathError(
                "not_regular",
                f"{path} is not a regular file (mode {stat.filemode(st.st_mode)}); left as it is",
                errno=errno.EINVAL,
            )
    tmp = f"{path}.{uuid.uuid4().hex[:16]}.tmp"
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that got us here is the one to report
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_local(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def mkdir_private(path: str) -> None:
    """One new directory only we can read (a staging dir): ``FileExistsError`` when something is there."""
    os.mkdir(path, 0o700)


def makedirs_private(root: str, rel_dir: str, *, mode: int = 0o700) -> None:
    """Create ``root/rel_dir`` (private ``mode``), refusing when an existing component is a symlink.

    ``os.makedirs`` follows a planted link: every existing component is checked before it runs.
    """
    cur = root
    for part in rel_dir.split("/"):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            break  # what is missing, makedirs creates as real directories
        if stat.S_ISLNK(st.st_mode):
            raise InsecurePathError("symlink", f"{cur} is a symlink; nothing is written through it", errno=errno.ELOOP)
    os.makedirs(os.path.join(root, rel_dir), mode=mode, exist_ok=True)


def is_dir(path: str) -> bool:
    """A local directory is there (symlinks followed, as ``os.path.isdir``); never raises."""
    return os.path.isdir(path)


def lexists(path: str) -> bool:
    """Something (a file, a directory, even a dangling symlink) is at this local path."""
    return os.path.lexists(path)


def dir_size(path: str) -> int:
    """Bytes of the regular files directly in a local directory (links not followed); 0 when unreadable."""
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def list_names(path: str) -> list[str]:
    """The names in one local directory (``os.listdir``: raises ``OSError`` when it cannot be read)."""
    return os.listdir(path)


def owner_uid(path: str) -> int | None:
    """The uid that owns a local path itself (a symlink is not followed), or None when nothing is there (F37)."""
    try:
        return os.lstat(path).st_uid
    except FileNotFoundError:
        return None


def open_reader(path: str) -> BinaryIO:
    """A local regular file, opened as :func:`open_regular` opens it (no-follow, never a FIFO), as a file object."""
    return os.fdopen(open_regular(path), "rb")


def lstat_local(path: str) -> os.stat_result:
    """``os.lstat`` of a local path: what is there, without following a symlink."""
    return os.lstat(path)


def rename_no_replace(src: str, dst: str, *, what: str = "exists") -> None:
    """Rename ``src`` to ``dst``, never replacing what is there: ``FileExistsError`` instead (F38).

    ``what`` ends the error's message (``"<dst> <what>"``) so callers keep their wording.
    """
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, f"{dst} {what}", dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # it appeared between the check and the rename
            raise FileExistsError(errno.EEXIST, f"{dst} {what}", dst) from e
        raise


def rename_commit(staging: str, final: str) -> None:
    """The local commit point: rename the fsynced staging dir to its final name, then fsync the parent.

    Raises ``FileExistsError`` when ``final`` already holds a checkpoint (F38): nothing is replaced.
    """
    fsync_dir(staging)
    rename_no_replace(staging, final, what="already exists")
    fsync_dir(os.path.dirname(final))


def remove_tree_local(path: str) -> None:
    """Remove a staging dir or a deleted checkpoint's leftovers without following symlinks."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    shutil.rmtree(path)


def clean_stale_staging(
    store: Store, run: str, older_than_s: float | None = None, now: float | None = None
) -> list[str]:
    """Remove our own staging dirs older than the threshold; never anything else (F09)."""
    removed: list[str] = []
    if not store.is_local:
        return removed
    base = store.join(run)
    now = time.time() if now is None else now
    older_than_s = store.stale_s if older_than_s is None else older_than_s
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


def put_bytes_exclusive_local(store: Store, rel: str, data: bytes) -> None:
    """``O_EXCL`` + fsync of the file and its directory: ``FileExistsError`` when ``rel`` exists (F38)."""
    path = store.join(rel)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    write_new_file(path, data)
    fsync_dir(os.path.dirname(path))


def delete_local(store: Store, rel: str) -> None:
    """Unlink one local file; a missing one is not an error."""
    try:
        os.unlink(store.join(rel))
    except FileNotFoundError:
        pass


def delete_tree_local(store: Store, rel: str) -> int:
    """Remove ``rel`` (without following symlinks); 1 when something went, 0 when nothing was there."""
    try:
        remove_tree_local(store.join(rel))
    except FileNotFoundError:
        return 0
    return 1
