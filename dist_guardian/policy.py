"""The resume policy, pure: the order candidates are tried in, where a suspect goes, what may come back.

Belongs here: :func:`order` (the plan from the verdicts alone: timestamps never order
anything, F35), :func:`defer_suspect` and :func:`better_remains` (a candidate found suspect
while loading), and :class:`Reason` with the rules that call a failure transient (a store
that may answer later, an attempt that ran out of time) or lasting (F33, F48). Every rank
computes the same from the same inputs; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .candidate import TIER_RANK, Candidate, validate_suspect_policy

# Loads one resume tries before it stops (T04): 2,000 foreign files that sniff clean and fail to load cost
# 2,000 attempts and journal entries. Reaching it with candidates left raises AttemptCapReached (never fresh).
MAX_ATTEMPTS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Reason:
    """Why one rank could not load a candidate: the text for people, and whether it may pass.

    ``transient`` decides the end of a resume (F33): after a transient failure every
    candidate failing is not a reason to start fresh, since progress may only be out of reach.
    """

    text: str
    transient: bool = False

    def to_wire(self) -> str:
        """The reason as one gathered string: a flag character, then the text ("" carries no reason)."""
        return ("T" if self.transient else "L") + self.text

    @classmethod
    def from_wire(cls, raw: str) -> Reason | None:
        """What :meth:`to_wire` sent (None for a rank with nothing to report)."""
        if not raw:
            return None
        return cls(text=raw[1:], transient=raw[0] == "T")


# An insecure node-local root is refused for good (F48); the rest of a store's troubles may pass.
_LASTING_STORE_MARKS = ("insecure", "symlink", "owned by uid")


def store_reason_is_transient(reason: str) -> bool:
    """Whether an unreachable store may answer on a later start.

    Store reasons reach the plan as text from ``discovery`` and ``stores`` (``InsecurePathError``
    messages carry the marks above), so this one rule still reads the text.
    """
    return not any(mark in reason for mark in _LASTING_STORE_MARKS)


def _key(c: Candidate) -> tuple:
    # Newest step, then newest lineage (F36), then V < L < S, then the user's store order.
    return (-c.step, -c.generation, TIER_RANK[c.tier], c.store_index, c.path)


def order(candidates: Iterable[Candidate], suspect: str = "after_same_step") -> list[Candidate]:
    """The plan: the order in which resume tries candidates (FAULTS.md policy).

    R candidates are dropped. ``after_same_step`` keeps a suspect right after the other
    replicas of its step; ``last_resort`` moves every suspect after every V and L;
    ``reject`` drops suspects. Pure: the same verdicts always give the same plan.
    """
    policy = validate_suspect_policy(suspect)
    usable = sorted((c for c in candidates if c.tier != "R"), key=_key)
    if policy == "reject":
        return [c for c in usable if c.tier != "S"]
    if policy == "last_resort":
        return [c for c in usable if c.tier != "S"] + [c for c in usable if c.tier == "S"]
    return usable


def defer_suspect(plan: list[Candidate], index: int, suspect: str, reason: str) -> list[Candidate]:
    """Re-place plan[index], found suspect while loading, where the policy puts an S candidate.

    Returns the remaining plan after ``index`` (all ranks compute the same). With
    ``after_same_step`` it goes after the remaining entries of its step; with ``last_resort``
    after every remaining non-suspect entry; with ``reject`` it is dropped.
    """
    cand = plan[index].with_verdict("S", reason)
    rest = list(plan[index + 1 :])
    if suspect == "reject":
        return rest
    if suspect == "last_resort":
        pos = len(rest)
        while pos > 0 and rest[pos - 1].tier == "S":
            pos -= 1
        return rest[:pos] + [cand] + rest[pos:]
    pos = 0
    while pos < len(rest) and rest[pos].step == cand.step and rest[pos].generation == cand.generation:
        pos += 1
    return rest[:pos] + [cand] + rest[pos:]


def better_remains(c: Candidate, rest: Sequence[Candidate], suspect: str) -> bool:
    """Whether an intact candidate the policy prefers to suspect ``c`` is still ahead in ``rest``."""
    if suspect == "last_resort":
        return any(r.tier in ("V", "L") for r in rest)
    return any(r.step == c.step and r.generation == c.generation and r.tier in ("V", "L") for r in rest)
