"""Shared pieces of the benchmarks: a realistic state, timing, page-cache control, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def transformer_state(total_bytes: int, *, n_small: int = 200, seed: int = 0) -> dict[str, Any]:
    """A transformer-like mix: bf16 weight matrices, fp32 norms/biases, fp32 Adam moments, scalars.

    Model tensors are ~1/5 of the bytes (bf16), Adam moments ~4/5 (two fp32 copies), as in a
    mixed-precision run. ``n_small`` small tensors stand in for norms and biases.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = 1024
    per_param = 2 + 4 + 4  # bf16 weight + fp32 exp_avg + fp32 exp_avg_sq
    n_params = max(total_bytes // per_param, hidden * hidden)
    n_layers = max(1, int(n_params // (4 * hidden * hidden)))
    model: dict[str, torch.Tensor] = {}
    for layer in range(n_layers):
        model[f"layers.{layer}.attn.qkv.weight"] = torch.randn(3 * hidden, hidden, generator=g).to(torch.bfloat16)
        model[f"layers.{layer}.mlp.fc.weight"] = torch.randn(hidden, hidden, generator=g).to(torch.bfloat16)
    for i in range(n_small):
        model[f"norms.{i}.weight"] = torch.randn(hidden, generator=g)
    state = {
        name: {
            "step": torch.tensor(10.0),
            "exp_avg": torch.randn(t.shape, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(t.shape, generator=g) * 1e-6,
        }
        for name, t in model.items()
    }
    optim = {
        "state": state,
        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(model)}],
    }
    return {"model": model, "optim": optim, "trainer": {"step": 1000, "tokens": 123456789}}


def state_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return 0


def touch(tree: Any) -> None:
    """Touch one byte per 4 KiB page of every tensor, so a lazily mapped load counts its page faults."""
    if isinstance(tree, torch.Tensor):
        if tree.numel():
            flat = (
                tree.reshape(-1).view(torch.uint8)
                if tree.is_contiguous()
                else tree.contiguous().reshape(-1).view(torch.uint8)
            )
            int(flat[::4096].sum())
    elif isinstance(tree, dict):
        for v in tree.values():
            touch(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            touch(v)


def drop_cache(path: str) -> None:
    """Drop a file's (or a directory's files') pages from the page cache: a cold read follows."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def raw_read(path: str, buf: memoryview, chunk: int = 8 << 20) -> None:
    """The baseline: readinto 8 MiB chunks into a pre-touched buffer, one thread."""
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos : pos + chunk])
            if not n:
                break
            pos += n


def raw_write_fsync(path: str, buf: memoryview, chunk: int = 8 << 20) -> None:
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(buf), chunk):
            f.write(buf[i : i + chunk])
        os.fsync(f.fileno())


def timed(fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    if before:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def print_table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format)."""
    print(f"\n{title}")
    widths = [
        max(len(h), *(len(format(r.get(k, ""), f) if r.get(k) is not None else "-") for r in rows)) for k, h, f in cols
    ]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(
            "  ".join((format(r[k], f) if r.get(k) is not None else "-").ljust(w) for (k, _, f), w in zip(cols, widths))
        )


def write_jsonl(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
