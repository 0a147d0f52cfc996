"""Publishing to and deleting from a store: uploads of finished files, the exclusive commit object, deletes.

Belongs here: :func:`put_file` (never streamed from a writer: a failed stream could publish
a partial object), :func:`put_bytes_exclusive` (the commit point, F38), :func:`delete` and
:func:`delete_tree`, and the upload part size. Local stores go to :mod:`.local`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from . import local, s3
from .base import Store, is_loopback
from .deadline import acall, call, filesystem, run
from .progress import Transfer
from .remote import list_tree

log = logging.getLogger(__name__)


class _UploadCallback:
    """An fsspec callback that feeds the stall deadline, the progress line and a per-part hook."""

    def __init__(self, transfer: Transfer, on_part: Callable[[int, int], None] | None):
        self.transfer = transfer
        self.on_part = on_part
        self.parts = 0
        self.size = 0

    def set_size(self, size: int) -> None:
        self.size = size

    def absolute_update(self, value: int) -> None:
        self.relative_update(max(0, value - self.transfer.done))

    def relative_update(self, inc: int = 1) -> None:
        self.parts += 1
        self.transfer.add(inc)
        if self.on_part is not None:
            self.on_part(self.parts, self.transfer.done)

    def branched(self, *a: Any, **k: Any) -> None:
        return None

    def call(self, *a: Any, **k: Any) -> None:
        return None


LOOPBACK_UPLOAD_PART = 256 << 20


def upload_part_size(store: Store) -> int | None:
    """The multipart part size of uploads: the store's ``upload_part_size``; else, for a loopback
    endpoint, 256 MiB (files under 512 MiB go up in one PUT: a server that assembles parts in
    Python, like moto, takes 2.5x longer for a multipart upload, research/performance.md); else
    s3fs's default (50 MiB parts, 10 at a time), which real S3 serves in parallel."""
    if store.upload_part_size:
        return store.upload_part_size
    return LOOPBACK_UPLOAD_PART if store.is_s3 and is_loopback(store) else None


def put_file(
    store: Store,
    local_path: str,
    rel: str,
    *,
    transfer: Transfer | None = None,
    on_part: Callable[[int, int], None] | None = None,
) -> None:
    """Upload a finished local file to its final key (never streamed: a failed stream could publish a partial object).

    Large files go up as a multipart upload (``upload_part_size``, ``upload_concurrency``),
    which S3 publishes only when it completes; s3fs aborts it when a part fails, and a
    process killed mid-way leaves it for :func:`abort_stale_uploads`. ``on_part(parts,
    bytes)`` runs after each part (tests stop a process there). The deadline counts from
    the last part acknowledged, so a big upload is not cut while it moves.
    """
    fd = local.open_regular(local_path)  # refuses a symlink or FIFO before fsspec opens the path by name
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    transfer = transfer if transfer is not None else Transfer(size, f"upload {store.uri(rel)}", show=False)
    if store.is_local:
        raise ConfigError(f"put_file is for remote stores; {store.url} commits through a staging dir")
    fs = filesystem(store)
    path = store.join(rel)
    cb = _UploadCallback(transfer, on_part)
    kw: dict[str, Any] = {}
    part_size = upload_part_size(store)
    if store.is_s3:
        if part_size:
            kw["chunksize"] = part_size
        if store.upload_concurrency:
            kw["max_concurrency"] = store.upload_concurrency
    part = min(size, part_size or (50 << 20))
    # One request may carry a whole part before anything is acknowledged: allow it a floor of 4 MB/s.
    limit = store.deadline_s + part / 4e6

    what = f"upload {store.uri(rel)}"
    if store.is_s3 and size < min(5 << 30, 2 * (part_size or (50 << 20))) and s3.direct_ok(store, fs):
        try:
            s3.direct_put(store, fs, path, local_path, size, transfer, what)
            cb.relative_update(0)
            return
        except s3.NoDirect as e:
            log.debug("direct PUT of %s not used (%s): uploading through s3fs", store.uri(rel), e)

    async def a() -> None:
        await fs._put_file(local_path, path, callback=cb, **kw)

    def s() -> None:
        fs.put_file(local_path, path, callback=cb, **kw)

    run(store, what, s, a, deadline_s=limit, transfer=transfer)


def put_bytes_exclusive(store: Store, rel: str, data: bytes) -> None:
    """Write a small object only if it does not exist: ``FileExistsError`` otherwise (the commit point, F38).

    S3: a conditional PUT (``If-None-Match: *``, s3fs ``mode="create"``): of two writers,
    exactly one gets 200 and the other 412. Local: ``O_EXCL`` + fsync of the file and its
    directory. Other fsspec backends: an existence check first (best effort, not atomic).
    """
    if store.is_local:
        local.put_bytes_exclusive_local(store, rel, data)
        return
    fs = filesystem(store)
    path = store.join(rel)
    what = f"commit {store.uri(rel)}"
    if store.is_s3:
        acall(store, what, lambda: fs._pipe_file(path, data, mode="create"))
        return

    def check_then_put() -> None:
        if fs.exists(path):
            raise FileExistsError(errno.EEXIST, f"{store.uri(rel)} already exists")
        fs.pipe_file(path, data)

    call(store, what, check_then_put)


def delete(store: Store, rel: str) -> None:
    """Delete one file or object. Idempotent: a missing one is not an error (S3 answers 204 either way)."""
    if store.is_local:
        local.delete_local(store, rel)
        return
    fs = filesystem(store)
    path = store.join(rel)
    try:
        run(store, f"delete {store.uri(rel)}", lambda: fs.rm_file(path), lambda: fs._rm_file(path))
    except FileNotFoundError:
        pass


def delete_tree(store: Store, rel: str) -> int:
    """Delete everything under ``rel`` (one listing, then batched deletes). Returns how many objects went."""
    if store.is_local:
        return local.delete_tree_local(store, rel)
    entries = [e for e in list_tree(store, rel, max_depth=64) if e.kind == "file"]
    if not entries:
        return 0
    fs = filesystem(store)
    paths = [store.join(rel, e.rel) for e in entries]
    what = f"delete {store.uri(rel)}"
    if store.is_s3:

        async def a() -> None:
            for i in range(0, len(paths), 1000):
                await fs._bulk_delete(paths[i : i + 1000])

        acall(store, what, a)
    else:
        call(store, what, lambda: [fs.rm_file(p) for p in paths])
    return len(paths)
