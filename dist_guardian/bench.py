"""``dist-guardian bench STORE``: what your storage gives, and what dist_guardian gets from it.

Measures, on the user's own store and in the same run: a raw write (write+fsync locally,
one PUT remotely) and a raw read (readinto locally, one GET remotely) of the same bytes,
then a dist_guardian save (checksums, fsync, atomic commit) and a resume (every checksum
verified) of a state of that size. Everything is written under a private run name that is
removed afterwards; nothing else in the store is touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)


def run_bench(
    store_url: str, *, size_mb: int = 256, runs: int = 3, storage_options: dict | None = None, concurrency: int = 1
) -> list[dict[str, Any]]:
    import torch

    from . import stores
    from .guardian import Guardian
    from .commit import SaveResult

    store = stores.resolve(store_url, 0, storage_options)
    run = f"dg-bench-{uuid.uuid4().hex[:8]}"
    nbytes = size_mb * 2**20
    n = nbytes // 4
    rows = [max(1, n // 4096), 4096] if n >= 4096 else [1, n]
    state = {"weights": {f"w{i}": torch.randn(rows[0] // 8 or 1, rows[1]) for i in range(8)}}
    payload = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    mv = payload.numpy().data
    times: dict[str, list[float]] = {}

    def add(name: str, t: float) -> None:
        times.setdefault(name, []).append(t)

    try:
        for r in range(runs):
            rel = f"{run}/raw-{r}.bin"
            t0 = time.perf_counter()
            if store.is_local:
                os.makedirs(store.join(run), exist_ok=True)
                fd = stores.create_exclusive(store.join(rel))
                try:
                    pos = 0
                    while pos < len(mv):
                        pos += os.write(fd, mv[pos : pos + (8 << 20)])
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                fs = stores.filesystem(store)
                stores.call(store, "bench put", lambda: fs.pipe_file(store.join(rel), bytes(mv)), deadline_s=3600)
            add("raw write", time.perf_counter() - t0)
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf.fill_(0)
            t0 = time.perf_counter()
            if store.is_local:
                with os.fdopen(stores.open_regular(store.join(rel)), "rb", buffering=0) as f:
                    dst = buf.numpy().data
                    pos = 0
                    while pos < nbytes:
                        pos += f.readinto(dst[pos : pos + (8 << 20)]) or 0
            else:
                stores.read_range_into(store, rel, 0, buf.numpy().data, concurrency=1)
            add("raw read", time.perf_counter() - t0)
            g = Guardian(
                stores=[store_url],
                run=run,
                rng=False,
                storage_options=storage_options,
                remote_concurrency=concurrency,
                timeout=3600,
            )
            t0 = time.perf_counter()
            res = g.save(state, step=r)
            add("dist_guardian save", time.perf_counter() - t0)
            assert isinstance(res, SaveResult)  # blocking save
            g.close()
            if not res.committed:
                raise RuntimeError(f"bench save failed: {res.reason}")
            target: dict[str, Any] = {"weights": {}}
            t0 = time.perf_counter()
            rr = Guardian(
                stores=[store_url],
                run=run,
                rng=False,
                storage_options=storage_options,
                remote_concurrency=concurrency,
                timeout=3600,
            ).resume(target)
            add("dist_guardian resume", time.perf_counter() - t0)
            if not rr.resumed:
                raise RuntimeError("bench resume found nothing")
    finally:
        _cleanup(store, run)
    size = sum(t.numel() * t.element_size() for t in state["weights"].values())
    out = []
    for name, ts in times.items():
        b = nbytes if name.startswith("raw") else size
        med = statistics.median(ts)
        out.append({"store": store_url, "method": name, "seconds": med, "gb_s": b / med / 1e9, "runs": len(ts)})
    base = {r["method"]: r["gb_s"] for r in out}
    for r in out:
        ref = base["raw write"] if "write" in r["method"] or "save" in r["method"] else base["raw read"]
        r["x_raw"] = r["gb_s"] / ref
    return out


def _cleanup(store, run: str) -> None:
    from . import stores

    try:
        if store.is_local:
            shutil.rmtree(store.join(run), ignore_errors=True)
        else:
            fs = stores.filesystem(store)
            stores.call(store, "bench cleanup", lambda: fs.rm(store.join(run), recursive=True), deadline_s=600)
    except OSError as e:
        log.warning("could not remove the bench run %s: %s", run, e)


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<22} {'seconds':>8} {'GB/s':>7} {'x raw':>6}")
    for r in rows:
        print(f"{r['method']:<22} {r['seconds']:>8.3f} {r['gb_s']:>7.2f} {r['x_raw']:>6.2f}")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dist-guardian bench: --plot needs matplotlib (pip install dist-guardian[plot])", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["method"] for r in rows], [r["gb_s"] for r in rows], color=["#999", "#999", "#2a7", "#2a7"][: len(rows)])
    ax.set_ylabel("GB/s")
    ax.set_title(f"{rows[0]['store']}")
    for i, r in enumerate(rows):
        ax.text(i, r["gb_s"], f"{r['x_raw']:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(args) -> int:
    opts = json.loads(args.storage_options) if args.storage_options else None
    rows = run_bench(
        args.store, size_mb=args.size_mb, runs=args.runs, storage_options=opts, concurrency=args.concurrency
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows)
    if args.plot:
        plot(rows, args.plot)
    return 0
