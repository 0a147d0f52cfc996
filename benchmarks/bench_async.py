"""How much a training loop slows while an async save runs in the background, and how long it is blocked.

The "training loop" is a CPU matmul loop on this machine's cores (torch's intra-op threads).
For each round: step times with no save (baseline), then ``save(blocking=False)`` of a --size
GiB state (its return is the blocked time: the snapshot copy), then step times until the
background save completes. Reported: the blocked time, the background save's duration, and the
median step time during the save against the baseline (the slowdown), per round and as medians.

    python benchmarks/bench_async.py --size 1 --runs 3

The background writer is a thread of the training process; xxhash and os.write release the
GIL, and the writer holds it only between 64 MiB chunks. Run it twice to tell the GIL from the
cores: with --threads 1 the loop needs one core and the writer has the other, so a slowdown
that remains there is the interpreter lock (or memory bandwidth); with the default threads the
loop and the writer also compete for the two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402


def steps(a: torch.Tensor, b: torch.Tensor, *, n: int | None = None, until=None) -> list[float]:
    out = []
    while (n is not None and len(out) < n) or (until is not None and not until()):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=float, default=1.0, help="GiB saved in the background (default %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the loop (0: torch's default)")
    p.add_argument("--matmul", type=int, default=768, help="square matrix size of one step")
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "async.jsonl"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_big = max(1, int(args.size * 64))
    g = torch.Generator().manual_seed(0)
    state = {"model": {f"w{i}": torch.randn(4 << 20, generator=g) for i in range(n_big)}}  # 16 MiB each
    nbytes = common.state_bytes(state)
    a, b = torch.randn(args.matmul, args.matmul), torch.randn(args.matmul, args.matmul)
    base = tempfile.mkdtemp(prefix="dg-async-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    load0 = os.getloadavg()
    rows = []
    try:
        guard = Guardian(stores=[base], run="bench", rng=False, keep_last=1)
        steps(a, b, n=20)  # warm-up
        for r in range(args.runs):
            quiet = steps(a, b, n=40)
            t0 = time.perf_counter()
            fut = guard.save(state, step=r + 1, blocking=False)
            blocked = time.perf_counter() - t0
            during = steps(a, b, until=fut.done)
            res = fut.result()
            total = time.perf_counter() - t0
            assert res.committed, res.reason
            row = {
                "round": r,
                "blocked_s": blocked,
                "save_s": total,
                "step_quiet_ms": 1e3 * statistics.median(quiet),
                "step_during_ms": 1e3 * statistics.median(during) if during else None,
                "steps_during": len(during),
            }
            row["slowdown"] = row["step_during_ms"] / row["step_quiet_ms"] if during else None
            rows.append(row)
            print(row, flush=True)
        guard.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load1 = os.getloadavg()
    med = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in rows[0] if k != "round"}
    med["round"] = "median"
    meta = {"bench": "async", "bytes": nbytes, "threads": torch.get_num_threads(), "matmul": args.matmul}
    meta |= {"loadavg_before": load0, "loadavg_after": load1, **common.machine()}
    common.print_table(
        f"async save of {nbytes / 1e9:.2f} GB while a {args.matmul}x{args.matmul} matmul loop runs "
        f"({torch.get_num_threads()} threads); load average {load0[0]:.2f} before, {load1[0]:.2f} after",
        [*rows, med],
        [
            ("round", "round", ""),
            ("blocked_s", "blocked s", ".3f"),
            ("save_s", "save s", ".2f"),
            ("step_quiet_ms", "step, no save ms", ".2f"),
            ("step_during_ms", "step, during save ms", ".2f"),
            ("slowdown", "slowdown", ".2f"),
        ],
    )
    common.write_jsonl(args.out, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
