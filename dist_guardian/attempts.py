"""One attempt at one candidate on every rank, and the decision its vote leads to.

Belongs here: the attempt loop of a resume page (LLNL SCR's fallback loop): each rank loads
the same candidate into staging under a deadline (:func:`run_with_deadline`), one vote takes
the minimum, and :func:`_decide` turns the outcome into the next step (apply, move on, or
defer a suspect), and the :class:`Record` every rank accumulates for the decision record.
Failures travel as data (:class:`errors.Reason`), so every rank reaches every collective once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _faults, journal
from .candidate import Attempt, Candidate, Loaded, ResumeResult
from .comm import Comm
from .errors import AgreementTimeout, AttemptCapReached, CoordinationError, Reason, StoreError
from .planning import Plan
from .policy import (
    MAX_ATTEMPTS,
    better_remains,
    defer_suspect,
    reason_from_wire,
    reason_to_wire,
    store_reason_is_transient,
)
from .stores import Store

log = logging.getLogger(__name__)

# The vote takes the minimum: one rank's damage outside the tensors (T10) moves the candidate to last resort on all.
VOTE_FAIL, VOTE_LAST_RESORT, VOTE_SUSPECT, VOTE_OK = 0, 1, 2, 3
# An attempt's failure text is kept to this many characters of the error's message (it crosses ranks).
_DETAIL_CAP = 1500

__all__ = ["MAX_ATTEMPTS", "LoadDeadlineExceeded", "LoopContext", "Record", "attempt_loop", "run_with_deadline"]


class _Outcome:
    __slots__ = ("value", "error", "done")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class LoadDeadlineExceeded(TimeoutError):
    """A load ran past its attempt deadline: a failure that may be transient (F33)."""


def run_with_deadline(fn: Callable[[], Any], deadline_s: float) -> Any:
    """Run a load on this rank, bounded: a hung load raises :class:`LoadDeadlineExceeded` (the rank votes fail).

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
        raise LoadDeadlineExceeded(f"timeout: the load did not finish within {deadline_s:.1f}s")
    if out.error is not None:
        raise out.error
    return out.value


def _is_fatal(e: BaseException) -> bool:
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopContext:
    """What the attempt loop works with on this rank: the group, the caller's functions, the resolved stores."""

    comm: Comm
    load_fn: Callable[[Candidate, Store], Any]
    apply_fn: Callable[[Candidate, Any], None] | None
    store_list: tuple[Store, ...]
    run: str
    suspect: str
    attempt_timeout: float
    journal_store: Store | None  # the primary, where the journal lives (None: no journal)

    def record(self, c: Candidate, **counts: Any) -> None:
        """Journal an attempt's start or outcome (rank 0 only; advisory)."""
        if self.comm.rank == 0 and self.journal_store is not None:
            journal.record(self.journal_store, self.run, c, **counts)


@dataclass
class Record:
    """What the decision record accumulates over the pages of one resume (identical on every rank)."""

    t0: float
    attempts: list[Attempt] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    unreachable: tuple[tuple[str, str], ...] = ()
    generation: int = 1
    sightings: int = 0
    transient: bool = False  # a store was unreachable or an attempt timed out: never start fresh (F33)

    def add_page(self, plan: Plan) -> None:
        if not self.sightings:
            self.unreachable, self.sightings = plan.unreachable, plan.sightings
            self.transient = any(store_reason_is_transient(r) for _, r in plan.unreachable)
        self.generation = max(self.generation, plan.generation)
        self.rejected += plan.rejected
        self.warnings += plan.warnings
        # The decision record says why a newer candidate was tried last (DESIGN section 5: "reported").
        self.warnings += [
            f"crash_loop_demoted: {p}: at least {journal.UNFINISHED_LIMIT} attempts never finished; tried last"
            for p in plan.demoted
        ]

    def result(self, loaded: Candidate | None) -> ResumeResult:
        """The decision: resumed from ``loaded``, or (None) a fresh start."""
        return ResumeResult(
            resumed=loaded is not None,
            step=loaded.step if loaded else None,
            store=loaded.store if loaded else None,
            path=loaded.path if loaded else None,
            tier=loaded.tier if loaded else None,
            generation=self.generation,
            attempts=tuple(self.attempts),
            warnings=tuple(self.warnings),
            rejected=tuple(self.rejected),
            unreachable=self.unreachable,
            seconds=time.monotonic() - self.t0,
        )


@dataclass
class _Tried:
    """What this rank's attempt at one candidate produced, before the vote."""

    staged: Any = None
    failure: Reason | None = None
    suspect: tuple[str, ...] = ()
    last_resort: bool = False
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def vote(self) -> int:
        if self.failure is not None:
            return VOTE_FAIL
        return VOTE_LAST_RESORT if self.last_resort else VOTE_SUSPECT if self.suspect else VOTE_OK


def attempt_loop(ctx: LoopContext, remaining: list[Candidate], rec: Record) -> Candidate | None:
    """Collective: every rank tries the same entry, one vote, all move on together.

    Returns the loaded candidate (already applied on every rank) or None; an attempt that
    timed out sets ``rec.transient``. Raises :class:`AttemptCapReached` when ``MAX_ATTEMPTS``
    loads have failed and candidates remain.
    """
    idx = 0
    while idx < len(remaining):
        _check_attempt_cap(ctx.comm.rank, rec.attempts, untried=len(remaining) - idx)
        c = remaining[idx]
        tried = _attempt(ctx, c, rec.warnings)
        verdict = _vote(ctx, c, tried)
        chosen, remaining = _decide(ctx, verdict, remaining, idx, tried, rec)
        if chosen is not None:
            _apply(ctx, chosen, tried, rec)
            return chosen
        tried.staged = None  # dropped before the next load, so two stagings never coexist
        idx += 1
    return None


def _check_attempt_cap(rank: int, attempts: Sequence[Attempt], untried: int) -> None:
    tried = sum(a.outcome != "unavailable" for a in attempts)
    if tried < MAX_ATTEMPTS:
        return
    # Same attempts on every rank (lockstep), so every rank raises here together.
    msg = (
        f"attempt_cap_reached: {tried} candidates failed to load (cap MAX_ATTEMPTS={MAX_ATTEMPTS}) and "
        f"at least {untried} remain untried; not starting fresh. Move files that are not checkpoints "
        "(see the attempts) out of the stores, then restart"
    )
    if rank == 0:
        log.error("%s", msg)
    raise AttemptCapReached(msg, tried=tried, untried=untried)


def _attempt(ctx: LoopContext, c: Candidate, warnings: list[str]) -> _Tried:
    """This rank loads ``c`` into staging, bounded by the attempt deadline; a failure becomes a reason."""
    rank = ctx.comm.rank
    store = next((s for s in ctx.store_list if s.index == c.store_index), None)
    ctx.record(c, started=1)
    tried = _Tried(started=time.monotonic())
    try:
        if store is None:
            raise StoreError("store_unusable", f"store {c.store} is not usable on this rank")
        _faults.hit("during_load", rank=rank, step=c.step)
        result = run_with_deadline(lambda: ctx.load_fn(c, store), ctx.attempt_timeout)
        if isinstance(result, Loaded):
            tried.staged, tried.suspect, tried.last_resort = result.staged, result.suspect, result.last_resort
            warnings += list(result.warnings)
        else:
            tried.staged = result
    except LoadDeadlineExceeded as e:
        tried.failure = Reason("TimeoutError", str(e)[:_DETAIL_CAP], transient=True)
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if _is_fatal(e):
            raise
        # The error's own field decides (F33): a store that drops mid-load (StoreUnavailable) may answer later.
        tried.failure = Reason(type(e).__name__, str(e)[:_DETAIL_CAP], transient=getattr(e, "transient", False))
    if tried.failure is not None:
        tried.staged = None
    return tried


def _vote(ctx: LoopContext, c: Candidate, tried: _Tried) -> int:
    """Collective: the minimum of every rank's vote on ``c``."""
    _faults.hit("before_vote", rank=ctx.comm.rank, step=c.step)
    try:
        verdict = ctx.comm.vote_min(tried.vote, f"vote on {c.path}")
    except CoordinationError as e:
        # The job dies here; the attempt stays unfinished (the crash-loop count), and the journal
        # says why, so the next start can report it (F23: reason=timeout; F24/F25: a dead peer).
        ctx.record(c, outcome="timeout" if isinstance(e, AgreementTimeout) else "peer_failed")
        raise
    tried.elapsed = time.monotonic() - tried.started
    return verdict


def _decide(
    ctx: LoopContext, verdict: int, remaining: list[Candidate], idx: int, tried: _Tried, rec: Record
) -> tuple[Candidate | None, list[Candidate]]:
    """Collective: what a vote leads to. Returns the candidate to apply (None: move on) and the plan ahead.

    Failed: every rank's reason is recorded, all move on. Suspect: deferred behind an intact
    candidate the policy prefers (or dropped under ``reject``), else loaded with a warning.
    """
    c = remaining[idx]
    if verdict == VOTE_OK:
        return c, remaining
    if verdict == VOTE_FAIL:
        _record_failure(ctx, c, tried, rec)
        return None, remaining
    texts = ctx.comm.gather_strings("; ".join(tried.suspect), f"gather suspect reasons for {c.path}")
    reasons = tuple((r, t) for r, t in enumerate(texts) if t)
    suspect = ctx.suspect
    policy = "last_resort" if verdict == VOTE_LAST_RESORT and suspect != "reject" else suspect
    if better_remains(c, remaining[idx + 1 :], policy) or policy == "reject":
        outcome: Literal["failed", "deferred"] = "failed" if suspect == "reject" else "deferred"
        rec.attempts.append(Attempt.of(c, outcome, reasons, seconds=tried.elapsed, tier="S"))
        if ctx.comm.rank == 0:
            log.warning(
                "candidate_suspect %s: %s; %s",
                c.path,
                "; ".join(t for _, t in reasons),
                "rejected by policy" if suspect == "reject" else "trying intact candidates first",
            )
        ctx.record(c, finished=1, outcome=outcome)
        found = "tree_damaged" if verdict == VOTE_LAST_RESORT else "checksum_mismatch"
        tail = defer_suspect(remaining, idx, policy, f"{found} found while loading")
        return None, remaining[: idx + 1] + tail
    msg = f"checkpoint_suspect_loaded: {c.path} (step {c.step}) loaded despite: " + "; ".join(
        f"rank {r}: {t}" for r, t in reasons
    )
    rec.warnings.append(msg)
    if ctx.comm.rank == 0:
        log.warning("%s", msg)
    return c.with_verdict("S", *(t for _, t in reasons)), remaining


def _record_failure(ctx: LoopContext, c: Candidate, tried: _Tried, rec: Record) -> None:
    """Collective: gather every rank's reason for a failed vote into the record."""
    raw = ctx.comm.gather_strings(reason_to_wire(tried.failure), f"gather failure reasons for {c.path}")
    failures = [(r, why) for r, why in ((r, reason_from_wire(t)) for r, t in enumerate(raw)) if why is not None]
    reasons = tuple((r, str(why)) for r, why in failures)
    # A timeout may be transient (F33): every rank sees the same gathered reasons, so all agree.
    rec.transient = rec.transient or any(why.transient for _, why in failures)
    rec.attempts.append(Attempt.of(c, "failed", reasons, seconds=tried.elapsed))
    if ctx.comm.rank == 0:
        log.warning("attempt_failed %s: %s", c.describe(), "; ".join(f"rank {r}: {t}" for r, t in reasons))
    ctx.record(c, finished=1, outcome="failed")


def _apply(ctx: LoopContext, c: Candidate, tried: _Tried, rec: Record) -> None:
    """Unanimous yes: make the staged state live on every rank, then report it."""
    if ctx.apply_fn is not None:
        ctx.apply_fn(c, tried.staged)
    ctx.record(c, finished=1, outcome="loaded")
    if c.tier == "L":
        rec.warnings.append(f"legacy_unverified_loaded: {c.path} has no manifest checksums")
    rec.attempts.append(Attempt.of(c, "loaded", seconds=tried.elapsed))
