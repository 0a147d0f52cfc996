"""Saving: per-rank writes into a staging dir, one commit by rank 0, mirrors, retention.

A checkpoint becomes visible only at its commit point: the rename of a fully fsynced
staging dir on a local store, the manifest PUT on an object store. Everything before that
point can die (SIGKILL, ENOSPC, EIO) without a reader ever seeing a partial checkpoint, and
nothing here deletes or overwrites a committed checkpoint except retention, by its rules.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import _faults, discovery, formats, manifest, stores, verify
from .errors import CommitConflict, ConfigError, SaveFailed, StoreError
from .manifest import FileEntry, TensorStat
from .stores import Store

log = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"
MIN_KEEP_LAST = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveResult:
    committed: bool
    step: int
    path: str | None = None
    seconds: float = 0.0
    bytes_written: int = 0
    reason: str | None = None


@dataclass
class WrittenEntry:
    entry: FileEntry
    stats: dict[str, TensorStat]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.entry.name, "size": self.entry.size, "digest": self.entry.digest, "rank": self.entry.rank,
            "stats": {k: [s.digest, s.max_abs, s.finite] for k, s in self.stats.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WrittenEntry":
        return cls(
            entry=FileEntry(name=d["name"], size=d["size"], digest=d["digest"], rank=d["rank"]),
            stats={k: TensorStat(digest=v[0], max_abs=v[1], finite=v[2]) for k, v in d["stats"].items()},
        )


def write_file(path: str, tree_json: str, specs: Sequence[formats.TensorSpec], max_abs: dict[str, tuple[float | None, bool]],
               *, rank: int, step: int, file_rank: int | None) -> WrittenEntry:
    """Write one native file exclusively (0600), fsync it, and return its manifest entry."""
    _faults.hit("before_data_write", rank=rank, step=step)
    fd = stores.create_exclusive(path)
    try:
        written = formats.write_native(fd, tree_json, specs, hook=lambda p: _faults.hit(p, rank=rank, step=step))
        os.fsync(fd)  # fsyncgate: an EIO here abandons the save; the same file is never fsynced again
    finally:
        os.close(fd)
    _faults.hit("after_data_fsync", rank=rank, step=step)
    stats = {n: TensorStat(digest=d, max_abs=max_abs.get(n, (None, True))[0], finite=max_abs.get(n, (None, True))[1])
             for n, d in written.tensor_digests.items()}
    return WrittenEntry(entry=FileEntry(name=os.path.basename(path), size=written.size, digest=written.digest, rank=file_rank), stats=stats)


def save_errno_reason(e: BaseException, where: str) -> str:
    """``save_failed errno=ENOSPC ...``: the errno named, reconstructed from free space when it was lost."""
    code = getattr(e, "errno", None)
    if code is None and isinstance(e, OSError) is False:
        try:
            if shutil.disk_usage(where).free < 1 << 20:
                code = errno.ENOSPC
        except OSError:
            pass
    name = errno.errorcode.get(code, str(code)) if code else type(e).__name__
    return f"save_failed errno={name}: {type(e).__name__}: {e}"


def commit_local(store: Store, run: str, staging: str, step: int, generation: int, manifest_bytes: bytes, *, rank: int = 0) -> str:
    """Write the manifest into the fsynced staging dir and rename it to its final name (the commit point).

    Raises :class:`CommitConflict` when the step was committed by another writer of the same
    lineage (F38). A checkpoint of another lineage at the same step is kept, and ours is
    committed beside it as ``step-N-gG`` (F36).
    """
    _faults.hit("before_manifest", rank=rank, step=step)
    fd = stores.create_exclusive(os.path.join(staging, manifest.MANIFEST_NAME))
    try:
        formats._write_all(fd, memoryview(manifest_bytes))
        os.fsync(fd)
    finally:
        os.close(fd)
    stores.fsync_dir(staging)
    _faults.hit("after_manifest_before_rename", rank=rank, step=step)
    for name in (stores.step_dir_name(step), stores.step_dir_name(step, generation)):
        final = store.join(run, name)
        try:
            os.rename(staging, final) if not os.path.lexists(final) else _raise_exists(final)
        except FileExistsError:
            other = _generation_of(final)
            if other == generation or other is None:
                raise CommitConflict(errno.EEXIST, f"commit_conflict: {final} was committed by another writer; ours is discarded") from None
            log.warning("lineage_fork step=%d: %s holds generation %s; committing generation %d beside it", step, final, other, generation)
            continue
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                other = _generation_of(final)
                if other == generation or other is None:
                    raise CommitConflict(errno.EEXIST, f"commit_conflict: {final} was committed by another writer") from e
                continue
            raise
        _faults.hit("after_rename_before_dirsync", rank=rank, step=step)
        stores.fsync_dir(os.path.dirname(final))
        return final
    raise CommitConflict(errno.EEXIST, f"commit_conflict: step {step} generation {generation} already committed")


def _raise_exists(path: str) -> None:
    raise FileExistsError(errno.EEXIST, f"{path} exists", path)


def _generation_of(path: str) -> int | None:
    try:
        fd = stores.open_regular(os.path.join(path, manifest.MANIFEST_NAME))
        with os.fdopen(fd, "rb") as f:
            return manifest.parse(f.read(manifest.MAX_MANIFEST_BYTES + 1)).generation
    except (OSError, manifest.ManifestError):
        return None


def discard_staging(path: str) -> None:
    try:
        stores.remove_tree_local(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove staging dir %s: %s", path, e)


def writer_info() -> dict[str, Any]:
    from . import __version__

    return {"host": socket.gethostname(), "pid": os.getpid(), "dist_guardian": __version__}


# ----------------------------------------------------------------------------- mirrors


def copy_checkpoint(src_dir: str, dst: Store, run: str, dirname: str, *, exclusive: bool = False, rank: int = 0) -> str:
    """Copy one committed checkpoint (a local dir holding its manifest) to a store, manifest last.

    Returns its location there. A destination that already holds a committed copy is left
    alone (a mirror is idempotent), or raises ``FileExistsError`` with ``exclusive``.
    """
    mbytes = _read_local_manifest(src_dir)
    mf = manifest.parse(mbytes)
    if dst.is_local:
        final = dst.join(run, dirname)
        if os.path.lexists(final):
            if exclusive:
                raise FileExistsError(errno.EEXIST, f"{final} already exists", final)
            return final
        stores.makedirs_local(dst.join(run))
        staging = dst.join(run, stores.new_staging_name(mf.step))
        os.mkdir(staging, 0o700)
        try:
            for f in mf.files:
                _copy_local_file(os.path.join(src_dir, f.name), os.path.join(staging, f.name), f.size)
            fd = stores.create_exclusive(os.path.join(staging, manifest.MANIFEST_NAME))
            try:
                formats._write_all(fd, memoryview(mbytes))
                os.fsync(fd)
            finally:
                os.close(fd)
            stores.rename_commit(staging, final)
        except FileExistsError:
            discard_staging(staging)
            if exclusive:
                raise
            return final
        except BaseException:
            discard_staging(staging)
            raise
        return final
    # Object store: finished files first, sizes checked, manifest last and exclusive.
    rel_dir = f"{run}/{dirname}"
    fs = stores.filesystem(dst)
    if stores.call(dst, "exists", lambda: fs.exists(dst.join(rel_dir, manifest.MANIFEST_NAME))):
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"{dst.uri(rel_dir)} already has a manifest")
        return dst.uri(rel_dir)
    for i, f in enumerate(mf.files):
        _faults.hit("before_s3_data", rank=rank, step=mf.step)
        stores.put_file(dst, os.path.join(src_dir, f.name), f"{rel_dir}/{f.name}")
        if i == 0:
            _faults.hit("mid_s3_data", rank=rank, step=mf.step)
        got = stores.remote_size(dst, f"{rel_dir}/{f.name}")
        if got != f.size:
            raise OSError(errno.EIO, f"{dst.uri(rel_dir, f.name)}: uploaded {got} bytes, expected {f.size}")
    _faults.hit("before_s3_manifest", rank=rank, step=mf.step)
    try:
        stores.put_bytes_exclusive(dst, f"{rel_dir}/{manifest.MANIFEST_NAME}", mbytes)
    except FileExistsError:
        if exclusive:
            raise
        log.warning("commit_conflict: %s already has a manifest; keeping it", dst.uri(rel_dir))
    _faults.hit("after_s3_manifest", rank=rank, step=mf.step)
    return dst.uri(rel_dir)


def _read_local_manifest(src_dir: str) -> bytes:
    fd = stores.open_regular(os.path.join(src_dir, manifest.MANIFEST_NAME))
    with os.fdopen(fd, "rb") as f:
        return f.read(manifest.MAX_MANIFEST_BYTES + 1)


def _copy_local_file(src: str, dst: str, size: int) -> None:
    fd_in = stores.open_regular(src)
    try:
        fd_out = stores.create_exclusive(dst)
        try:
            left = size
            while left > 0:
                n = os.copy_file_range(fd_in, fd_out, min(left, 1 << 30)) if hasattr(os, "copy_file_range") else 0
                if n <= 0:
                    chunk = os.read(fd_in, min(left, 64 << 20))
                    if not chunk:
                        raise OSError(errno.EIO, f"{src}: shorter than its manifest says ({size - left} of {size} bytes)")
                    formats._write_all(fd_out, memoryview(chunk))
                    n = len(chunk)
                left -= n
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


@dataclass
class MirrorJob:
    src_dir: str
    cleanup: bool  # remove src_dir when every target has its copy (a remote primary's local staging)
    run: str
    dirname: str
    step: int
    targets: list[Store]
    tries: int = 0
    next_try: float = 0.0
    last_error: str = ""


class Mirrors:
    """Background copies of committed checkpoints to the other stores, retried with backoff (F43).

    Training never waits on a slow remote: ``submit`` returns at once; ``wait`` (from
    ``close()``) waits with a deadline and reports what is still unmirrored.
    """

    def __init__(self, max_backoff_s: float = 60.0):
        self.max_backoff_s = max_backoff_s
        self._q: "queue.Queue[MirrorJob | None]" = queue.Queue()
        self._pending: list[MirrorJob] = []
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.done: list[tuple[str, str]] = []  # (store url, location)

    def submit(self, src_dir: str, run: str, dirname: str, step: int, targets: Sequence[Store], *, cleanup: bool = False) -> None:
        if not targets:
            if cleanup:
                discard_staging(src_dir)
            return
        with self._lock:
            self._pending.append(MirrorJob(src_dir=src_dir, cleanup=cleanup, run=run, dirname=dirname, step=step, targets=list(targets)))
            self._idle.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="dist_guardian-mirror", daemon=True)
            self._thread.start()
        self._q.put(None)

    def unmirrored(self, run: str) -> dict[str, set[str]]:
        """Store URL -> checkpoint dir names not yet committed there (retention keeps those, F42)."""
        out: dict[str, set[str]] = {}
        with self._lock:
            for j in self._pending:
                if j.run == run:
                    for t in j.targets:
                        out.setdefault(t.url, set()).add(j.dirname)
        return out

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._idle.set()
                    return
                now = time.monotonic()
                due = [j for j in self._pending if j.next_try <= now]
                wait = min((j.next_try for j in self._pending), default=now) - now
            if not due:
                try:
                    self._q.get(timeout=max(0.05, min(wait, 1.0)))
                except queue.Empty:
                    pass
                continue
            for job in due:
                self._run(job)

    def _run(self, job: MirrorJob) -> None:
        for t in list(job.targets):
            try:
                loc = copy_checkpoint(job.src_dir, t, job.run, job.dirname)
                job.targets.remove(t)
                self.done.append((t.url, loc))
                log.info("mirrored step %d to %s", job.step, loc)
            except Exception as e:
                job.last_error = f"{t.url}: {type(e).__name__}: {e}"
                job.tries += 1
                delay = min(self.max_backoff_s, 0.5 * 2 ** min(job.tries, 10))
                job.next_try = time.monotonic() + delay
                log.warning("mirror_deferred step=%d store=%s: %s; retry in %.1fs", job.step, t.url, e, delay)
        with self._lock:
            if not job.targets:
                self._pending.remove(job)
        if not job.targets and job.cleanup:
            discard_staging(job.src_dir)

    def wait(self, timeout_s: float) -> list[str]:
        """Wait for pending mirrors; returns a description of what is still unmirrored."""
        t0 = time.monotonic()
        announced = False
        while not self._idle.wait(0.5):
            if not announced and time.monotonic() - t0 > 1.0:
                log.info("waiting for %d mirror upload(s) to finish", len(self._pending))
                announced = True
            if time.monotonic() - t0 > timeout_s:
                break
        with self._lock:
            return [f"step {j.step} -> {', '.join(t.url for t in j.targets)} ({j.last_error or 'in progress'})" for j in self._pending]


# ----------------------------------------------------------------------------- retention


def retain(store: Store, run: str, keep_last: int, *, protected: set[str] = frozenset(),
           quarantined: set[str] = frozenset(), dry_run: bool = False) -> list[str]:
    """Delete old verified checkpoints beyond ``keep_last`` in one store. Returns what was deleted.

    Counts only committed checkpoints that pass cheap verification; always keeps the newest
    verified; never deletes anything not verified (L, S and R are kept: quarantine),
    anything in ``protected`` (not yet mirrored, F42) or ``quarantined``; and never touches a
    store it could not list fully (F40-F42). Locally the directory is renamed to a trash name
    first (atomic), remotely the manifest is deleted first: a half-deleted checkpoint never
    looks committed (F41).
    """
    if keep_last < 1:
        raise ConfigError("keep_last must be at least 1")
    if keep_last < MIN_KEEP_LAST:
        log.warning("keep_last=%d raised to %d: the newest checkpoint alone could be the bad one (F40)", keep_last, MIN_KEEP_LAST)
        keep_last = MIN_KEEP_LAST
    try:
        sightings = discovery.discover_store(store, run)
    except (OSError, StoreError) as e:
        log.warning("retention skipped for %s: could not list it fully (%s)", store.url, e)
        return []
    ours = [s for s in sightings if s.kind == "native" and s.rel.startswith(run + "/")]
    checked = verify.verify_all(ours, run=run, compat=None).candidates
    good = sorted((c for c in checked if c.tier == "V"), key=lambda c: (c.step, c.generation), reverse=True)
    deleted = []
    for c in good[keep_last:]:
        name = c.rel.split("/", 1)[1]
        if name in protected:
            log.warning("retention_blocked_unmirrored: keeping %s until its mirror is committed", c.path)
            continue
        if c.path in quarantined:
            continue
        if dry_run:
            deleted.append(c.path)
            continue
        try:
            _delete_checkpoint(store, run, name)
            deleted.append(c.path)
            log.info("retention deleted %s (keep_last=%d)", c.path, keep_last)
        except OSError as e:
            log.warning("retention could not delete %s: %s", c.path, e)
    if store.is_local and not dry_run:
        _clean_trash(store, run)
    return deleted


def _delete_checkpoint(store: Store, run: str, name: str) -> None:
    if store.is_local:
        src = store.join(run, name)
        trash = store.join(run, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        os.rename(src, trash)
        stores.fsync_dir(store.join(run))
        _faults.hit("mid_retention")
        stores.remove_tree_local(trash)
        return
    rel = f"{run}/{name}"
    stores.delete_remote(store, f"{rel}/{manifest.MANIFEST_NAME}")
    _faults.hit("mid_retention")
    fs = stores.filesystem(store)
    stores.call(store, f"delete {store.uri(rel)}", lambda: fs.rm(store.join(rel), recursive=True))


def _clean_trash(store: Store, run: str) -> None:
    try:
        names = os.listdir(store.join(run))
    except OSError:
        return
    for n in names:
        if n.startswith(TRASH_PREFIX):
            try:
                stores.remove_tree_local(store.join(run, n))
            except OSError as e:
                log.warning("could not clean %s: %s", n, e)


def local_temp_staging(step: int) -> str:
    """A private staging dir for a checkpoint whose primary store is remote (uploaded, then removed)."""
    base = stores.node_local_base()
    path = os.path.join(base, stores.new_staging_name(step))
    os.mkdir(path, 0o700)
    return path


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
