"""Frozen values that cross ranks: candidates, attempts, the resume result.

Everything here is small and plain (JSON-able primitives), because candidates travel from
rank 0 to every rank as JSON bytes and end up in the decision record. The ordering and
deferral rules that act on these values live in ``policy``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError, PlanFormatError

Tier = Literal["V", "L", "S", "R"]
SuspectPolicy = Literal["after_same_step", "last_resort", "reject"]
SUSPECT_POLICIES = ("after_same_step", "last_resort", "reject")
Kind = Literal["native", "torch", "dcp", "safetensors", "hf"]
KINDS = ("native", "torch", "dcp", "safetensors", "hf")
TIER_RANK = {"V": 0, "L": 1, "S": 2, "R": 3}


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRef:
    """One file of a candidate: its name relative to the candidate, its expected size and digest."""

    name: str
    size: int
    digest: str | None = None
    rank: int | None = None  # None: read by every rank; k: read only by rank k (per-rank state)


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One checkpoint in one store, with the verdict of verification.

    ``path`` is a location inside ``store`` (a local path or an fsspec URL); ``replica_key``
    is equal for copies of the same checkpoint in different stores, so the order can put
    an intact copy before a damaged one.
    """

    id: str
    store: str
    store_index: int
    rel: str  # location relative to the store root (each rank resolves it through its own store)
    path: str  # rank 0's full location, for people and records
    kind: Kind
    step: int
    generation: int = 0
    run: str | None = None
    world_size: int | None = None
    tier: Tier = "V"
    reasons: tuple[str, ...] = ()
    files: tuple[FileRef, ...] = ()
    replica_key: str = ""
    manifest_digest: str | None = None
    compat_fingerprint: str | None = None
    layout_fingerprint: str | None = None  # of the manifest's whole layout: retention groups by (compat, layout)
    created_unix: float | None = None

    def with_verdict(self, tier: Tier, *reasons: str) -> Candidate:
        return dataclasses.replace(self, tier=tier, reasons=self.reasons + tuple(reasons))

    def files_for_rank(self, rank: int, world_size: int) -> tuple[FileRef, ...]:
        """The files this rank reads when it loads this candidate (the availability vote checks these)."""
        own = [f for f in self.files if f.rank is None]
        per_rank = [f for f in self.files if f.rank is not None]
        if per_rank:
            saved_ws = self.world_size or len(per_rank)
            want = rank % max(saved_ws, 1)
            own += [f for f in per_rank if f.rank == want]
        return tuple(own)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reasons"] = list(self.reasons)
        d["files"] = [dataclasses.asdict(f) for f in self.files]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        """A candidate from its JSON record; :class:`PlanFormatError` names the first bad field.

        Every rank turns ``rel`` and file names into local paths, so they are checked here as
        strictly as a manifest's file names: relative, no ``..``, no NUL, no separators in a file name.
        """
        if not isinstance(d, dict):
            raise PlanFormatError(f"malformed plan: a candidate is a {type(d).__name__}, not an object")
        cid = d.get("id", "?")
        unknown = sorted(map(str, set(d) - _CANDIDATE_FIELDS))
        if unknown:
            raise PlanFormatError(f"malformed plan: candidate {cid!r} has unknown fields {unknown[:5]}")
        missing = [k for k in ("id", "store", "store_index", "rel", "path", "kind", "step") if k not in d]
        if missing:
            raise PlanFormatError(f"malformed plan: candidate {cid!r} lacks {missing}")

        def bad(field: str, why: str) -> PlanFormatError:
            return PlanFormatError(
                f"malformed plan: candidate {str(cid)[:200]!r}: {field} {why} (got {str(d.get(field))[:80]!r})"
            )

        for k in ("id", "store", "path", "replica_key"):
            if k in d and not isinstance(d[k], str):
                raise bad(k, "must be a string")
        for k in ("run", "manifest_digest", "compat_fingerprint", "layout_fingerprint"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise bad(k, "must be a string or null")
        if not _is_int(d["store_index"], 0, 1 << 20):
            raise bad("store_index", "must be a store position")
        if not _is_int(d["step"], -1, 10**20):
            raise bad("step", "must be an integer step (-1: unknown)")
        if "generation" in d and not _is_int(d["generation"], 0, 1 << 62):
            raise bad("generation", "must be a non-negative integer")
        if d.get("world_size") is not None and not _is_int(d["world_size"], 1, 1 << 20):
            raise bad("world_size", "must be a positive integer or null")
        if d["kind"] not in KINDS:
            raise bad("kind", f"must be one of {', '.join(KINDS)}")
        if not isinstance(d.get("tier", "V"), str) or d.get("tier", "V") not in TIER_RANK:
            raise bad("tier", "must be V, L, S or R")
        cu = d.get("created_unix")
        if cu is not None and (isinstance(cu, bool) or not isinstance(cu, (int, float)) or not _finite(cu)):
            raise bad("created_unix", "must be a finite number or null")
        if not _safe_rel(d["rel"]):
            raise bad("rel", "must be a relative path inside the store (no '..', no NUL, not absolute)")
        reasons = d.get("reasons", ())
        if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) for r in reasons):
            raise bad("reasons", "must be a list of strings")
        files = d.get("files", ())
        if not isinstance(files, (list, tuple)):
            raise bad("files", "must be a list")
        refs = []
        for f in files:
            if not isinstance(f, dict) or set(f) - _FILEREF_FIELDS or "name" not in f or "size" not in f:
                raise bad("files", "entries must be objects with name and size")
            name, size, digest, rank = f["name"], f["size"], f.get("digest"), f.get("rank")
            if not isinstance(name, str) or name in (".", "..") or "/" in name or "\x00" in name:
                raise bad("files", f"name {str(name)[:80]!r} is not a plain file name")
            if (
                not _is_int(size, 0, 1 << 62)
                or (digest is not None and not isinstance(digest, str))
                or (rank is not None and not _is_int(rank, 0, 1 << 20))
            ):
                raise bad("files", f"entry {name!r} has a bad size, digest or rank")
            refs.append(FileRef(name=name, size=size, digest=digest, rank=rank))
        d = dict(d)
        d["reasons"] = tuple(reasons)
        d["files"] = tuple(refs)
        return cls(**d)

    def describe(self) -> str:
        return f"step {self.step} ({self.kind}, tier {self.tier}) in {self.store} at {self.path}"


_CANDIDATE_FIELDS = frozenset(f.name for f in dataclasses.fields(Candidate))
_FILEREF_FIELDS = frozenset(f.name for f in dataclasses.fields(FileRef))


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _finite(v: float) -> bool:
    try:
        return float(v) - float(v) == 0.0
    except OverflowError:
        return False


def _safe_rel(rel: Any) -> bool:
    """A location relative to a store root that cannot leave it (what each rank joins to its own root).

    ``"."`` is the root itself: a store that is one Hugging Face ``checkpoint-N/`` directory.
    """
    if rel == ".":
        return True
    if not isinstance(rel, str) or not rel or len(rel) > 4096 or "\x00" in rel or rel.startswith("/"):
        return False
    return all(p not in ("", ".", "..") for p in rel.split("/"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One candidate tried by every rank, and what each rank said about it."""

    candidate_id: str
    step: int
    store: str
    path: str
    tier: str
    outcome: Literal["loaded", "failed", "deferred", "unavailable", "skipped"]
    reasons: tuple[tuple[int, str], ...] = ()  # (rank, reason)
    seconds: float = 0.0

    @classmethod
    def of(
        cls,
        c: Candidate,
        outcome: Literal["loaded", "failed", "deferred", "unavailable", "skipped"],
        reasons: tuple[tuple[int, str], ...] = (),
        *,
        seconds: float = 0.0,
        tier: str | None = None,
    ) -> Attempt:
        """The record of trying ``c`` (its tier unless the attempt found another)."""
        return cls(
            candidate_id=c.id,
            step=c.step,
            store=c.store,
            path=c.path,
            tier=tier or c.tier,
            outcome=outcome,
            reasons=reasons,
            seconds=seconds,
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reasons"] = [{"rank": r, "reason": why} for r, why in self.reasons]
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeResult:
    """What resume decided. Identical on every rank (same step, store and path)."""

    resumed: bool
    step: int | None = None
    store: str | None = None
    path: str | None = None
    tier: str | None = None
    generation: int = 0
    attempts: tuple[Attempt, ...] = ()
    warnings: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()  # (path, reason) of R candidates, for the record
    unreachable: tuple[tuple[str, str], ...] = ()  # (store, reason)
    seconds: float = 0.0

    def to_json(self) -> str:
        """The decision record: one JSON object, logged once by rank 0."""
        d = {
            "resumed": self.resumed,
            "step": self.step,
            "store": self.store,
            "path": self.path,
            "tier": self.tier,
            "generation": self.generation,
            "attempts": [a.to_json() for a in self.attempts],
            "warnings": list(self.warnings),
            "rejected": [{"path": p, "reason": r} for p, r in self.rejected],
            "unreachable": [{"store": s, "reason": r} for s, r in self.unreachable],
            "seconds": round(self.seconds, 4),
        }
        return json.dumps(d, sort_keys=False)


def validate_suspect_policy(suspect: str) -> SuspectPolicy:
    if suspect not in SUSPECT_POLICIES:
        raise ConfigError(f"suspect={suspect!r} is not a policy; use one of {', '.join(SUSPECT_POLICIES)}")
    return suspect  # type: ignore[return-value]


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """What a load function may return: the staged state, and why it is suspect (if it is).

    ``last_resort``: the damage lies where the sanity gate cannot judge it (the state tree, T10),
    so whatever the suspect policy, the candidate is tried only after every intact one
    (``reject`` still drops it). A load function that returns anything else is taken as
    ``Loaded(staged=value)``.
    """

    staged: Any = None
    suspect: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    last_resort: bool = False
