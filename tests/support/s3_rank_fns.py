"""Functions that run in other processes for the S3 fault tests (importable by forkserver children).

Children of the forkserver inherit its environment, not the test's: every function here
takes the environment it needs (a fault rule, a node-local root) and sets it itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def child_save(
    stores: list[str],
    run: str,
    steps: list[int],
    storage_options: dict,
    env: dict[str, str],
    q: Any,
    *,
    blob_mb: float = 0.0,
    seed: int = 0,
    start_at: float | None = None,
    mirror_timeout: float = 30.0,
) -> None:
    """One independent writer (no process group): save ``steps``, close, report."""
    os.environ.update(env)
    os.environ.setdefault("RANK", "0")
    import helpers

    from dist_guardian import Guardian

    state = helpers.make_state(seed, blob_mb=blob_mb)
    g = Guardian(stores=stores, run=run, storage_options=storage_options, mirror_timeout=mirror_timeout)
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    out = []
    for s in steps:
        r = g.save(state, step=s)
        out.append({"committed": r.committed, "reason": r.reason, "path": r.path})
    left = g.close()
    q.put({"pid": os.getpid(), "saves": out, "unmirrored": left})


def child_retain(url: str, storage_options: dict, run: str, keep_last: int, env: dict[str, str], q: Any) -> None:
    """Retention of one store in its own process (a fault rule may kill it half-way, F41)."""
    os.environ.update(env)
    os.environ.setdefault("RANK", "0")
    from dist_guardian import retention, stores

    store = stores.resolve(url, 0, storage_options)
    q.put(retention.retain(store, run, keep_last))


def resume_deleting_before_load(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    storage_options: dict,
    endpoint: str,
    bucket: str,
    key: str,
    step: int,
) -> dict[str, Any]:
    """F20: rank 0 deletes an S3 object after the plan's broadcast and availability vote, right before the load."""
    import boto3
    import rank_fns

    from dist_guardian import _faults

    original = _faults.hit
    done = []

    def hit(point: str, *, rank: int | None = None, step: int | None = None, _want: int = step):
        if point == "during_load" and step == _want and rank == 0 and not done:
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            ).delete_object(Bucket=bucket, Key=key)
            done.append(key)
        return original(point, rank=rank, step=step)

    _faults.hit = hit
    out = rank_fns.resume_state(rank, world, stores=stores, run=run, storage_options=storage_options)
    out["deleted"] = list(done)
    return out


def resume_report_error(rank: int, world: int, *, stores: list[str], run: str, storage_options: dict) -> dict[str, Any]:
    """F16 variant: resume and report what it raised (and that the state was not touched)."""
    import helpers

    from dist_guardian import Guardian

    state = helpers.make_state(42)
    before = helpers.model_tensors(state)
    g = Guardian(stores=stores, run=run, timeout=20.0, storage_options=storage_options, mirror_timeout=2.0)
    try:
        r = g.resume(state)
        err = None
        resumed = r.resumed
    except Exception as e:  # reported to the test, which expects NoReachableCheckpoint
        err, resumed = f"{type(e).__name__}: {e}", None
    finally:
        g.close()
    untouched = all(torch.equal(before[k], v) for k, v in helpers.model_tensors(state).items())
    return {"error": err, "resumed": resumed, "untouched": untouched}
