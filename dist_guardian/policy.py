"""The resume policy, pure: the order candidates are tried in, where a suspect goes, what may come back.

Belongs here: :func:`order` (the plan from the verdicts alone: timestamps never order
anything, F35), :func:`defer_suspect` and :func:`better_remains` (a candidate found suspect
while loading), the wire form of an attempt's :class:`errors.Reason` (its text plus the
transient flag, F33), and the rules that call a store reason transient or lasting (F48).
Those rules read the token of a reason (``LASTING_STORE_TOKENS``, ``STORE_DOWN_TOKENS``),
never words of its text. Every rank computes the same from the same inputs; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from .candidate import TIER_RANK, Candidate, validate_suspect_policy
from .errors import Reason

# Loads one resume tries before it stops (T04): 2,000 foreign files that sniff clean and fail to load cost
# 2,000 attempts and journal entries. Reaching it with candidates left raises AttemptCapReached (never fresh).
MAX_ATTEMPTS = 64


def reason_to_wire(reason: Reason | None) -> str:
    """A rank's attempt failure as one gathered string: a flag character, then its text ("" carries no reason).

    The text alone does not say whether the failure may pass (F33), so the flag travels with it.
    """
    if reason is None:
        return ""
    return ("T" if reason.transient else "L") + str(reason)


def reason_from_wire(raw: str) -> Reason | None:
    """What :func:`reason_to_wire` sent (None for a rank with nothing to report)."""
    if not raw:
        return None
    return replace(Reason.parse(raw[1:]), transient=raw[0] == "T")


# Store reasons that will not pass by waiting: an insecure node-local root or a symlinked path is refused for
# good (F48). Every other reason a store gives (store_unreachable, store_auth_failed, a listing error) may pass.
LASTING_STORE_TOKENS = frozenset({"node_local_root_insecure", "run_dir_symlink", "symlink", "insecure"})
# Candidate reasons that say a store was not read, not that the checkpoint is bad (retention must not act on them).
STORE_DOWN_TOKENS = frozenset({"store_unreachable", "store_auth_failed"})


def reason_token(reason: str | Reason) -> str:
    """The token of a reason, given as the value or as its text (what crosses ranks in JSON)."""
    return reason.token if isinstance(reason, Reason) else Reason.parse(reason).token


def store_reason_is_transient(reason: str | Reason) -> bool:
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
