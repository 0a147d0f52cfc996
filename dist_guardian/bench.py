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
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def run_bench(
    store_url: str, *, size_mb: int = 256, runs: int = 3, storage_options: dict | None = None, concurrency: int = 1
) -> list[dict[str, Any]]:
    import torch

    from . import stores

    store = stores.resolve(store_url, 0, storage_options)
    run = f"dg-bench-{uuid.uuid4().hex[:8]}"
    nbytes = size_mb * 2**20
    n = nbytes // 4
    rows = [max(1, n // 4096), 4096] if n >= 4096 else [1, n]
    state = {"weights": {f"w{i}": torch.randn(rows[0] // 8 or 1, rows[1]) for i in range(8)}}
    payload = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    times: dict[str, list[float]] = {}

    def add(name: str, t: float) -> None:
        times.setdefault(name, []).append(t)

    knobs = {"storage_options": storage_options, "remote_concurrency": concurrency}
    try:
        for r in range(runs):
            rel = f"{run}/raw-{r}.bin"
            t0 = time.perf_counter()
            _raw_write(store, rel, payload.numpy().data)
            add("raw write", time.perf_counter() - t0)
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf.fill_(0)
            t0 = time.perf_counter()
            _raw_read(store, rel, buf.numpy().data)
            add("raw read", time.perf_counter() - t0)
            _guardian_round(store_url, run, state, r, knobs, add)
    finally:
        _cleanup(store, run)
    size = sum(t.numel() * t.element_size() for t in state["weights"].values())
    return _rows(store_url, times, raw_bytes=nbytes, state_bytes=size)


# The raw baselines talk to the OS or to fsspec directly, on purpose: they are what dist_guardian is measured
# against, so they branch on the store's kind themselves instead of going through a stores helper.


def _raw_write(store: Any, rel: str, mv: memoryview) -> None:
    from . import stores

    if store.is_local:
        stores.makedirs_local(store.join(rel.rpartition("/")[0]))
        fd = stores.create_exclusive(store.join(rel))
        try:
            pos = 0
            while pos < len(mv):
                pos += os.write(fd, mv[pos : pos + (8 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    fs = stores.filesystem(store)
    stores.call(store, "bench put", lambda: fs.pipe_file(store.join(rel), bytes(mv)), deadline_s=3600)


def _raw_read(store: Any, rel: str, dst: memoryview) -> None:
    from . import stores

    if not store.is_local:
        stores.read_range_into(store, rel, 0, dst, concurrency=1)
        return
    with os.fdopen(stores.open_regular(store.join(rel)), "rb", buffering=0) as f:
        pos = 0
        while pos < len(dst):
            pos += f.readinto(dst[pos : pos + (8 << 20)]) or 0


def _guardian_round(
    store_url: str, run: str, state: dict[str, Any], step: int, knobs: dict[str, Any], add: Callable[[str, float], None]
) -> None:
    """One blocking save and one resume through ``Guardian``, each timed."""
    from .commit import SaveResult
    from .guardian import Guardian

    g = Guardian(stores=[store_url], run=run, rng=False, timeout=3600, **knobs)
    t0 = time.perf_counter()
    res = g.save(state, step=step)
    add("dist_guardian save", time.perf_counter() - t0)
    assert isinstance(res, SaveResult)  # blocking save
    g.close()
    if not res.committed:
        raise RuntimeError(f"bench save failed: {res.reason}")
    target: dict[str, Any] = {"weights": {}}
    t0 = time.perf_counter()
    rr = Guardian(stores=[store_url], run=run, rng=False, timeout=3600, **knobs).resume(target)
    add("dist_guardian resume", time.perf_counter() - t0)
    if not rr.resumed:
        raise RuntimeError("bench resume found nothing")


def _rows(store_url: str, times: dict[str, list[float]], *, raw_bytes: int, state_bytes: int) -> list[dict[str, Any]]:
    """The median of each method, in GB/s and as a multiple of the raw write or read."""
    out: list[dict[str, Any]] = []
    for name, ts in times.items():
        b = raw_bytes if name.startswith("raw") else state_bytes
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
        stores.delete_tree(store, run)
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
