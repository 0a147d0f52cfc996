"""Errors of fsspec, s3fs, botocore and aiohttp as builtin ``OSError`` subclasses (s3fs ``errors.py`` style).

Belongs here: the translation table and :func:`translate`, and the memo of refused
credentials. ``FileNotFoundError`` / ``FileExistsError`` / ``IsADirectoryError`` /
``NotADirectoryError`` keep their meaning; everything that says "the store is not usable
now" becomes :class:`StoreUnavailable` (``store_unreachable`` or ``store_auth_failed`` in
its message); our own :class:`StoreError` (``InsecurePathError`` included) passes through.
The translated exception carries the original as ``__cause__``.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING

from ..errors import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from .base import Store

AUTH_FAILURE_TTL_S = 300.0
# S3 error codes (botocore ClientError ``response["Error"]["Code"]``) that mean "these credentials are refused".
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "Forbidden",
        "403",
        "AuthFailure",
        "UnrecognizedClient",
    }
)
# Error codes that mean "the store itself is missing": (errno, message tail).
MISSING_CODES = {"NoSuchBucket": (errno.ENOENT, "the bucket does not exist")}
# Builtin errors whose meaning survives translation, with the errno to use when the original has none.
KEPT = {
    FileNotFoundError: errno.ENOENT,
    FileExistsError: errno.EEXIST,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
}

_auth_failed: dict[tuple, tuple[float, str]] = {}
_tables_lock = threading.Lock()
_tables: tuple[tuple[type, ...], tuple[type, ...]] | None = None


def _client_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(credential errors, timeout errors) of the clients: botocore's are not ``OSError``s, so they are named.

    Built on first use, so that importing this module does not import botocore.
    """
    global _tables
    with _tables_lock:
        if _tables is None:
            auth: list[type] = [PermissionError]
            timeout: list[type] = [TimeoutError]  # asyncio.TimeoutError and aiohttp's timeouts derive from it
            try:
                from botocore import exceptions as bx

                auth += [
                    bx.NoCredentialsError,
                    bx.PartialCredentialsError,
                    bx.CredentialRetrievalError,
                    bx.UnknownCredentialError,
                ]
                timeout += [bx.ConnectTimeoutError, bx.ReadTimeoutError]
            except ImportError:  # no S3 client installed: only builtin errors can reach us
                pass
            _tables = (tuple(auth), tuple(timeout))
        return _tables


def error_code(e: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, on the exception or on its cause chain."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 5:
        resp = getattr(cur, "response", None)
        if isinstance(resp, dict):
            code = (resp.get("Error") or {}).get("Code")
            if code:
                return str(code)
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def timed_out(store: Store, what: str, limit: float) -> StoreUnavailable:
    """The error of a call that missed its deadline (tests and callers match "did not answer within")."""
    return StoreUnavailable(
        "store_unreachable", f"{what} did not answer within {limit:.1f}s", errno=errno.ETIMEDOUT, store=store.url
    )


def _classify(store: Store, what: str, e: BaseException, limit: float) -> BaseException:
    code = error_code(e)
    name = type(e).__name__
    auth_types, timeout_types = _client_types()
    if isinstance(e, StoreError):
        return e
    if code in MISSING_CODES:
        num, tail = MISSING_CODES[code]
        return StoreUnavailable("store_unreachable", f"{what}: {tail}", errno=num, store=store.url)
    if isinstance(e, auth_types) or code in AUTH_CODES:
        detail = f"{what}: {name}: {e}"
        _auth_failed[store.key] = (time.monotonic(), detail)
        return StoreUnavailable("store_auth_failed", detail, errno=errno.EACCES, store=store.url)
    if isinstance(e, OSError) and isinstance(e, tuple(KEPT)):
        return type(e)(e.errno or KEPT.get(type(e), errno.ENOENT), f"{what}: {e}")
    if isinstance(e, timeout_types):
        return timed_out(store, what, limit)
    num = (e.errno if isinstance(e, OSError) else None) or errno.EIO
    return StoreUnavailable("store_unreachable", f"{what}: {name}: {e}", errno=num, store=store.url)


def translate(store: Store, what: str, e: BaseException, limit: float) -> BaseException:
    """``e`` as a builtin ``OSError`` subclass, with ``e`` as its cause (``e`` itself when it is already ours).

    ``what`` names the operation and object for the message; ``limit`` is the deadline that applied.
    A refused credential is remembered (:func:`check_auth_memo`).
    """
    t = _classify(store, what, e, limit)
    if t is not e:
        t.__cause__ = e
    return t


def check_auth_memo(store: Store) -> None:
    """Raise :class:`StoreUnavailable` while a refusal of this store's credentials is fresh.

    One refused attempt marks the store unavailable: no retry storm against bad credentials (F19).
    """
    hit = _auth_failed.get(store.key)
    if hit is None:
        return
    if time.monotonic() - hit[0] > AUTH_FAILURE_TTL_S:
        _auth_failed.pop(store.key, None)
        return
    detail = f"{hit[1]} (not retried for {AUTH_FAILURE_TTL_S:.0f}s)"
    raise StoreUnavailable("store_auth_failed", detail, errno=errno.EACCES, store=store.url)


def _reset_after_fork() -> None:
    """A forked child starts with no remembered refusals (its parent's clock and credentials are not its own)."""
    _auth_failed.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
