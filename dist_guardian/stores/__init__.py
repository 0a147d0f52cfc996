"""The storage edge: resolve store URLs, list, read, publish atomically, delete.

Locations are ``str`` end to end. Local stores (a path, ``file://``, ``tmp://NAME``) use
``os`` directly (:mod:`.local`); every other URL goes through fsspec, under a deadline we
own (:mod:`.deadline`), with errors translated to builtin ``OSError`` subclasses
(:mod:`.errors`) and S3 fast paths (:mod:`.s3`). The modules, bottom up:

- :mod:`.base`: the :class:`Store` value, resolving URLs and options, on-disk names
- :mod:`.errors`: client errors as ``OSError`` subclasses, the memo of refused credentials
- :mod:`.progress`: :class:`Transfer`, the clock of the stall deadline and the progress line
- :mod:`.deadline`: bounded calls, the fsspec instance cache, the I/O thread pool
- :mod:`.local`: safe opens, local listing and reads, the rename commit, run-dir checks
- :mod:`.s3`: paginated listing, GETs into buffers, presigned direct GET/PUT, multipart cleanup
- :mod:`.remote`: listing, stat and reads of any store
- :mod:`.reader`: :class:`RemoteReader`, one sequential stream
- :mod:`.publish`: uploads, the exclusive commit object, deletes
- :mod:`.ops`: operations that dispatch by store kind themselves (small writes, presence checks)

This package re-exports what the rest of ``dist_guardian`` uses, so ``stores.X`` reads the
same everywhere. Patch a name in the module that looks it up (``stores.local.open_regular``),
not here.
"""

from __future__ import annotations

from ..errors import StoreUnavailable
from .base import (
    NAME_RE,
    NODE_LOCAL_ENV,
    STAGING_PREFIX,
    STAGING_RE,
    STEP_DIR_RE,
    Entry,
    Store,
    check_storage_options,
    check_url,
    is_loopback,
    new_staging_name,
    node_local_base,
    resolve,
    step_dir_name,
)
from .deadline import call, filesystem
from .local import (
    check_dirs_no_symlink,
    clean_stale_staging,
    create_exclusive,
    dir_size,
    fsync_dir,
    is_dir,
    lexists,
    list_names,
    make_run_dir,
    makedirs_local,
    makedirs_private,
    mkdir_private,
    open_reader,
    open_regular,
    owner_uid,
    remove_tree_local,
    rename_commit,
    rename_no_replace,
    replace_file,
    write_new_file,
)
from .ops import WantedFile, missing_files, read_whole, write_small
from .progress import PROGRESS_ENV, Transfer
from .publish import delete, delete_tree, put_bytes_exclusive, put_file
from .reader import RemoteReader
from .remote import (
    LOOPBACK_CONCURRENCY,
    REMOTE_CONCURRENCY,
    list_tree,
    read_concurrency,
    read_range_into,
    read_small,
    remote_size,
    stat_object,
    tune_read_concurrency,
)
from .s3 import abort_stale_uploads

__all__ = [
    "Entry",
    "LOOPBACK_CONCURRENCY",
    "NAME_RE",
    "NODE_LOCAL_ENV",
    "PROGRESS_ENV",
    "REMOTE_CONCURRENCY",
    "RemoteReader",
    "STAGING_PREFIX",
    "STAGING_RE",
    "STEP_DIR_RE",
    "Store",
    "StoreUnavailable",
    "Transfer",
    "WantedFile",
    "abort_stale_uploads",
    "call",
    "check_dirs_no_symlink",
    "check_storage_options",
    "check_url",
    "clean_stale_staging",
    "create_exclusive",
    "delete",
    "delete_tree",
    "dir_size",
    "filesystem",
    "fsync_dir",
    "is_dir",
    "is_loopback",
    "lexists",
    "list_names",
    "list_tree",
    "make_run_dir",
    "makedirs_local",
    "makedirs_private",
    "missing_files",
    "mkdir_private",
    "new_staging_name",
    "node_local_base",
    "open_reader",
    "open_regular",
    "owner_uid",
    "put_bytes_exclusive",
    "put_file",
    "read_concurrency",
    "read_range_into",
    "read_small",
    "read_whole",
    "remote_size",
    "remove_tree_local",
    "rename_commit",
    "rename_no_replace",
    "replace_file",
    "resolve",
    "stat_object",
    "step_dir_name",
    "tune_read_concurrency",
    "write_new_file",
    "write_small",
]
