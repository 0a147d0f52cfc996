"""Rank functions for the foreign-checkpoint tests: an FSDP2 job writes DCP, another loads it (issue 13).

Module-level so the forkserver of ``dg_harness`` can import them by name.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    """Sums of the full (unsharded) model and optimizer tensors, the same on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    out = {f"m.{k}": float(v.double().sum()) for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, opt, options=full)
    for fqn, d in osd["state"].items():
        for k, v in d.items():
            out[f"o.{fqn}.{k}"] = float(v.double().sum()) if isinstance(v, torch.Tensor) else float(v)
    return out


def fsdp2_save(rank: int, world: int, *, path: str) -> dict[str, float]:
    """Train an FSDP2 model two steps and ``dcp.save`` its ``get_state_dict`` layout (sharded DTensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _shard(_model(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(2):
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return _full(model, opt)


def fsdp2_resume(rank: int, world: int, *, root: str) -> dict[str, Any]:
    """A fresh FSDP2 model and a never-stepped AdamW resumed through Guardian (DCP reshards into the DTensors)."""
    from dist_guardian import Guardian

    model = _shard(_model(7))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    r = Guardian(stores=[root], run="r", timeout=30).resume({"model": model, "optim": opt})
    return {"resumed": r.resumed, "step": r.step, "full": _full(model, opt), "record": r.to_json()}


def plain_resume(rank: int, world: int, *, root: str) -> dict[str, Any]:
    """An unsharded model on one rank resumed from the 2-rank FSDP2 checkpoint."""
    from dist_guardian import Guardian

    model = _model(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    r = Guardian(stores=[root], run="r", timeout=30).resume({"model": model, "optim": opt})
    out = {f"m.{k}": float(v.double().sum()) for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    for i, d in opt.state_dict()["state"].items():
        for k, v in d.items():
            out[f"o.{names[i]}.{k}"] = float(v.double().sum())
    return {"resumed": r.resumed, "step": r.step, "full": out, "record": r.to_json()}


def lightning_find(rank: int, world: int, *, dirpath: str, mirror: str) -> dict[str, Any]:
    """Every rank asks for the Lightning checkpoint to resume from (collective)."""
    import os

    from dist_guardian.integrations.lightning import find_resume_checkpoint

    path = find_resume_checkpoint(dirpath, stores=[mirror], timeout=60)
    return {"path": path, "size": os.path.getsize(path) if path else None}
