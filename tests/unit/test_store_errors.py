"""The translation table of ``stores.errors``: client errors as builtin ``OSError`` subclasses, cause kept."""

from __future__ import annotations

import errno

import pytest
from botocore import exceptions as bx

from dist_guardian import stores
from dist_guardian.errors import InsecurePathError, StoreUnavailable
from dist_guardian.stores import errors as store_errors


@pytest.fixture
def store():
    s = stores.resolve("memory://errors-table", 0)
    yield s
    store_errors._auth_failed.pop(s.key, None)


def _client_error(code: str) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")


@pytest.mark.parametrize("exc", [bx.NoCredentialsError(), _client_error("AccessDenied"), PermissionError("no")])
def test_refused_credentials_are_auth_failures_and_remembered(store, exc):
    t = store_errors.translate(store, "read x", exc, 1.0)
    assert isinstance(t, StoreUnavailable) and t.errno == errno.EACCES and t.__cause__ is exc
    assert t.strerror.startswith(f"store_auth_failed store={store.url}: read x: ")
    with pytest.raises(StoreUnavailable, match="not retried for 300s"):
        store_errors.check_auth_memo(store)


@pytest.mark.parametrize(
    "exc",
    [TimeoutError("t"), bx.ReadTimeoutError(endpoint_url="http://x"), bx.ConnectTimeoutError(endpoint_url="http://x")],
)
def test_timeouts_say_did_not_answer(store, exc):
    t = store_errors.translate(store, "list y", exc, 2.5)
    assert isinstance(t, StoreUnavailable) and t.errno == errno.ETIMEDOUT and t.__cause__ is exc
    assert t.strerror == f"store_unreachable store={store.url}: list y did not answer within 2.5s"


def test_missing_bucket_kept_meanings_and_our_own_errors(store):
    t = store_errors.translate(store, "list z", _client_error("NoSuchBucket"), 1.0)
    assert isinstance(t, StoreUnavailable) and t.errno == errno.ENOENT and "the bucket does not exist" in t.strerror
    for kind in (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
        t = store_errors.translate(store, "stat z", kind("gone"), 1.0)
        assert type(t) is kind and t.strerror == "stat z: gone" and isinstance(t.__cause__, kind)
    ours = InsecurePathError("symlink", "x is a symlink")
    assert store_errors.translate(store, "read z", ours, 1.0) is ours
    other = store_errors.translate(store, "read z", RuntimeError("boom"), 1.0)
    assert isinstance(other, StoreUnavailable) and other.strerror.endswith("read z: RuntimeError: boom")
