"""The resume protocol: plan on rank 0, broadcast, availability vote, lockstep attempt loop.

Every rank attempts the same candidate, then exactly one vote decides: all succeeded, or
all move to the next candidate together (LLNL SCR's fallback loop, on a gloo group). Rank 0
alone lists stores and reads manifests; what crosses ranks is JSON. Failures travel as data
(a vote of 0 and a short reason), so every rank reaches every collective exactly once.

Belongs here: the collective steps of a resume, one function each (agree on a plan page,
vote on availability, one attempt, the decision a vote leads to, the end when all failed).
The rules those steps follow (order, deferral, what is transient) are ``policy``'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _faults, stores, verify
from .attempts import MAX_ATTEMPTS, LoopContext, Record, attempt_loop
from .candidate import Attempt, Candidate, ResumeResult
from .comm import Comm
from .config import ResumeConfig, resume_config
from .errors import ConfigError, DistGuardianError, NoReachableCheckpoint, ResumeFailed
from .planning import Plan, PlanCursor, PlanRequest, resolve_stores
from .stores import Store

log = logging.getLogger(__name__)

# guardian.py reaches resolve_stores through here; tests read MAX_ATTEMPTS here.
__all__ = ["MAX_ATTEMPTS", "available_locally", "resolve_stores", "resume"]


def available_locally(
    c: Candidate, store_list: Sequence[Store], rank: int, world_size: int, listings: dict[int, Any]
) -> str | None:
    """Why this rank cannot reach ``c`` (None when it can): files present, regular, right size."""
    store = next((s for s in store_list if s.index == c.store_index), None)
    if store is None:
        return f"store {c.store} is not usable on this rank"
    wanted = c.files_for_rank(rank, world_size)
    if store.kind == "tmp":
        # F37 on every rank: each node has its own node-local root, which rank 0 never verified.
        planted = verify.foreign_owner(store, [c.rel] + [f"{c.rel}/{f.name}" for f in wanted if f.name])
        if planted:
            log.warning("security_event: %s; never opened", planted)
            return planted
    return stores.missing_files(
        store, c.rel, [(f.name, f.size) for f in wanted], is_dir=c.kind == "dcp", listings=listings
    )


def resume(
    load_fn: Callable[[Candidate, Store], Any],
    stores: Sequence[str] | str | None = None,
    *,
    apply_fn: Callable[[Candidate, Any], None] | None = None,
    comm: Comm | None = None,
    config: ResumeConfig | None = None,
    **options: Any,
) -> ResumeResult:
    """Collective: call on every rank. Bring every rank to the newest candidate that loads everywhere.

    ``stores`` are URLs as for :class:`~dist_guardian.Guardian` (the first is the primary, where the
    journal lives); ``options`` are the :class:`~dist_guardian.config.ResumeConfig` knobs ``run``,
    ``compat``, ``layout``, ``suspect``, ``on_exhausted``, ``timeout``, ``attempt_timeout``,
    ``storage_options``, ``extra_safe_globals`` and ``use_journal`` (an unknown one raises
    :class:`ConfigError` naming the allowed ones); or pass a built ``config`` instead of both.
    ``load_fn(candidate, store)`` loads one candidate on this rank into staging and
    returns it (or a :class:`~dist_guardian.candidate.Loaded`), or raises; ``store`` is the resolved
    :class:`~dist_guardian.Store` that holds it, so ``store.join(candidate.rel)`` is the candidate's
    local path (``store.is_local``) or its fsspec path, and ``candidate.path`` a readable location.
    ``apply_fn(candidate,
    staged)`` runs on every rank only after a unanimous vote, so no rank ever holds a mix of
    two checkpoints (F29). Without a process group this is the same loop at world size 1.
    After ``MAX_ATTEMPTS`` failed loads with candidates still untried it raises
    :class:`~dist_guardian.errors.AttemptCapReached` (a ``ResumeFailed``), whatever
    ``on_exhausted`` says: untried candidates are never given up for a fresh start (F33).

    Example::

        def load(c, store):
            with open(store.join(c.rel), "rb") as f:
                return torch.load(f, weights_only=True)

        result = dist_guardian.resume(load, stores=["ckpts/"], run="r1",
                                      apply_fn=lambda c, sd: model.load_state_dict(sd))
    """
    if config is None:
        config = resume_config(stores or (), options)
    elif stores is not None or options:
        raise ConfigError("resume() got config= and stores or other options: give one or the other")
    settings = _Settings(load_fn=load_fn, apply_fn=apply_fn, config=config, t0=time.monotonic())
    own_comm = comm is None
    comm = comm or Comm(config.timeout)
    try:
        return _resume(settings, comm)
    finally:
        if own_comm:
            comm.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Settings:
    """One resume's inputs (the config checked when it was built): what every step below reads."""

    load_fn: Callable[[Candidate, Store], Any]
    apply_fn: Callable[[Candidate, Any], None] | None
    config: ResumeConfig
    t0: float

    @property
    def request(self) -> PlanRequest:
        cfg = self.config
        return PlanRequest(
            run=cfg.run,
            compat=cfg.compat,
            suspect=cfg.suspect,
            layout=cfg.layout,
            extra_safe_globals=cfg.safe_global_names,
            use_journal=cfg.use_journal,
        )


def _resume(settings: _Settings, comm: Comm) -> ResumeResult:
    """Collective: page by page, agree on the plan, drop what some rank cannot reach, attempt the rest."""
    cfg = settings.config
    store_list, refused = resolve_stores(cfg.stores, cfg.storage_options)
    primary = store_list[0] if store_list and store_list[0].index == 0 else None  # the journal lives here
    ctx = LoopContext(
        comm=comm,
        load_fn=settings.load_fn,
        apply_fn=settings.apply_fn,
        store_list=tuple(store_list),
        run=cfg.run,
        suspect=cfg.suspect,
        attempt_timeout=cfg.load_deadline,
        journal_store=primary if cfg.use_journal else None,
    )
    cursor = PlanCursor(store_list, settings.request, refused=refused) if comm.rank == 0 else None
    rec = Record(t0=settings.t0)
    more = True
    while more:
        plan = _agree_on_page(comm, cursor)
        more = plan.more
        rec.add_page(plan)
        if comm.rank == 0:
            _log_plan(cfg.run, plan)
        if not plan.candidates:
            continue
        remaining = _availability_vote(plan.candidates, comm, store_list, rec.attempts)
        loaded = attempt_loop(ctx, remaining, rec)
        if loaded is not None:
            result = rec.result(loaded)
            if comm.rank == 0:
                log.info("resume decision: %s", result.to_json())
            return result
    return _exhausted(settings, comm, rec)


def _agree_on_page(comm: Comm, cursor: PlanCursor | None) -> Plan:
    """Collective: rank 0 plans the next page, every rank receives it and checks it holds the same (F27).

    A crash while planning travels as data (a plan with ``error``), so no rank waits forever.
    """
    plan_doc: Any = None
    if cursor is not None:
        try:
            plan_doc = cursor.next_page().to_json()
        except Exception as e:
            log.exception("planning failed")
            plan_doc = Plan(
                candidates=(),
                rejected=(),
                unreachable=(),
                warnings=(),
                generation=0,
                sightings=0,
                error=f"{type(e).__name__}: {e}",
            ).to_json()
    plan_doc = comm.broadcast_json(plan_doc, "broadcast plan")
    if _faults.hit("after_broadcast", rank=comm.rank) == "corrupt" and plan_doc["candidates"]:
        plan_doc["candidates"] = plan_doc["candidates"][1:]
    comm.check_same(json.dumps(plan_doc, sort_keys=True).encode(), "plan hash check")
    plan = Plan.from_json(plan_doc)
    if plan.error:
        raise ResumeFailed(f"rank 0 could not plan the resume: {plan.error}")
    return plan


def _log_plan(run: str, plan: Plan) -> None:
    log.info(
        "resume plan for run %s: %d candidates (%d sightings, %d rejected, %d stores unreachable)%s",
        run,
        len(plan.candidates),
        plan.sightings,
        len(plan.rejected),
        len(plan.unreachable),
        "; older steps follow if these fail" if plan.more else "",
    )
    for i, c in enumerate(plan.candidates):
        log.info("  plan[%d] %s%s", i, c.describe(), f" ({'; '.join(c.reasons)})" if c.reasons else "")


def _exhausted(settings: _Settings, comm: Comm, rec: Record) -> ResumeResult:
    """Every candidate failed, or there was none (F33): a fresh start, or a raise when progress may be lost."""
    result = rec.result(None)
    anything = rec.sightings > 0
    summary = _exhausted_summary(result)
    if rec.transient:
        if not anything:
            raise NoReachableCheckpoint(
                "no checkpoint found, but a store was unreachable, so starting fresh could throw progress away; "
                f"fix the store or remove it from stores=. {summary}"
            )
        raise ResumeFailed(
            "every reachable candidate failed, and a store was unreachable or an attempt timed out (maybe transient); "
            f"not starting fresh. Let the launcher retry. {summary}"
        )
    if anything and settings.config.on_exhausted == "raise":
        raise ResumeFailed(f"every candidate failed and on_exhausted='raise'. {summary}")
    if comm.rank == 0:
        if anything:
            log.error("starting FRESH: every candidate failed for a lasting reason; all are kept. %s", summary)
        else:
            cfg = settings.config
            log.warning(
                "starting FRESH: no checkpoint found for run %s in %s; seen there: %s",
                cfg.run,
                ", ".join(cfg.stores),
                _seen(resolve_stores(cfg.stores, cfg.storage_options)[0], cfg.run),
            )
        log.info("resume decision: %s", result.to_json())
    return result


def _seen(store_list: Sequence[Store], run: str, limit: int = 8) -> str:
    """What each store holds where resume looks (``<store>/<run>/``, and a local store's top), for the
    fresh-start warning: a wrong path or run name shows as what is there instead. Only on a fresh start."""
    parts = []
    for store in store_list:
        where = [run] + ([""] if store.is_local else [])
        names: list[str] = []
        for rel in where:
            try:
                listed = stores.list_tree(store, rel, max_depth=1, max_entries=1000)
                names += [f"{rel}/{e.rel}" if rel else e.rel for e in listed]
            except (OSError, DistGuardianError) as e:
                names.append(f"({rel or '.'}: {type(e).__name__})")
        names = sorted(set(names))
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        parts.append(f"{store.url}: " + (shown or "empty"))
    return "; ".join(parts) if parts else "no store could be used"


def _availability_vote(
    candidates: Sequence[Candidate], comm: Comm, store_list: Sequence[Store], attempts: list[Attempt]
) -> list[Candidate]:
    """Collective: drop what not every rank can reach, before any data is read (F21, F22)."""
    rank, world = comm.rank, comm.world_size
    listings: dict[int, Any] = {}
    local_why = [available_locally(c, store_list, rank, world, listings) for c in candidates]
    agreed = comm.vote_bits([w is None for w in local_why], "availability vote")
    if all(agreed):
        return list(candidates)
    masks = comm.gather_strings(json.dumps([w or "" for w in local_why]), "gather availability reasons")
    per_rank = [json.loads(m) for m in masks]
    remaining = []
    for i, c in enumerate(candidates):
        if agreed[i]:
            remaining.append(c)
            continue
        reasons = tuple((r, per_rank[r][i]) for r in range(world) if per_rank[r][i])
        attempts.append(Attempt.of(c, "unavailable", reasons))
        if rank == 0:
            log.warning(
                "candidate_unavailable id=%s ranks=%s: %s",
                c.path,
                [r for r, _ in reasons],
                "; ".join(f"rank {r}: {w}" for r, w in reasons),
            )
    return remaining


def _exhausted_summary(r: ResumeResult) -> str:
    parts = [f"{a.path}: {a.outcome} ({'; '.join(f'rank {k}: {w}' for k, w in a.reasons)})" for a in r.attempts]
    parts += [f"{p}: rejected ({why})" for p, why in r.rejected]
    parts += [f"store {s}: unreachable ({why})" for s, why in r.unreachable]
    return "Candidates: " + (" | ".join(parts) if parts else "none")
