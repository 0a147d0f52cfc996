"""Store operations that pick the local or the remote way themselves: callers name a store and a path.

Belongs here: an operation whose meaning is the same on every kind of store, with one local
and one remote implementation (writing a small object whole, reading a file whole, checking
that a checkpoint's files are present with their sizes), so no module outside ``stores`` branches on
``store.is_local`` to do it. Where the rule itself differs by kind (the rename commit against
the exclusive manifest PUT), the caller keeps its branch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from . import local, remote  # looked up at call time, so a test's patch of ``stores.local.X`` is seen
from .base import Store
from .deadline import call, filesystem

# One wanted file of a checkpoint: its name inside the checkpoint ("" for a single-file one) and size (0: any).
WantedFile = tuple[str, int]


def write_small(store: Store, rel: str, data: bytes, *, what: str) -> None:
    """Write one small object whole: an atomic replace on a local store, one PUT on a remote one.

    Locally the parent directories are created private, and a planted symlink among them
    (``<run> -> elsewhere``) is refused before anything is created or written through it.
    """
    if not store.is_local:
        fs = filesystem(store)
        call(store, what, lambda: fs.pipe_file(store.join(rel), data))
        return
    parent = rel.rpartition("/")[0]
    if parent:
        local.makedirs_private(store.root, parent, mode=0o700)
    local.check_dirs_no_symlink(store.root, rel)
    local.replace_file(store.join(rel), data)


def read_whole(store: Store, rel: str) -> bytes:
    """One file whole, of any size (a foreign ``torch.save`` file): the safe open locally (no symlink
    among its directories or as the file, F45), a HEAD then ranged reads remotely."""
    if store.is_local:
        local.check_dirs_no_symlink(store.root, rel)
        with os.fdopen(local.open_regular(store.join(rel)), "rb") as f:
            return f.read()
    buf = bytearray(remote.remote_size(store, rel))
    remote.read_range_into(store, rel, 0, memoryview(buf))
    return bytes(buf)


def missing_files(
    store: Store, rel: str, wanted: Sequence[WantedFile], *, is_dir: bool, listings: dict[int, Any]
) -> str | None:
    """Why ``wanted`` files of the checkpoint at ``rel`` cannot be read from here (None when they can).

    Local: each file is there, regular (not a link, F45) and of its size. Remote: one listing
    of the run per store, kept in ``listings`` (keyed by store index) across the candidates
    of one availability vote.
    """
    if store.is_local:
        return _missing_local(store, rel, wanted, is_dir=is_dir)
    if store.index not in listings:
        run_prefix = rel.split("/", 1)[0]
        try:
            listings[store.index] = {e.rel: e for e in remote.list_tree(store, run_prefix, max_depth=2)}
        except (OSError, StoreError) as e:
            listings[store.index] = str(e)
    listing = listings[store.index]
    if isinstance(listing, str):
        return f"store unreachable from this rank: {listing}"
    sub = rel.split("/", 1)[1] if "/" in rel else ""
    for name, size in wanted:
        entry = listing.get(f"{sub}/{name}" if name else sub)
        if entry is None:
            return f"missing: {store.uri(rel, name) if name else store.uri(rel)}"
        if size and entry.size != size:
            return f"size_mismatch: {name} expected={size} got={entry.size}"
    return None


def _missing_local(store: Store, rel: str, wanted: Sequence[WantedFile], *, is_dir: bool) -> str | None:
    for name, size in wanted:
        path = store.join(rel, name) if name else store.join(rel)
        try:
            st = local.lstat_local(path)
        except FileNotFoundError:
            return f"missing: {path}"
        except OSError as e:
            return f"unreadable: {path}: {e}"
        if not stat.S_ISREG(st.st_mode):
            return f"not_regular: {path}"
        if size and st.st_size != size:
            return f"size_mismatch: {path} expected={size} got={st.st_size}"
    if is_dir and not os.path.isdir(store.join(rel)):
        return f"missing: {store.join(rel)}"
    return None
