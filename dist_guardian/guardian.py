"""``Guardian``: the public object. Resume into live state, save it, close.

Built on ``coordinator.resume``: this module turns a user's ``state`` dict into staged
trees (load) and into native files (save), applies staging only after a unanimous vote,
and owns the per-rank RNG state, mirrors and retention.
"""

from __future__ import annotations

import copy
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from . import _faults, coordinator, discovery, formats, loading, manifest, saving, statetree, stores, verify
from .candidate import Candidate, Loaded, ResumeResult, validate_suspect_policy
from .comm import Comm
from .errors import CheckpointFormatError, CommitConflict, ConfigError, DistGuardianError, SaveFailed
from .saving import SaveResult, WrittenEntry
from .stores import Store, check_storage_options, check_url

log = logging.getLogger(__name__)

REPLICATED_FILE = "replicated.dgt"
MIN_KEEP_LAST = saving.MIN_KEEP_LAST


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.dgt"


class Guardian:
    """Resume from the best checkpoint that loads on every rank; save so that one always exists.

    Args:
        stores: store URLs, the first is the primary (where saves commit): a local path,
            ``file://...``, ``tmp://NAME`` (node-local, private) or any fsspec URL.
        run: the run name; a store may hold many runs (``<store>/<run>/step-.../``).
        compat: must match the checkpoint's to resume (F31), e.g. ``{"model": "gpt-small"}``.
        keep_last: retention; ``None`` keeps everything. 1 is raised to 2 (F40).
        suspect: ``"after_same_step"`` | ``"last_resort"`` | ``"reject"`` (FAULTS.md).
        on_exhausted: ``"fresh"`` or ``"raise"`` (F33).
        timeout: seconds; bounds one load attempt and each vote.
        storage_options: per URL prefix, e.g. ``{"s3://bucket": {"client_kwargs": {...}}}``.
        per_rank: keys of ``state`` that differ per rank (data position, sharded tensors);
            everything else is replicated and written once by rank 0.
        required: keys that a foreign checkpoint must hold (default: the ``nn.Module`` keys).
        extra_safe_globals: classes a foreign ``torch.save`` file may need (F34 opt-in).
        foreign_loader: ``fn(obj, state) -> dict`` mapping a foreign file onto ``state``.
        save_failures: consecutive failed saves tolerated with a warning before one raises.
        remote_concurrency: connections per remote file read; ``None`` lets the store decide
            (its ``concurrency`` storage option, else one GET stream for a loopback endpoint
            and parallel ranged reads for a real one: ``stores.read_concurrency``).
        mirror_timeout: seconds ``close()`` waits for mirror uploads before it reports
            what is still unmirrored.
        repair: re-fetch a damaged local replica from the intact one that was loaded
            (F05). Off by default: the damaged copy is only reported
            (``replica_repair_needed``); on, it is replaced in the background and kept
            aside as ``.quarantine-<dir>-<id>``.
        progress: a progress line on stderr for remote loads and for ``close()`` waiting on
            mirrors (rank 0, transfers over about a second). ``None``: only on a TTY.

    Example::

        g = Guardian(stores=["ckpt/", "tmp://run-1"], run="run-1")
        result = g.resume({"model": model, "optim": optim})
        g.save({"model": model, "optim": optim}, step=100)
        g.close()
    """

    def __init__(
        self,
        stores: Sequence[str],
        run: str = "default",
        compat: dict[str, Any] | None = None,
        keep_last: int | None = None,
        suspect: str = "after_same_step",
        on_exhausted: str = "fresh",
        timeout: float = 600.0,
        storage_options: dict[str, dict[str, Any]] | None = None,
        *,
        per_rank: Iterable[str] = (),
        required: Iterable[str] | None = None,
        rng: bool = True,
        extra_safe_globals: Iterable[Any] = (),
        foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
        save_failures: int = 2,
        remote_concurrency: int | None = None,
        mirror_timeout: float = 600.0,
        repair: bool = False,
        progress: bool | None = None,
    ):
        if isinstance(stores, str):
            stores = [stores]
        if not stores:
            raise ConfigError("stores is empty: give at least one store, e.g. stores=['checkpoints/']")
        if not isinstance(run, str) or not manifest.RUN_NAME_RE.match(run):
            raise ConfigError(f"run={run!r} is not a plain name (letters, digits, '.', '_', '-')")
        for url in stores:
            check_url(url)
        check_storage_options(storage_options, stores)
        _faults.check()
        validate_suspect_policy(suspect)
        if on_exhausted not in coordinator.ON_EXHAUSTED:
            raise ConfigError(f"on_exhausted={on_exhausted!r}: use 'fresh' or 'raise'")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds")
        if keep_last is not None:
            if not isinstance(keep_last, int) or keep_last < 1:
                raise ConfigError(f"keep_last={keep_last!r} must be None or a positive integer")
            if keep_last < MIN_KEEP_LAST:
                log.warning("keep_last=%d raised to %d: the newest checkpoint alone could be the bad one (F40)", keep_last, MIN_KEEP_LAST)
                keep_last = MIN_KEEP_LAST
        if compat is not None:
            try:
                json.dumps(compat, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"compat must be JSON-able: {e}") from None
        self.store_urls = list(stores)
        self.run = run
        self.compat = compat
        self.keep_last = keep_last
        self.suspect = suspect
        self.on_exhausted = on_exhausted
        self.timeout = float(timeout)
        self.storage_options = storage_options or {}
        self.per_rank = set(per_rank)
        self.required = None if required is None else list(required)
        self.rng = rng
        self.extra_safe_globals = list(extra_safe_globals)
        self.foreign_loader = foreign_loader
        self.save_failures = save_failures
        self.remote_concurrency = remote_concurrency
        self.mirror_timeout = mirror_timeout
        self.repair = repair
        self.progress = progress
        self._verified: set[tuple[str, str, str]] = set()  # (store url, rel, manifest digest) known good
        self._uploads_checked: set[str] = set()  # remote primaries whose stale multipart uploads were handled
        self.generation = 1
        self._comm: Comm | None = None
        self._stores: list[Store] | None = None
        self._mirrors: saving.Mirrors | None = None
        self._failed_saves = 0
        self._quarantined: set[str] = set()
        self._layout: dict[str, str] | None = None  # of the state last saved: retention keeps to its group (T02)
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None  # one background save at a time (blocking=False)
        self._pending: Future | None = None
        self._buffers = statetree.SnapshotBuffers()

    # ------------------------------------------------------------------ plumbing

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = Comm(self.timeout)  # collective on first use: every rank gets here
        return self._comm

    def _store_list(self) -> list[Store]:
        if self._stores is None:
            self._stores, refused = coordinator.resolve_stores(self.store_urls, self.storage_options)
            if not self._stores or self._stores[0].index != 0:
                why = refused[0][1] if refused else "unknown"
                raise ConfigError(f"the primary store {self.store_urls[0]} cannot be used: {why}")
        return self._stores

    def _required(self, state: dict[str, Any]) -> list[str]:
        if self.required is not None:
            return self.required
        return [k for k, v in state.items() if isinstance(v, torch.nn.Module)]

    # ------------------------------------------------------------------ resume

    def resume(self, state: dict[str, Any]) -> ResumeResult:
        """Collective: call on every rank. Load the best checkpoint that loads everywhere into ``state``.

        Returns a :class:`ResumeResult` identical on every rank. ``state`` is only touched
        by a candidate that every rank loaded (F29); with ``result.resumed == False`` it is
        untouched (a fresh start, FAULTS.md F33).
        """
        self._check_open()
        self.wait()
        _check_state(state)
        comm = self.comm
        required = self._required(state)

        def load(c: Candidate, store: Store) -> Loaded:
            if c.kind == "native":
                staged = loading.load_native(c, store, rank=comm.rank, world_size=comm.world_size,
                                             concurrency=self.remote_concurrency,
                                             progress=self.progress if comm.rank == 0 else False)
            elif c.kind == "torch":
                staged = loading.load_torch_file(c, store, state, extra_safe_globals=self.extra_safe_globals,
                                                 foreign_loader=self.foreign_loader, required=required)
            else:
                staged = loading.load_dcp(c, store, state, extra_safe_globals=self.extra_safe_globals)
            loading.check_structure(staged, state, required)
            if staged.suspect:
                try:
                    loading.sanity_gate(staged)
                except CheckpointFormatError as e:
                    raise CheckpointFormatError(f"{'; '.join(staged.suspect)}; {e}") from None
            return Loaded(staged=staged, suspect=tuple(staged.suspect), warnings=tuple(staged.warnings),
                          last_resort=staged.tree_damaged)

        def apply(c: Candidate, staged: loading.Staged) -> None:
            loading.apply(staged, state)

        result = coordinator.resume(
            load, self.store_urls, run=self.run, compat=self.compat, suspect=self.suspect,
            on_exhausted=self.on_exhausted, timeout=self.timeout, storage_options=self.storage_options,
            apply_fn=apply, extra_safe_globals=[_qualname(g) for g in self.extra_safe_globals], comm=comm,
            layout=statetree.layout_fingerprints(state),
        )
        self.generation = result.generation
        self._quarantined |= {a.path for a in result.attempts if a.outcome in ("failed", "deferred")}
        if comm.rank == 0:
            self._after_resume(result)
        return result

    # ------------------------------------------------------------------ save

    def save(self, state: dict[str, Any], step: int, metrics: dict[str, Any] | None = None, *,
             blocking: bool = True) -> SaveResult | "Future[SaveResult]":
        """Collective: call on every rank. Write and commit a checkpoint of ``state`` at ``step``.

        Replicated state is written once by rank 0, per-rank state (RNG, ``per_rank`` keys)
        by each rank. Any rank that fails makes every rank abandon this save, leaving the
        previous checkpoints untouched (F11, F12). Returns a :class:`SaveResult` identical
        on every rank; raises :class:`SaveFailed` after ``save_failures`` failures in a row.

        With ``blocking=False`` training waits only for a copy of the state into reusable
        buffers (pinned when CUDA is present); writing, hashing and the commit run in a
        background thread, and a ``Future[SaveResult]`` is returned. The next ``save``,
        ``resume`` or ``close`` waits for it first, so collectives never interleave.
        """
        self._check_open()
        self.wait()
        _check_state(state)
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= manifest.MAX_STEP:
            raise ConfigError(f"step={step!r} must be an integer in [0, {manifest.MAX_STEP}]")
        metrics = copy.deepcopy(dict(metrics or {}))  # a snapshot, like the state (T06)
        for k, v in list(metrics.items()):
            if isinstance(v, torch.Tensor):
                metrics[k] = v.item()
        comm = self.comm
        layout = statetree.layout_fingerprints(state)
        if blocking:
            return self._save(statetree.capture(state), self._rng_now(), layout, step, metrics)
        t0 = time.monotonic()
        captured = self._buffers.snapshot(statetree.capture(state))
        self._buffers.synchronize()  # device-to-host copies done before training touches the tensors again
        rng = self._rng_now()
        log.debug("async save of step %d: snapshot took %.3fs", step, time.monotonic() - t0)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_guardian-save")
        self._pending = self._pool.submit(self._save, captured, rng, layout, step, metrics)
        return self._pending

    def wait(self) -> SaveResult | None:
        """Wait for the pending background save (if any) and return its result (raising its error)."""
        fut, self._pending = self._pending, None
        return fut.result() if fut is not None else None

    def _rng_now(self) -> dict[str, Any] | None:
        return statetree.rng_state() if self.rng else None

    def _save(self, captured: dict[str, Any], rng: dict[str, Any] | None, layout: dict[str, str], step: int,
              metrics: dict[str, Any]) -> SaveResult:
        comm = self.comm
        rank, world = comm.rank, comm.world_size
        store_list = self._store_list()
        primary = store_list[0]
        t0 = time.monotonic()

        # 1. Rank 0 opens the staging dir (its name travels to every rank).
        staging_doc: dict[str, Any] = {}
        if rank == 0:
            try:
                staging_doc = {"staging": self._open_staging(primary, step)}
            except Exception as e:
                staging_doc = {"error": saving.save_errno_reason(e, primary.root if primary.is_local else ".")}
        staging_doc = comm.broadcast_json(staging_doc, f"broadcast staging dir of step {step}")
        if "error" in staging_doc:
            return self._save_failed(step, [(0, staging_doc["error"])], t0)
        staging = staging_doc["staging"]

        # 2. Every rank writes its files into staging, hashing as it goes.
        mine: list[dict[str, Any]] = []
        err = ""
        try:
            if not os.path.isdir(staging):
                raise SaveFailed(f"staging dir {staging} is not visible on this rank: the primary store must be shared by every rank")
            mine = [w.to_json() for w in self._write_rank_files(captured, rng, staging, step, rank, world)]
        except Exception as e:
            err = saving.save_errno_reason(e, staging if os.path.isdir(staging) else ".")
            log.warning("[rank=%d] %s", rank, err)
        texts = comm.gather_strings(json.dumps({"files": mine, "error": err}), f"gather digests of step {step}", max_len=1 << 26)
        docs = [json.loads(t) for t in texts]
        errors = [(r, d["error"]) for r, d in enumerate(docs) if d["error"]]
        if errors:
            if rank == 0:
                self._discard(primary, staging)
            comm.vote_min(1, f"abandon step {step}")
            return self._save_failed(step, errors, t0)

        # 3. Rank 0 writes the manifest and commits; every rank learns the outcome.
        outcome: dict[str, Any] = {}
        if rank == 0:
            entries = [WrittenEntry.from_json(e) for d in docs for e in d["files"]]
            try:
                outcome = {"path": self._commit(primary, staging, step, entries, metrics, world, layout)}
            except Exception as e:
                self._discard(primary, staging)
                reason = str(e) if isinstance(e, CommitConflict) else saving.save_errno_reason(e, primary.root if primary.is_local else ".")
                log.warning("%s", reason)
                outcome = {"error": reason}
        outcome = comm.broadcast_json(outcome, f"broadcast commit of step {step}")
        if "error" in outcome:
            return self._save_failed(step, [(0, outcome["error"])], t0)
        self._failed_saves = 0
        path = outcome["path"]
        nbytes = sum(e["size"] for d in docs for e in d["files"])
        if rank == 0:
            self._after_commit(store_list, path, staging, step)
            log.info("saved step %d to %s (%.1f MB in %.2fs)", step, path, nbytes / 1e6, time.monotonic() - t0)
        return SaveResult(committed=True, step=step, path=path, seconds=time.monotonic() - t0, bytes_written=nbytes)

    def _open_staging(self, primary: Store, step: int) -> str:
        if primary.is_local:
            stores.make_run_dir(primary, self.run)
            stores.clean_stale_staging(primary, self.run)
            path = primary.join(self.run, stores.new_staging_name(step))
            os.mkdir(path, 0o700)
            return path
        return saving.local_temp_staging(step)

    def _write_rank_files(self, captured: dict[str, Any], rng: dict[str, Any] | None, staging: str, step: int,
                          rank: int, world: int) -> list[WrittenEntry]:
        out = []
        if rank == 0:
            replicated = {k: v for k, v in captured.items() if k not in self.per_rank}
            out.append(_write_tree(os.path.join(staging, REPLICATED_FILE), replicated, rank=rank, step=step, file_rank=None))
        per = {k: v for k, v in captured.items() if k in self.per_rank}
        if rng is not None:
            per[statetree.RNG_KEY] = rng
        out.append(_write_tree(os.path.join(staging, rank_file_name(rank, world)), per, rank=rank, step=step, file_rank=rank))
        return out

    def _commit(self, primary: Store, staging: str, step: int, entries: list[WrittenEntry], metrics: dict[str, Any],
                world: int, layout: dict[str, str]) -> str:
        mbytes = manifest.build(
            run=self.run, step=step, generation=self.generation, world_size=world, created_unix=time.time(),
            compat=self.compat or {}, metrics=metrics, files=[w.entry for w in entries],
            tensors={w.entry.name: w.stats for w in entries}, trees={w.entry.name: w.trees for w in entries},
            torch_version=torch.__version__,
            writer=saving.writer_info(), layout=layout,
        )
        self._layout = layout
        if primary.is_local:
            final = saving.commit_local(primary, self.run, staging, step, self.generation, mbytes)
            self._verified.add((primary.url, f"{self.run}/{os.path.basename(final)}", manifest.digest_bytes(mbytes)))
            return final
        # Remote primary: upload the finished files from local staging, manifest last (exclusive).
        stores.write_new_file(os.path.join(staging, manifest.MANIFEST_NAME), mbytes)
        for name in (stores.step_dir_name(step), stores.step_dir_name(step, self.generation)):
            try:
                loc = saving.copy_checkpoint(staging, primary, self.run, name, exclusive=True,
                                             abort_stale=primary.url not in self._uploads_checked)
                self._uploads_checked.add(primary.url)
                self._verified.add((primary.url, f"{self.run}/{name}", manifest.digest_bytes(mbytes)))
                return loc
            except FileExistsError:
                other = _remote_generation(primary, f"{self.run}/{name}")
                if other == self.generation or other is None:
                    raise CommitConflict(f"commit_conflict: {primary.uri(self.run, name)} was committed by another writer") from None
                log.warning("lineage_fork step=%d: %s holds generation %s", step, primary.uri(self.run, name), other)
        raise CommitConflict(f"commit_conflict: step {step} generation {self.generation} already committed in {primary.url}")

    # ------------------------------------------------------------------ mirrors, retention, repair (rank 0)

    def _worker(self) -> saving.Mirrors:
        if self._mirrors is None:
            self._mirrors = saving.Mirrors(on_mirrored=self._on_mirrored, progress=self.progress)
        return self._mirrors

    def _after_commit(self, store_list: list[Store], path: str, staging: str, step: int) -> None:
        """Rank 0, after the primary commit: queue the mirrors, then retention (never waits on a remote)."""
        primary = store_list[0]
        dirname = os.path.basename(path.rstrip("/"))
        src_dir = path if primary.is_local else staging
        others = store_list[1:]
        if not others:
            if not primary.is_local:
                saving.discard_staging(staging)
            if self.keep_last is not None:
                self._retain(primary, [])  # nothing remote to wait for: in line, as before
            return
        worker = self._worker()
        worker.submit(src_dir, self.run, dirname, step, others, cleanup=not primary.is_local)
        if self.keep_last is not None:
            worker.submit_task(f"retention {primary.url}", lambda: self._retain(primary, others))

    def _retain(self, store: Store, mirrors: list[Store]) -> list[str]:
        """Retention of one store. The primary keeps what a mirror does not hold yet (F42) and queues it."""
        protected: set[str] = set()
        if self._mirrors is not None and mirrors:
            for names in self._mirrors.unmirrored(self.run).values():
                protected |= names
        primary = self._store_list()[0]
        return saving.retain(store, self.run, self.keep_last, protected=protected, quarantined=self._quarantined,
                             mirrors=mirrors, verified=self._verified, journal_store=primary,
                             on_unmirrored=self._catch_up if mirrors and store.is_local else None,
                             compat=self.compat or {}, layout=self._layout)

    def _catch_up(self, c: Candidate, missing: list[Store]) -> None:
        """A committed local checkpoint that a mirror lacks (deferred, or from an earlier run): mirror it."""
        primary = self._store_list()[0]
        name = c.rel.split("/", 1)[1]
        pending = self._worker().unmirrored(self.run)
        targets = [m for m in missing if name not in pending.get(m.url, set())]
        if targets:
            log.info("mirror catch-up: %s -> %s", c.path, ", ".join(t.url for t in targets))
            self._worker().submit(primary.join(c.rel), self.run, name, c.step, targets)

    def _on_mirrored(self, target: Store, job: saving.MirrorJob) -> None:
        """A mirror committed: retention may now run in that store, and may now free the primary (F42)."""
        if self.keep_last is None:
            return
        store_list = self._store_list()
        worker = self._worker()
        worker.submit_task(f"retention {target.url}", lambda: self._retain(target, []))
        worker.submit_task(f"retention {store_list[0].url}", lambda: self._retain(store_list[0], store_list[1:]))

    def _catch_up_on_start(self, store_list: list[Store], down: set[str]) -> None:
        """Mirror the newest committed local checkpoints that a mirror lacks (a mirror deferred
        before the last restart, F43; a store added to the list). The newest ``keep_last``
        (or only the newest without retention): what that mirror would keep anyway."""
        primary = store_list[0]
        try:
            checked = verify.verify_all([s for s in discovery.discover_store(primary, self.run) if s.kind == "native"],
                                        run=self.run, compat=None).candidates
        except (OSError, DistGuardianError) as e:
            log.warning("mirror catch-up skipped: cannot list %s (%s)", primary.url, e)
            return
        good = sorted((c for c in checked if c.tier == "V" and c.path not in self._quarantined),
                      key=lambda c: (c.step, c.generation), reverse=True)[: self.keep_last or 1]
        for m in store_list[1:]:
            if m.url in down:
                continue  # unreachable at start: the next save's retention catches up (close() must not wait on it)
            view = saving._mirror_view(m, self.run)
            if view is None:
                continue
            missing = [c for c in good if not saving._held_or_not_needed(c, view, len(good), good)]
            for c in missing:
                self._catch_up(c, [m])

    def _clean_uploads(self, s: Store) -> None:
        saving.clean_stale_uploads(s, self.run)
        if self._mirrors is not None:
            self._mirrors.uploads_checked.add(s.url)
        self._uploads_checked.add(s.url)

    def _after_resume(self, result: ResumeResult) -> None:
        """Rank 0: report (and with ``repair=True`` re-fetch) damaged replicas of what was loaded (F05);
        queue the stale-upload cleanup of reachable object stores (F14), in the background."""
        try:
            store_list = self._store_list()
        except DistGuardianError:
            return
        down = {u for u, _ in result.unreachable}
        remote = [s for s in store_list if not s.is_local and s.is_s3 and s.url not in down]
        for s in remote:
            self._worker().submit_task(f"clean stale uploads {s.url}", lambda s=s: self._clean_uploads(s))
        if store_list[0].is_local and len(store_list) > 1:
            self._worker().submit_task("mirror catch-up", lambda: self._catch_up_on_start(store_list, down))
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
                mbytes = stores.read_small(src, f"{rel}/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
                self._verified.add((src.url, rel, manifest.digest_bytes(mbytes)))
            except OSError:
                pass
        bad = {a.path: "; ".join(w for _, w in a.reasons) or a.outcome for a in result.attempts if a.outcome in ("failed", "deferred")}
        bad.update({p: why for p, why in result.rejected})
        for s in store_list:
            if s.url == src.url:
                continue
            where = s.uri(rel)
            if where not in bad:
                continue
            log.warning("replica_repair_needed path=%s reason=%s: step %s was loaded from %s instead%s",
                        where, bad[where][:300], result.step, result.path,
                        "; re-fetching it in the background" if self.repair and s.is_local else
                        "; pass repair=True to re-fetch it" if s.is_local else "")
            if self.repair and s.is_local:
                dirname = rel.split("/", 1)[1]
                self._worker().submit_task(f"repair {where}",
                                           lambda s=s, dirname=dirname: saving.repair_replica(src, rel, s, self.run, dirname))

    def _discard(self, primary: Store, staging: str) -> None:
        saving.discard_staging(staging)

    def _save_failed(self, step: int, errors: list[tuple[int, str]], t0: float) -> SaveResult:
        self._failed_saves += 1
        reason = "; ".join(f"rank {r}: {e}" for r, e in errors)
        if self.comm.rank == 0:
            log.error("save of step %d abandoned on every rank; previous checkpoints untouched. %s", step, reason)
        if self._failed_saves > self.save_failures:
            raise SaveFailed(f"save of step {step} failed ({self._failed_saves} in a row): {reason}")
        return SaveResult(committed=False, step=step, seconds=time.monotonic() - t0, reason=reason)

    # ------------------------------------------------------------------ close

    def close(self) -> list[str]:
        """Collective: call on every rank. Destroy the coordination group; rank 0 waits for mirrors.

        Rank 0 waits up to ``mirror_timeout`` for background mirror uploads and housekeeping,
        with a progress line on a terminal, and returns what is still unmirrored (empty when
        everything landed; also logged). The other ranks return at once.
        """
        if self._closed:
            return []
        try:
            self.wait()
        except DistGuardianError as e:
            log.error("the last background save failed: %s", e)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        self._closed = True
        left: list[str] = []
        if self._comm is not None:
            if self._comm.distributed and self._comm.broken is None:
                try:
                    self._comm.vote_min(1, "close")
                except DistGuardianError:
                    pass
            self._comm.close()
        if self._mirrors is not None:
            left = self._mirrors.wait(self.mirror_timeout)
            self._mirrors.stop()
            if left:
                log.warning("unmirrored after close(): %s", "; ".join(left))
        return left

    def flush(self, timeout: float | None = None) -> list[str]:
        """Rank 0: wait for background mirror uploads and housekeeping, without closing.

        Returns what is still unmirrored after ``timeout`` seconds (default ``mirror_timeout``);
        other ranks return ``[]`` at once. Training never needs this; ``close()`` does it.
        A pending background save is waited for first (its mirror is queued by its commit).
        """
        if not self._closed:
            self.wait()
        if self._mirrors is None:
            return []
        return self._mirrors.wait(self.mirror_timeout if timeout is None else timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Guardian is closed; create a new one")

    def __enter__(self) -> "Guardian":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _remote_generation(store: Store, rel: str) -> int | None:
    try:
        return manifest.parse(stores.read_small(store, f"{rel}/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)).generation
    except (OSError, manifest.ManifestError):
        return None


def _write_tree(path: str, tree: dict[str, Any], *, rank: int, step: int, file_rank: int | None) -> WrittenEntry:
    enc = statetree.Encoder()
    encoded = enc.encode(tree, "")
    tree_json = json.dumps(encoded, separators=(",", ":"), allow_nan=False)
    specs = [statetree.tensor_spec(n, t) for n, t in enc.tensors.items()]
    return saving.write_file(path, tree_json, specs, lambda spec: statetree.max_abs(enc.tensors[spec.name]),
                             rank=rank, step=step, file_rank=file_rank, trees=formats.tree_key_digests(encoded))


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise ConfigError("state must be a non-empty dict with string keys, e.g. {'model': model, 'optim': optimizer}")
    if statetree.RNG_KEY in state:
        raise ConfigError(f"state key {statetree.RNG_KEY!r} is reserved")


def _qualname(g: Any) -> str:
    return g if isinstance(g, str) else f"{g.__module__}.{g.__qualname__}"
