"""Retention: which old checkpoints of one store may go, and deleting them marker first.

What belongs here: the retention rules (F40-F42), the view of what a mirror holds, the
deletion of one checkpoint (commit marker first), and the cleanup of deletion leftovers
(local trash dirs, uncommitted object-store step dirs). Who runs retention and when (after a
commit, after a mirror landed) is ``mirror``; the CLI's ``prune`` calls :func:`retain` directly.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _faults, discovery, manifest, policy, stores, verify
from .config import MIN_KEEP_LAST
from .copying import CLAIMS_DIR, claim_rel, remove_stale
from .errors import ConfigError, StoreError
from .layout import JOURNAL_DIR, MANIFEST_NAME, STEP_DIR_RE, TRASH_PREFIX  # noqa: F401 (re-exported)
from .stores import Store

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RetentionGuards:
    """What a live writer knows that a listing does not, and what it must not delete.

    ``protected``: dir names with a mirror upload in flight (F42). ``quarantined``: paths that
    failed at resume (also read from the journal of ``journal_store``). ``verified``: (store url,
    rel, manifest digest) known to verify fully, so a local checkpoint is read once per process;
    retention adds what it verifies. ``on_unmirrored(candidate, missing stores)`` may queue the
    upload that retention is waiting for.
    """

    protected: set[str] | frozenset[str] = frozenset()
    quarantined: set[str] | frozenset[str] = frozenset()
    verified: set[tuple[str, str, str]] | None = None
    journal_store: Store | None = None
    on_unmirrored: Callable[[Any, list[Store]], None] | None = None


def retain(
    store: Store,
    run: str,
    keep_last: int,
    *,
    compat: dict[str, Any] | None = None,
    layout: dict[str, str] | None = None,
    mirrors: Sequence[Store] = (),
    dry_run: bool = False,
    guards: RetentionGuards | None = None,
) -> list[str]:
    """Delete old verified checkpoints beyond ``keep_last`` in one store. Returns what was deleted.

    The rules (F40-F42):

    - Counts and deletes within one group of checkpoints only: the same compat fingerprint
      and the same layout fingerprint (another job's, or another model's, checkpoints in the
      run dir never push out ours). With ``compat`` (and ``layout``, the job's own: what it
      just saved) only that group is touched; without, every group is pruned on its own.
    - Counts only committed and verified checkpoints, newest first. On a local store a
      counted checkpoint is verified fully (every checksum) once per process
      (``guards.verified`` caches it; the caller adds what it just wrote); a remote one by its
      manifest and listed sizes. One that fails is kept and not counted.
    - Always keeps the newest verified of each group (``keep_last`` below 2 is raised to 2).
    - Never deletes what is not verified (L, S and R are kept), anything protected or
      quarantined (:class:`RetentionGuards`), or a checkpoint that one of ``mirrors`` does not
      hold yet while that mirror would keep it, i.e. holds fewer than ``keep_last`` newer copies
      of its group (``retention_blocked_unmirrored``). A mirror that cannot be listed holds
      nothing, as far as we know.
    - Never touches a store it could not list fully.
    - Deletes the commit marker first: locally the directory is renamed to a trash name
      (atomic), remotely the claim and then the manifest go first; a half-deleted
      checkpoint never looks committed, and its leftovers are removed next time (F41).
    """
    if keep_last < 1:
        raise ConfigError("keep_last must be at least 1")
    if keep_last < MIN_KEEP_LAST:
        log.warning(
            "keep_last=%d raised to %d: the newest checkpoint alone could be the bad one (F40)",
            keep_last,
            MIN_KEEP_LAST,
        )
        keep_last = MIN_KEEP_LAST
    guards = guards or RetentionGuards()
    listed = _list_verified(store, run)
    if listed is None:
        return []
    sightings, checked = listed
    bad = set(guards.quarantined) | _journal_quarantined(guards.journal_store, run, checked)
    groups = _groups(checked, compat, layout)
    doomed = _beyond_keep_last(store, groups, keep_last, bad, guards.verified)
    deleted = _delete_unless_unmirrored(store, run, doomed, keep_last, mirrors, guards, dry_run)
    if not dry_run:
        if store.is_local:
            _clean_trash(store, run)
        else:
            clean_orphans(store, run, sightings)
    return deleted


def _list_verified(store: Store, run: str) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """(sightings, verified candidates) of the run's native checkpoints, or None when the store was not read fully."""
    try:
        sightings = discovery.discover_store(store, run)
        ours = [s for s in sightings if s.kind == "native" and s.rel.startswith(run + "/")]
        checked = verify.verify_all(ours, run=run, compat=None).candidates
    except (OSError, StoreError) as e:
        log.warning("retention skipped for %s: could not list it fully (%s)", store.url, e)
        return None
    unreadable = [c for c in checked if c.tier == "R" and policy.store_was_down(c.reasons)]
    if unreadable:
        log.warning(
            "retention skipped for %s: could not read %s (%s)",
            store.url,
            unreadable[0].path,
            "; ".join(unreadable[0].reasons),
        )
        return None
    return sightings, checked


def _groups(
    checked: Sequence[Any], compat: dict[str, Any] | None, layout: dict[str, str] | None
) -> dict[tuple[str | None, str | None], list[Any]]:
    """Tier V checkpoints by (compat, layout) fingerprint, newest first; only the wanted group when given."""
    want = (
        None if compat is None else manifest.compat_fingerprint(compat),
        None if layout is None else manifest.layout_fingerprint(layout),
    )
    groups: dict[tuple[str | None, str | None], list[Any]] = {}
    for c in sorted((c for c in checked if c.tier == "V"), key=lambda c: (c.step, c.generation), reverse=True):
        key = (c.compat_fingerprint, c.layout_fingerprint)
        if all(w is None or w == k for w, k in zip(want, key, strict=True)):
            groups.setdefault(key, []).append(c)
    return groups


def _beyond_keep_last(
    store: Store,
    groups: dict[Any, list[Any]],
    keep_last: int,
    bad: set[str],
    verified: set[tuple[str, str, str]] | None,
) -> list[tuple[Any, list[Any]]]:
    """(candidate, its group) for each checkpoint past the newest ``keep_last`` verified ones of its group."""
    doomed: list[tuple[Any, list[Any]]] = []
    for members in groups.values():
        counted = 0
        for c in members:
            if c.path in bad:
                continue  # quarantine: neither counted nor deleted
            if counted >= keep_last:
                doomed.append((c, members))
                continue
            vkey = (store.url, c.rel, c.manifest_digest or "")
            if store.is_local and (verified is None or vkey not in verified):
                tier, reasons = verify.verify_full(store, c.rel)
                if tier != "V":
                    log.warning(
                        "retention_not_counted %s: tier %s (%s); kept, and not counted as verified",
                        c.path,
                        tier,
                        "; ".join(reasons),
                    )
                    continue
                if verified is not None:
                    verified.add(vkey)
            counted += 1
    return doomed


def _delete_unless_unmirrored(
    store: Store,
    run: str,
    doomed: list[tuple[Any, list[Any]]],
    keep_last: int,
    mirrors: Sequence[Store],
    guards: RetentionGuards,
    dry_run: bool,
) -> list[str]:
    deleted: list[str] = []
    views: dict[str, dict[str, Any] | None] = {}
    for c, members in doomed:
        name = c.rel.split("/", 1)[1]
        if name in guards.protected:
            log.warning("retention_blocked_unmirrored: keeping %s until its mirror upload is committed", c.path)
            continue
        missing = []
        for m in mirrors:
            if m.url not in views:
                views[m.url] = mirror_view(m, run)
            if not held_or_not_needed(c, views[m.url], keep_last, members):
                missing.append(m)
        if missing:
            log.warning(
                "retention_blocked_unmirrored: keeping %s: not committed in %s yet",
                c.path,
                ", ".join(m.url for m in missing),
            )
            if guards.on_unmirrored is not None:
                guards.on_unmirrored(c, missing)
            continue
        if dry_run:
            deleted.append(c.path)
            continue
        try:
            _delete_checkpoint(store, run, name)
            deleted.append(c.path)
            log.info("retention deleted %s (keep_last=%d)", c.path, keep_last)
        except OSError as e:
            log.warning("retention could not delete %s: %s", c.path, e)
    return deleted


def _journal_quarantined(journal_store: Store | None, run: str, checked: Sequence[Any]) -> set[str]:
    """Paths whose last resume attempt failed or was found suspect (the journal remembers it across restarts)."""
    if journal_store is None:
        return set()
    from . import journal

    try:
        names = {e.rel for e in stores.list_tree(journal_store, f"{run}/{JOURNAL_DIR}", max_depth=1)}
    except (OSError, StoreError):
        return set()
    out = set()
    for c in checked:
        rel = journal._rel(run, c)
        if rel.rsplit("/", 1)[-1] in names and journal.read(journal_store, run, c).get("last_outcome") in (
            "failed",
            "deferred",
        ):
            out.add(c.path)
    return out


def mirror_view(m: Store, run: str) -> dict[str, Any] | None:
    """What a mirror holds: {dir name: {file: size}} for committed dirs, or None when it cannot be listed."""
    try:
        entries = stores.list_tree(m, run, max_depth=2)
    except (OSError, StoreError) as e:
        log.warning("retention: cannot list mirror %s (%s); its copies count as missing", m.url, e)
        return None
    dirs: dict[str, dict[str, int]] = {}
    for entry in entries:
        head, sep, tail = entry.rel.partition("/")
        if sep and entry.kind == "file" and STEP_DIR_RE.match(head):
            dirs.setdefault(head, {})[tail] = entry.size
    return {d: files for d, files in dirs.items() if MANIFEST_NAME in files}


def held_or_not_needed(c: Any, view: dict[str, Any] | None, keep_last: int, group: Sequence[Any]) -> bool:
    """Whether the mirror ``view`` holds ``c``, or holds ``keep_last`` newer copies of ``group`` (the checkpoints
    of ``c``'s store with its compat and layout): then its own retention would not keep ``c`` either."""
    if view is None:
        return False
    if _holds(view, c):
        return True
    return sum(1 for p in group if p.step > c.step and _holds(view, p)) >= keep_last


def _holds(view: dict[str, Any], c: Any) -> bool:
    files = view.get(c.rel.split("/", 1)[1])
    return files is not None and all(files.get(f.name) == f.size for f in c.files)


def _delete_checkpoint(store: Store, run: str, name: str) -> None:
    if store.is_local:
        src = store.join(run, name)
        trash = store.join(run, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        stores.rename_no_replace(src, trash)
        stores.fsync_dir(store.join(run))
        _faults.hit("mid_retention")
        stores.remove_tree_local(trash)
        return
    rel = f"{run}/{name}"
    stores.delete(store, claim_rel(run, name))
    stores.delete(store, f"{rel}/{MANIFEST_NAME}")  # from here on it is not a candidate
    _faults.hit("mid_retention")
    stores.delete_tree(store, rel)


def clean_orphans(store: Store, run: str, sightings: Sequence[Any] | None = None) -> list[str]:
    """Remove uncommitted step dirs of an object store that nobody is writing (F41 leftovers, dead writers).

    A step dir without a manifest is never a candidate there. It is removed when it has no
    claim (a writer always claims before uploading: these are a deletion's leftovers) or
    when its claim is older than ``stale_s``. Local stores keep such dirs (they are legacy
    candidates, F08); their own leftovers are trash and staging dirs.
    """
    if store.is_local:
        return []
    if sightings is None:
        try:
            sightings = discovery.discover_store(store, run)
        except (OSError, StoreError):
            return []
    orphans = [
        s for s in sightings if s.kind == "native" and s.rel.startswith(run + "/") and s.child(MANIFEST_NAME) is None
    ]
    if not orphans:
        return []
    try:
        claims = {e.rel: e for e in stores.list_tree(store, f"{run}/{CLAIMS_DIR}", max_depth=1)}
    except (OSError, StoreError):
        return []
    removed = []
    now = time.time()
    for s in orphans:
        name = s.rel.split("/", 1)[1]
        claim = claims.get(f"{name}.json")
        if claim is not None and (claim.mtime is None or now - claim.mtime < store.stale_s):
            continue  # a writer is uploading it
        try:
            remove_stale(store, run, name, "uncommitted leftovers (no manifest)" if claim is None else "stale claim")
            removed.append(s.store.uri(s.rel))
        except (OSError, StoreError) as e:
            log.warning("could not remove leftovers %s: %s", s.store.uri(s.rel), e)
    return removed


def _clean_trash(store: Store, run: str) -> None:
    try:
        names = stores.list_names(store.join(run))
    except OSError:
        return
    for n in names:
        if n.startswith(TRASH_PREFIX):
            try:
                stores.remove_tree_local(store.join(run, n))
            except OSError as e:
                log.warning("could not clean %s: %s", n, e)
