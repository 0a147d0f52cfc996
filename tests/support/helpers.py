"""Test helpers: a small training state, damage to files, and the "nothing lost" invariant."""

from __future__ import annotations

import json
import os
import random
import struct
from typing import Any

import numpy as np
import torch

from dist_guardian import manifest


def make_state(seed: int = 0, hidden: int = 16) -> dict[str, Any]:
    """A small model + AdamW + scheduler + plain trainer state, trained a couple of steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    state = {"model": model, "optim": opt, "sched": sched, "trainer": {"epoch": 0, "seen": 0}}
    train(state, 2)
    return state


def train(state: dict[str, Any], steps: int, generator: torch.Generator | None = None) -> None:
    """A few optimizer steps; pass the same ``generator`` on every rank for replicated (DDP-like) training."""
    model, opt, sched = state["model"], state["optim"], state["sched"]
    for _ in range(steps):
        x = torch.randn(4, 8, generator=generator)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state["trainer"]["seen"] += 4


def model_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume restores, cloned, for exact comparison."""
    opt = state["optim"].state_dict()
    return {
        "model": model_tensors(state),
        "optim_state": {k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()} for k, v in opt["state"].items()},
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


def next_randoms() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def step_dir(root: str, run: str, step: int) -> str:
    return os.path.join(root, run, f"step-{step:012d}")


def flip_bit_in_tensor(path: str, tensor: str | None = None, bit: int = 6, byte_in_elem: int | None = None) -> None:
    """Flip one bit inside a tensor's bytes of a native file (the first float tensor by default)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        names = [k for k, v in header.items() if v["dtype"] in ("F32", "F64") and v["data_offsets"][1] > v["data_offsets"][0]]
        name = tensor or names[0]
        begin, _end = header[name]["data_offsets"]
        size = {"F32": 4, "F64": 8}[header[name]["dtype"]]
        pos = 8 + n + begin + (size - 1 if byte_in_elem is None else byte_in_elem)
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ (1 << bit)]))


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
