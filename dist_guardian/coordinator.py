"""The resume protocol: plan on rank 0, broadcast, availability vote, lockstep attempt loop.

Every rank attempts the same candidate, then exactly one vote decides: all succeeded, or
all move to the next candidate together (LLNL SCR's fallback loop, on a gloo group). Rank 0
alone lists stores and reads manifests; what crosses ranks is JSON. Failures travel as data
(a vote of 0 and a short reason), so every rank reaches every collective exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from . import _faults, journal, stores, verify
from .candidate import Attempt, Candidate, Loaded, ResumeResult, defer_suspect, validate_suspect_policy
from .comm import Comm
from .planning import Plan, PlanCursor, resolve_stores
from .errors import (AgreementTimeout, AttemptCapReached, ConfigError, CoordinationError, DistGuardianError,
                     NoReachableCheckpoint, ResumeFailed, StoreError)
from .stores import NAME_RE, Store, check_storage_options, check_url

log = logging.getLogger(__name__)

# The vote takes the minimum: one rank's damage outside the tensors (T10) moves the candidate to last resort on all.
VOTE_FAIL, VOTE_LAST_RESORT, VOTE_SUSPECT, VOTE_OK = 0, 1, 2, 3
TIMEOUT_PREFIX = "TimeoutError: timeout:"
ON_EXHAUSTED = ("fresh", "raise")
# Loads one resume tries before it stops (T04): 2,000 foreign files that sniff clean and fail to load cost
# 2,000 attempts and journal entries. Reaching it with candidates left raises AttemptCapReached (never fresh).
MAX_ATTEMPTS = 64


def available_locally(c: Candidate, store_list: Sequence[Store], rank: int, world_size: int, listings: dict[int, Any]) -> str | None:
    """Why this rank cannot reach ``c`` (None when it can): files present, regular, right size."""
    store = next((s for s in store_list if s.index == c.store_index), None)
    if store is None:
        return f"store {c.store} is not usable on this rank"
    wanted = c.files_for_rank(rank, world_size)
    if store.is_local:
        if store.kind == "tmp":
            # F37 on every rank: each node has its own node-local root, which rank 0 never verified.
            planted = verify.foreign_owner(store, [c.rel] + [f"{c.rel}/{f.name}" for f in wanted if f.name])
            if planted:
                log.warning("security_event: %s; never opened", planted)
                return planted
        for f in wanted:
            path = store.join(c.rel, f.name) if f.name else store.join(c.rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return f"missing: {path}"
            except OSError as e:
                return f"unreadable: {path}: {e}"
            if not stat.S_ISREG(st.st_mode):
                return f"not_regular: {path}"
            if f.size and st.st_size != f.size:
                return f"size_mismatch: {path} expected={f.size} got={st.st_size}"
        if c.kind == "dcp" and not os.path.isdir(store.join(c.rel)):
            return f"missing: {store.join(c.rel)}"
        return None
    if store.index not in listings:
        run_prefix = c.rel.split("/", 1)[0]
        try:
            listings[store.index] = {e.rel: e for e in stores.list_tree(store, run_prefix, max_depth=2)}
        except (OSError, StoreError) as e:
            listings[store.index] = str(e)
    listing = listings[store.index]
    if isinstance(listing, str):
        return f"store unreachable from this rank: {listing}"
    sub = c.rel.split("/", 1)[1] if "/" in c.rel else ""
    for f in wanted:
        key = f"{sub}/{f.name}" if f.name else sub
        e = listing.get(key)
        if e is None:
            return f"missing: {store.uri(c.rel, f.name) if f.name else store.uri(c.rel)}"
        if f.size and e.size != f.size:
            return f"size_mismatch: {f.name} expected={f.size} got={e.size}"
    return None


class _Outcome:
    __slots__ = ("value", "error", "done")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


def run_with_deadline(fn: Callable[[], Any], deadline_s: float) -> Any:
    """Run a load on this rank, bounded: a hung load becomes a TimeoutError here (the rank votes fail).

    The worker thread cannot be killed; it is abandoned (its staging is never applied).
    """
    out = _Outcome()

    def work() -> None:
        try:
            out.value = fn()
        except BaseException as e:  # noqa: B036 - re-raised in the caller's thread
            out.error = e
        finally:
            out.done.set()

    t = threading.Thread(target=work, name="dist_guardian-load", daemon=True)
    t.start()
    if not out.done.wait(deadline_s):
        raise TimeoutError(f"timeout: the load did not finish within {deadline_s:.1f}s")
    if out.error is not None:
        raise out.error
    return out.value


def _is_fatal(e: BaseException) -> bool:
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


def resume(
    load_fn: Callable[[Candidate, Store], Any],
    stores: Sequence[str],
    *,
    run: str = "default",
    compat: dict[str, Any] | None = None,
    layout: dict[str, str] | None = None,
    suspect: str = "after_same_step",
    on_exhausted: str = "fresh",
    timeout: float = 600.0,
    attempt_timeout: float | None = None,
    storage_options: dict[str, dict[str, Any]] | None = None,
    apply_fn: Callable[[Candidate, Any], None] | None = None,
    extra_safe_globals: Iterable[str] = (),
    comm: Comm | None = None,
    use_journal: bool = True,
) -> ResumeResult:
    """Collective: call on every rank. Bring every rank to the newest candidate that loads everywhere.

    ``stores`` are URLs as for :class:`~dist_guardian.Guardian` (the first is the primary, where the
    journal lives). ``load_fn(candidate, store)`` loads one candidate on this rank into staging and
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
    validate_suspect_policy(suspect)
    if on_exhausted not in ON_EXHAUSTED:
        raise ConfigError(f"on_exhausted={on_exhausted!r}: use 'fresh' or 'raise'")
    if not isinstance(run, str) or not NAME_RE.match(run):
        raise ConfigError(f"run={run!r} is not a plain name (letters, digits, '.', '_', '-')")
    if isinstance(stores, str):
        stores = [stores]
    for url in stores:
        check_url(url)
    check_storage_options(storage_options, stores)
    _faults.check()
    t0 = time.monotonic()
    own_comm = comm is None
    comm = comm or Comm(timeout)
    try:
        return _resume(
            load_fn, stores, comm=comm, run=run, compat=compat, layout=layout, suspect=suspect, on_exhausted=on_exhausted,
            # The rank's own deadline fires before its peers' vote timeout, so a slow load is a failed
            # attempt (all move on) rather than a dead coordination group.
            attempt_timeout=attempt_timeout if attempt_timeout is not None else 0.8 * timeout,
            storage_options=storage_options, apply_fn=apply_fn, extra_safe_globals=extra_safe_globals,
            use_journal=use_journal, t0=t0,
        )
    finally:
        if own_comm:
            comm.close()


def _resume(load_fn, urls, *, comm: Comm, run, compat, layout, suspect, on_exhausted, attempt_timeout, storage_options,
            apply_fn, extra_safe_globals, use_journal, t0) -> ResumeResult:
    rank, world = comm.rank, comm.world_size
    store_list, refused = resolve_stores(urls, storage_options)
    cursor: PlanCursor | None = None
    attempts: list[Attempt] = []
    warnings: list[str] = []
    rejected: list[tuple[str, str]] = []
    unreachable: tuple[tuple[str, str], ...] = ()
    generation, sightings, transient = 1, 0, False
    primary = store_list[0] if store_list and store_list[0].index == 0 else None  # the journal lives here
    more = True
    while more:
        # 1-3. Rank 0 plans the next page; a crash while planning travels as data so no rank waits forever.
        plan_doc: Any = None
        if rank == 0:
            try:
                if cursor is None:
                    cursor = PlanCursor(store_list, run=run, compat=compat, layout=layout, suspect=suspect,
                                        extra_safe_globals=extra_safe_globals, refused=refused, use_journal=use_journal)
                plan_doc = cursor.next_page().to_json()
            except Exception as e:
                log.exception("planning failed")
                plan_doc = Plan(candidates=(), rejected=(), unreachable=(), warnings=(), generation=0, sightings=0,
                                error=f"{type(e).__name__}: {e}").to_json()
        # 4. Broadcast and check that every rank holds the same plan (F27).
        plan_doc = comm.broadcast_json(plan_doc, "broadcast plan")
        if _faults.hit("after_broadcast", rank=rank) == "corrupt" and plan_doc["candidates"]:
            plan_doc["candidates"] = plan_doc["candidates"][1:]
        comm.check_same(json.dumps(plan_doc, sort_keys=True).encode(), "plan hash check")
        plan = Plan.from_json(plan_doc)
        if plan.error:
            raise ResumeFailed(f"rank 0 could not plan the resume: {plan.error}")
        more = plan.more
        if not sightings:
            unreachable, sightings = plan.unreachable, plan.sightings
            transient = any(_is_transient_store_reason(r) for _, r in plan.unreachable)
        generation = max(generation, plan.generation)
        rejected += plan.rejected
        warnings += plan.warnings
        # The decision record says why a newer candidate was tried last (DESIGN section 5: "reported").
        warnings += [f"crash_loop_demoted: {p}: at least {journal.UNFINISHED_LIMIT} attempts never finished; tried last"
                     for p in plan.demoted]
        if rank == 0:
            log.info("resume plan for run %s: %d candidates (%d sightings, %d rejected, %d stores unreachable)%s",
                     run, len(plan.candidates), plan.sightings, len(plan.rejected), len(plan.unreachable),
                     "; older steps follow if these fail" if more else "")
            for i, c in enumerate(plan.candidates):
                log.info("  plan[%d] %s%s", i, c.describe(), f" ({'; '.join(c.reasons)})" if c.reasons else "")
        if not plan.candidates:
            continue
        remaining = _availability_vote(plan.candidates, comm, store_list, attempts)
        loaded, transient_here = _attempt_loop(
            remaining, load_fn, comm=comm, run=run, suspect=suspect, attempt_timeout=attempt_timeout,
            apply_fn=apply_fn, use_journal=use_journal, primary=primary, store_list=store_list,
            attempts=attempts, warnings=warnings)
        transient = transient or transient_here
        if loaded is not None:
            result = ResumeResult(resumed=True, step=loaded.step, store=loaded.store, path=loaded.path, tier=loaded.tier,
                                  generation=generation, attempts=tuple(attempts), warnings=tuple(warnings),
                                  rejected=tuple(rejected), unreachable=unreachable, seconds=time.monotonic() - t0)
            if rank == 0:
                log.info("resume decision: %s", result.to_json())
            return result

    # 7. Exhausted (F33).
    result = ResumeResult(resumed=False, generation=generation, attempts=tuple(attempts),
                          warnings=tuple(warnings), rejected=tuple(rejected), unreachable=unreachable,
                          seconds=time.monotonic() - t0)
    anything = sightings > 0
    summary = _exhausted_summary(result)
    if transient:
        if not anything:
            raise NoReachableCheckpoint(
                "no checkpoint found, but a store was unreachable, so starting fresh could throw progress away; "
                f"fix the store or remove it from stores=. {summary}")
        raise ResumeFailed(
            "every reachable candidate failed, and a store was unreachable or an attempt timed out (maybe transient); "
            f"not starting fresh. Let the launcher retry. {summary}")
    if anything and on_exhausted == "raise":
        raise ResumeFailed(f"every candidate failed and on_exhausted='raise'. {summary}")
    if anything:
        if rank == 0:
            log.error("starting FRESH: every candidate failed for a lasting reason; all are kept. %s", summary)
    elif rank == 0:
        log.info("no checkpoint found in %s for run %s: starting fresh", ", ".join(urls), run)
    if rank == 0:
        log.info("resume decision: %s", result.to_json())
    return result


def _attempt_loop(remaining: list[Candidate], load_fn, *, comm: Comm, run: str, suspect: str, attempt_timeout: float,
                  apply_fn, use_journal: bool, primary: Store | None, store_list: Sequence[Store],
                  attempts: list[Attempt], warnings: list[str]) -> tuple[Candidate | None, bool]:
    """Collective: every rank tries the same entry, one vote, all move on together.

    Returns the loaded candidate (already applied on every rank) or None, and whether a
    failure may have been transient (an attempt timed out). Raises :class:`AttemptCapReached`
    when ``MAX_ATTEMPTS`` loads have failed and candidates remain.
    """
    rank = comm.rank
    transient = False
    idx = 0
    while idx < len(remaining):
        tried = sum(a.outcome != "unavailable" for a in attempts)
        if tried >= MAX_ATTEMPTS:
            # Same attempts on every rank (lockstep), so every rank raises here together.
            untried = len(remaining) - idx
            msg = (f"attempt_cap_reached: {tried} candidates failed to load (cap MAX_ATTEMPTS={MAX_ATTEMPTS}) and "
                   f"at least {untried} remain untried; not starting fresh. Move files that are not checkpoints "
                   "(see the attempts) out of the stores, then restart")
            if rank == 0:
                log.error("%s", msg)
            raise AttemptCapReached(msg, tried=tried, untried=untried)
        c = remaining[idx]
        store = next((s for s in store_list if s.index == c.store_index), None)
        if rank == 0 and use_journal and primary is not None:
            journal.record(primary, run, c, started=1)
        t1 = time.monotonic()
        staged: Any = None
        suspect_reasons: tuple[str, ...] = ()
        last_resort = False
        why = ""
        try:
            if store is None:
                raise StoreError(f"store {c.store} is not usable on this rank")
            _faults.hit("during_load", rank=rank, step=c.step)
            result = run_with_deadline(lambda: load_fn(c, store), attempt_timeout)
            if isinstance(result, Loaded):
                staged, suspect_reasons, last_resort = result.staged, result.suspect, result.last_resort
                warnings += list(result.warnings)
            else:
                staged = result
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            if _is_fatal(e):
                raise
            why = f"{type(e).__name__}: {e}"[:1500]
            staged = None
        code = (VOTE_FAIL if why else VOTE_LAST_RESORT if last_resort else VOTE_SUSPECT if suspect_reasons
                else VOTE_OK)
        _faults.hit("before_vote", rank=rank, step=c.step)
        try:
            verdict = comm.vote_min(code, f"vote on {c.path}")
        except CoordinationError as e:
            # The job dies here; the attempt stays unfinished (the crash-loop count), and the journal
            # says why, so the next start can report it (F23: reason=timeout; F24/F25: a dead peer).
            if rank == 0 and use_journal and primary is not None:
                journal.record(primary, run, c, outcome="timeout" if isinstance(e, AgreementTimeout) else "peer_failed")
            raise
        elapsed = time.monotonic() - t1
        if verdict == VOTE_FAIL:
            texts = comm.gather_strings(why, f"gather failure reasons for {c.path}")
            reasons = tuple((r, t) for r, t in enumerate(texts) if t)
            # A timeout may be transient (F33): every rank sees the same gathered texts, so all agree.
            transient = transient or any(t.startswith(TIMEOUT_PREFIX) for _, t in reasons)
            attempts.append(Attempt(candidate_id=c.id, step=c.step, store=c.store, path=c.path, tier=c.tier,
                                    outcome="failed", reasons=reasons, seconds=elapsed))
            if rank == 0:
                log.warning("attempt_failed %s: %s", c.describe(), "; ".join(f"rank {r}: {t}" for r, t in reasons))
                if use_journal and primary is not None:
                    journal.record(primary, run, c, finished=1, outcome="failed")
            del staged
            idx += 1
            continue
        if verdict in (VOTE_SUSPECT, VOTE_LAST_RESORT):
            texts = comm.gather_strings("; ".join(suspect_reasons), f"gather suspect reasons for {c.path}")
            reasons = tuple((r, t) for r, t in enumerate(texts) if t)
            rest = remaining[idx + 1 :]
            policy = "last_resort" if verdict == VOTE_LAST_RESORT and suspect != "reject" else suspect
            if _better_remains(c, rest, policy) or policy == "reject":
                outcome = "failed" if suspect == "reject" else "deferred"
                attempts.append(Attempt(candidate_id=c.id, step=c.step, store=c.store, path=c.path, tier="S",
                                        outcome=outcome, reasons=reasons, seconds=elapsed))
                if rank == 0:
                    log.warning("candidate_suspect %s: %s; %s", c.path, "; ".join(t for _, t in reasons),
                                "rejected by policy" if suspect == "reject" else "trying intact candidates first")
                    if use_journal and primary is not None:
                        journal.record(primary, run, c, finished=1, outcome=outcome)
                found = "tree_damaged" if verdict == VOTE_LAST_RESORT else "checksum_mismatch"
                tail = defer_suspect(remaining, idx, policy, f"{found} found while loading")
                remaining = remaining[: idx + 1] + tail
                idx += 1
                continue
            msg = (f"checkpoint_suspect_loaded: {c.path} (step {c.step}) loaded despite: "
                   + "; ".join(f"rank {r}: {t}" for r, t in reasons))
            warnings.append(msg)
            if rank == 0:
                log.warning("%s", msg)
            c = c.with_verdict("S", *(t for _, t in reasons))
        # Unanimous yes: apply on every rank, then report.
        if apply_fn is not None:
            apply_fn(c, staged)
        if rank == 0 and use_journal and primary is not None:
            journal.record(primary, run, c, finished=1, outcome="loaded")
        if c.tier == "L":
            warnings.append(f"legacy_unverified_loaded: {c.path} has no manifest checksums")
        attempts.append(Attempt(candidate_id=c.id, step=c.step, store=c.store, path=c.path, tier=c.tier,
                                outcome="loaded", seconds=elapsed))
        return c, transient
    return None, transient


def _availability_vote(candidates: Sequence[Candidate], comm: Comm, store_list: Sequence[Store],
                       attempts: list[Attempt]) -> list[Candidate]:
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
        attempts.append(Attempt(candidate_id=c.id, step=c.step, store=c.store, path=c.path, tier=c.tier,
                                outcome="unavailable", reasons=reasons))
        if rank == 0:
            log.warning("candidate_unavailable id=%s ranks=%s: %s", c.path, [r for r, _ in reasons],
                        "; ".join(f"rank {r}: {w}" for r, w in reasons))
    return remaining


def _is_transient_store_reason(reason: str) -> bool:
    # An insecure node-local root is a lasting refusal (F48); anything else may come back.
    return "insecure" not in reason and "symlink" not in reason and "owned by uid" not in reason


def _better_remains(c: Candidate, rest: Sequence[Candidate], suspect: str) -> bool:
    if suspect == "last_resort":
        return any(r.tier in ("V", "L") for r in rest)
    return any(r.step == c.step and r.generation == c.generation and r.tier in ("V", "L") for r in rest)


def _exhausted_summary(r: ResumeResult) -> str:
    parts = [f"{a.path}: {a.outcome} ({'; '.join(f'rank {k}: {w}' for k, w in a.reasons)})" for a in r.attempts]
    parts += [f"{p}: rejected ({why})" for p, why in r.rejected]
    parts += [f"store {s}: unreachable ({why})" for s, why in r.unreachable]
    return "Candidates: " + (" | ".join(parts) if parts else "none")
