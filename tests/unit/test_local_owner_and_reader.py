"""The local helpers verification reads through: who owns a path (F37), and a safe reader (no symlink, no FIFO)."""

from __future__ import annotations

import os

import pytest

from dist_guardian import stores
from dist_guardian.errors import InsecurePathError


def test_owner_uid_is_ours_for_our_file_and_none_when_nothing_is_there(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    assert stores.owner_uid(str(tmp_path / "f")) == os.geteuid()
    assert stores.owner_uid(str(tmp_path / "missing")) is None


def test_owner_uid_reads_a_symlink_itself(tmp_path):
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "link"))
    assert stores.owner_uid(str(tmp_path / "link")) == os.geteuid()  # dangling, yet there: never followed


def test_open_reader_reads_a_regular_file_and_refuses_a_symlink_and_a_fifo(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    with stores.open_reader(str(tmp_path / "f")) as f:
        assert f.read() == b"abc"
    os.symlink(str(tmp_path / "f"), str(tmp_path / "link"))
    with pytest.raises(InsecurePathError, match="is a symlink"):
        stores.open_reader(str(tmp_path / "link"))
    os.mkfifo(str(tmp_path / "fifo"))
    with pytest.raises(InsecurePathError, match="not a regular file"):
        stores.open_reader(str(tmp_path / "fifo"))
