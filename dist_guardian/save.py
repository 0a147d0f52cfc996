"""The collective save protocol: staging, per-rank writes, one commit, every rank told the outcome.

What belongs here: what every rank does to save one checkpoint (rank 0 opens the staging dir
and broadcasts it; every rank writes and hashes its files; the digests are gathered; rank 0
writes the manifest and commits; the outcome is broadcast), the count of failed saves in a
row, and the background thread of ``blocking=False``. Writing one file and the commit rule
are ``commit``; the upload of a remote primary ``copying``; what rank 0 does after a commit
(mirrors, retention) ``mirror.Upkeep``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import copying, formats, manifest, sharded_io, sharding, statetree, stores
from .bulk import gc_paused
from .comm import Comm
from .commit import (
    Committed,
    SaveResult,
    WrittenEntry,
    commit_local,
    discard_staging,
    open_staging,
    save_errno_reason,
    write_file,
    writer_info,
)
from .config import GuardianConfig
from .discovery import REPLICATED_FILE
from .errors import CommitConflict, ConfigError, SaveFailed
from .layout import rank_file_name  # noqa: F401 (re-exported)
from .mirror import Upkeep
from .stores import Store

log = logging.getLogger(__name__)


def check_state(state: Any) -> None:
    """Raise :class:`ConfigError` for a ``state`` that cannot be saved or resumed into (same on every rank)."""
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise ConfigError("state must be a non-empty dict with string keys, e.g. {'model': model, 'optim': optimizer}")
    if statetree.RNG_KEY in state:
        raise ConfigError(f"state key {statetree.RNG_KEY!r} is reserved")


class Saver:
    """One Guardian's saves: the collective protocol, the failure counter, the background thread.

    ``comm`` and ``store_list`` are called when a save needs them (the first creates the
    coordination group, collectively; the second resolves the stores once).
    """

    def __init__(
        self, config: GuardianConfig, comm: Callable[[], Comm], store_list: Callable[[], list[Store]], upkeep: Upkeep
    ):
        self.config = config
        self.run = config.resume.run
        self._comm = comm
        self._store_list = store_list
        self._upkeep = upkeep
        self.failed_saves = 0
        self.buffers = statetree.SnapshotBuffers()
        self._pool: ThreadPoolExecutor | None = None  # one background save at a time (blocking=False)
        self._pending: Future[SaveResult] | None = None

    def save(
        self, state: dict[str, Any], step: int, metrics: dict[str, Any] | None, *, blocking: bool, generation: int
    ) -> SaveResult | Future[SaveResult]:
        """Collective: call on every rank (``Guardian.save`` documents it). Waits for a pending save first."""
        self.wait()
        check_state(state)
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= manifest.MAX_STEP:
            raise ConfigError(f"step={step!r} must be an integer in [0, {manifest.MAX_STEP}]")
        metrics = copy.deepcopy(dict(metrics or {}))  # a snapshot, like the state (T06)
        for k, v in list(metrics.items()):
            if isinstance(v, torch.Tensor):
                metrics[k] = v.item()
        self._comm()
        layout = statetree.layout_fingerprints(state)
        if blocking:
            return self._save(sharding.capture(state), self._rng_now(), layout, step, metrics, generation)
        t0 = time.monotonic()
        captured = self.buffers.snapshot(sharding.capture(state))
        self.buffers.synchronize()  # device-to-host copies done before training touches the tensors again
        rng = self._rng_now()
        log.debug("async save of step %d: snapshot took %.3fs", step, time.monotonic() - t0)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_guardian-save")
        self._pending = self._pool.submit(self._save, captured, rng, layout, step, metrics, generation)
        return self._pending

    def wait(self) -> SaveResult | None:
        """Wait for the pending background save (if any) and return its result (raising its error)."""
        fut, self._pending = self._pending, None
        return fut.result() if fut is not None else None

    def shutdown(self) -> None:
        """Stop the background thread (after :meth:`wait`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _rng_now(self) -> dict[str, Any] | None:
        return statetree.rng_state() if self.config.rng else None

    def _save(
        self,
        captured: dict[str, Any],
        rng: dict[str, Any] | None,
        layout: dict[str, str],
        step: int,
        metrics: dict[str, Any],
        generation: int,
    ) -> SaveResult:
        comm = self._comm()
        store_list = self._store_list()
        primary = store_list[0]
        t0 = time.monotonic()
        # 1. Rank 0 opens the staging dir (its name travels to every rank).
        staging_doc: dict[str, Any] = {}
        if comm.rank == 0:
            try:
                staging_doc = {"staging": open_staging(primary, self.run, step)}
            except Exception as e:
                staging_doc = {"error": save_errno_reason(e, primary.root if primary.is_local else ".")}
        staging_doc = comm.broadcast_json(staging_doc, f"broadcast staging dir of step {step}")
        if "error" in staging_doc:
            return self._failed(step, [(0, staging_doc["error"])], t0)
        staging = staging_doc["staging"]
        # 2. Every rank writes its files into staging, hashing as it goes.
        with gc_paused():  # 100,000 tensors' tables cross ranks as JSON: see bulk
            docs, errors = self._write_and_gather(comm, captured, rng, staging, step)
        if errors:
            if comm.rank == 0:
                discard_staging(staging)
            comm.vote_min(1, f"abandon step {step}")
            return self._failed(step, errors, t0)
        # 3. Rank 0 writes the manifest and commits; every rank learns the outcome.
        outcome: dict[str, Any] = {}
        done: Committed | None = None
        if comm.rank == 0:
            entries = [WrittenEntry.from_json(e) for d in docs for e in d["files"]]
            try:
                sharded = sharded_io.merge([d["chunks"] for d in docs])
                info = _CommitInfo(metrics, comm.world_size, layout, generation, sharded)
                with gc_paused():
                    done = self._commit(primary, staging, step, entries, info)
                outcome = {"path": done.path}
            except Exception as e:
                discard_staging(staging)
                reason = (
                    str(e)
                    if isinstance(e, CommitConflict)
                    else save_errno_reason(e, primary.root if primary.is_local else ".")
                )
                log.warning("%s", reason)
                outcome = {"error": reason}
        outcome = comm.broadcast_json(outcome, f"broadcast commit of step {step}")
        if "error" in outcome:
            return self._failed(step, [(0, outcome["error"])], t0)
        self.failed_saves = 0
        nbytes = sum(e["size"] for d in docs for e in d["files"])
        if done is not None:
            self._upkeep.after_commit(store_list, done)
            log.info("saved step %d to %s (%.1f MB in %.2fs)", step, done.path, nbytes / 1e6, time.monotonic() - t0)
        return SaveResult(
            committed=True, step=step, path=outcome["path"], seconds=time.monotonic() - t0, bytes_written=nbytes
        )

    def _write_and_gather(
        self, comm: Comm, captured: dict[str, Any], rng: dict[str, Any] | None, staging: str, step: int
    ) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
        """Collective: write this rank's files, then gather every rank's entries; (docs, errors by rank)."""
        mine: list[dict[str, Any]] = []
        chunks: dict[str, Any] = {}
        err = ""
        replicated = {k: v for k, v in captured.items() if k not in self.config.per_rank}
        plan: sharded_io.ShardPlan | None = None
        try:
            if sharding.holds_dtensor(replicated):  # the same on every rank: the state's structure decides
                plan = sharded_io.agree(comm, replicated, step)
            if not stores.is_dir(staging):
                raise SaveFailed(
                    "staging_not_shared",
                    f"staging dir {staging} is not visible on this rank: "
                    "the primary store must be shared by every rank",
                )
            written, chunks = self._write_rank_files(captured, rng, staging, step, comm, plan)
            mine = [w.to_json() for w in written]
        except Exception as e:
            err = save_errno_reason(e, staging if stores.is_dir(staging) else ".")
            log.warning("[rank=%d] %s", comm.rank, err)
        own: dict[str, Any] = {"files": mine, "chunks": chunks, "error": err}
        if not comm.distributed:  # one process: its own entries need no JSON round trip (0.1 s at 100,000 tensors)
            docs = [json.loads(json.dumps(own)) if chunks else own]
        else:
            texts = comm.gather_strings(json.dumps(own), f"gather digests of step {step}", max_len=1 << 26)
            docs = [json.loads(t) for t in texts]
        return docs, [(r, d["error"]) for r, d in enumerate(docs) if d["error"]]

    def _write_rank_files(
        self,
        captured: dict[str, Any],
        rng: dict[str, Any] | None,
        staging: str,
        step: int,
        comm: Comm,
        plan: sharded_io.ShardPlan | None,
    ) -> tuple[list[WrittenEntry], dict[str, Any]]:
        """This rank's files, and the chunk records of the sharded layout (empty for a state without DTensors).

        Sharded layout (``plan``): the replicated tree (tensors by reference) in ``replicated.dgt``
        from rank 0, every tensor of it as chunks in the ranks' shard files (``sharded_io``).
        """
        rank, per_rank = comm.rank, self.config.per_rank
        out = []
        chunks: dict[str, Any] = {}
        if plan is not None:
            shard_entry, chunks = sharded_io.write_shards(staging, plan, rank=rank, world=comm.world_size, step=step)
            out += [shard_entry] if shard_entry is not None else []
        if rank == 0:
            path = os.path.join(staging, REPLICATED_FILE)
            if plan is not None:
                tree_json = json.dumps(plan.encoded, separators=(",", ":"), allow_nan=False)
                trees = formats.tree_key_digests(plan.encoded)
                out.append(write_file(path, tree_json, [], None, rank=rank, step=step, file_rank=None, trees=trees))
            else:
                replicated = {k: v for k, v in captured.items() if k not in per_rank}
                out.append(write_tree(path, replicated, rank=rank, step=step, file_rank=None, pool="replicated"))
        per = {k: v for k, v in captured.items() if k in per_rank}
        if rng is not None:
            per[statetree.RNG_KEY] = rng
        name = rank_file_name(rank, comm.world_size)
        out.append(write_tree(os.path.join(staging, name), per, rank=rank, step=step, file_rank=rank, pool="rank"))
        return out, chunks

    def _commit(
        self, primary: Store, staging: str, step: int, entries: list[WrittenEntry], info: _CommitInfo
    ) -> Committed:
        """Rank 0: build the manifest and commit ``staging`` under the lineage rule, locally or remotely."""
        generation, layout = info.generation, info.layout
        mbytes = manifest.build(
            manifest.ManifestDraft(
                run=self.run,
                step=step,
                generation=generation,
                world_size=info.world,
                created_unix=time.time(),
                compat=self.config.resume.compat or {},
                metrics=info.metrics,
                files=[w.entry for w in entries],
                tensors={w.entry.name: w.stats for w in entries},
                trees={w.entry.name: w.trees for w in entries},
                torch_version=torch.__version__,
                writer=writer_info(),
                layout=layout,
                sharded=info.sharded,
            )
        )
        if primary.is_local:
            path = commit_local(primary, self.run, staging, step, generation, mbytes)
        else:
            checked = self._upkeep.uploads_checked
            path = copying.commit_remote(
                primary, self.run, staging, step, generation, mbytes, abort_stale=primary.url not in checked
            )
            checked.add(primary.url)
        return Committed(
            path=path,
            staging=staging,
            step=step,
            dirname=os.path.basename(path.rstrip("/")),
            manifest_digest=manifest.digest_bytes(mbytes),
            layout=layout,
        )

    def _failed(self, step: int, errors: list[tuple[int, str]], t0: float) -> SaveResult:
        self.failed_saves += 1
        reason = "; ".join(f"rank {r}: {e}" for r, e in errors)
        if self._comm().rank == 0:
            log.error("save of step %d abandoned on every rank; previous checkpoints untouched. %s", step, reason)
        if self.failed_saves > self.config.save_failures:
            raise SaveFailed("save_failed", f"save of step {step} failed ({self.failed_saves} in a row): {reason}")
        return SaveResult(committed=False, step=step, seconds=time.monotonic() - t0, reason=reason)


@dataclass(frozen=True, slots=True)
class _CommitInfo:
    """What the manifest of one save records besides its files."""

    metrics: dict[str, Any]
    world: int
    layout: dict[str, str]
    generation: int
    sharded: dict[str, manifest.ShardedTensor]


def write_tree(
    path: str, tree: dict[str, Any], *, rank: int, step: int, file_rank: int | None, pool: str | None = None
) -> WrittenEntry:
    """Encode a state tree (tensors out of line) and write it as one native file.

    ``pool``: the kind of file whose packing buffers this write reuses (``statetree.PackBuffers``).
    """
    bufs = statetree.PACK_BUFFERS.take(pool) if pool is not None else None
    try:
        with gc_paused():  # 100,000 tensors: see bulk
            return _write_tree(path, tree, rank=rank, step=step, file_rank=file_rank, pool=bufs)
    finally:
        if pool is not None and bufs is not None:
            statetree.PACK_BUFFERS.give(pool, bufs)


def _write_tree(
    path: str, tree: dict[str, Any], *, rank: int, step: int, file_rank: int | None, pool: statetree.PackPool | None
) -> WrittenEntry:
    enc = statetree.Encoder()
    encoded = enc.encode(tree, "")
    tree_json, trees = formats.tree_json_and_digests(encoded)
    specs = statetree.tensor_specs(enc.tensors, pool)
    return write_file(
        path,
        tree_json,
        specs,
        lambda spec: statetree.max_abs(enc.tensors[spec.name]),
        rank=rank,
        step=step,
        file_rank=file_rank,
        trees=trees,
    )
