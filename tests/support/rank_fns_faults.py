"""Rank functions for tests/faults/test_faults_distributed.py (they must live in an importable module).

Each function runs on every rank of a ``dg_harness.run_ranks`` call (real processes, real
gloo). Results are plain dicts. A rank whose ``resume`` raises writes what it saw to
``<report_dir>/rank-N.json`` first and then re-raises, so the harness still sees the
exception and the non-zero exit code, and the test still sees the timings and checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from typing import Any

import helpers
import numpy as np
import torch

# ----------------------------------------------------------------------------- small tools


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        except Exception:  # a broken record must not break the rank
            self.lines.append(f"{record.levelname} {record.name}: <unformattable>")


def capture_logs() -> _ListHandler:
    h = _ListHandler()
    lg = logging.getLogger("dist_guardian")
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    return h


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}:" + _h(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _tree_digest(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _tensor_digest(v)
    if isinstance(v, dict):
        return {str(k): _tree_digest(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_tree_digest(x) for x in v]
    if isinstance(v, float):
        return repr(v)
    return v


def rng_digest() -> str:
    """A digest of this process's python, numpy and torch CPU (and CUDA) RNG states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    parts = [
        repr((version, internal, gauss)).encode(),
        np_state[1].tobytes(),
        repr(np_state[2:]).encode(),
        torch.get_rng_state().numpy().tobytes(),
    ]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts += [torch.cuda.get_rng_state(i).numpy().tobytes() for i in range(torch.cuda.device_count())]
    return _h(b"|".join(parts))


def state_digest(state: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of model, optimizer and scheduler, the plain trees and the RNG, as exact digests."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if hasattr(v, "state_dict") and not isinstance(v, torch.Tensor):
            out[k] = _tree_digest(v.state_dict())
        else:
            out[k] = _tree_digest(v)
    out["__rng__"] = rng_digest()
    return out


def _rank_state(seed: int, *, blob_mb: float = 0.0, device: str = "cpu") -> dict[str, Any]:
    """``helpers.make_state`` plus a replicated ``extra.blob`` of ``blob_mb`` MB of zeros (always present)."""
    state = helpers.make_state(seed, device=device)
    state["extra"] = {"blob": torch.zeros(max(1, int(blob_mb * (1 << 20)) // 4), dtype=torch.float32)}
    return state


def _write_report(report_dir: str | None, rank: int, doc: dict[str, Any]) -> None:
    if not report_dir:
        return
    tmp = os.path.join(report_dir, f".rank-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(report_dir, f"rank-{rank}.json"))


def _agent_watchdog(report_dir: str, rank: int, hard_s: float) -> None:
    """What torchrun's agent does to a hung worker: once a peer has failed, tear this one down.

    Runs in a daemon thread of the faulted rank only. A peer that raised wrote its report
    file; then this process exits 143 (as after the agent's SIGTERM). ``hard_s`` caps its life.
    """
    t0 = time.monotonic()

    def loop() -> None:
        while True:
            time.sleep(0.05)
            try:
                peers = [n for n in os.listdir(report_dir) if n.startswith("rank-") and n != f"rank-{rank}.json"]
            except OSError:
                peers = []
            if peers:
                time.sleep(0.3)
                os._exit(143)
            if time.monotonic() - t0 > hard_s:
                os._exit(124)

    threading.Thread(target=loop, name="test-agent-watchdog", daemon=True).start()


# ----------------------------------------------------------------------------- saving


def save_fixture(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    steps: list[int],
    seed: int = 0,
    dg_timeout: float = 20.0,
    blob_mb: dict[int, float] | None = None,
    fault: dict[int, str] | None = None,
    report_dir: str | None = None,
) -> dict[str, Any]:
    """Every rank builds the same model (replicated) and its own RNG stream and data position, trains one
    step before each save, and records the exact digest of what each save captured.

    ``blob_mb`` maps a step to the size of a replicated ``extra.blob`` tensor at that step (F28).
    ``fault`` maps a step to a DIST_GUARDIAN_FAULT rule active only during that save.
    """
    from dist_guardian import Guardian

    logs = capture_logs()
    state = _rank_state(seed)
    torch.manual_seed(1000 + rank)
    random.seed(2000 + rank)
    np.random.seed(3000 + rank)
    state["data"] = {"position": 100 * rank}
    g = Guardian(stores=stores, run=run, timeout=dg_timeout, per_rank=("data",))
    out: dict[str, Any] = {"committed": {}, "reasons": {}, "digests": {}, "next": {}}
    for s in steps:
        helpers.train_replicated(state, 1)
        state["data"]["position"] += 1
        mb = (blob_mb or {}).get(s, 0.0)
        state["extra"] = {"blob": torch.full((max(1, int(mb * (1 << 20)) // 4),), float(s), dtype=torch.float32)}
        rule = (fault or {}).get(s)
        if rule:
            os.environ["DIST_GUARDIAN_FAULT"] = rule
        try:
            digest = state_digest(state)
            r = g.save(state, step=s)
        finally:
            os.environ.pop("DIST_GUARDIAN_FAULT", None)
        out["committed"][s] = r.committed
        out["reasons"][s] = r.reason
        out["digests"][s] = digest
        # What a resumed run must draw next: draw on a copy of the RNG state, then put it back.
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        out["next"][s] = helpers.next_randoms()
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    g.close()
    out["logs"] = logs.lines
    out["pid"] = os.getpid()
    return out


# ----------------------------------------------------------------------------- resuming


def resume_fixture(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    dg_timeout: float = 20.0,
    seed: int = 42,
    on_exhausted: str = "fresh",
    suspect: str = "after_same_step",
    storage_options: dict | None = None,
    report_dir: str | None = None,
    watchdog_s: float | None = None,
    rlimit_as_headroom_mb: float | None = None,
    blob_mb: float = 0.0,
    probe_after_failure: bool = True,
) -> dict[str, Any]:
    """Resume into a fresh state (different seed, so anything applied shows) and report what happened.

    On success: the decision record, the exact state digest, the next random numbers, the logs.
    On failure: writes ``rank-N.json`` (error, elapsed, whether the state was untouched, whether
    the coordination group refuses further collectives) and re-raises.
    """
    from dist_guardian import Guardian
    from dist_guardian.errors import CoordinationError

    logs = capture_logs()
    if watchdog_s is not None and report_dir:
        _agent_watchdog(report_dir, rank, watchdog_s)
    state = _rank_state(seed, blob_mb=blob_mb)
    state["data"] = {"position": -1}
    before = state_digest(state)
    g = Guardian(
        stores=stores,
        run=run,
        timeout=dg_timeout,
        per_rank=("data",),
        suspect=suspect,
        on_exhausted=on_exhausted,
        storage_options=storage_options,
    )
    limit_info = None
    if rlimit_as_headroom_mb is not None:
        import resource

        _ = g.comm  # collective (every rank creates the group the same way): its threads exist before the limit
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = vm + int(rlimit_as_headroom_mb * (1 << 20))
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        limit_info = {"vmsize": vm, "limit": limit}
    t0 = time.monotonic()
    try:
        r = g.resume(state)
    except BaseException as e:
        elapsed = time.monotonic() - t0
        doc: dict[str, Any] = {
            "error_type": type(e).__name__,
            "error": str(e)[:4000],
            "elapsed": elapsed,
            "unchanged": state_digest(state) == before,
            "logs": logs.lines,
            "limit": limit_info,
        }
        if probe_after_failure and isinstance(e, CoordinationError):
            # After a failed collective the group must not be touched again ("pair closure"):
            # a later vote raises at once, and close() returns at once.
            doc["broken"] = g.comm.broken
            t1 = time.monotonic()
            try:
                g.comm.vote_min(1, "probe after failure")
                doc["probe"] = "returned"
            except CoordinationError as e2:
                doc["probe"] = f"{type(e2).__name__}: {e2}"
            doc["probe_s"] = time.monotonic() - t1
            t2 = time.monotonic()
            g.close()
            doc["close_s"] = time.monotonic() - t2
        _write_report(report_dir, rank, doc)
        raise
    elapsed = time.monotonic() - t0
    digest = state_digest(state)
    g.close()
    return {
        "resumed": r.resumed,
        "step": r.step,
        "path": r.path,
        "store": r.store,
        "tier": r.tier,
        "record": json.loads(r.to_json()),
        "warnings": list(r.warnings),
        "digest": digest,
        "unchanged": digest == before,
        "data": dict(state["data"]),
        "next": helpers.next_randoms(),
        "logs": logs.lines,
        "elapsed": elapsed,
        "limit": limit_info,
    }


# ----------------------------------------------------------------------------- independent writers


def independent_writer(
    rank: int,
    world: int,
    *,
    root: str,
    run: str,
    step: int,
    role: dict[int, str],
    fault: dict[int, str] | None = None,
    seed: int = 0,
    report_dir: str | None = None,
    wait_for_staging_s: float = 0.0,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Two separate jobs on one machine: each harness rank leaves the process group and acts as a
    world-size-1 writer into the same root (F38, F39).

    role[rank] is ``"writer"`` (save ``step`` at once), ``"zombie"`` (an old incarnation: save
    ``step`` with generation 1 and a delayed commit) or ``"new"`` (a new incarnation: wait until the
    zombie's save is in flight, resume, then save ``step``).
    """
    import torch.distributed as dist

    from dist_guardian import Guardian
    from dist_guardian import stores as dg_stores

    dist.barrier()  # both jobs start together
    dist.destroy_process_group()
    logs = capture_logs()
    if fault and rank in fault:
        os.environ["DIST_GUARDIAN_FAULT"] = fault[rank]
    state = _rank_state(seed + 17 * rank)
    torch.manual_seed(500 + rank)
    state["data"] = {"position": 7 + rank}
    g = Guardian(stores=[root], run=run, timeout=10.0, per_rank=("data",), storage_options=storage_options)
    out: dict[str, Any] = {"pid": os.getpid(), "role": role[rank]}
    if role[rank] == "new":
        run_dir = os.path.join(root, run)
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait_for_staging_s:
            if any(n.startswith(dg_stores.STAGING_PREFIX) for n in os.listdir(run_dir)):
                break
            time.sleep(0.01)
        out["saw_zombie_staging"] = any(n.startswith(dg_stores.STAGING_PREFIX) for n in os.listdir(run_dir))
        r = g.resume(state)
        out["resumed_step"] = r.step
        out["generation"] = g.generation
    out["digest"] = state_digest(state)
    t = time.monotonic()
    res = g.save(state, step=step)
    out["commit_time"] = time.time()
    out["save_s"] = time.monotonic() - t
    out.update(committed=res.committed, path=res.path, reason=res.reason, generation=g.generation)
    g.close()
    out["logs"] = logs.lines
    return out


def resume_then_save(
    rank: int,
    world: int,
    *,
    stores: list[str],
    run: str,
    steps: list[int],
    keep_last: int | None,
    dg_timeout: float = 20.0,
    seed: int = 42,
) -> dict[str, Any]:
    """Resume (whatever it decides), then train and save ``steps`` with retention on (F33: failed
    candidates are quarantined, so retention never deletes them)."""
    from dist_guardian import Guardian

    logs = capture_logs()
    state = _rank_state(seed)
    state["data"] = {"position": 0}
    before = state_digest(state)
    g = Guardian(stores=stores, run=run, timeout=dg_timeout, per_rank=("data",), keep_last=keep_last)
    r = g.resume(state)
    out: dict[str, Any] = {
        "resumed": r.resumed,
        "record": json.loads(r.to_json()),
        "unchanged": state_digest(state) == before,
        "committed": [],
    }
    for s in steps:
        helpers.train_replicated(state, 1)
        out["committed"].append(g.save(state, step=s).committed)
    g.close()
    out["logs"] = logs.lines
    return out


# ----------------------------------------------------------------------------- NCCL default group (gpu)


def round_trip_on_device(rank: int, world: int, *, phase: str, root: str, run: str, device_kind: str) -> dict[str, Any]:
    """Save (two steps, gradients averaged over the default group like DDP) or resume, on ``device_kind``."""
    import torch.distributed as dist

    from dist_guardian import Guardian

    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    torch.manual_seed(0)
    state = _rank_state(0, device=device)
    state["data"] = {"position": 100 * rank}

    def step() -> None:
        helpers.train_replicated(state, 1, device)
        # The default group (NCCL on GPUs) is in use between saves, as in a DDP job.
        t = torch.ones(1, device=device) * (rank + 1)
        dist.all_reduce(t)
        assert int(t.item()) == world * (world + 1) // 2
        state["data"]["position"] += 1

    g = Guardian(stores=[root], run=run, timeout=30.0, per_rank=("data",))
    if phase == "save":
        torch.manual_seed(1000 + rank)
        if device_kind == "cuda":
            torch.cuda.manual_seed(2000 + rank)
        random.seed(3000 + rank)
        np.random.seed(4000 + rank)
        out: dict[str, Any] = {"committed": []}
        for s in (10, 20):
            step()
            digest = state_digest(state)
            out["committed"].append(g.save(state, step=s).committed)
        g.close()
        out["digest"] = digest
        out["next"] = helpers.next_randoms(device)
        return out
    state["data"] = {"position": -1}
    r = g.resume(state)
    digest = state_digest(state)
    nxt = helpers.next_randoms(device)
    step()  # training continues on the default group after the resume
    g.close()
    return {
        "resumed": r.resumed,
        "step": r.step,
        "digest": digest,
        "next": nxt,
        "param_device": str(next(state["model"].parameters()).device),
    }
