"""``dist_guardian.integrations.lightning`` with a real ``pl.Trainer``: resume past a damaged newest ``.ckpt``.

``GuardianCheckpointIO`` writes every checkpoint atomically with its checksum and mirrors it;
``find_resume_checkpoint`` picks the newest one that loads (restoring the local copy from the
mirror first) and ``trainer.fit(ckpt_path=...)`` goes on to ``max_steps`` from there.
"""

from __future__ import annotations

import ast
import os

import lightning_helpers as lh
import pytest
import torch

import dist_guardian
from dist_guardian.integrations import lightning as dgl


def _fit(d: str, max_steps: int, mirror: str | None, ckpt_path: str | None = None, **kw) -> lh.TinyModule:
    io_ = dgl.GuardianCheckpointIO(stores=[mirror] if mirror else [])
    return lh.fit(d, max_steps, ckpt_path=ckpt_path, plugins=[io_], save_last=False, **kw)


def test_saves_are_checksummed_mirrored_and_resume_from_the_mirror(tmp_path):
    d, mirror = str(tmp_path / "ck"), str(tmp_path / "mirror")
    _fit(d, 30, mirror)
    names = lh.ckpts(d)
    assert names == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=1-step=30.ckpt"]
    assert sorted(os.listdir(os.path.join(mirror, "lightning"))) == [".dist_guardian", *names]
    assert not [f for f in os.listdir(d) if ".tmp-" in f]
    newest = os.path.join(d, names[-1])
    good = open(newest, "rb").read()
    os.truncate(newest, len(good) // 3)
    path = dgl.find_resume_checkpoint(d, stores=[mirror])
    assert path == newest and open(newest, "rb").read() == good  # restored from the mirror before Lightning reads it
    module = _fit(d, 40, mirror, ckpt_path=path)
    assert module.seen_steps[0] == 30 and module.global_step == 40


def test_without_a_mirror_the_previous_ckpt_resumes_to_max_steps(tmp_path):
    d = str(tmp_path / "ck")
    _fit(d, 30, None)
    newest = os.path.join(d, "epoch=1-step=30.ckpt")
    os.truncate(newest, os.path.getsize(newest) // 2)
    path = dgl.find_resume_checkpoint(d)
    assert path == os.path.join(d, "epoch=1-step=20.ckpt")
    module = _fit(d, 30, None, ckpt_path=path)
    assert module.seen_steps[0] == 20 and module.global_step == 30
    # the resumed run saved step 30 again (Lightning names it -v1 beside the damaged one): the next resume takes it
    again = dgl.find_resume_checkpoint(d)
    assert again is not None and again != newest and torch.load(again, weights_only=True)["global_step"] == 30


def test_flipped_bytes_fail_the_checksum_and_nothing_loads_from_an_empty_dir(tmp_path):
    d = str(tmp_path / "ck")
    _fit(d, 20, None)
    newest = os.path.join(d, "epoch=1-step=20.ckpt")
    raw = bytearray(open(newest, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(newest, "wb").write(bytes(raw))
    assert dgl.find_resume_checkpoint(d) == os.path.join(d, "epoch=0-step=10.ckpt")
    os.makedirs(tmp_path / "empty")
    assert dgl.find_resume_checkpoint(str(tmp_path / "empty")) is None


def test_remove_never_deletes_the_newest_good_or_an_unmirrored_one(tmp_path):
    d = str(tmp_path / "ck")
    (tmp_path / "not_a_dir").write_text("x")  # every mirror upload fails
    _fit(d, 30, str(tmp_path / "not_a_dir"), every=10, save_top_k=1)
    assert lh.ckpts(d) == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=1-step=30.ckpt"]
    io_ = dgl.GuardianCheckpointIO()
    for step in (10, 20):
        io_.save_checkpoint({"global_step": step, "state_dict": {}}, os.path.join(d, f"s{step}.ckpt"))
    io_.remove_checkpoint(os.path.join(d, "s20.ckpt"))  # the newest good: kept
    assert os.path.exists(os.path.join(d, "s20.ckpt"))
    os.truncate(os.path.join(d, "s20.ckpt"), 10)  # now s10 is the newest good one
    io_.remove_checkpoint(os.path.join(d, "s10.ckpt"))
    assert os.path.exists(os.path.join(d, "s10.ckpt"))
    io_.save_checkpoint({"global_step": 30, "state_dict": {}}, os.path.join(d, "s30.ckpt"))
    io_.remove_checkpoint(os.path.join(d, "s10.ckpt"))
    assert not os.path.exists(os.path.join(d, "s10.ckpt"))


def test_the_adapter_imports_only_the_public_api():
    tree = ast.parse(open(dgl.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dist_guardian")):
            assert node.level == 0 and node.module == "dist_guardian", ast.dump(node)
            assert all(a.name in dist_guardian.__all__ for a in node.names), [a.name for a in node.names]
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("dist_guardian.") for a in node.names)


@pytest.mark.timeout(180)
def test_two_ranks_agree_and_the_local_copy_is_restored_once_for_all(tmp_path):
    import foreign_rank_fns
    from dg_harness import run_ranks

    d, mirror = str(tmp_path / "ck"), str(tmp_path / "mirror")
    _fit(d, 20, mirror)
    newest = os.path.join(d, "epoch=1-step=20.ckpt")
    size = os.path.getsize(newest)
    os.truncate(newest, size // 2)
    out = run_ranks(foreign_rank_fns.lightning_find, 2, timeout=150, dirpath=d, mirror=mirror)
    assert out.ok(), out.errors
    assert [out.results[r] for r in range(2)] == [{"path": newest, "size": size}] * 2


@pytest.mark.timeout(120)
def test_an_s3_mirror_restores_the_truncated_newest(tmp_path, s3):
    so = s3.storage_options()
    d = str(tmp_path / "ck")
    io_ = dgl.GuardianCheckpointIO(stores=[s3.url], storage_options=so)
    lh.fit(d, 20, plugins=[io_], save_last=False)
    newest = os.path.join(d, "epoch=1-step=20.ckpt")
    good = open(newest, "rb").read()
    os.truncate(newest, 100)
    path = dgl.find_resume_checkpoint(d, stores=[s3.url], storage_options=so)
    assert path == newest and open(newest, "rb").read() == good
