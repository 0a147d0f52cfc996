"""The crash-loop journal: which candidates were attempted and never finished.

Before an attempt, rank 0 records it in ``<primary>/<run>/.journal/``; after the vote it
records the outcome. A candidate whose attempts never finished twice (the job died: OOM
kill, segfault, a hang killed by the agent) is demoted to the end of the plan on the next
launch, so ``torchrun --max-restarts`` cannot loop forever on it (DESIGN section 5).
The journal is advisory: failing to write it is logged, never fatal.

Belongs here: the entry's name (one per checkpoint, not per copy), its counters, and
:func:`record`/:func:`unfinished`. Bytes go through ``stores`` (``read_small``, ``write_small``).
"""

from __future__ import annotations

import json
import logging

import xxhash

from . import stores
from .candidate import Candidate
from .layout import JOURNAL_DIR  # noqa: F401 (re-exported)
from .stores import Store

log = logging.getLogger(__name__)

UNFINISHED_LIMIT = 2
MAX_ENTRY_BYTES = 64 * 1024


def _key(c: Candidate) -> str:
    # One entry per checkpoint, not per copy: what kills a loader (its size, a poisoned
    # tensor) kills it from every store, so every replica is demoted together (F23: "B").
    return xxhash.xxh3_64_hexdigest(f"{c.step}|{c.generation}|{c.replica_key or c.store + '|' + c.rel}".encode())


def _rel(run: str, c: Candidate) -> str:
    return f"{run}/{JOURNAL_DIR}/{_key(c)}.json"


def read(store: Store, run: str, c: Candidate) -> dict:
    try:
        doc = json.loads(stores.read_small(store, _rel(run, c), MAX_ENTRY_BYTES))
        if isinstance(doc, dict) and isinstance(doc.get("started"), int) and isinstance(doc.get("finished"), int):
            return doc
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("journal entry for %s unreadable: %s", c.path, e)
    return {"started": 0, "finished": 0}


def unfinished(store: Store, run: str, c: Candidate) -> int:
    doc = read(store, run, c)
    return max(0, doc["started"] - doc["finished"])


def record(
    store: Store, run: str, c: Candidate, *, started: int = 0, finished: int = 0, outcome: str | None = None
) -> None:
    """Add to a candidate's counters (rank 0 only): the entry is replaced whole (atomically on local stores)."""
    try:
        doc = read(store, run, c)
        doc["started"] += started
        doc["finished"] += finished
        doc["path"] = c.path
        doc["step"] = c.step
        if outcome:
            doc["last_outcome"] = outcome
        # A planted symlink (<run> or <run>/.journal -> elsewhere) is refused before anything is created
        # or written through it (stores.write_small); a remote store gets one PUT.
        stores.write_small(store, _rel(run, c), json.dumps(doc).encode(), what=f"journal {_rel(run, c)}")
    except OSError as e:
        log.warning("could not write the resume journal in %s: %s", store.url, e)
