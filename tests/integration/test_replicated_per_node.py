"""The replicated file is fetched once per node: S3 GETs of it do not grow with the ranks of a node.

Real ranks (gloo), a real S3 endpoint (moto), and a counting proxy in front of it: every
request line that reaches the server is recorded. One checkpoint is saved, then resumed by 1,
2 and 4 ranks that share one node (``LOCAL_WORLD_SIZE``, as torchrun sets it), and, as the
control that shows the count can fail, by 2 ranks that do not know they share a node.
"""

from __future__ import annotations

import os

import pytest
import rank_fns as rf
from dg_harness import run_ranks
from helpers import make_state
from s3_helpers import ChaosProxy

from dist_guardian import Guardian

RUN = "pernode"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def proxy(s3_server):
    p = ChaosProxy(s3_server.host, s3_server.port)
    yield p
    p.close()


def _replicated_gets(proxy: ChaosProxy) -> list[str]:
    return [line for line in proxy.lines if line.startswith("GET ") and "/replicated.dgt" in line]


def _resume(world: int, s3, proxy, shm: str, *, share: bool):
    proxy.lines.clear()
    env = {r: {"LOCAL_RANK": str(r), **({"LOCAL_WORLD_SIZE": str(world)} if share else {})} for r in range(world)}
    out = run_ranks(
        rf.resume_state,
        world,
        timeout=150,
        env=env,
        common_env={"DIST_GUARDIAN_SHM_DIR": shm},
        stores=[s3.url],
        run=RUN,
        storage_options=s3.storage_options(proxy.endpoint),
    )
    assert out.ok(), out.errors
    return out, _replicated_gets(proxy)


def test_replicated_gets_per_node_do_not_grow_with_ranks(tmp_path, s3, proxy):
    state = make_state(3, blob_mb=2.0)
    state["data"] = {"position": 7}
    g = Guardian(stores=[s3.url], run=RUN, per_rank=("data",), storage_options=s3.storage_options(), timeout=30)
    assert g.save(state, step=5).committed
    g.close()
    want = {k: float(v.double().sum()) for k, v in state["model"].state_dict().items()}
    shm = str(tmp_path / "shm")
    os.mkdir(shm)
    counts = {}
    for world in (1, 2, 4):
        out, gets = _resume(world, s3, proxy, shm, share=True)
        for r in range(world):
            res = out.results[r]
            assert res["resumed"] and res["step"] == 5 and res["weights"] == want, (world, r)
        counts[world] = len(gets)
        if world > 1:
            assert os.listdir(os.path.join(shm, f"dist_guardian-{os.getuid()}")) == []  # the last rank cleaned up
    assert counts[1] >= 1 and counts[1] == counts[2] == counts[4], counts
    _, gets = _resume(2, s3, proxy, shm, share=False)  # control: ranks that do not know they share a node
    assert len(gets) > counts[2], (counts, gets)
