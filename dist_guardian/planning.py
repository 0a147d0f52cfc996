"""Rank 0's half of resume, without torch: resolve stores, discover, verify, order, consult the journal.

Kept apart from ``coordinator`` so that ``dist-guardian plan`` prints exactly the plan a
resume would follow, without importing torch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Sequence

from . import discovery, journal, stores, verify
from .candidate import Candidate, order
from .errors import ConfigError, StoreError
from .stores import Store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What rank 0 broadcasts: the ordered candidates and everything the record needs."""

    candidates: tuple[Candidate, ...]
    rejected: tuple[tuple[str, str], ...]
    unreachable: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    generation: int  # the lineage of this incarnation: newest seen + 1 (F36, F39)
    sightings: int
    demoted: tuple[str, ...] = ()
    error: str | None = None
    listing: tuple[Candidate, ...] = ()  # every candidate, R included (for `ls`; not broadcast)

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_json() for c in self.candidates],
            "rejected": [list(r) for r in self.rejected],
            "unreachable": [list(u) for u in self.unreachable],
            "warnings": list(self.warnings),
            "generation": self.generation,
            "sightings": self.sightings,
            "demoted": list(self.demoted),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        return cls(
            candidates=tuple(Candidate.from_json(c) for c in d["candidates"]),
            rejected=tuple(tuple(r) for r in d["rejected"]),  # type: ignore[misc]
            unreachable=tuple(tuple(u) for u in d["unreachable"]),  # type: ignore[misc]
            warnings=tuple(d["warnings"]),
            generation=int(d["generation"]),
            sightings=int(d["sightings"]),
            demoted=tuple(d.get("demoted", ())),
            error=d.get("error"),
        )


def resolve_stores(urls: Sequence[str], storage_options: dict | None) -> tuple[list[Store], list[tuple[str, str]]]:
    """Resolve every store URL on this rank; an insecure or broken one is reported, not fatal (F48)."""
    if not urls:
        raise ConfigError("stores is empty: give at least one store, e.g. stores=['checkpoints/']")
    out, bad = [], []
    for i, url in enumerate(urls):
        try:
            out.append(stores.resolve(url, i, storage_options))
        except ConfigError:
            raise
        except (StoreError, OSError) as e:
            log.warning("store %s refused: %s", url, e)
            bad.append((url, str(e)))
    return out, bad


def make_plan(
    store_list: Sequence[Store],
    *,
    run: str,
    compat: dict[str, Any] | None,
    suspect: str,
    extra_safe_globals: Iterable[str] = (),
    refused: Sequence[tuple[str, str]] = (),
    use_journal: bool = True,
    include_rejected: bool = False,
) -> Plan:
    """Rank 0 only: discover, verify and order. Never raises for a bad store or candidate."""
    found = discovery.discover(store_list, run)
    checked = verify.verify_all(found.sightings, run=run, compat=compat, extra_safe_globals=extra_safe_globals)
    ordered = order(checked.candidates, suspect)
    demoted: list[str] = []
    if use_journal and store_list and ordered:
        primary = store_list[0]
        keep, tail = [], []
        for c in ordered:
            n = journal.unfinished(primary, run, c)
            if n >= journal.UNFINISHED_LIMIT:
                tail.append(c.with_verdict(c.tier, f"crash_loop: {n} attempts never finished; demoted to the end"))
                demoted.append(c.path)
                log.warning("crash_loop_demoted %s: %d attempts killed the job; tried last", c.path, n)
            else:
                keep.append(c)
        ordered = keep + tail
    return Plan(
        candidates=tuple(ordered),
        rejected=tuple((c.path, "; ".join(c.reasons)) for c in checked.candidates if c.tier == "R"),
        unreachable=tuple(found.unreachable) + tuple(refused),
        warnings=checked.warnings + found.notes,
        generation=checked.max_generation + 1,
        sightings=len(found.sightings),
        demoted=tuple(demoted),
        listing=tuple(sorted(checked.candidates, key=lambda c: (-c.step, -c.generation, c.store_index, c.path)))
        if include_rejected else (),
    )
