"""Run a function on N ranks as real processes joined by gloo (or another default backend): the one rank bootstrap.

forkserver with torch preloaded and a TCPStore hosted by the test process: ~0.1 s per
2-rank run after the first (research/ecosystem.md), where spawn costs 4-6 s. Each rank may
get its own environment (a fault rule, a node-local root: "two nodes on one machine").
A rank that dies (SIGKILL, os._exit) or hangs is reported, never waited on past the deadline.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

_CTX = None


def ctx() -> Any:
    """The forkserver context every harness run (and the S3 tests' child processes) starts from.

    Preloaded modules are named as the children import them: ``support/`` is on ``sys.path``.
    """
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # The first optimizer step imports torch._dynamo (~3 s per rank here): preload it too,
        # so each 2-rank run costs ~0.3 s instead of 2-4 s.
        _CTX.set_forkserver_preload(
            [
                "torch",
                "torch.distributed",
                "numpy",
                "torch._dynamo",
                "torch.optim",
                "dist_guardian.guardian",
                "dg_harness",
                "helpers",
            ]
        )
    return _CTX


@dataclass
class RankOutcome:
    """What each rank of one run returned or raised, how it exited, and how long the run took."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # rank -> "Type: message\ntraceback"
    exitcodes: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def error_type(self, rank: int) -> str | None:
        e = self.errors.get(rank)
        return e.split(":", 1)[0] if e else None

    def ok(self) -> bool:
        return not self.errors and len(self.results) == len(self.exitcodes)


@dataclass(frozen=True)
class _Launch:
    """How one rank joins: the test process's TCPStore, the default backend and its timeouts, its environment."""

    env: dict[str, str]
    port: int = 0  # the TCPStore's, filled in by _run once it is listening
    backend: str = "gloo"
    pg_timeout_s: float = 20.0
    store_timeout_s: float = 30.0
    debug_detail: bool = True  # TORCH_DISTRIBUTED_DEBUG=DETAIL unless the environment says otherwise


def _entry(fn: Callable[..., Any], rank: int, world: int, launch: _Launch, q: Any, kwargs: dict[str, Any]) -> None:
    """The bootstrap of every harness rank: join the default group, run ``fn``, report, exit at once."""
    os.environ.update(launch.env)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    if launch.debug_detail:
        os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    import torch
    import torch.distributed as dist

    code = 0
    try:
        device_kw = {}
        if launch.backend == "nccl":
            torch.cuda.set_device(rank)
            device_kw["device_id"] = torch.device("cuda", rank)
        store = dist.TCPStore(
            "127.0.0.1", launch.port, world, is_master=False, timeout=datetime.timedelta(seconds=launch.store_timeout_s)
        )
        dist.init_process_group(
            launch.backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=launch.pg_timeout_s),
            **device_kw,
        )
        # By value (plain pickle): a tensor put on the queue as it is travels as a shared-memory fd that
        # the parent fetches from this process later, which fails when this rank has exited by then.
        q.put((rank, "ok", pickle.dumps(fn(rank, world, **kwargs))))
    except BaseException as e:  # report everything, including SystemExit/KeyboardInterrupt
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        code = 3
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    # Exit without interpreter teardown: a gloo thread freeing tensors at exit can abort
    # (DESIGN section 4); everything this rank reports has been put on the queue already.
    q.close()
    q.join_thread()
    os._exit(code)


def run_ranks(
    fn: Callable[..., Any],
    world: int = 2,
    *,
    timeout: float = 60.0,
    pg_timeout_s: float = 20.0,
    env: dict[int, dict[str, str]] | None = None,
    common_env: dict[str, str] | None = None,
    **kwargs: Any,
) -> RankOutcome:
    """Run ``fn(rank, world, **kwargs)`` on ``world`` processes; return what each rank returned or raised."""
    launches = []
    for r in range(world):
        e = dict(common_env or {})
        e.update((env or {}).get(r, {}))
        launches.append(_Launch(env=e, pg_timeout_s=pg_timeout_s))
    return _run(ctx(), fn, launches, timeout, kwargs)


def run_ranks_backend(
    fn: Callable[..., Any], world: int, backend: str, *, timeout: float = 120.0, **kwargs: Any
) -> RankOutcome:
    """``run_ranks`` for a default group other than gloo (NCCL): spawned ranks (CUDA must not be
    initialized before a fork), ``LOCAL_RANK`` set, 60 s timeouts, the same reporting."""
    launches = [
        _Launch(
            env={"LOCAL_RANK": str(r)}, backend=backend, pg_timeout_s=60.0, store_timeout_s=60.0, debug_detail=False
        )
        for r in range(world)
    ]
    return _run(mp.get_context("spawn"), fn, launches, timeout, kwargs)


def _run(
    c: Any, fn: Callable[..., Any], launches: list[_Launch], timeout: float, kwargs: dict[str, Any]
) -> RankOutcome:
    """Start one process per launch, hosting their TCPStore here; collect until all reported, died or the deadline."""
    import torch.distributed as dist

    world = len(launches)
    store = dist.TCPStore(
        "127.0.0.1", 0, world + 1, is_master=True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False
    )
    q = c.Queue()
    procs = []
    for r, launch in enumerate(launches):
        p = c.Process(target=_entry, args=(fn, r, world, replace(launch, port=store.port), q, kwargs), daemon=True)
        p.start()
        procs.append(p)
    out = RankOutcome()
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        _collect(q, procs, out, deadline)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
        out.exitcodes = {i: p.exitcode for i, p in enumerate(procs)}
        out.seconds = time.monotonic() - t0
    for i, p in enumerate(procs):
        if i not in out.results and i not in out.errors:
            out.errors[i] = f"Died: rank {i} exited with {p.exitcode} without reporting"
    return out


def _report(out: RankOutcome, rank: int, kind: str, val: Any) -> None:
    if kind == "ok":
        out.results[rank] = pickle.loads(val)  # a result this test's own rank function returned
    else:
        out.errors[rank] = val


def _collect(q: Any, procs: list[Any], out: RankOutcome, deadline: float) -> None:
    """Take reports off the queue until every rank reported, or every silent rank has exited, or the deadline."""
    world = len(procs)
    while len(out.results) + len(out.errors) < world and time.monotonic() < deadline:
        try:
            rank, kind, val = q.get(timeout=0.05)
            _report(out, rank, kind, val)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode is not None]
            reported = set(out.results) | set(out.errors)
            if dead and all(i in reported or procs[i].exitcode is not None for i in range(world)):
                time.sleep(0.2)
                while True:
                    try:
                        rank, kind, val = q.get_nowait()
                        _report(out, rank, kind, val)
                    except queue.Empty:
                        break
                break
