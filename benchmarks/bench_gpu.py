"""Host-to-device: dist_guardian's pinned staging against ``tensor.to('cuda')`` of the same bytes.

Runs unchanged on a machine with CUDA; on a CPU-only machine it says so and exits 0.

    python benchmarks/bench_gpu.py --size-mb 2048 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=2048)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "gpu.jsonl"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (bench_gpu runs on a GPU machine)")
        return 0
    dev = torch.device("cuda", 0)
    n = args.size_mb * 2**20 // 4
    cols = 8192
    host = {f"w{i}": torch.randn(n // cols // 8, cols) for i in range(8)}
    nbytes = common.state_bytes(host)
    model = {k: torch.empty_like(v, device=dev) for k, v in host.items()}
    base = tempfile.mkdtemp(prefix="dg-gpu-")
    rows = []
    try:
        Guardian(stores=[base], run="gpu", rng=False).save({"model": host}, step=1)
        t_to, t_pinned_to, t_resume = [], [], []
        pinned = {k: v.pin_memory() for k, v in host.items()}
        for _ in range(args.runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k, v in host.items():
                model[k].copy_(v.to(dev))
            torch.cuda.synchronize()
            t_to.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for k, v in pinned.items():
                model[k].copy_(v, non_blocking=True)
            torch.cuda.synchronize()
            t_pinned_to.append(time.perf_counter() - t0)
            target = torch.nn.Module()
            for k, v in model.items():
                target.register_buffer(k, v)
            common.warm_cache(os.path.join(base, "gpu"))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = Guardian(stores=[base], run="gpu", rng=False).resume({"model": target})
            torch.cuda.synchronize()
            t_resume.append(time.perf_counter() - t0)
            assert r.resumed
        for name, ts in (
            ("tensor.to('cuda') (pageable)", t_to),
            ("pinned copy_ (non_blocking)", t_pinned_to),
            ("dist_guardian resume into cuda model (read+verify+H2D)", t_resume),
        ):
            rows.append({"method": name, "seconds": common.median(ts), "gb_s": nbytes / common.median(ts) / 1e9})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    common.print_table(
        f"host to device, {nbytes / 1e9:.2f} GB, median of {args.runs} on {torch.cuda.get_device_name(0)}",
        rows,
        [("method", "method", "s"), ("seconds", "s", ".3f"), ("gb_s", "GB/s", ".2f")],
    )
    common.write_jsonl(args.out, rows, {"bench": "gpu", **common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
