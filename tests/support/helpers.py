"""Test helpers: a small training state, how it trains, exact snapshots of it, and the "nothing lost" invariant.

Damage to files is in ``corruption``; the rank-side functions of multi-rank tests in ``rank_fns*``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_guardian import Guardian, manifest


def make_state(seed: int = 0, hidden: int = 16, *, device: str = "cpu", blob_mb: float = 0.0) -> dict[str, Any]:
    """A small model + AdamW + scheduler + plain trainer state, trained a couple of steps.

    ``device``: the model moves there and gets a fresh optimizer and scheduler on the moved
    parameters (their state then lives there after the first step). ``blob_mb``: a plain float
    tensor ``blob`` of that many MB, so files need several parts (S3 multipart, disk limits).
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    state = {"model": model, "optim": opt, "sched": sched, "trainer": {"epoch": 0, "seen": 0}}
    train(state, 2)
    if device != "cpu":
        model.to(device)
        state["optim"] = opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    if blob_mb:
        state["blob"] = torch.randn(int(blob_mb * 1e6 / 4), generator=torch.Generator().manual_seed(seed))
    return state


def _step(state: dict[str, Any], x: torch.Tensor) -> None:
    model, opt, sched = state["model"], state["optim"], state["sched"]
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    state["trainer"]["seen"] += 4


def train(state: dict[str, Any], steps: int, generator: torch.Generator | None = None) -> None:
    """A few optimizer steps; pass the same ``generator`` on every rank for replicated (DDP-like) training."""
    for _ in range(steps):
        _step(state, torch.randn(4, 8, generator=generator))


def train_replicated(state: dict[str, Any], steps: int, device: str = "cpu") -> None:
    """Steps identical on every rank (as under DDP: replicated state is the same everywhere), while
    each rank's own RNG streams advance (as a per-rank data sampler's would)."""
    for _ in range(steps):
        random.random(), np.random.rand(), torch.rand(1)
        gen = torch.Generator().manual_seed(state["trainer"]["seen"])
        _step(state, torch.randn(4, 8, generator=gen).to(device))


@dataclass(frozen=True)
class SavedAB:
    """What ``save_a_b`` left: exact snapshots of A and B, and what ``Guardian.close()`` reported unmirrored."""

    snap_a: dict[str, Any]
    snap_b: dict[str, Any]
    unmirrored: list[str]


def save_a_b(stores: list[str], run: str, **guardian_kw: Any) -> SavedAB:
    """The two checkpoints most fault tests start from: A (step 100) and B (step 200) of
    ``make_state(seed=0)``, one training step apart, each asserted committed."""
    state = make_state(seed=0)
    g = Guardian(stores=stores, run=run, **guardian_kw)
    assert g.save(state, step=100).committed
    snap_a = snapshot(state)
    train(state, 1)
    assert g.save(state, step=200).committed
    snap_b = snapshot(state)
    return SavedAB(snap_a=snap_a, snap_b=snap_b, unmirrored=g.close())


def model_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume restores, cloned, for exact comparison."""
    opt = state["optim"].state_dict()
    return {
        "model": model_tensors(state),
        "optim_state": {
            k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
            for k, v in opt["state"].items()
        },
        "optim_groups": json.dumps(opt["param_groups"], default=str),
        "sched": json.dumps(state["sched"].state_dict(), default=str),
        "trainer": dict(state["trainer"]),
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict) and isinstance(y, dict):
            if not same(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def next_randoms(device: str = "cpu") -> tuple:
    """What this process draws next from python, numpy and torch (and ``device``'s) RNG: equal after a resume."""
    out: tuple = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    if device != "cpu":
        out += (torch.rand(3, device=device).tolist(),)
    return out


def step_dir(root: str, run: str, step: int) -> str:
    return os.path.join(root, run, f"step-{step:012d}")


def committed(root: str, run: str) -> dict[str, str]:
    """The committed checkpoints of a local store: dir name -> manifest digest (the "nothing lost" set)."""
    out = {}
    base = os.path.join(root, run)
    if not os.path.isdir(base):
        return out
    for name in sorted(os.listdir(base)):
        mp = os.path.join(base, name, manifest.MANIFEST_NAME)
        if name.startswith("step-") and os.path.isfile(mp):
            with open(mp, "rb") as f:
                out[name] = manifest.digest_bytes(f.read())
    return out


def assert_nothing_lost(before: dict[str, str], after: dict[str, str]) -> None:
    missing = {k: v for k, v in before.items() if after.get(k) != v}
    assert not missing, f"committed checkpoints lost or changed: {sorted(missing)}"
