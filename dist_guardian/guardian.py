"""``Guardian``: the public object. Resume into live state, save it, close.

A facade: the config (``config``), the load path (``coordinator.resume`` with the ``load`` and
``apply`` of this module, calling ``loading``), the collective save protocol (``save.Saver``)
and rank 0's background mirrors and retention (``mirror.Upkeep``) are wired here and live there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from . import completeness, coordinator, loading, staging, statetree
from .candidate import Candidate, Loaded, ResumeResult
from .comm import Comm
from .commit import SaveResult
from .config import GuardianConfig, guardian_config
from .errors import ConfigError, DistGuardianError
from .mirror import Upkeep
from .save import Saver, check_state
from .staging import Staged
from .stores import Store

log = logging.getLogger(__name__)


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
        rng: save each rank's RNG state (python, numpy, torch) and restore it on resume.
        required: keys that a foreign checkpoint must hold even with ``partial_ok`` (default: the
            ``nn.Module`` keys); without ``partial_ok`` it must restore every key of ``state``.
        partial_ok: a foreign checkpoint that restores only part of ``state`` (``required`` at
            least) is resumed from, with a WARNING naming the rest; by default it fails and
            the next candidate is tried, so ``resumed=True`` means all of ``state`` came back.
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

    Everything after ``run`` is keyword-only. Every value is checked once, here, into
    ``self.config`` (:class:`~dist_guardian.config.GuardianConfig`); a bad value or an unknown
    keyword raises :class:`ConfigError` naming it and what is allowed, before any collective.

    Example::

        g = Guardian(stores=["ckpt/", "tmp://run-1"], run="run-1")
        result = g.resume({"model": model, "optim": optim})
        g.save({"model": model, "optim": optim}, step=100)
        g.close()
    """

    def __init__(self, stores: Sequence[str] | str, run: str = "default", **options: Any):
        self.config: GuardianConfig = guardian_config(stores, run, options)
        self.store_urls = list(self.config.resume.stores)
        self.run = run
        self.generation = 1
        self._comm: Comm | None = None
        self._stores: list[Store] | None = None
        self._closed = False
        self._upkeep = Upkeep(self.config, self._store_list)
        self._saver = Saver(self.config, lambda: self.comm, self._store_list, self._upkeep)

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = Comm(self.config.resume.timeout)  # collective on first use: every rank gets here
        return self._comm

    def _store_list(self) -> list[Store]:
        if self._stores is None:
            self._stores, refused = coordinator.resolve_stores(self.store_urls, self.config.resume.storage_options)
            if not self._stores or self._stores[0].index != 0:
                why = refused[0][1] if refused else "unknown"
                raise ConfigError(f"the primary store {self.store_urls[0]} cannot be used: {why}")
        return self._stores

    def resume(self, state: dict[str, Any]) -> ResumeResult:
        """Collective: call on every rank. Load the best checkpoint that loads everywhere into ``state``.

        Returns a :class:`ResumeResult` identical on every rank. ``state`` is only touched
        by a candidate that every rank loaded (F29); with ``result.resumed == False`` it is
        untouched (a fresh start, FAULTS.md F33).
        """
        self._check_open()
        self.wait()
        check_state(state)
        comm, cfg = self.comm, self.config.resume
        required = (
            cfg.required
            if cfg.required is not None
            else tuple(k for k, v in state.items() if isinstance(v, torch.nn.Module))
        )
        options = loading.LoadOptions(
            rank=comm.rank,
            world_size=comm.world_size,
            concurrency=cfg.remote_concurrency,
            progress=cfg.progress if comm.rank == 0 else False,
            extra_safe_globals=cfg.extra_safe_globals,
            foreign_loader=cfg.foreign_loader,
            required=required,
            partial_ok=cfg.partial_ok,
        )

        def load(c: Candidate, store: Store) -> Loaded:
            return loading.load_and_check(c, store, state, options)

        def apply(c: Candidate, staged: Staged) -> None:
            staging.apply(staged, state)
            if comm.rank == 0:
                for w in staged.warnings:
                    if w.startswith(completeness.PARTIAL_TOKEN):
                        log.warning("%s", w)

        result = coordinator.resume(
            load, apply_fn=apply, comm=comm, config=replace(cfg, layout=statetree.layout_fingerprints(state))
        )
        self.generation = result.generation
        self._upkeep.note_attempts(result)
        if comm.rank == 0:
            self._upkeep.after_resume(result)
        return result

    def save(
        self, state: dict[str, Any], step: int, metrics: dict[str, Any] | None = None, *, blocking: bool = True
    ) -> SaveResult | Future[SaveResult]:
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
        return self._saver.save(state, step, metrics, blocking=blocking, generation=self.generation)

    def wait(self) -> SaveResult | None:
        """Wait for the pending background save (if any) and return its result (raising its error)."""
        return self._saver.wait()

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
            self._saver.shutdown()
        self._closed = True
        if self._comm is not None:
            if self._comm.distributed and self._comm.broken is None:
                try:
                    self._comm.vote_min(1, "close")
                except DistGuardianError:
                    pass
            self._comm.close()
        return self._upkeep.close(self.config.mirror_timeout)

    def flush(self, timeout: float | None = None) -> list[str]:
        """Rank 0: wait for background mirror uploads and housekeeping, without closing.

        Returns what is still unmirrored after ``timeout`` seconds (default ``mirror_timeout``);
        other ranks return ``[]`` at once. Training never needs this; ``close()`` does it.
        A pending background save is waited for first (its mirror is queued by its commit).
        """
        if not self._closed:
            self.wait()
        return self._upkeep.flush(self.config.mirror_timeout if timeout is None else timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Guardian is closed; create a new one")

    def __enter__(self) -> Guardian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
