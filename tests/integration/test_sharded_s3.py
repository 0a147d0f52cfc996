"""A sharded checkpoint mirrored to S3 (moto) resumes from S3 alone, resharded: ranged reads of the chunks."""

from __future__ import annotations

import numpy as np
import pytest
import sharded_rank_fns as srf
from dg_harness import run_ranks

pytestmark = pytest.mark.timeout(180)


def test_sharded_checkpoint_resumes_from_its_s3_mirror_on_another_world_size(tmp_path, s3):
    so = s3.storage_options()
    saved = run_ranks(
        srf.save_run,
        2,
        timeout=120,
        root=str(tmp_path / "ck"),
        run="r",
        saves=[1],
        total=2,
        mirrors=(s3.url,),
        storage_options=so,
    )
    assert saved.ok(), saved.errors
    assert saved.results[0]["unmirrored"] == []
    assert any(k.endswith("shards-00001-of-00002.dgt") for k in s3.keys())
    out = run_ranks(srf.resume_run, 1, timeout=120, root=s3.url, run="r", storage_options=so)
    assert out.ok(), out.errors
    got = out.results[0]
    assert got["resumed"] and got["step"] == 1, got["attempts"]
    want = saved.results[0]["at"][1]
    for k in want:
        assert np.array_equal(got["loaded"][k], want[k]), k
