"""Typed reasons (errors.Reason) and the one constructor convention of the OSError-derived errors.

Exact messages are asserted: logs, JSON records and other tests read this text, and the
coordinator, retention and planning decide on tokens read back from it (policy).
"""

from __future__ import annotations

import errno
import pickle

import pytest

from dist_guardian import policy
from dist_guardian.errors import (
    CommitConflict,
    DistGuardianError,
    InsecurePathError,
    Reason,
    SaveFailed,
    StoreError,
    StoreUnavailable,
)


def test_reason_text_is_token_colon_detail():
    assert str(Reason("insecure", "/x is a symlink")) == "insecure: /x is a symlink"
    assert str(Reason("legacy_unverified")) == "legacy_unverified"
    r = Reason("store_unreachable", "list y did not answer within 2.5s", transient=True, store="s3://b/ck")
    assert str(r) == "store_unreachable store=s3://b/ck: list y did not answer within 2.5s"


def test_reason_parse_gives_the_token_back():
    text = "store_unreachable store=s3://b/ck: list y did not answer within 2.5s"
    assert Reason.parse(text) == Reason("store_unreachable", "list y did not answer within 2.5s", store="s3://b/ck")
    assert Reason.parse("insecure: /x: is a symlink") == Reason("insecure", "/x: is a symlink")
    assert Reason.parse("unsafe_globals=['os.system']").token == "unsafe_globals"
    assert Reason.parse("[Errno 5] boom").token == ""
    for r in (Reason("a_b", "c: d"), Reason("x"), Reason("t", "u", store="memory://m")):
        assert Reason.parse(str(r)) == r


@pytest.mark.parametrize(
    "cls, default_errno, transient",
    [
        (StoreError, errno.EIO, False),
        (StoreUnavailable, errno.EIO, True),
        (InsecurePathError, errno.EPERM, False),
        (SaveFailed, errno.EIO, False),
        (CommitConflict, errno.EEXIST, False),
    ],
)
def test_one_constructor_convention(cls, default_errno, transient):
    e = cls("some_token", "what happened to /p")
    assert isinstance(e, OSError) and isinstance(e, DistGuardianError)
    assert (e.reason, e.detail, e.errno, e.transient) == ("some_token", "what happened to /p", default_errno, transient)
    assert str(e) == e.strerror == "some_token: what happened to /p"
    assert e.why == Reason("some_token", "what happened to /p", transient=transient)
    with_errno = cls("some_token", "what happened to /p", errno=errno.ELOOP)
    assert with_errno.errno == errno.ELOOP and str(with_errno) == str(e)  # never "[Errno 40] ..."
    back = pickle.loads(pickle.dumps(with_errno))
    assert type(back) is cls and (back.reason, back.detail, back.errno, str(back)) == (
        "some_token",
        "what happened to /p",
        errno.ELOOP,
        "some_token: what happened to /p",
    )


def test_store_errors_name_the_store():
    e = StoreUnavailable(
        "store_unreachable", "list y did not answer within 2.5s", errno=errno.ETIMEDOUT, store="s3://b/ck"
    )
    assert str(e) == "store_unreachable store=s3://b/ck: list y did not answer within 2.5s"
    assert e.errno == errno.ETIMEDOUT and e.why.transient and e.why.store == "s3://b/ck"
    try:
        raise e
    except OSError as caught:
        assert caught is e


def test_commit_conflict_prints_the_same_however_raised():
    msg = "commit_conflict: step 7 generation 2 already committed in file:///ck"
    assert str(CommitConflict("commit_conflict", "step 7 generation 2 already committed in file:///ck")) == msg


def test_policy_decides_on_tokens_never_on_text():
    assert not policy.store_reason_is_transient("node_local_root_insecure: tmp root /t has mode 0777")
    assert not policy.store_reason_is_transient("symlink: /t/x is a symlink; refusing to follow it")
    assert not policy.store_reason_is_transient(InsecurePathError("run_dir_symlink", "/r is a symlink").why)
    assert policy.store_reason_is_transient("store_unreachable store=s3://b: list did not answer within 1.0s")
    # a detail that merely mentions a lasting word does not make the reason lasting
    assert policy.store_reason_is_transient("store_auth_failed store=s3://insecure-bucket: read: symlink")
    assert policy.store_was_down(["size_mismatch: a expected=1 got=2", "store_auth_failed store=s3://b: read x"])
    assert not policy.store_was_down(["manifest_rejected: bad_json: store_unreachable in a detail"])
