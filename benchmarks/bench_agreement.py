"""Cost of the agreement rounds on gloo (CPU): one vote, the availability vote, a whole resume.

For each world size (--ranks, default 1,2,4) it starts that many real processes joined by
gloo on 127.0.0.1 and measures, round by round (--rounds, default 50, at least 20):

  vote_min      one agreement round: the MIN all-reduce of one int64 that decides an attempt
                (``Comm.vote_min``, on dist_guardian's own gloo group)
  vote_bits64   the availability vote over 64 plan entries (``Comm.vote_bits``)
  plan_hash     the plan-hash check after the broadcast (``Comm.check_same``, F27)
  resume_warm   ``Guardian.resume`` of a store holding one small checkpoint (discovery on rank
                0, broadcast, hash check, availability vote, load, vote, apply, journal), on a
                Guardian whose coordination group exists already
  resume_cold   the same with a new Guardian each round (creating its gloo group is included)

A round's time is the slowest rank's (all ranks start it together after a sync vote); the
table shows the median and p90 over rounds, in milliseconds. World size 1 is the no-op path
(no process group). The vote figures use ``dist_guardian.comm`` directly (internal API: the
public surface has no way to time one vote alone); the resume figures use the public API.

    python benchmarks/bench_agreement.py --rounds 50 --out benchmarks/out/agreement.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPS = ("vote_min", "vote_bits64", "plan_hash", "resume_warm", "resume_cold")


def _state():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    opt.zero_grad()
    return {"model": model, "optim": opt, "trainer": {"step": 1}}


def _worker(rank: int, world: int, port: int, rounds: int, root: str, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    logging.disable(logging.WARNING)  # the per-round resume decision lines are INFO; keep warnings out too
    try:
        import torch
        import torch.distributed as dist

        from dist_guardian import Guardian
        from dist_guardian.comm import Comm

        if world > 1:
            store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
            )
        comm = Comm(60.0)
        state = _state()
        g = Guardian(stores=[root], run="bench", timeout=60.0)
        g.save(state, step=1)
        plan = bytes(range(256)) * 16  # a 4 KiB plan, the same on every rank
        bits = [True] * 64

        def sync() -> None:
            comm.vote_min(1, "sync")

        def slowest(dt: float) -> float:
            # The round's cost is its slowest rank's (gathered after the round, outside the timing).
            t = torch.tensor([dt], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
            return float(t.item())

        def measure(fn) -> list[float]:
            fn()  # warm-up round
            out = []
            for _ in range(rounds):
                sync()
                t0 = time.perf_counter()
                fn()
                out.append(slowest(time.perf_counter() - t0))
            return out

        def resume_cold() -> None:
            g2 = Guardian(stores=[root], run="bench", timeout=60.0)
            r = g2.resume(state)
            assert r.resumed and r.step == 1
            g2.close()

        def resume_warm() -> None:
            r = g.resume(state)
            assert r.resumed and r.step == 1

        res = {
            "vote_min": measure(lambda: comm.vote_min(2, "bench vote")),
            "vote_bits64": measure(lambda: comm.vote_bits(bits, "bench availability")),
            "plan_hash": measure(lambda: comm.check_same(plan, "bench plan hash")),
            "resume_warm": measure(resume_warm),
            "resume_cold": measure(resume_cold),
        }
        g.close()
        comm.close()
        q.put((rank, "ok", res))
        code = 0
    except BaseException as e:  # report, never hang the parent
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        code = 3
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    q.close()
    q.join_thread()
    os._exit(code)  # no interpreter teardown with gloo threads around (DESIGN section 4)


def run_world(world: int, rounds: int, timeout: float) -> dict[str, list[float]]:
    import torch.distributed as dist

    root = tempfile.mkdtemp(prefix=f"dg-bench-agree-{world}-")
    try:
        master = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False) if world > 1 else None
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["torch", "torch.distributed", "torch._dynamo", "torch.optim", "dist_guardian.guardian"]
        )
        q = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(r, world, master.port if master else 0, rounds, root, q), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, kind, val = q.get(timeout=0.5)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
                continue
            if kind != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{val}")
            got[rank] = val
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if len(got) < world:
            raise RuntimeError(f"world {world}: only ranks {sorted(got)} reported within {timeout:.0f}s")
        return got[0]  # every rank holds the same per-round maxima
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=50, help="measured rounds per operation (at least 20)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per world size")
    p.add_argument(
        "--out", default=os.path.join("benchmarks", "out", "agreement.jsonl"), help="JSON lines appended here"
    )
    args = p.parse_args(argv)
    if args.rounds < 20:
        p.error("--rounds must be at least 20 (medians of fewer rounds are noise on a shared machine)")
    worlds = [int(x) for x in args.ranks.split(",") if x.strip()]
    rows = []
    for w in worlds:
        load0 = os.getloadavg()[0]
        res = run_world(w, args.rounds, args.timeout)
        for op in OPS:
            xs = sorted(res[op])
            rows.append(
                {
                    "bench": "agreement",
                    "world": w,
                    "op": op,
                    "rounds": len(xs),
                    "median_ms": statistics.median(xs) * 1e3,
                    "p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3,
                    "min_ms": xs[0] * 1e3,
                    "max_ms": xs[-1] * 1e3,
                    "loadavg": load0,
                }
            )
    common.print_table(
        "Agreement cost on gloo (CPU), slowest rank per round, milliseconds",
        rows,
        [
            ("world", "ranks", "d"),
            ("op", "operation", "s"),
            ("median_ms", "median", ".3f"),
            ("p90_ms", "p90", ".3f"),
            ("min_ms", "min", ".3f"),
            ("rounds", "rounds", "d"),
            ("loadavg", "load", ".1f"),
        ],
    )
    common.write_jsonl(args.out, rows, common.machine())
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
