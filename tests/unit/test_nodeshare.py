"""The node share's fallbacks: a failed, dead or refusing reader sends the other ranks back to the store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_guardian import nodeshare


@pytest.fixture
def share(tmp_path, monkeypatch):
    monkeypatch.setenv(nodeshare.SHM_ENV, str(tmp_path))
    d = nodeshare.share_dir()
    assert d is not None and oct(os.stat(d).st_mode & 0o777) == "0o700"
    return d


def test_reader_publishes_and_follower_reads_the_copy(share):
    path = os.path.join(share, "k1")
    assert nodeshare._elect(path) and not nodeshare._elect(path)  # one reader per key
    got = nodeshare._lead(path, lambda: b"bytes", lambda r, fd: os.write(fd, r) == len(r))
    assert got == b"bytes"
    assert nodeshare._follow(path, lambda p: open(p, "rb").read(), wait_s=5) == b"bytes"


def test_refused_or_failed_publish_sends_followers_to_the_store(share):
    path = os.path.join(share, "k2")
    assert nodeshare._elect(path)
    nodeshare._lead(path, lambda: b"damaged", lambda r, fd: False)  # digest disagreed: kept private
    assert nodeshare._follow(path, lambda p: pytest.fail("read"), wait_s=5) is None
    path = os.path.join(share, "k3")
    assert nodeshare._elect(path)
    with pytest.raises(OSError):
        nodeshare._lead(path, lambda: (_ for _ in ()).throw(OSError("store down")), lambda r, fd: True)
    assert nodeshare._follow(path, lambda p: pytest.fail("read"), wait_s=5) is None


def test_dead_reader_is_not_waited_for(share):
    path = os.path.join(share, "k4")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(path + ".lock", "w") as f:
        f.write(dead.stdout.strip())
    assert nodeshare._follow(path, lambda p: pytest.fail("read"), wait_s=30) is None


def test_last_rank_out_removes_the_files(share):
    path = os.path.join(share, "k5")
    assert nodeshare._elect(path)
    nodeshare._lead(path, lambda: b"x", lambda r, fd: os.write(fd, r) == 1)
    nodeshare._done(share, path, 0, 2)
    assert sorted(os.listdir(share)) == ["k5.dgt", "k5.done0", "k5.lock"]
    nodeshare._done(share, path, 1, 2)
    assert os.listdir(share) == []


def test_without_a_local_world_every_rank_fetches(monkeypatch, share):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert nodeshare.fetch_once(("a",), lambda: 7, lambda r, fd: pytest.fail("publish"), pytest.fail, wait_s=1) == 7
    assert os.listdir(share) == []
