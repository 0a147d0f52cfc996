"""Hugging Face ``Trainer``: checksummed, mirrored ``checkpoint-N/`` dirs, and the newest one that loads.

``GuardianCallback`` records a manifest (size and xxh3-128 of every file) into each
``checkpoint-N/`` the Trainer writes, mirrors it to the other stores in the background, and
prunes by step instead of the Trainer's mtime-based ``save_total_limit`` (never the newest good
checkpoint, never one a mirror does not hold yet). ``find_resume_checkpoint`` is collective:
every rank tries the newest candidate across the output dir and the mirrors, and the path of
the newest one whose files verify and whose model and optimizer load on every rank comes back,
restored from a mirror into the output dir first when the local copy is damaged or gone::

    trainer = Trainer(..., callbacks=[GuardianCallback(stores=["s3://bucket/runs"])])
    trainer.train(resume_from_checkpoint=find_resume_checkpoint(args.output_dir, stores=["s3://bucket/runs"]))

Only this module imports transformers; it uses dist_guardian's public parts: ``dist_guardian.resume``,
``hf_dirs`` (manifest, mirror, prune, restore of a checkpoint dir), ``hf_loading.check_loads``, and the
config and run-name rules every entry point validates with.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

import dist_guardian
from dist_guardian import Candidate, ConfigError, Loaded, Store, hf_dirs, hf_loading
from dist_guardian.config import ResumeConfig
from dist_guardian.layout import NAME_RE

log = logging.getLogger(__name__)

__all__ = ["GuardianCallback", "find_resume_checkpoint"]

_CALLBACK_OPTIONS = ("storage_options", "keep_last", "mirror_timeout")


def run_name(output_dir: str, run: str | None) -> str:
    """The run the mirrors keep this output dir's checkpoints under: ``run``, else the output dir's
    name when it is a plain name, else ``"default"`` (``<store>/<run>/checkpoint-N/``)."""
    if run is not None:
        return run
    base = os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    return base if NAME_RE.match(base) else "default"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    """One saved ``checkpoint-N/`` for the worker."""

    ck: str
    output_dir: str
    step: int
    world_size: int
    protect: tuple[str, ...]


class GuardianCallback(TrainerCallback):
    """Checksum, mirror and prune every ``checkpoint-N/`` the Trainer saves.

    Args:
        stores: the mirror stores (``/backup/ckpt``, ``tmp://NAME``, ``s3://bucket/runs``...);
            the Trainer's ``output_dir`` is the primary.
        run: the run name in the mirrors (default: the output dir's name).
        storage_options: per URL prefix, as for :class:`~dist_guardian.Guardian`.
        keep_last: checkpoints to keep (default: ``save_total_limit``; at least 2). The Trainer's
            own rotation is turned off (``args.save_total_limit = None``): it orders by mtime and
            would delete a checkpoint a mirror does not hold yet.
        mirror_timeout: seconds ``on_train_end`` waits for mirror uploads (default 600).
    """

    def __init__(self, stores: Sequence[str] = (), run: str | None = None, **guardian_options: Any):
        unknown = sorted(set(guardian_options) - set(_CALLBACK_OPTIONS))
        if unknown:
            allowed = ", ".join(_CALLBACK_OPTIONS)
            raise ConfigError(f"GuardianCallback() got unknown keyword(s) {unknown}; use: {allowed}")
        self.store_urls = [stores] if isinstance(stores, str) else list(stores)
        if self.store_urls:
            ResumeConfig(stores=tuple(self.store_urls), storage_options=guardian_options.get("storage_options"))
        if run is not None and not (isinstance(run, str) and NAME_RE.match(run)):
            raise ConfigError(f"run={run!r} is not a plain name (letters, digits, '.', '_', '-')")
        keep, timeout = guardian_options.get("keep_last"), guardian_options.get("mirror_timeout", 600.0)
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ConfigError(f"keep_last={keep!r} must be None (save_total_limit decides) or a positive integer")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
            raise ConfigError(f"mirror_timeout={timeout!r} must be a non-negative number of seconds")
        self.run, self.options = run, guardian_options
        self.keep_last: int | None = keep
        self.mirror_timeout = float(timeout)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unmirrored: set[str] = set()
        self._targets: list[Store] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.keep_last is None and args.save_total_limit is not None:
            self.keep_last = int(args.save_total_limit)
        args.save_total_limit = None  # pruned here, by step, after the mirrors hold a copy
        opts = self.options.get("storage_options")
        self._targets = hf_dirs.mirror_stores(self.store_urls, opts)
        if self._worker is None and state.is_world_process_zero:
            self._worker = threading.Thread(target=self._work, name="dist_guardian-hf-mirror", daemon=True)
            self._worker.start()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Collective: every rank calls it (the Trainer does). After ``checkpoint-N/`` is written by every
        rank (each its ``rng_state_K.pth``), rank 0 queues its manifest, mirror and pruning in the background."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files are written before rank 0 records them
        if not state.is_world_process_zero:
            return
        job = _Job(
            ck=os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
            output_dir=args.output_dir,
            step=state.global_step,
            world_size=args.world_size,
            protect=(state.best_model_checkpoint,) if state.best_model_checkpoint else (),
        )
        with self._lock:
            self._unmirrored.add(job.ck)
        self._jobs.put(job)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        left = self.flush()
        if left:
            log.warning("still unmirrored after %.0fs: %s", self.mirror_timeout, left)

    def flush(self, timeout: float | None = None) -> list[str]:
        """Wait for queued manifests, mirrors and pruning; returns the checkpoints not yet mirrored everywhere."""
        if self._worker is None:
            return []
        done = threading.Event()

        def wait() -> None:
            self._jobs.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(self.mirror_timeout if timeout is None else timeout)
        with self._lock:
            return sorted(self._unmirrored)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is not None:
                    self._record_mirror_prune(job)
            except Exception:  # training never dies of a mirror; the next save retries it
                log.exception("dist_guardian could not record or mirror %s", job.ck if job else "?")
            finally:
                self._jobs.task_done()

    def _record_mirror_prune(self, job: _Job) -> None:
        """Worker thread: the manifest (hashing off the training thread), the mirrors, then retention."""
        run = run_name(job.output_dir, self.run)
        hf_dirs.record_manifest(job.ck, step=job.step, run=run, world_size=job.world_size)
        with self._lock:
            pending = sorted(self._unmirrored)
        for ck in pending:  # a failed earlier mirror is retried with this one
            if not os.path.isdir(ck) or not hf_dirs.mirror(ck, self._targets, run):
                with self._lock:
                    self._unmirrored.discard(ck)
        if self.keep_last is not None:
            hf_dirs.prune(job.output_dir, self.keep_last, run=run, targets=self._targets, protect=job.protect)


def find_resume_checkpoint(output_dir: str, stores: Sequence[str] | None = None, **guardian_options: Any) -> str | None:
    """Collective: call on every rank. The local path of the newest ``checkpoint-N/`` that loads on every rank.

    Every rank tries the same candidate, newest first, across ``output_dir`` and ``stores`` (the
    mirrors of :class:`GuardianCallback`): its files must verify (sizes, zip CRCs, the manifest's
    checksums: a damaged copy is never chosen) and its model and optimizer must load weights-only
    on every rank. A copy found only in a mirror, or intact only there, is first restored into
    ``output_dir`` by rank 0 before the vote (verified in full; a damaged local copy is kept aside as
    ``.quarantine-...``): the output dir must be shared by the ranks, as the Trainer's resume needs.
    None only when nothing loads; the decision record is then logged at WARNING.

    ``guardian_options``: ``run`` (the mirrors' run name, as the callback's), ``storage_options``,
    ``timeout``, ``extra_safe_globals``, ``partial_ok`` (a checkpoint without ``optimizer.pt`` is
    fine), ``suspect`` (default ``"reject"``), ``use_journal`` (default off).
    """
    opts = dict(guardian_options)
    run = run_name(output_dir, opts.pop("run", None))
    need_optimizer = not opts.pop("partial_ok", False)
    opts.setdefault("suspect", "reject")
    opts.setdefault("use_journal", False)  # it would live in <output_dir>/<run>/.journal; the Trainer loads later
    urls = [os.path.abspath(output_dir)] + list(stores or ())
    rank, world = _rank_world()

    def load(c: Candidate, store: Store) -> Loaded:
        loaded = hf_loading.check_loads(
            c,
            store,
            rank=rank,
            world_size=world,
            extra_safe_globals=opts.get("extra_safe_globals", ()),
            need_optimizer=need_optimizer,
        )
        if c.store_index != 0 and rank == 0:
            # A mirror's copy: rank 0 restores it into the output dir before its vote (verified in full; a
            # damaged local copy is set aside), so a failed restore is a failed attempt on every rank.
            local = hf_dirs.restore(store, c.rel, output_dir)
            log.warning("checkpoint_restored %s from the mirror copy %s", local, c.path)
        return loaded

    result = dist_guardian.resume(load, stores=urls, run=run, **opts)
    if not result.resumed:
        if rank == 0:
            log.warning("find_resume_checkpoint: no checkpoint loads; training starts fresh: %s", result.to_json())
        return None
    assert result.path is not None
    if result.store == urls[0]:
        return result.path
    return os.path.join(os.path.abspath(output_dir), result.path.rstrip("/").rsplit("/", 1)[-1])
