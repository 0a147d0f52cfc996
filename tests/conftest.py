"""Shared fixtures: a private node-local root per test, the S3 server, the multi-rank harness path.

The tests are in folders by kind (``unit/``, ``contract/``, ``integration/``, ``faults/``, ``e2e/``);
what they share is in ``support/``, put on ``sys.path`` here so it is imported by plain module name
(``import helpers``, ``import rank_fns``). Those names must stay stable: the forkserver of
``dg_harness.ctx()`` preloads modules by name, and rank functions are pickled by module name; the
forkserver and its children inherit this ``sys.path``.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def node_local_root(tmp_path, monkeypatch):
    """Every test gets its own node-local root (``tmp://`` stores), created 0700 like the real one."""
    root = tmp_path / "node0"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("DIST_GUARDIAN_NODE_LOCAL_ROOT", str(root))
    monkeypatch.delenv("DIST_GUARDIAN_FAULT", raising=False)
    return root


@pytest.fixture(autouse=True)
def _clean_memory_fs():
    yield
    try:
        from fsspec.implementations.memory import MemoryFileSystem

        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]
    except ImportError:
        pass


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 and a free port, started by the test session itself."""
    from s3_helpers import MotoServer

    srv = MotoServer()
    yield srv
    srv.stop()


@pytest.fixture
def s3(s3_server):
    """A fresh bucket per test, with the storage_options that reach it (also from spawned ranks).

    Reset after the test: every object, open multipart upload and the bucket itself are removed.
    """
    bucket = s3_server.new_bucket()
    yield bucket
    try:
        bucket.destroy()
    except Exception as e:  # a test that broke the bucket on purpose must not fail in teardown
        logging.getLogger(__name__).warning("could not reset bucket %s: %s", bucket.name, e)
