"""One commit rule for local and remote primaries (F36, F38): ``step-N``, else ``step-N-gG`` beside another
lineage; the same generation twice is a CommitConflict. Real files and a real ``memory://`` store."""

from __future__ import annotations

import logging
import os
import shutil
import uuid

import helpers
import pytest

from dist_guardian import Guardian, copying, manifest, stores
from dist_guardian.commit import commit_local
from dist_guardian.errors import CommitConflict

RUN = "r"


def _committed_checkpoint(tmp_path) -> str:
    root = str(tmp_path / "src")
    g = Guardian(stores=[root], run=RUN, rng=False)
    assert g.save(helpers.make_state(seed=1), step=7).committed
    g.close()
    return helpers.step_dir(root, RUN, 7)


def _staging_copy(src_dir: str, tmp_path) -> tuple[str, bytes]:
    """The checkpoint's files in a fresh staging dir without a manifest, and the manifest bytes."""
    staging = str(tmp_path / f"staging-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    for name in os.listdir(src_dir):
        if name != manifest.MANIFEST_NAME:
            shutil.copy(os.path.join(src_dir, name), os.path.join(staging, name))
    with open(os.path.join(src_dir, manifest.MANIFEST_NAME), "rb") as f:
        return staging, f.read()


def _commit(store, staging: str, generation: int, mbytes: bytes) -> str:
    if store.is_local:
        return commit_local(store, RUN, staging, 7, generation, mbytes)
    return copying.commit_remote(store, RUN, staging, 7, generation, mbytes, abort_stale=False)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_same_generation_conflicts_and_another_lineage_commits_beside_it(tmp_path, kind, caplog):
    src = _committed_checkpoint(tmp_path)
    if kind == "local":
        store = stores.resolve(str(tmp_path / "dst"), 0)
        stores.make_run_dir(store, RUN)
    else:
        store = stores.resolve(f"memory://c-{uuid.uuid4().hex[:8]}/ckpt", 0)
    staging, mbytes = _staging_copy(src, tmp_path)
    first = _commit(store, staging, 1, mbytes)
    assert first == store.uri(RUN, "step-000000000007")
    staging, mbytes = _staging_copy(src, tmp_path)
    with pytest.raises(
        CommitConflict,
        match=r"commit_conflict: .*step-000000000007 was committed by another writer; "
        r"ours is discarded$",
    ):
        _commit(store, staging, 1, mbytes)  # the same lineage committed this step first (F38)
    staging, mbytes = _staging_copy(src, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dist_guardian.commit"):
        second = _commit(store, staging, 2, mbytes)  # another lineage: beside it (F36)
    assert second == store.uri(RUN, "step-000000000007-g2")
    assert f"lineage_fork step=7: {first} holds generation 1; committing generation 2 beside it" in caplog.text
    staging, mbytes = _staging_copy(src, tmp_path)  # both names held by generation 1 (the bytes we uploaded)
    with pytest.raises(CommitConflict, match=f"commit_conflict: step 7 generation 2 already committed in {store.url}$"):
        _commit(store, staging, 2, mbytes)
