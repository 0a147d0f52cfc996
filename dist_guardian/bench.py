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


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` (Agg backend), or a :class:`ConfigError` saying how to get it.

    Imported only here: matplotlib is the ``plot`` extra, not a dependency of checkpointing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import ConfigError

        raise ConfigError("dist-guardian bench --plot needs matplotlib: pip install 'dist-guardian[plot]'") from None
    return plt


def sweep(
    store_url: str, *, size_mb: int, runs: int = 1, counts: tuple[int, ...] = (10, 1_000, 10_000, 100_000)
) -> list[dict[str, Any]]:
    """Save and load time against size and against tensor count, for dist_guardian and (local stores) its peers.

    Sizes: 1/16, 1/4 and all of ``size_mb``; counts: 10 ... 100,000 tensors (of 64 floats or more) of
    ``min(size_mb, 64)`` MiB in all. Every save writes a new path. Rows: ``{"sweep", "x", "method",
    "seconds"}`` (median of ``runs``).
    """
    import tempfile

    import torch

    from . import stores

    local = stores.resolve(store_url, 0, None).is_local
    out: list[dict[str, Any]] = []
    cases = [("size_mb", mb, mb, 8) for mb in sorted({max(1, size_mb // 16), max(1, size_mb // 4), size_mb})]
    count_mb = min(size_mb, 64)
    cases += [("tensors", n, count_mb, n) for n in counts if count_mb * 2**18 >= 64 * n]  # >= 64 floats each
    for sweep_name, x, mb, n in cases:
        per = max(1, mb * 2**18 // n)
        state = {"model": {f"t{i}": torch.randn(per) for i in range(n)}}
        times: dict[str, list[float]] = {}
        for r in range(runs):
            run = f"dg-sweep-{uuid.uuid4().hex[:8]}"
            _guardian_round(store_url, run, state, r, {}, lambda k, t: times.setdefault(k, []).append(t))
            _cleanup(stores.resolve(store_url, 0, None), run)
            if local:
                with tempfile.TemporaryDirectory(dir=stores.resolve(store_url, 0, None).root) as d:
                    for k, t in _peer_round(state, d).items():
                        times.setdefault(k, []).append(t)
        out += [{"sweep": sweep_name, "x": x, "method": k, "seconds": statistics.median(v)} for k, v in times.items()]
    return out


def _peer_round(state: dict[str, Any], d: str) -> dict[str, float]:
    """torch.save/torch.load and safetensors save/load (with a copy) of ``state``, each to a new file, fsynced."""
    import torch

    flat = {f"model.{k}": v for k, v in state["model"].items()}
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.save(state, os.path.join(d, "s.pt"))
    _fsync(os.path.join(d, "s.pt"))
    out["torch.save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.load(os.path.join(d, "s.pt"), weights_only=True)
    out["torch.load"] = time.perf_counter() - t0
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        return out
    t0 = time.perf_counter()
    save_file(flat, os.path.join(d, "s.st"))
    _fsync(os.path.join(d, "s.st"))
    out["safetensors save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    {k: v.clone() for k, v in load_file(os.path.join(d, "s.st")).items()}
    out["safetensors load + copy"] = time.perf_counter() - t0
    return out


def _fsync(path: str) -> None:
    from . import stores

    fd = stores.open_regular(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plot(rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]], path: str) -> None:
    """Two panels, time against size and against tensor count, one line per method; and the bench's figures."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, label in ((axes[0], "size_mb", "state size (MiB)"), (axes[1], "tensors", "tensors (same bytes)")):
        pts = [r for r in sweep_rows if r["sweep"] == name]
        for method in sorted({r["method"] for r in pts}):
            xs = sorted((r["x"], r["seconds"]) for r in pts if r["method"] == method)
            style = "-o" if method.startswith("dist_guardian") else "--."
            ax.plot([x for x, _ in xs], [y for _, y in xs], style, label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    summary = ", ".join(f"{r['method']} {r['gb_s']:.2f} GB/s" for r in rows)
    fig.suptitle(f"{rows[0]['store'] if rows else ''}: {summary}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}")


def main(args) -> int:
    opts = json.loads(args.storage_options) if args.storage_options else None
    if args.plot:
        require_matplotlib()  # before minutes of measuring
    rows = run_bench(
        args.store, size_mb=args.size_mb, runs=args.runs, storage_options=opts, concurrency=args.concurrency
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows)
    if args.plot:
        plot(rows, sweep(args.store, size_mb=args.size_mb), args.plot)
    return 0
