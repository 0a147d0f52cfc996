"""Rank 0's half of resume, without torch: resolve stores, discover, verify, order, consult the journal.

Belongs here: :class:`PlanRequest` (what a plan is made for), :class:`Plan` (what rank 0
broadcasts, decoded strictly), :class:`PlanCursor` (the plan one page at a time) and
:func:`make_plan` (the whole plan, for the CLI). Kept apart from ``coordinator`` so that
``dist-guardian plan`` prints exactly the plan a resume would follow, without importing torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from . import discovery, journal, manifest, stores, verify
from .candidate import Candidate
from .discovery import Discovery, Sighting
from .errors import ConfigError, PlanFormatError, StoreError
from .policy import order
from .stores import Store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlanRequest:
    """What rank 0 plans for: the run, what a candidate must match, and the suspect policy."""

    run: str
    compat: dict[str, Any] | None = None  # the caller's compatibility fingerprint inputs (None: accept any)
    suspect: str = "after_same_step"
    extra_safe_globals: tuple[str, ...] = ()  # qualnames a foreign pickle may name, besides the built-in allowlist
    use_journal: bool = True  # demote crash-looping candidates (reads <primary>/<run>/.journal/)
    layout: dict[str, str] | None = None  # the live state's layout fingerprints (T02)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What rank 0 broadcasts: the ordered candidates and everything the record needs."""

    candidates: tuple[Candidate, ...]
    rejected: tuple[tuple[str, str], ...]
    unreachable: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    generation: int  # the lineage of this incarnation: newest seen + 1, at most manifest.MAX_GENERATION (F36, F39)
    sightings: int
    demoted: tuple[str, ...] = ()
    error: str | None = None
    more: bool = False  # rank 0 has more pages (older steps) to verify if this one is exhausted
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
            "more": self.more,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        """The plan rank 0 broadcast. A malformed one raises :class:`PlanFormatError` naming the field."""
        if not isinstance(d, dict):
            raise PlanFormatError(f"malformed plan: a {type(d).__name__}, not an object")
        unknown = sorted(map(str, set(d) - _PLAN_KEYS))
        missing = [k for k in _PLAN_REQUIRED if k not in d]
        if unknown or missing:
            raise PlanFormatError(f"malformed plan: unknown fields {unknown[:5]}, missing fields {missing}")

        def pairs(key: str) -> tuple[tuple[str, str], ...]:
            v = d[key]
            if not isinstance(v, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in v
            ):
                raise PlanFormatError(f"malformed plan: {key} must be a list of [text, text] pairs")
            return tuple((p[0], p[1]) for p in v)

        def strings(key: str) -> tuple[str, ...]:
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise PlanFormatError(f"malformed plan: {key} must be a list of strings")
            return tuple(v)

        for key in ("generation", "sightings"):
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PlanFormatError(f"malformed plan: {key} must be a non-negative integer (got {str(v)[:40]!r})")
        if not isinstance(d["candidates"], list):
            raise PlanFormatError("malformed plan: candidates must be a list")
        if d.get("error") is not None and not isinstance(d["error"], str):
            raise PlanFormatError("malformed plan: error must be a string or null")
        if not isinstance(d.get("more", False), bool):
            raise PlanFormatError("malformed plan: more must be true or false")
        return cls(
            candidates=tuple(Candidate.from_json(c) for c in d["candidates"]),
            rejected=pairs("rejected"),
            unreachable=pairs("unreachable"),
            warnings=strings("warnings"),
            generation=d["generation"],
            sightings=d["sightings"],
            demoted=strings("demoted"),
            error=d.get("error"),
            more=d.get("more", False),
        )


_PLAN_REQUIRED = ("candidates", "rejected", "unreachable", "warnings", "generation", "sightings")
_PLAN_KEYS = frozenset(_PLAN_REQUIRED + ("demoted", "error", "more"))


def resolve_stores(urls: Sequence[str], storage_options: dict | None) -> tuple[list[Store], list[tuple[str, str]]]:
    """Resolve every store URL on this rank; an insecure or broken one is reported, not fatal (F48)."""
    if not urls:
        raise ConfigError("stores is empty: give at least one store, e.g. stores=['checkpoints/']")
    stores.check_storage_options(storage_options, urls)
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


PAGE_STEPS = 8  # distinct steps whose manifests rank 0 reads before the first attempt
PAGE_FOREIGN = 16  # foreign files and directories rank 0 verifies per page


class PlanCursor:
    """Rank 0's plan, one page at a time: one listing per store, then manifests newest first.

    Discovery over 10,000 checkpoints must not read 10,000 manifests before the first
    attempt (DESIGN section 7): a page holds the newest ``page_steps`` steps (every replica
    of them, in every store) plus the next ``PAGE_FOREIGN`` foreign sightings, those with
    the newest step in their name first and those without one last (sniffing one costs
    milliseconds: 20,000 of them cost minutes before the first attempt, T04). Suspects under
    ``last_resort`` and crash-loop demotions are held back and come in a final page, so the
    policy holds across pages.
    """

    def __init__(
        self,
        store_list: Sequence[Store],
        request: PlanRequest,
        *,
        refused: Sequence[tuple[str, str]] = (),
        page_steps: int | None = PAGE_STEPS,
    ):
        """No I/O here: the stores are listed by the first :meth:`next_page`."""
        self.store_list, self.request, self.refused = list(store_list), request, tuple(refused)
        self.page_steps = page_steps
        self.found: Discovery | None = None
        self._native: list[Sighting] = []
        self._foreign: list[Sighting] = []
        self._pos = 0
        self._foreign_pos = 0
        self._held: list[Candidate] = []  # last_resort suspects and demoted candidates, for the final page
        self._final_sent = False
        self.max_generation, self._max_generation_from, self._capped = 0, "", False
        self.pages = 0
        self.all_candidates: list[Candidate] = []

    def _discover(self) -> Discovery:
        """One listing per store (on the first page): native sightings newest first, foreign ones by name."""
        found = discovery.discover(self.store_list, self.request.run)
        self._native = sorted(
            (s for s in found.sightings if s.kind == "native"),
            key=lambda s: (-(s.step if s.step is not None else -1), -(s.generation_hint or 0), s.store.index),
        )
        self._foreign = sorted(
            (s for s in found.sightings if s.kind != "native"),
            key=lambda s: (s.step is None, -(s.step or 0), s.store.index, s.rel),
        )
        for s in self._native:
            self._saw_generation(s.generation_hint or 0, s.store.uri(s.rel))
        self.found = found
        return found

    def _take(self) -> list[Sighting]:
        end = len(self._foreign) if self.page_steps is None else self._foreign_pos + PAGE_FOREIGN
        out = self._foreign[self._foreign_pos : end]
        self._foreign_pos += len(out)
        steps: set[int | None] = set()
        while self._pos < len(self._native):
            s = self._native[self._pos]
            if s.step not in steps and self.page_steps is not None and len(steps) >= self.page_steps:
                break
            steps.add(s.step)
            out.append(s)
            self._pos += 1
        return out

    def _saw_generation(self, generation: int, where: str) -> None:
        if generation > self.max_generation:
            self.max_generation, self._max_generation_from = generation, where

    @property
    def next_generation(self) -> int:
        """This incarnation's lineage: the newest seen + 1, capped at ``MAX_GENERATION`` so that one
        planted or foreign manifest never makes every later save fail (T03)."""
        return min(self.max_generation + 1, manifest.MAX_GENERATION)

    def _generation_warnings(self) -> list[str]:
        if self._capped or self.max_generation < manifest.MAX_GENERATION:
            return []
        self._capped = True
        msg = (
            f"generation_capped: {self._max_generation_from} carries generation {self.max_generation}; "
            f"this incarnation saves at the cap {manifest.MAX_GENERATION}"
        )
        log.warning("%s", msg)
        return [msg]

    @property
    def _listed_all(self) -> bool:
        return self._pos >= len(self._native) and self._foreign_pos >= len(self._foreign)

    @property
    def exhausted(self) -> bool:
        return self._listed_all and (self._final_sent or not self._held) and self.pages > 0

    def next_page(self) -> Plan:
        """The next page of the plan (rank 0 only); the first one lists every store."""
        first = self.pages == 0
        found = self._discover() if self.found is None else self.found
        sightings = self._take()
        self.pages += 1
        req = self.request
        checked = verify.verify_all(
            sightings,
            run=req.run,
            compat=req.compat,
            extra_safe_globals=list(req.extra_safe_globals),
            layout=req.layout,
        )
        self.all_candidates += checked.candidates
        self._saw_generation(
            checked.max_generation,
            next((c.path for c in checked.candidates if c.generation == checked.max_generation), "a manifest"),
        )
        ordered = order(checked.candidates, req.suspect)
        if req.suspect == "last_resort":
            self._held += [c for c in ordered if c.tier == "S"]
            ordered = [c for c in ordered if c.tier != "S"]
        warnings = list(checked.warnings) + _lineage_warnings(ordered) + self._generation_warnings()
        ordered, demoted = self._demote_crash_loops(ordered)
        if self._listed_all and self._held and not self._final_sent:
            # Last page of the listing: append what the policy holds back until the very end.
            ordered += self._held
            self._final_sent = True
        return Plan(
            candidates=tuple(ordered),
            rejected=tuple((c.path, "; ".join(c.reasons)) for c in checked.candidates if c.tier == "R"),
            unreachable=(tuple(found.unreachable) + self.refused) if first else (),
            warnings=tuple(warnings) + (found.notes if first else ()),
            generation=self.next_generation,
            sightings=len(found.sightings),
            demoted=tuple(demoted),
            more=not self.exhausted,
        )

    def _demote_crash_loops(self, ordered: list[Candidate]) -> tuple[list[Candidate], list[str]]:
        """Hold back, for the final page, every candidate whose attempts killed the job twice (DESIGN 5)."""
        if not (self.request.use_journal and self.store_list and ordered):
            return ordered, []
        keep: list[Candidate] = []
        demoted: list[str] = []
        for c in ordered:
            n = journal.unfinished(self.store_list[0], self.request.run, c)
            if n >= journal.UNFINISHED_LIMIT:
                why = f"crash_loop: {n} attempts never finished; demoted to the end"
                self._held.append(c.with_verdict(c.tier, why))
                demoted.append(c.path)
                log.warning("crash_loop_demoted %s: %d attempts killed the job; tried last", c.path, n)
            else:
                keep.append(c)
        return keep, demoted


def _lineage_warnings(ordered: Sequence[Candidate]) -> list[str]:
    out = []
    gens: dict[int, set[int]] = {}
    for c in ordered:
        if c.kind == "native":
            gens.setdefault(c.step, set()).add(c.generation)
    for step, g in sorted(gens.items(), reverse=True):
        if len(g) > 1:  # F36: two lineages committed the same step (a rollback, a zombie writer)
            msg = (
                f"lineage_fork step={step} generations={sorted(g, reverse=True)}: the newest lineage is tried "
                "first; all are kept"
            )
            log.warning("%s", msg)
            out.append(msg)
    return out


def make_plan(
    store_list: Sequence[Store],
    request: PlanRequest,
    *,
    refused: Sequence[tuple[str, str]] = (),
    include_rejected: bool = False,
) -> Plan:
    """The whole plan at once (every manifest read): what ``dist-guardian plan`` prints.

    Rank 0 only; never raises for a bad store or candidate. ``include_rejected`` fills
    ``listing`` with every candidate, R included (what ``dist-guardian ls`` shows).
    """
    cur = PlanCursor(store_list, request, refused=refused, page_steps=None)
    pages = [cur.next_page()]
    while not cur.exhausted:
        pages.append(cur.next_page())
    first = pages[0]
    return Plan(
        candidates=tuple(c for p in pages for c in p.candidates),
        rejected=tuple(r for p in pages for r in p.rejected),
        unreachable=first.unreachable,
        warnings=tuple(w for p in pages for w in p.warnings),
        generation=cur.next_generation,
        sightings=first.sightings,
        demoted=tuple(d for p in pages for d in p.demoted),
        listing=tuple(sorted(cur.all_candidates, key=lambda c: (-c.step, -c.generation, c.store_index, c.path)))
        if include_rejected
        else (),
    )
