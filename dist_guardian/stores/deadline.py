"""Bounded calls to remote stores: every fsspec call runs under a deadline we own.

Belongs here: the fsspec filesystem cache (one instance per endpoint and credentials, never
fsspec's own instance cache), the thread pool that runs blocking calls, their reset in a
forked child, and :func:`call` / :func:`acall` / :func:`run`, which bound one operation and
translate its errors (:mod:`.errors`). A frozen endpoint costs seconds, not the minutes of
the client's defaults; the deadline counts from the last byte a :class:`Transfer` moved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import ConfigError
from .base import Store
from .errors import check_auth_memo, timed_out, translate
from .progress import Transfer

T = TypeVar("T")

_fs_lock = threading.Lock()
_fs_cache: dict[tuple, Any] = {}
_pool = cf.ThreadPoolExecutor(max_workers=64, thread_name_prefix="dist_guardian-io")


def _after_fork_in_child() -> None:
    """A forked child cannot use its parent's filesystems (their event loop and connections stay
    behind) nor its pool threads: start from scratch."""
    global _pool, _fs_lock
    _fs_cache.clear()
    _fs_lock = threading.Lock()
    _pool = cf.ThreadPoolExecutor(max_workers=64, thread_name_prefix="dist_guardian-io")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem(store: Store):
    """The fsspec filesystem of a remote store (one per endpoint and credentials, never fsspec's instance cache)."""
    if store.is_local:
        raise ConfigError(f"{store.url} is a local store; it has no fsspec filesystem here")
    key = store.key
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            import fsspec

            opts = dict(store.storage_options)
            if store.is_s3:
                opts = _s3_defaults(opts)
            retries = opts.pop("retries", None)
            fs = fsspec.filesystem(store.protocol, skip_instance_cache=True, **opts)
            if retries is not None and hasattr(fs, "retries"):
                fs.retries = int(retries)  # s3fs: an attribute, not a constructor argument
            _fs_cache[key] = fs
        return fs


def _s3_defaults(opts: dict[str, Any]) -> dict[str, Any]:
    """Tight, explicit timeouts and retries: a frozen endpoint must cost seconds (413 s with s3fs defaults).

    botocore's standard retry mode retries throttling (503 SlowDown) and transient 5xx with
    backoff; s3fs's own loop (``retries``) adds attempts on connection errors. Both are
    small here, and our deadline bounds the whole call anyway.
    """
    opts = dict(opts)
    cfg = dict(opts.get("config_kwargs") or {})
    cfg.setdefault("connect_timeout", 3)
    cfg.setdefault("read_timeout", 20)
    cfg.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    opts["config_kwargs"] = cfg
    opts.setdefault("retries", 2)
    return opts


def call(
    store: Store, what: str, fn: Callable[[], T], deadline_s: float | None = None, transfer: Transfer | None = None
) -> T:
    """Run one blocking remote operation under our deadline, translating errors to ``OSError`` subclasses.

    The deadline counts from the start, or from the last progress of ``transfer``. A call
    that misses it is abandoned (its thread cannot be killed) and reported as
    :class:`StoreUnavailable`. Async filesystems use :func:`acall`, which cancels instead.
    """
    limit = store.deadline_s if deadline_s is None else deadline_s
    check_auth_memo(store)
    fut = _pool.submit(fn)
    start = time.monotonic()
    while True:
        last = max(start, transfer.last) if transfer is not None else start
        remaining = last + limit - time.monotonic()
        try:
            if remaining <= 0:
                raise cf.TimeoutError
            return fut.result(timeout=min(remaining, 0.5) if transfer is not None else remaining)
        except cf.TimeoutError:
            if transfer is not None and max(start, transfer.last) + limit > time.monotonic():
                continue
            fut.cancel()
            raise timed_out(store, what, limit) from None
        except Exception as e:
            t = translate(store, what, e, limit)
            if t is e:
                raise
            raise t from e


async def _watchdog(aw: Awaitable[T], limit: float, transfer: Transfer | None) -> T:
    """Await ``aw``; cancel it when nothing moved for ``limit`` seconds (the request is dropped, not leaked)."""
    task = asyncio.ensure_future(aw)
    start = time.monotonic()
    while True:
        last = max(start, transfer.last) if transfer is not None else start
        remaining = last + limit - time.monotonic()
        if remaining <= 0:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: B036 - the cancellation we asked for, or its failure
                pass
            raise TimeoutError(f"no progress for {limit:.1f}s")
        done, _ = await asyncio.wait({task}, timeout=remaining)
        if done:
            return task.result()


def acall(
    store: Store,
    what: str,
    make: Callable[[], Awaitable[T]],
    deadline_s: float | None = None,
    transfer: Transfer | None = None,
) -> T:
    """Run one coroutine of an async filesystem on its loop, under our deadline (cancelled when missed)."""
    from fsspec.asyn import sync

    limit = store.deadline_s if deadline_s is None else deadline_s
    check_auth_memo(store)
    fs = filesystem(store)
    try:
        return sync(fs.loop, _watchdog, make(), limit, transfer)
    except Exception as e:
        t = translate(store, what, e, limit)
        if t is e:
            raise
        raise t from e


def run(
    store: Store,
    what: str,
    sync_fn: Callable[[], T],
    async_fn: Callable[[], Awaitable[T]] | None = None,
    deadline_s: float | None = None,
    transfer: Transfer | None = None,
) -> T:
    """One operation under the deadline: its coroutine on an async filesystem (cancelled when late), else the
    blocking call."""
    fs = filesystem(store)
    if async_fn is not None and getattr(fs, "async_impl", False):
        return acall(store, what, async_fn, deadline_s, transfer)
    return call(store, what, sync_fn, deadline_s, transfer)
