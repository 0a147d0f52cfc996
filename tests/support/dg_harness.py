"""Run a function on N ranks as real processes joined by gloo.

forkserver with torch preloaded and a TCPStore hosted by the test process: ~0.1 s per
2-rank run after the first (research/ecosystem.md), where spawn costs 4-6 s. Each rank may
get its own environment (a fault rule, a node-local root: "two nodes on one machine").
A rank that dies (SIGKILL, os._exit) or hangs is reported, never waited on past the deadline.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

_CTX = None


def ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # The first optimizer step imports torch._dynamo (~3 s per rank here): preload it too,
        # so each 2-rank run costs ~0.3 s instead of 2-4 s.
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "numpy", "torch._dynamo", "torch.optim",
                                     "dist_guardian.guardian", "dg_harness", "helpers"])
    return _CTX


@dataclass
class RankOutcome:
    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # rank -> "Type: message\ntraceback"
    exitcodes: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def error_type(self, rank: int) -> str | None:
        e = self.errors.get(rank)
        return e.split(":", 1)[0] if e else None

    def ok(self) -> bool:
        return not self.errors and len(self.results) == len(self.exitcodes)


def _entry(fn, rank, world, port, pg_timeout_s, q, env, kwargs):
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    import torch.distributed as dist

    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        q.put((rank, "ok", fn(rank, world, **kwargs)))
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


def run_ranks(fn: Callable[..., Any], world: int = 2, *, timeout: float = 60.0, pg_timeout_s: float = 20.0,
              env: dict[int, dict[str, str]] | None = None, common_env: dict[str, str] | None = None,
              **kwargs: Any) -> RankOutcome:
    """Run ``fn(rank, world, **kwargs)`` on ``world`` processes; return what each rank returned or raised."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    c = ctx()
    q = c.Queue()
    procs = []
    for r in range(world):
        e = dict(common_env or {})
        e.update((env or {}).get(r, {}))
        p = c.Process(target=_entry, args=(fn, r, world, store.port, pg_timeout_s, q, e, kwargs), daemon=True)
        p.start()
        procs.append(p)
    out = RankOutcome()
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        while len(out.results) + len(out.errors) < world and time.monotonic() < deadline:
            try:
                rank, kind, val = q.get(timeout=0.05)
                (out.results if kind == "ok" else out.errors)[rank] = val
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None]
                reported = set(out.results) | set(out.errors)
                if dead and all(i in reported or procs[i].exitcode is not None for i in range(world)):
                    time.sleep(0.2)
                    while True:
                        try:
                            rank, kind, val = q.get_nowait()
                            (out.results if kind == "ok" else out.errors)[rank] = val
                        except queue.Empty:
                            break
                    break
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
