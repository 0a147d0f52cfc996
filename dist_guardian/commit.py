"""One checkpoint on one store: files written into staging, and the commit rule.

What belongs here: writing one native file into a staging dir (fsynced, exclusive), the
result values of a save, the local commit (rename of the fsynced staging dir) and the one
lineage rule that both the local and the remote commit follow. Nothing here is collective
and nothing imports torch; the collective protocol that calls it is in ``save``, the
object-store upload in ``copying``.

A checkpoint becomes visible only at its commit point: the rename of a fully fsynced
staging dir on a local store, the manifest PUT on an object store. Everything before that
point can die (SIGKILL, ENOSPC, EIO) without a reader ever seeing a partial checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _faults, formats, manifest, stores
from .errors import CommitConflict
from .layout import MANIFEST_NAME, new_staging_name, step_dir_name
from .manifest import FileEntry
from .stores import Store
from .tables import TensorTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveResult:
    """What ``Guardian.save`` returns, identical on every rank: committed where, or why not (``reason``)."""

    committed: bool
    step: int
    path: str | None = None
    seconds: float = 0.0
    bytes_written: int = 0
    reason: str | None = None


@dataclass
class WrittenEntry:
    """One written file as its manifest will list it; crosses ranks as JSON (``to_json``/``from_json``)."""

    entry: FileEntry
    stats: TensorTable  # per-tensor digests and stats, and the region digests, in columns
    trees: dict[str, str] = field(default_factory=dict)  # top-level key of the state tree -> digest

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.entry.name,
            "size": self.entry.size,
            "digest": self.entry.digest,
            "rank": self.entry.rank,
            "table": self.stats.to_json(),
            "trees": self.trees,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WrittenEntry:
        return cls(
            entry=FileEntry(name=d["name"], size=d["size"], digest=d["digest"], rank=d["rank"]),
            stats=TensorTable.of_own_json(d["table"]),
            trees=d["trees"],
        )


def write_file(
    path: str,
    tree_json: str,
    specs: Sequence[formats.TensorSpec],
    stats_fn: Callable[[formats.TensorSpec], tuple[float | None, bool]] | None,
    *,
    rank: int,
    step: int,
    file_rank: int | None,
    trees: dict[str, str] | None = None,
) -> WrittenEntry:
    """Write one native file exclusively (0600), fsync it, and return its manifest entry.

    ``stats_fn(spec) -> (max_abs, finite)`` runs in the write pipeline, overlapped with I/O;
    ``trees`` (:func:`formats.tree_key_digests` of the tree) goes into the manifest as it is.
    """
    _faults.hit("before_data_write", rank=rank, step=step)
    fd = stores.create_exclusive(path)
    try:
        written = formats.write_native(
            fd, tree_json, specs, hook=lambda p: _faults.hit(p, rank=rank, step=step), stats_fn=stats_fn
        )
        os.fsync(fd)  # fsyncgate: an EIO here abandons the save; the same file is never fsynced again
    finally:
        os.close(fd)
    _faults.hit("after_data_fsync", rank=rank, step=step)
    entry = FileEntry(name=os.path.basename(path), size=written.size, digest=written.digest, rank=file_rank)
    return WrittenEntry(entry=entry, stats=written.table, trees=dict(trees or {}))


def save_errno_reason(e: BaseException, where: str) -> str:
    """``save_failed errno=ENOSPC ...``: the errno named, reconstructed from free space when it was lost."""
    code = getattr(e, "errno", None)
    if code is None and not isinstance(e, OSError):
        try:
            if shutil.disk_usage(where).free < 1 << 20:
                code = errno.ENOSPC
        except OSError:
            pass
    name = errno.errorcode.get(code, str(code)) if code else type(e).__name__
    return f"save_failed errno={name}: {type(e).__name__}: {e}"


def writer_info() -> dict[str, Any]:
    """Who wrote a manifest or holds a claim: host and pid tell a dead writer of this host (``copying``)."""
    from . import __version__

    return {"host": socket.gethostname(), "pid": os.getpid(), "dist_guardian": __version__}


def open_staging(primary: Store, run: str, step: int) -> str:
    """A new staging dir for ``step``: in the run dir of a local primary, node-local for a remote one.

    A remote primary's checkpoint is finished in local staging, then uploaded (``copying.commit_remote``).
    """
    if primary.is_local:
        stores.make_run_dir(primary, run)
        stores.clean_stale_staging(primary, run)
        path = primary.join(run, new_staging_name(step))
    else:
        path = os.path.join(stores.node_local_base(), new_staging_name(step))
    stores.mkdir_private(path)
    return path


def discard_staging(path: str) -> None:
    try:
        stores.remove_tree_local(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove staging dir %s: %s", path, e)


def committed_generation(store: Store, rel: str) -> int | None:
    """The generation of the checkpoint committed at ``rel``, or None when its manifest cannot be read."""
    try:
        return manifest.parse(
            stores.read_small(store, f"{rel}/{MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES)
        ).generation
    except (OSError, manifest.ManifestError):
        return None


def commit_lineage(store: Store, run: str, step: int, generation: int, place: Callable[[str], str]) -> str:
    """The one commit rule, local and remote alike: ``step-N``, else ``step-N-gG`` beside another lineage.

    ``place(dirname)`` commits under that name and returns the location, or raises
    ``FileExistsError`` when the name is taken. A name held by another generation is kept,
    and ours goes beside it as ``step-N-gG`` (``lineage_fork``, F36). A name held by the same
    generation, or by a checkpoint whose manifest cannot be read, is a :class:`CommitConflict`:
    another writer of this lineage committed the step first (F38).
    """
    for name in (step_dir_name(step), step_dir_name(step, generation)):
        try:
            return place(name)
        except FileExistsError:
            other = committed_generation(store, f"{run}/{name}")
            where = store.uri(run, name)
            if other == generation or other is None:
                raise CommitConflict(
                    "commit_conflict", f"{where} was committed by another writer; ours is discarded"
                ) from None
            log.warning(
                "lineage_fork step=%d: %s holds generation %s; committing generation %d beside it",
                step,
                where,
                other,
                generation,
            )
    raise CommitConflict("commit_conflict", f"step {step} generation {generation} already committed in {store.url}")


def commit_local(
    store: Store, run: str, staging: str, step: int, generation: int, manifest_bytes: bytes, *, rank: int = 0
) -> str:
    """Write the manifest into the fsynced staging dir and rename it to its final name (the commit point).

    The final name follows :func:`commit_lineage`.
    """
    _faults.hit("before_manifest", rank=rank, step=step)
    stores.write_new_file(os.path.join(staging, MANIFEST_NAME), manifest_bytes)
    stores.fsync_dir(staging)
    _faults.hit("after_manifest_before_rename", rank=rank, step=step)

    def rename_into(name: str) -> str:
        final = store.join(run, name)
        stores.rename_no_replace(staging, final)  # FileExistsError: committed by another writer (F38)
        _faults.hit("after_rename_before_dirsync", rank=rank, step=step)
        stores.fsync_dir(os.path.dirname(final))
        return final

    return commit_lineage(store, run, step, generation, rename_into)


@dataclass(frozen=True, slots=True, kw_only=True)
class Committed:
    """What rank 0 knows after a commit, for the housekeeping that follows it (``mirror.Upkeep``).

    ``staging`` is the local dir that still holds the files when the primary is remote
    (mirrors copy from it, then remove it); ``manifest_digest`` marks the copy as known good.
    """

    path: str
    staging: str
    step: int
    dirname: str
    manifest_digest: str
    layout: dict[str, str]
