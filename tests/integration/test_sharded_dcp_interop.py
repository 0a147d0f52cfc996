"""A DCP checkpoint written by an FSDP2 job (``torch.distributed.checkpoint.save``) keeps loading, resharded.

The directory is a foreign candidate (tier L): resume at 2 ranks and at 1 must hand every rank
the writer's model and AdamW state (compared as gathered full tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import sharded_rank_fns as srf
from dg_harness import run_ranks

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("world", [2, 1])
def test_dcp_from_an_fsdp2_job_loads_with_resharding(tmp_path, world):
    root = str(tmp_path)
    saved = run_ranks(srf.dcp_save_run, 2, timeout=120, root=root, run="r", step=2)
    assert saved.ok(), saved.errors
    want = saved.results[0]["at"]
    out = run_ranks(srf.resume_run, world, timeout=120, root=root, run="r", data=False)
    assert out.ok(), out.errors
    for r in range(world):
        got = out.results[r]
        assert got["resumed"] and got["step"] == 2, got["attempts"]
        assert sorted(got["loaded"]) == sorted(want)
        for k in want:
            assert np.array_equal(got["loaded"][k], want[k]), k
