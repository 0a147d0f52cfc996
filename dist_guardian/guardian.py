"""``Guardian``: the public object. Resume into live state, save it, close.

Built on ``coordinator.resume``: this module turns a user's ``state`` dict into staged
trees (load) and into native files (save), applies staging only after a unanimous vote,
and owns the per-rank RNG state, mirrors and retention.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from . import _faults, coordinator, loading, manifest, saving, statetree, stores
from .candidate import Candidate, Loaded, ResumeResult, validate_suspect_policy
from .comm import Comm
from .errors import CheckpointFormatError, CommitConflict, ConfigError, DistGuardianError, SaveFailed
from .saving import SaveResult, WrittenEntry
from .stores import Store

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
        remote_concurrency: int = 1,
        mirror_timeout: float = 600.0,
    ):
        if isinstance(stores, str):
            stores = [stores]
        if not stores:
            raise ConfigError("stores is empty: give at least one store, e.g. stores=['checkpoints/']")
        if not isinstance(run, str) or not manifest.RUN_NAME_RE.match(run):
            raise ConfigError(f"run={run!r} is not a plain name (letters, digits, '.', '_', '-')")
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
        self.generation = 1
        self._comm: Comm | None = None
        self._stores: list[Store] | None = None
        self._mirrors: saving.Mirrors | None = None
        self._failed_saves = 0
        self._quarantined: set[str] = set()
        self._closed = False

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
        _check_state(state)
        comm = self.comm
        required = self._required(state)

        def load(c: Candidate, store: Store) -> Loaded:
            if c.kind == "native":
                staged = loading.load_native(c, store, rank=comm.rank, world_size=comm.world_size,
                                             concurrency=self.remote_concurrency)
            elif c.kind == "torch":
                staged = loading.load_torch_file(c, store, state, extra_safe_globals=self.extra_safe_globals,
                                                 foreign_loader=self.foreign_loader, required=required)
            else:
                staged = loading.load_dcp(c, store, state)
            loading.check_structure(staged, state, required)
            if staged.suspect:
                try:
                    loading.sanity_gate(staged)
                except CheckpointFormatError as e:
                    raise CheckpointFormatError(f"{'; '.join(staged.suspect)}; {e}") from None
            return Loaded(staged=staged, suspect=tuple(staged.suspect), warnings=tuple(staged.warnings))

        def apply(c: Candidate, staged: loading.Staged) -> None:
            loading.apply(staged, state)

        result = coordinator.resume(
            load, self.store_urls, run=self.run, compat=self.compat, suspect=self.suspect,
            on_exhausted=self.on_exhausted, timeout=self.timeout, storage_options=self.storage_options,
            apply_fn=apply, extra_safe_globals=[_qualname(g) for g in self.extra_safe_globals], comm=comm,
        )
        self.generation = result.generation
        self._quarantined |= {a.path for a in result.attempts if a.outcome == "failed"}
        return result

    # ------------------------------------------------------------------ save

    def save(self, state: dict[str, Any], step: int, metrics: dict[str, Any] | None = None) -> SaveResult:
        """Collective: call on every rank. Write and commit a checkpoint of ``state`` at ``step``.

        Replicated state is written once by rank 0, per-rank state (RNG, ``per_rank`` keys)
        by each rank. Any rank that fails makes every rank abandon this save, leaving the
        previous checkpoints untouched (F11, F12). Returns a :class:`SaveResult` identical
        on every rank; raises :class:`SaveFailed` after ``save_failures`` failures in a row.
        """
        self._check_open()
        _check_state(state)
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= manifest.MAX_STEP:
            raise ConfigError(f"step={step!r} must be an integer in [0, {manifest.MAX_STEP}]")
        metrics = dict(metrics or {})
        for k, v in list(metrics.items()):
            if isinstance(v, torch.Tensor):
                metrics[k] = v.item()
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
            mine = [w.to_json() for w in self._write_rank_files(state, staging, step, rank, world)]
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
                outcome = {"path": self._commit(primary, staging, step, entries, metrics, world)}
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
            stores.makedirs_local(primary.join(self.run))
            stores.clean_stale_staging(primary, self.run)
            path = primary.join(self.run, stores.new_staging_name(step))
            os.mkdir(path, 0o700)
            return path
        return saving.local_temp_staging(step)

    def _write_rank_files(self, state: dict[str, Any], staging: str, step: int, rank: int, world: int) -> list[WrittenEntry]:
        captured = statetree.capture(state)
        out = []
        if rank == 0:
            replicated = {k: v for k, v in captured.items() if k not in self.per_rank}
            out.append(_write_tree(os.path.join(staging, REPLICATED_FILE), replicated, rank=rank, step=step, file_rank=None))
        per = {k: v for k, v in captured.items() if k in self.per_rank}
        if self.rng:
            per[statetree.RNG_KEY] = statetree.rng_state()
        out.append(_write_tree(os.path.join(staging, rank_file_name(rank, world)), per, rank=rank, step=step, file_rank=rank))
        return out

    def _commit(self, primary: Store, staging: str, step: int, entries: list[WrittenEntry], metrics: dict[str, Any], world: int) -> str:
        mbytes = manifest.build(
            run=self.run, step=step, generation=self.generation, world_size=world, created_unix=time.time(),
            compat=self.compat or {}, metrics=metrics, files=[w.entry for w in entries],
            tensors={w.entry.name: w.stats for w in entries}, torch_version=torch.__version__,
            writer=saving.writer_info(),
        )
        if primary.is_local:
            return saving.commit_local(primary, self.run, staging, step, self.generation, mbytes)
        # Remote primary: upload the finished files from local staging, manifest last (exclusive).
        fd = stores.create_exclusive(os.path.join(staging, manifest.MANIFEST_NAME))
        try:
            os.write(fd, mbytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in (stores.step_dir_name(step), stores.step_dir_name(step, self.generation)):
            try:
                return saving.copy_checkpoint(staging, primary, self.run, name, exclusive=True)
            except FileExistsError:
                other = _remote_generation(primary, f"{self.run}/{name}")
                if other == self.generation or other is None:
                    raise CommitConflict(f"commit_conflict: {primary.uri(self.run, name)} was committed by another writer") from None
                log.warning("lineage_fork step=%d: %s holds generation %s", step, primary.uri(self.run, name), other)
        raise CommitConflict(f"commit_conflict: step {step} generation {self.generation} already committed in {primary.url}")

    def _after_commit(self, store_list: list[Store], path: str, staging: str, step: int) -> None:
        primary = store_list[0]
        dirname = os.path.basename(path.rstrip("/"))
        src_dir = path if primary.is_local else staging
        if self._mirrors is None:
            self._mirrors = saving.Mirrors()
        self._mirrors.submit(src_dir, self.run, dirname, step, store_list[1:], cleanup=not primary.is_local)
        if self.keep_last is not None:
            protected = set()
            if self._mirrors is not None:
                for names in self._mirrors.unmirrored(self.run).values():
                    protected |= names
            saving.retain(store_list[0], self.run, self.keep_last, protected=protected, quarantined=self._quarantined)

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
        """Collective: call on every rank. Wait for mirrors, destroy the coordination group.

        Returns what is still unmirrored (empty when everything landed).
        """
        if self._closed:
            return []
        self._closed = True
        left: list[str] = []
        if self._mirrors is not None:
            left = self._mirrors.wait(self.mirror_timeout)
            if left:
                log.warning("unmirrored after close(): %s", "; ".join(left))
        if self._comm is not None:
            if self._comm.distributed and self._comm.broken is None:
                try:
                    self._comm.vote_min(1, "close")
                except DistGuardianError:
                    pass
            self._comm.close()
        return left

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
    tree_json = json.dumps(enc.encode(tree, ""), separators=(",", ":"), allow_nan=False)
    specs = [statetree.tensor_spec(n, t) for n, t in enc.tensors.items()]
    stats = {n: statetree.max_abs(t) for n, t in enc.tensors.items()}
    return saving.write_file(path, tree_json, specs, stats, rank=rank, step=step, file_rank=file_rank)


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise ConfigError("state must be a non-empty dict with string keys, e.g. {'model': model, 'optim': optimizer}")
    if statetree.RNG_KEY in state:
        raise ConfigError(f"state key {statetree.RNG_KEY!r} is reserved")


def _qualname(g: Any) -> str:
    return g if isinstance(g, str) else f"{g.__module__}.{g.__qualname__}"
