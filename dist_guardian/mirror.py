"""Rank 0's background work: mirror uploads with backoff, and the housekeeping around them.

What belongs here: the worker thread (``Mirrors``: mirror jobs retried with backoff, tasks run
once) and ``Upkeep``, which decides what the worker is asked to do after a commit (mirror it,
then retention), after a mirror landed (retention there and on the primary, F42), and after a
resume (catch-up of what a mirror lacks, F43; stale-upload cleanup, F14; the report and opt-in
repair of a damaged replica, F05). Training never waits on a remote: everything here runs on
the worker. The copies themselves are ``copying``; the deletion rules ``retention``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import copying, discovery, manifest, retention, stores, verify
from .candidate import Candidate, ResumeResult
from .commit import Committed, discard_staging
from .config import GuardianConfig
from .errors import DistGuardianError
from .layout import MANIFEST_NAME
from .stores import Store

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        *,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        on_mirrored: Callable[[Store, MirrorJob], None] | None = None,
        progress: bool | None = None,
    ):
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

    def submit(
        self, src_dir: str, run: str, dirname: str, step: int, targets: Sequence[Store], *, cleanup: bool = False
    ) -> None:
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
                self._jobs.append(
                    MirrorJob(
                        src_dir=src_dir, cleanup=cleanup, run=run, dirname=dirname, step=step, targets=list(targets)
                    )
                )
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
            return [
                f"step {j.step} -> {', '.join(t.url for t in j.targets)} ({j.last_error or 'in progress'})"
                for j in self._jobs
            ]

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
        total = stores.dir_size(job.src_dir)
        job.transfer = stores.Transfer(total, f"mirror step {job.step} to {t.url}", show=False)
        self.current = job
        try:
            loc = copying.copy_checkpoint(
                job.src_dir,
                t,
                job.run,
                job.dirname,
                token=job.token,
                transfer=job.transfer,
                abort_stale=t.url not in self.uploads_checked,
            )
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
                    log.info(
                        "close(): waiting up to %.0fs for mirror upload(s): %s", timeout_s, "; ".join(self.pending())
                    )
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


class Upkeep:
    """What rank 0 queues on the worker around commits and resumes, and what it remembers for retention.

    ``verified`` (store url, rel, manifest digest) are copies known to verify fully (retention
    need not read them again); ``quarantined`` paths failed at resume and are never counted
    or deleted; ``layout`` is that of the state last committed (retention keeps to its group, T02).
    """

    def __init__(self, config: GuardianConfig, store_list: Callable[[], list[Store]]):
        self.config = config
        self.run = config.resume.run
        self._store_list = store_list
        self.verified: set[tuple[str, str, str]] = set()
        self.quarantined: set[str] = set()
        self.layout: dict[str, str] | None = None
        self.worker = Mirrors(on_mirrored=self._on_mirrored, progress=config.resume.progress)

    @property
    def uploads_checked(self) -> set[str]:
        """Object stores whose stale multipart uploads were handled in this process (once per start, F14)."""
        return self.worker.uploads_checked

    def after_commit(self, store_list: list[Store], done: Committed) -> None:
        """Rank 0, after the primary commit: queue the mirrors, then retention (never waits on a remote)."""
        primary = store_list[0]
        self.verified.add((primary.url, f"{self.run}/{done.dirname}", done.manifest_digest))
        self.layout = done.layout
        others = store_list[1:]
        if not others:
            if not primary.is_local:
                discard_staging(done.staging)
            if self.config.keep_last is not None:
                self._retain(primary, [])  # nothing remote to wait for: in line, as before
            return
        src_dir = done.path if primary.is_local else done.staging
        self.worker.submit(src_dir, self.run, done.dirname, done.step, others, cleanup=not primary.is_local)
        if self.config.keep_last is not None:
            self.worker.submit_task(f"retention {primary.url}", lambda: self._retain(primary, others))

    def _retain(self, store: Store, mirrors: list[Store]) -> list[str]:
        """Retention of one store. The primary keeps what a mirror does not hold yet (F42) and queues it."""
        if self.config.keep_last is None:
            return []
        protected: set[str] = set()
        if mirrors:
            for names in self.worker.unmirrored(self.run).values():
                protected |= names
        guards = retention.RetentionGuards(
            protected=protected,
            quarantined=self.quarantined,
            verified=self.verified,
            journal_store=self._store_list()[0],
            on_unmirrored=self._catch_up if mirrors and store.is_local else None,
        )
        return retention.retain(
            store,
            self.run,
            self.config.keep_last,
            compat=self.config.resume.compat or {},
            layout=self.layout,
            mirrors=mirrors,
            guards=guards,
        )

    def _catch_up(self, c: Candidate, missing: list[Store]) -> None:
        """A committed local checkpoint that a mirror lacks (deferred, or from an earlier run): mirror it."""
        primary = self._store_list()[0]
        name = c.rel.split("/", 1)[1]
        pending = self.worker.unmirrored(self.run)
        targets = [m for m in missing if name not in pending.get(m.url, set())]
        if targets:
            log.info("mirror catch-up: %s -> %s", c.path, ", ".join(t.url for t in targets))
            self.worker.submit(primary.join(c.rel), self.run, name, c.step, targets)

    def _on_mirrored(self, target: Store, job: MirrorJob) -> None:
        """A mirror committed: retention may now run in that store, and may now free the primary (F42)."""
        if self.config.keep_last is None:
            return
        store_list = self._store_list()
        self.worker.submit_task(f"retention {target.url}", lambda: self._retain(target, []))
        self.worker.submit_task(f"retention {store_list[0].url}", lambda: self._retain(store_list[0], store_list[1:]))

    def _catch_up_on_start(self, store_list: list[Store], down: set[str]) -> None:
        """Mirror the newest committed local checkpoints that a mirror lacks (a mirror deferred
        before the last restart, F43; a store added to the list). The newest ``keep_last``
        (or only the newest without retention): what that mirror would keep anyway."""
        primary = store_list[0]
        try:
            sightings = [s for s in discovery.discover_store(primary, self.run) if s.kind == "native"]
            checked = verify.verify_all(sightings, run=self.run, compat=None).candidates
        except (OSError, DistGuardianError) as e:
            log.warning("mirror catch-up skipped: cannot list %s (%s)", primary.url, e)
            return
        good = sorted(
            (c for c in checked if c.tier == "V" and c.path not in self.quarantined),
            key=lambda c: (c.step, c.generation),
            reverse=True,
        )[: self.config.keep_last or 1]
        for m in store_list[1:]:
            if m.url in down:
                continue  # unreachable at start: the next save's retention catches up (close() must not wait on it)
            view = retention.mirror_view(m, self.run)
            if view is None:
                continue
            for c in [c for c in good if not retention.held_or_not_needed(c, view, len(good), good)]:
                self._catch_up(c, [m])

    def _clean_uploads(self, s: Store) -> None:
        copying.clean_stale_uploads(s, self.run)
        self.uploads_checked.add(s.url)

    def note_attempts(self, result: ResumeResult) -> None:
        """Every rank, after a resume: what failed or was deferred is quarantined from retention."""
        self.quarantined |= {a.path for a in result.attempts if a.outcome in ("failed", "deferred")}

    def after_resume(self, result: ResumeResult) -> None:
        """Rank 0: queue the stale-upload cleanup of reachable object stores (F14) and the mirror
        catch-up (F43) in the background; report (and with ``repair=True`` re-fetch) damaged
        replicas of what was loaded (F05)."""
        try:
            store_list = self._store_list()
        except DistGuardianError:
            return
        down = {u for u, _ in result.unreachable}
        for s in [s for s in store_list if not s.is_local and s.is_s3 and s.url not in down]:
            self.worker.submit_task(f"clean stale uploads {s.url}", functools.partial(self._clean_uploads, s))
        if store_list[0].is_local and len(store_list) > 1:
            self.worker.submit_task("mirror catch-up", lambda: self._catch_up_on_start(store_list, down))
        if not result.resumed or result.store is None:
            return
        loaded = next((a for a in result.attempts if a.outcome == "loaded"), None)
        src = next((s for s in store_list if s.url == result.store), None)
        if loaded is None or src is None:
            return
        rel = loaded.candidate_id.split(":", 1)[1]
        if result.tier == "V" and src.is_local:
            # Every checksum of this copy was just checked while loading: retention need not read it again.
            try:
                mbytes = stores.read_small(src, f"{rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
                self.verified.add((src.url, rel, manifest.digest_bytes(mbytes)))
            except OSError:
                pass
        self._report_damaged_replicas(result, store_list, src, rel)

    def _report_damaged_replicas(self, result: ResumeResult, store_list: Sequence[Store], src: Store, rel: str) -> None:
        bad = {
            a.path: "; ".join(w for _, w in a.reasons) or a.outcome
            for a in result.attempts
            if a.outcome in ("failed", "deferred")
        }
        bad.update({p: why for p, why in result.rejected})
        repair = self.config.repair
        for s in store_list:
            where = s.uri(rel)
            if s.url == src.url or where not in bad:
                continue
            log.warning(
                "replica_repair_needed path=%s reason=%s: step %s was loaded from %s instead%s",
                where,
                bad[where][:300],
                result.step,
                result.path,
                "; re-fetching it in the background"
                if repair and s.is_local
                else "; pass repair=True to re-fetch it"
                if s.is_local
                else "",
            )
            if repair and s.is_local:
                dirname = rel.split("/", 1)[1]
                self.worker.submit_task(
                    f"repair {where}",
                    functools.partial(copying.repair_replica, src, rel, s, self.run, dirname),
                )

    def flush(self, timeout_s: float) -> list[str]:
        """Wait for mirror uploads and housekeeping, at most ``timeout_s``; returns what is still unmirrored."""
        return self.worker.wait(timeout_s)

    def close(self, timeout_s: float) -> list[str]:
        """Wait as :meth:`flush` does, then stop the worker; what is still unmirrored is logged and returned."""
        left = self.worker.wait(timeout_s)
        self.worker.stop()
        if left:
            log.warning("unmirrored after close(): %s", "; ".join(left))
        return left
