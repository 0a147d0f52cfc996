"""The resume policy, pure: the order candidates are tried in, where a suspect goes, what may come back.

Belongs here: :func:`order` (the plan from the verdicts alone: timestamps never order
anything, F35), :func:`defer_suspect` and :func:`better_remains` (a candidate found suspect
while loading), and :class:`Reason` with the rules that call a failure transient (a store
that may answer later, an attempt that ran out of time) or lasting (F33, F48). Those rules
read the token of an :class:`errors.Reason` (``LASTING_STORE_TOKENS``, ``STORE_DOWN_TOKENS``),
never words of its text. Every rank computes the same from the same inputs; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .candidate import TIER_RANK, Candidate, validate_suspect_policy
from .errors import Reason as ErrorReason

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


# Store reasons that will not pass by waiting: an insecure node-local root or a symlinked path is refused for
# good (F48). Every other reason a store gives (store_unreachable, store_auth_failed, a listing error) may pass.
LASTING_STORE_TOKENS = frozenset({"node_local_root_insecure", "run_dir_symlink", "symlink", "insecure"})
# Candidate reasons that say a store was not read, not that the checkpoint is bad (retention must not act on them).
STORE_DOWN_TOKENS = frozenset({"store_unreachable", "store_auth_failed"})


def reason_token(reason: str | ErrorReason) -> str:
    """The token of a reason, given as the value or as its text (what crosses ranks in JSON)."""
    return reason.token if isinstance(reason, ErrorReason) else ErrorReason.parse(reason).token


def store_reason_is_transient(reason: str | ErrorReason) -> bool:
    """Whether an unreachable store may answer on a later start: decided on the reason's token."""
    return reason_token(reason) not in LASTING_STORE_TOKENS


def store_was_down(reasons: Iterable[str]) -> bool:
    """Whether a candidate's reasons say its store did not answer (so its verdict says nothing of its bytes)."""
    return any(reason_token(r) in STORE_DOWN_TOKENS for r in reasons)


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
