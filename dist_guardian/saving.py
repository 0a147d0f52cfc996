"""Saving: per-rank writes into a staging dir, one commit by rank 0, mirrors, retention.

A checkpoint becomes visible only at its commit point: the rename of a fully fsynced
staging dir on a local store, the manifest PUT on an object store. Everything before that
point can die (SIGKILL, ENOSPC, EIO) without a reader ever seeing a partial checkpoint, and
nothing here deletes or overwrites a committed checkpoint except retention, by its rules.

On an object store a writer first claims the step (``<run>/.writers/<dir>.json``, a PUT with
``If-None-Match: *``), so two writers never mix files under one key (F38); uploads are of
finished files; the manifest goes last, also conditional. Mirrors run on rank 0's background
worker with backoff (F43); retention counts only verified checkpoints and never deletes what a
mirror does not hold yet (F40-F42).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
    trees: dict[str, str] = field(default_factory=dict)  # top-level key of the state tree -> digest

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.entry.name, "size": self.entry.size, "digest": self.entry.digest, "rank": self.entry.rank,
            "stats": {k: [s.digest, s.max_abs, s.finite] for k, s in self.stats.items()}, "trees": self.trees,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WrittenEntry":
        return cls(
            entry=FileEntry(name=d["name"], size=d["size"], digest=d["digest"], rank=d["rank"]),
            stats={k: TensorStat(digest=v[0], max_abs=v[1], finite=v[2]) for k, v in d["stats"].items()},
            trees=d["trees"],
        )


def write_file(path: str, tree_json: str, specs: Sequence[formats.TensorSpec],
               stats_fn: Callable[[formats.TensorSpec], tuple[float | None, bool]] | None,
               *, rank: int, step: int, file_rank: int | None, trees: dict[str, str] | None = None) -> WrittenEntry:
    """Write one native file exclusively (0600), fsync it, and return its manifest entry.

    ``stats_fn(spec) -> (max_abs, finite)`` runs in the write pipeline, overlapped with I/O;
    ``trees`` (:func:`formats.tree_key_digests` of the tree) goes into the manifest as it is.
    """
    _faults.hit("before_data_write", rank=rank, step=step)
    fd = stores.create_exclusive(path)
    try:
        written = formats.write_native(fd, tree_json, specs, hook=lambda p: _faults.hit(p, rank=rank, step=step),
                                       stats_fn=stats_fn)
        os.fsync(fd)  # fsyncgate: an EIO here abandons the save; the same file is never fsynced again
    finally:
        os.close(fd)
    _faults.hit("after_data_fsync", rank=rank, step=step)
    none = (None, True)
    stats = {n: TensorStat(digest=d, max_abs=written.stats.get(n, none)[0], finite=written.stats.get(n, none)[1])
             for n, d in written.tensor_digests.items()}
    return WrittenEntry(entry=FileEntry(name=os.path.basename(path), size=written.size, digest=written.digest, rank=file_rank),
                        stats=stats, trees=dict(trees or {}))


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
    stores.write_new_file(os.path.join(staging, manifest.MANIFEST_NAME), manifest_bytes)
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


# ----------------------------------------------------------------------------- copies between stores (mirrors)

CLAIMS_DIR = ".writers"  # <run>/.writers/<step dir>.json: who is uploading that checkpoint to an object store
QUARANTINE_PREFIX = ".quarantine-"


def copy_checkpoint(src_dir: str, dst: Store, run: str, dirname: str, *, exclusive: bool = False, rank: int = 0,
                    token: str | None = None, transfer: stores.Transfer | None = None, abort_stale: bool = True) -> str:
    """Copy one committed checkpoint (a local dir holding its manifest) to a store, manifest last.

    Returns its location there. A destination that already holds a committed copy is left
    alone (a mirror is idempotent), or raises ``FileExistsError`` with ``exclusive``.

    Object stores have no rename, so the commit is the manifest: (1) with ``abort_stale``,
    multipart uploads that dead writers left under the run are aborted (F14); (2) the writer claims the
    step with an exclusive PUT of ``<run>/.writers/<dir>.json`` (412 for a concurrent
    writer: ``FileExistsError``, F38, before any byte is uploaded, so no two writers ever
    mix their files under one key); (3) each finished file is uploaded (never streamed into
    its final key); (4) one listing checks every size; (5) ``manifest.json`` is PUT with
    ``If-None-Match: *``. ``token`` identifies the writer across retries of one mirror job,
    so a retry resumes instead of conflicting with itself, skipping files already there.
    """
    mbytes = _read_local_manifest(src_dir)
    mf = manifest.parse(mbytes)
    if dst.is_local:
        return _copy_local(src_dir, mbytes, mf, dst, run, dirname, exclusive=exclusive)
    return _copy_remote(src_dir, mbytes, mf, dst, run, dirname, exclusive=exclusive, rank=rank,
                        token=token or uuid.uuid4().hex, transfer=transfer, abort_stale=abort_stale)


def _copy_local(src_dir: str, mbytes: bytes, mf: manifest.Manifest, dst: Store, run: str, dirname: str, *, exclusive: bool) -> str:
    final = dst.join(run, dirname)
    if os.path.lexists(final):
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"{final} already exists", final)
        return final
    stores.make_run_dir(dst, run)
    staging = dst.join(run, stores.new_staging_name(mf.step))
    os.mkdir(staging, 0o700)
    try:
        for f in mf.files:
            _copy_local_file(os.path.join(src_dir, f.name), os.path.join(staging, f.name), f.size)
        stores.write_new_file(os.path.join(staging, manifest.MANIFEST_NAME), mbytes)
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


def _claim_rel(run: str, dirname: str) -> str:
    return f"{run}/{CLAIMS_DIR}/{dirname}.json"


def _read_claim(dst: Store, run: str, dirname: str) -> tuple[str, float, bool] | None:
    """(writer token, age in seconds by the store's clock, writer known dead) of a step's claim, or None.

    "Known dead": the claim names this host and a pid that no longer exists (a writer killed
    mid-upload, then restarted here), so the next incarnation need not wait ``stale_s``.
    """
    dead = False
    try:
        st = stores.stat_object(dst, _claim_rel(run, dirname))
        doc = json.loads(stores.read_small(dst, _claim_rel(run, dirname), 64 * 1024))
        token = str(doc.get("token", "")) if isinstance(doc, dict) else ""
        w = doc.get("writer") if isinstance(doc, dict) else None
        if isinstance(w, dict) and w.get("host") == socket.gethostname() and isinstance(w.get("pid"), int) and w["pid"] > 0:
            dead = w["pid"] != os.getpid() and not _pid_alive(w["pid"])
    except FileNotFoundError:
        return None
    except ValueError:
        token = ""
    return token, (time.time() - st.mtime if st.mtime is not None else float("inf")), dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_remote(src_dir: str, mbytes: bytes, mf: manifest.Manifest, dst: Store, run: str, dirname: str, *,
                 exclusive: bool, rank: int, token: str, transfer: stores.Transfer | None, abort_stale: bool) -> str:
    rel_dir = f"{run}/{dirname}"
    uri = dst.uri(rel_dir)
    step = mf.step
    # (1) What dead writers left under the run (the caller asks once per start, F14).
    if abort_stale:
        clean_stale_uploads(dst, run)
    listing = {e.rel: e for e in stores.list_tree(dst, rel_dir, max_depth=1)}
    if manifest.MANIFEST_NAME in listing:
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"{uri} already has a manifest")
        return uri
    # (2) Claim the step (one conditional PUT), or find out who holds it.
    claim_doc = json.dumps({"token": token, "step": step, "writer": writer_info(), "created_unix": time.time()}).encode()
    resumed = False
    for _ in range(2):
        try:
            stores.put_bytes_exclusive(dst, _claim_rel(run, dirname), claim_doc)
            break
        except FileExistsError:
            claim = _read_claim(dst, run, dirname)
        if claim is None:
            continue  # released meanwhile: try once more
        other, age, dead = claim
        if other == token:
            resumed = True  # our own claim: a retry of this job resumes where it stopped
            break
        if age < dst.stale_s and not dead:
            raise FileExistsError(errno.EEXIST, f"commit_conflict: {uri} is being written by another writer "
                                                f"(claimed {age:.0f}s ago); ours is discarded")
        _remove_stale(dst, run, dirname, f"claim of a writer that stopped {age:.0f}s ago")
        listing = {}
    else:
        raise FileExistsError(errno.EEXIST, f"commit_conflict: could not claim {uri}; another writer holds it")
    if listing and not resumed:
        # We hold the claim, yet objects are there: what a deletion or a dead writer left. Never a candidate.
        n = stores.delete_tree(dst, rel_dir)
        log.warning("stale_upload_removed %s: objects without a claim or a manifest (%d objects)", uri, n)
        listing = {}
    # (3) Finished files, one by one (a resumed job skips what is already there with the right size).
    total = sum(f.size for f in mf.files)
    transfer = transfer if transfer is not None else stores.Transfer(total, f"mirror step {step} to {dst.url}", show=False)
    for i, f in enumerate(mf.files):
        have = listing.get(f.name)
        if resumed and have is not None and have.kind == "file" and have.size == f.size:
            transfer.add(f.size)
            continue
        _faults.hit("before_s3_data", rank=rank, step=step)
        fired = [False]

        def on_part(parts: int, _done: int, first: bool = i == 0) -> None:
            if first and parts == 2 and not fired[0]:  # kill -9 / raise in the middle of a multipart upload (F13, F14)
                fired[0] = True
                _faults.hit("mid_s3_data", rank=rank, step=step)

        stores.put_file(dst, os.path.join(src_dir, f.name), f"{rel_dir}/{f.name}", transfer=transfer, on_part=on_part)
        if i == 0 and not fired[0]:
            _faults.hit("mid_s3_data", rank=rank, step=step)
    # (4) One listing checks every object's size before anything is committed.
    listing = {e.rel: e for e in stores.list_tree(dst, rel_dir, max_depth=1)}
    for f in mf.files:
        got = listing.get(f.name)
        if got is None or got.size != f.size:
            raise OSError(errno.EIO, f"{dst.uri(rel_dir, f.name)}: uploaded {got.size if got else 'nothing'}, expected {f.size} bytes")
    # (5) The commit point.
    _faults.hit("before_s3_manifest", rank=rank, step=step)
    try:
        stores.put_bytes_exclusive(dst, f"{rel_dir}/{manifest.MANIFEST_NAME}", mbytes)
    except FileExistsError:
        if exclusive:
            raise FileExistsError(errno.EEXIST, f"commit_conflict: {uri} got a manifest from another writer (412)") from None
        log.warning("commit_conflict: %s already has a manifest; keeping it", uri)
    _faults.hit("after_s3_manifest", rank=rank, step=step)
    return uri


def clean_stale_uploads(store: Store, run: str) -> list[str]:
    """Clean what interrupted writers left in an object store under ``<run>/`` (F14). Returns what went.

    Multipart uploads are aborted (``mpu_aborted``) unless their step is claimed by a
    writer whose claim is younger than ``stale_s``; claims older than that, of steps that
    never got a manifest, are removed with their objects (``stale_upload_removed``).
    Nothing committed is touched. A no-op on local stores.
    """
    if store.is_local:
        return []
    now = time.time()
    claims = {e.rel[: -len(".json")]: e for e in stores.list_tree(store, f"{run}/{CLAIMS_DIR}", max_depth=1)
              if e.kind == "file" and e.rel.endswith(".json")}
    live = {d for d, e in claims.items() if e.mtime is not None and now - e.mtime < store.stale_s}
    prefix = store.join(run).lstrip("/").split("/", 1)[-1] + "/"  # the key prefix inside the bucket

    def keep(key: str) -> bool:
        rest = key[len(prefix):] if key.startswith(prefix) else key
        return rest.split("/", 1)[0] in live

    gone = stores.abort_stale_uploads(store, run, keep=keep)
    stale = [d for d in claims if d not in live]
    if stale:
        committed = {e.rel.split("/", 1)[0] for e in stores.list_tree(store, run, max_depth=2)
                     if e.rel.endswith("/" + manifest.MANIFEST_NAME)}
        for d in stale:
            if d in committed:
                continue  # a committed checkpoint's claim is its record; retention removes it with it
            try:
                _remove_stale(store, run, d, "claim of a writer that stopped")
                gone.append(store.uri(run, d))
            except FileExistsError:
                pass
    return gone


def _remove_stale(dst: Store, run: str, dirname: str, why: str) -> None:
    """Delete a step's uncommitted objects and its claim, after checking once more that nothing committed meanwhile."""
    rel_dir = f"{run}/{dirname}"
    listing = {e.rel for e in stores.list_tree(dst, rel_dir, max_depth=1)}
    if manifest.MANIFEST_NAME in listing:
        raise FileExistsError(errno.EEXIST, f"{dst.uri(rel_dir)} was committed meanwhile")
    n = stores.delete_tree(dst, rel_dir)
    stores.delete(dst, _claim_rel(run, dirname))
    log.warning("stale_upload_removed %s: %s (%d objects)", dst.uri(rel_dir), why, n)


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


def repair_replica(src: Store, src_rel: str, dst: Store, run: str, dirname: str) -> str:
    """Re-fetch a damaged local copy of a checkpoint from an intact replica (F05, opt-in).

    The replica is downloaded into a staging dir of ``dst`` and verified fully (every
    checksum); only then is the damaged directory renamed aside to
    ``.quarantine-<dir>-<id>`` (kept: nothing is deleted) and the staging dir renamed into
    its place. Returns the repaired path.
    """
    if not dst.is_local:
        raise ConfigError(f"repair re-fetches into local stores only; {dst.url} is remote")
    mbytes = stores.read_small(src, f"{src_rel}/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
    mf = manifest.parse(mbytes)
    stores.make_run_dir(dst, run)
    staging = dst.join(run, stores.new_staging_name(mf.step))
    os.mkdir(staging, 0o700)
    try:
        chunk = 32 << 20
        buf = bytearray(chunk)
        for f in mf.files:
            fd = stores.create_exclusive(os.path.join(staging, f.name))
            try:
                pos = 0
                while pos < f.size:
                    n = min(chunk, f.size - pos)
                    mv = memoryview(buf)[:n]
                    stores.read_range_into(src, f"{src_rel}/{f.name}", pos, mv, concurrency=1)
                    formats._write_all(fd, mv)
                    pos += n
                os.fsync(fd)
            finally:
                os.close(fd)
        stores.write_new_file(os.path.join(staging, manifest.MANIFEST_NAME), mbytes)
        stores.fsync_dir(staging)
        tmp = Store(url=staging, index=0, kind="local", root=os.path.dirname(staging))
        tier, reasons = verify.verify_full(tmp, os.path.basename(staging))
        if tier != "V":
            raise OSError(errno.EIO, f"the replica at {src.uri(src_rel)} does not verify either: {'; '.join(reasons)}")
        final = dst.join(run, dirname)
        if os.path.lexists(final):
            aside = dst.join(run, f"{QUARANTINE_PREFIX}{dirname}-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
            log.warning("replica_quarantined %s -> %s (kept for inspection)", final, aside)
        stores.rename_commit(staging, final)
    except BaseException:
        discard_staging(staging)
        raise
    log.warning("replica_repaired %s from %s", final, src.uri(src_rel))
    return final


# ----------------------------------------------------------------------------- background work (rank 0)


@dataclass
class MirrorJob:
    src_dir: str
    cleanup: bool  # remove src_dir when every target has its copy (a remote primary's local staging)
    run: str
    dirname: str
    step: int
    targets: list[Store]
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    tries: dict[str, int] = field(default_factory=dict)  # store url -> failed attempts
    next_try: dict[str, float] = field(default_factory=dict)  # store url -> monotonic time
    last_error: str = ""
    transfer: stores.Transfer | None = None

    def due(self, now: float) -> list[Store]:
        return [t for t in self.targets if self.next_try.get(t.url, 0.0) <= now]


class Mirrors:
    """Rank 0's background worker: mirror uploads, retried with backoff, and housekeeping tasks.

    Training never waits on a slow remote: ``submit`` returns at once (F43). A target that
    fails (down, hung, refusing) is retried with exponential backoff, ``mirror_deferred``
    logged each time; the other targets and jobs go on. Tasks (retention, repair, cleanup)
    run in order between uploads, each once. ``wait`` (from ``close()``) waits with a
    deadline and a progress line, and reports what is still unmirrored.
    """

    def __init__(self, *, base_backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 on_mirrored: Callable[[Store, MirrorJob], None] | None = None, progress: bool | None = None):
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_mirrored = on_mirrored
        self.progress = progress
        self._jobs: list[MirrorJob] = []
        self._tasks: dict[str, Callable[[], Any]] = {}
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.done: list[tuple[str, str]] = []  # (store url, location)
        self.current: MirrorJob | None = None
        self.uploads_checked: set[str] = set()  # stores whose stale multipart uploads were handled

    # -- submitting

    def submit(self, src_dir: str, run: str, dirname: str, step: int, targets: Sequence[Store], *, cleanup: bool = False) -> None:
        if not targets:
            if cleanup:
                discard_staging(src_dir)
            return
        with self._cv:
            if self._stop:
                log.warning("mirror of step %d not queued: the worker is stopped (closed)", step)
                return
            for j in self._jobs:
                if j.run == run and j.dirname == dirname and j.src_dir == src_dir:
                    j.targets += [t for t in targets if t.url not in {x.url for x in j.targets}]
                    break
            else:
                self._jobs.append(MirrorJob(src_dir=src_dir, cleanup=cleanup, run=run, dirname=dirname, step=step,
                                            targets=list(targets)))
            self._start()
            self._cv.notify_all()

    def submit_task(self, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once on the worker (a task with the same name already waiting is not added twice)."""
        with self._cv:
            if self._stop:
                log.debug("background task %s dropped: the worker is stopped", name)
                return
            self._tasks.setdefault(name, fn)
            self._start()
            self._cv.notify_all()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="dist_guardian-mirror", daemon=True)
            self._thread.start()

    # -- what is pending

    def unmirrored(self, run: str) -> dict[str, set[str]]:
        """Store URL -> checkpoint dir names not yet committed there (retention keeps those, F42)."""
        out: dict[str, set[str]] = {}
        with self._cv:
            for j in self._jobs:
                if j.run == run:
                    for t in j.targets:
                        out.setdefault(t.url, set()).add(j.dirname)
        return out

    def pending(self) -> list[str]:
        with self._cv:
            return [f"step {j.step} -> {', '.join(t.url for t in j.targets)} ({j.last_error or 'in progress'})" for j in self._jobs]

    def idle(self) -> bool:
        with self._cv:
            return not self._jobs and not self._tasks and not self._busy

    # -- the worker

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                work = [(j, j.due(now)) for j in self._jobs]
                work = [(j, ts) for j, ts in work if ts]
                tasks = list(self._tasks.items())
                self._tasks.clear()
                if not work and not tasks:
                    nxt = min((min(j.next_try.get(t.url, 0.0) for t in j.targets) for j in self._jobs), default=None)
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait(timeout=None if nxt is None else max(0.01, min(nxt - now, 1.0)))
                    continue
                self._busy = True
            for job, targets in work:
                for t in targets:
                    if self._stop:
                        return
                    self._run(job, t)
            for name, fn in tasks:
                if self._stop:
                    return
                try:
                    fn()
                except Exception as e:  # housekeeping never stops the worker
                    log.warning("background task %s failed: %s: %s", name, type(e).__name__, e)

    def _run(self, job: MirrorJob, t: Store) -> None:
        total = _dir_size(job.src_dir)
        job.transfer = stores.Transfer(total, f"mirror step {job.step} to {t.url}", show=False)
        self.current = job
        try:
            loc = copy_checkpoint(job.src_dir, t, job.run, job.dirname, token=job.token, transfer=job.transfer,
                                  abort_stale=t.url not in self.uploads_checked)
            self.uploads_checked.add(t.url)
        except Exception as e:
            n = job.tries[t.url] = job.tries.get(t.url, 0) + 1
            delay = min(self.max_backoff_s, self.base_backoff_s * 2 ** min(n - 1, 16))
            job.next_try[t.url] = time.monotonic() + delay
            job.last_error = f"{t.url}: {type(e).__name__}: {e}"
            log.warning("mirror_deferred step=%d store=%s attempt=%d: %s; retry in %.1fs", job.step, t.url, n, e, delay)
            return
        finally:
            self.current = None
        log.info("mirrored step %d to %s (manifest last)", job.step, loc)
        self.done.append((t.url, loc))
        with self._cv:
            job.targets = [x for x in job.targets if x.url != t.url]
            finished = not job.targets
            if finished:
                self._jobs.remove(job)
        if finished and job.cleanup:
            discard_staging(job.src_dir)
        if self.on_mirrored is not None:
            try:
                self.on_mirrored(t, job)
            except Exception as e:
                log.warning("after mirroring step %d to %s: %s: %s", job.step, t.url, type(e).__name__, e)

    def wait(self, timeout_s: float) -> list[str]:
        """Wait until every job and task is done, at most ``timeout_s``; returns what is still unmirrored."""
        t0 = time.monotonic()
        announced = False
        line: stores.Transfer | None = None
        while True:
            with self._cv:
                if not self._jobs and not self._tasks and not self._busy:
                    break
                if self._thread is None or not self._thread.is_alive():
                    break
                self._cv.wait(timeout=0.25)
            el = time.monotonic() - t0
            if el > timeout_s:
                break
            if el > 1.0:
                if not announced:
                    announced = True
                    log.info("close(): waiting up to %.0fs for mirror upload(s): %s", timeout_s, "; ".join(self.pending()))
                    line = stores.Transfer(0, "waiting for mirrors", show=self.progress)
                cur = self.current
                if line is not None and cur is not None and cur.transfer is not None:
                    line.label = f"waiting for mirrors: step {cur.step} ({len(self._jobs)} pending)"
                    line.total, line.done = cur.transfer.total, cur.transfer.done
                    line.add(0)
        if line is not None:
            line.close()
        return self.pending()

    def stop(self) -> None:
        """Stop the worker after its current operation (jobs left are reported by ``pending``)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()


def _dir_size(path: str) -> int:
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


# ----------------------------------------------------------------------------- retention


def retain(store: Store, run: str, keep_last: int, *, protected: set[str] | frozenset[str] = frozenset(),
           quarantined: set[str] | frozenset[str] = frozenset(), dry_run: bool = False,
           mirrors: Sequence[Store] = (), full_verify: bool | None = None, verified: set[tuple[str, str, str]] | None = None,
           journal_store: Store | None = None,
           on_unmirrored: Callable[[Any, list[Store]], None] | None = None,
           compat: dict[str, Any] | None = None, layout: dict[str, str] | None = None) -> list[str]:
    """Delete old verified checkpoints beyond ``keep_last`` in one store. Returns what was deleted.

    The rules (F40-F42):

    - Counts and deletes within one group of checkpoints only: the same compat fingerprint
      and the same layout fingerprint (another job's, or another model's, checkpoints in the
      run dir never push out ours). With ``compat`` (and ``layout``, the job's own: what it
      just saved) only that group is touched; without, every group is pruned on its own.
    - Counts only committed and verified checkpoints, newest first. On a local store a
      counted checkpoint is verified fully (every checksum) once per process
      (``verified`` caches it; the caller adds what it just wrote); a remote one by its
      manifest and listed sizes. One that fails is kept and not counted.
    - Always keeps the newest verified of each group (``keep_last`` below 2 is raised to 2).
    - Never deletes what is not verified (L, S and R are kept), anything in ``protected``
      (a mirror upload in flight, F42), anything ``quarantined`` (failed at resume, here or
      in the journal), or a checkpoint that one of ``mirrors`` does not hold yet while that
      mirror would keep it, i.e. holds fewer than ``keep_last`` newer copies of its group
      (``retention_blocked_unmirrored``; ``on_unmirrored`` may queue the upload). A mirror
      that cannot be listed holds nothing, as far as we know.
    - Never touches a store it could not list fully.
    - Deletes the commit marker first: locally the directory is renamed to a trash name
      (atomic), remotely the claim and then the manifest go first; a half-deleted
      checkpoint never looks committed, and its leftovers are removed next time (F41).
    """
    if keep_last < 1:
        raise ConfigError("keep_last must be at least 1")
    if keep_last < MIN_KEEP_LAST:
        log.warning("keep_last=%d raised to %d: the newest checkpoint alone could be the bad one (F40)", keep_last, MIN_KEEP_LAST)
        keep_last = MIN_KEEP_LAST
    try:
        sightings = discovery.discover_store(store, run)
        ours = [s for s in sightings if s.kind == "native" and s.rel.startswith(run + "/")]
        checked = verify.verify_all(ours, run=run, compat=None).candidates
    except (OSError, StoreError) as e:
        log.warning("retention skipped for %s: could not list it fully (%s)", store.url, e)
        return []
    unreadable = [c for c in checked if c.tier == "R" and any("store_unreachable" in r or "store_auth_failed" in r for r in c.reasons)]
    if unreadable:
        log.warning("retention skipped for %s: could not read %s (%s)", store.url, unreadable[0].path, "; ".join(unreadable[0].reasons))
        return []
    full = store.is_local if full_verify is None else full_verify
    bad = set(quarantined) | _journal_quarantined(journal_store, run, checked)
    want = (None if compat is None else manifest.compat_fingerprint(compat),
            None if layout is None else manifest.layout_fingerprint(layout))
    groups: dict[tuple[str | None, str | None], list[Any]] = {}
    for c in sorted((c for c in checked if c.tier == "V"), key=lambda c: (c.step, c.generation), reverse=True):
        key = (c.compat_fingerprint, c.layout_fingerprint)
        if all(w is None or w == k for w, k in zip(want, key)):
            groups.setdefault(key, []).append(c)
    doomed: list[tuple[Any, list[Any]]] = []
    for members in groups.values():
        counted = 0
        for c in members:
            if c.path in bad:
                continue  # quarantine: neither counted nor deleted
            if counted < keep_last:
                vkey = (store.url, c.rel, c.manifest_digest or "")
                if full and (verified is None or vkey not in verified):
                    tier, reasons = verify.verify_full(store, c.rel)
                    if tier != "V":
                        log.warning("retention_not_counted %s: tier %s (%s); kept, and not counted as verified",
                                    c.path, tier, "; ".join(reasons))
                        continue
                    if verified is not None:
                        verified.add(vkey)
                counted += 1
            else:
                doomed.append((c, members))
    deleted: list[str] = []
    views: dict[str, dict[str, Any] | None] = {}
    for c, members in doomed:
        name = c.rel.split("/", 1)[1]
        if name in protected:
            log.warning("retention_blocked_unmirrored: keeping %s until its mirror upload is committed", c.path)
            continue
        missing = []
        for m in mirrors:
            if m.url not in views:
                views[m.url] = _mirror_view(m, run)
            if not _held_or_not_needed(c, views[m.url], keep_last, members):
                missing.append(m)
        if missing:
            log.warning("retention_blocked_unmirrored: keeping %s: not committed in %s yet",
                        c.path, ", ".join(m.url for m in missing))
            if on_unmirrored is not None:
                on_unmirrored(c, missing)
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
    if not dry_run:
        if store.is_local:
            _clean_trash(store, run)
        else:
            clean_orphans(store, run, sightings)
    return deleted


def _journal_quarantined(journal_store: Store | None, run: str, checked: Sequence[Any]) -> set[str]:
    """Paths whose last resume attempt failed or was found suspect (the journal remembers it across restarts)."""
    if journal_store is None:
        return set()
    from . import journal

    try:
        names = {e.rel for e in stores.list_tree(journal_store, f"{run}/{journal.JOURNAL_DIR}", max_depth=1)}
    except (OSError, StoreError):
        return set()
    out = set()
    for c in checked:
        rel = journal._rel(run, c)
        if rel.rsplit("/", 1)[-1] in names and journal.read(journal_store, run, c).get("last_outcome") in ("failed", "deferred"):
            out.add(c.path)
    return out


def _mirror_view(m: Store, run: str) -> dict[str, Any] | None:
    """What a mirror holds: {dir name: {file: size}} for committed dirs, or None when it cannot be listed."""
    try:
        entries = stores.list_tree(m, run, max_depth=2)
    except (OSError, StoreError) as e:
        log.warning("retention: cannot list mirror %s (%s); its copies count as missing", m.url, e)
        return None
    dirs: dict[str, dict[str, int]] = {}
    for e in entries:
        head, sep, tail = e.rel.partition("/")
        if sep and e.kind == "file" and stores.STEP_DIR_RE.match(head):
            dirs.setdefault(head, {})[tail] = e.size
    return {d: files for d, files in dirs.items() if manifest.MANIFEST_NAME in files}


def _held_or_not_needed(c: Any, view: dict[str, Any] | None, keep_last: int, group: Sequence[Any]) -> bool:
    """Whether the mirror ``view`` holds ``c``, or holds ``keep_last`` newer copies of ``group`` (the checkpoints
    of ``c``'s store with its compat and layout): then its own retention would not keep ``c`` either."""
    if view is None:
        return False
    if _holds(view, c):
        return True
    return sum(1 for p in group if p.step > c.step and _holds(view, p)) >= keep_last


def _holds(view: dict[str, Any], c: Any) -> bool:
    files = view.get(c.rel.split("/", 1)[1])
    return files is not None and all(files.get(f.name) == f.size for f in c.files)


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
    stores.delete(store, _claim_rel(run, name))
    stores.delete(store, f"{rel}/{manifest.MANIFEST_NAME}")  # from here on it is not a candidate
    _faults.hit("mid_retention")
    stores.delete_tree(store, rel)


def clean_orphans(store: Store, run: str, sightings: Sequence[Any] | None = None) -> list[str]:
    """Remove uncommitted step dirs of an object store that nobody is writing (F41 leftovers, dead writers).

    A step dir without a manifest is never a candidate there. It is removed when it has no
    claim (a writer always claims before uploading: these are a deletion's leftovers) or
    when its claim is older than ``stale_s``. Local stores keep such dirs (they are legacy
    candidates, F08); their own leftovers are trash and staging dirs.
    """
    if store.is_local:
        return []
    if sightings is None:
        try:
            sightings = discovery.discover_store(store, run)
        except (OSError, StoreError):
            return []
    orphans = [s for s in sightings if s.kind == "native" and s.rel.startswith(run + "/") and s.child(manifest.MANIFEST_NAME) is None]
    if not orphans:
        return []
    try:
        claims = {e.rel: e for e in stores.list_tree(store, f"{run}/{CLAIMS_DIR}", max_depth=1)}
    except (OSError, StoreError):
        return []
    removed = []
    now = time.time()
    for s in orphans:
        name = s.rel.split("/", 1)[1]
        claim = claims.get(f"{name}.json")
        if claim is not None and (claim.mtime is None or now - claim.mtime < store.stale_s):
            continue  # a writer is uploading it
        try:
            _remove_stale(store, run, name, "uncommitted leftovers (no manifest)" if claim is None else "stale claim")
            removed.append(s.store.uri(s.rel))
        except (OSError, StoreError) as e:
            log.warning("could not remove leftovers %s: %s", s.store.uri(s.rel), e)
    return removed


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
