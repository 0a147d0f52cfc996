"""The crash-loop journal: which candidates were attempted and never finished.

Before an attempt, rank 0 records it in ``<primary>/<run>/.journal/``; after the vote it
records the outcome. A candidate whose attempts never finished twice (the job died: OOM
kill, segfault, a hang killed by the agent) is demoted to the end of the plan on the next
launch, so ``torchrun --max-restarts`` cannot loop forever on it (DESIGN section 5).
The journal is advisory: failing to write it is logged, never fatal.

Belongs here: the entry's name (one per checkpoint, not per copy), its counters, and
:func:`record`/:func:`unfinished`. Bytes go through ``stores`` helpers; the two filesystem
helpers at the bottom have no ``stores`` counterpart yet and move there after the split.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat

import xxhash

from . import stores
from .candidate import Candidate
from .errors import InsecurePathError
from .stores import Store

log = logging.getLogger(__name__)

JOURNAL_DIR = ".journal"
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


def record(store: Store, run: str, c: Candidate, *, started: int = 0, finished: int = 0,
           outcome: str | None = None) -> None:
    """Add to a candidate's counters (rank 0 only). Atomic replace on local stores."""
    try:
        doc = read(store, run, c)
        doc["started"] += started
        doc["finished"] += finished
        doc["path"] = c.path
        doc["step"] = c.step
        if outcome:
            doc["last_outcome"] = outcome
        _write(store, run, _rel(run, c), json.dumps(doc).encode())
    except OSError as e:
        log.warning("could not write the resume journal in %s: %s", store.url, e)


def _write(store: Store, run: str, rel: str, data: bytes) -> None:
    """One entry, whole: an atomic replace on a local store, one PUT on a remote one."""
    if not store.is_local:
        put_small(store, f"journal {rel}", rel, data)
        return
    # A planted symlink (<run> or <run>/.journal -> elsewhere) must not make us create or write
    # anything outside the store: checked before the directories are made (which would follow it) and after.
    makedirs_no_symlink(store.root, f"{run}/{JOURNAL_DIR}", mode=0o700)
    stores.check_dirs_no_symlink(store.root, rel)
    stores.replace_file(store.join(rel), data)


# ----------------------------------------------------------------------------- for stores/ after the split


def makedirs_no_symlink(root: str, rel_dir: str, *, mode: int) -> None:
    """Create ``root/rel_dir`` (private ``mode``), refusing when an existing component is a symlink.

    ``os.makedirs`` follows a planted link: every existing component is checked before it runs.
    """
    cur = root
    for part in rel_dir.split("/"):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            break  # what is missing, makedirs creates as real directories
        if stat.S_ISLNK(st.st_mode):
            raise InsecurePathError("symlink", f"{cur} is a symlink; the journal is not written through it",
                                    errno=errno.ELOOP)
    os.makedirs(os.path.join(root, rel_dir), mode=mode, exist_ok=True)


def put_small(store: Store, what: str, rel: str, data: bytes) -> None:
    """Write a small object of a remote store in one request, under the store's deadline."""
    fs = stores.filesystem(store)
    stores.call(store, what, lambda: fs.pipe_file(store.join(rel), data))
