"""Rank functions of the sharded (FSDP2 / tensor-parallel) tests: build, train, save, resume, gather.

Every rank builds the same small MLP, shards it with ``fully_shard`` on a 1-D mesh (or TP
over FSDP on a 2x2 mesh), trains on the same inputs, and reports the gathered full tensors
(``full_tensor()``) of the model and of the AdamW state, so the test compares what every
layout holds with what the writer held.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

DIMS = (12, 20, 9, 4)  # odd sizes: uneven shards, and an empty shard at 4 ranks


def build(
    world: int,
    mesh_shape: tuple[int, ...] | None = None,
    *,
    seed: int = 0,
    replicate: bool = False,
    plain: bool = False,
) -> Any:
    """The model (FSDP2 over the mesh; with two mesh dims TP on the second; ``plain``: not sharded) and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = []
    for a, b in zip(DIMS, DIMS[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    if plain:
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    shape = mesh_shape or (world,)
    if len(shape) == 2:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        dp = mesh["dp"]
    else:
        dp = init_device_mesh("cpu", shape)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    if replicate:  # a Replicate() buffer (written once) and a Shard(1) one (uneven columns)
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        g = torch.Generator().manual_seed(seed)
        table = torch.randn(4096, generator=g)
        model.register_buffer("table", distribute_tensor(table, dp, [Replicate()] * dp.ndim))
        model.register_buffer("cols", distribute_tensor(torch.randn(3, 10, generator=g), dp, [Shard(1)] * dp.ndim))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optim


def train(model: Any, optim: Any, steps: int, start: int) -> None:
    """Deterministic steps: the inputs of step ``s`` depend on ``s`` only, the same on every rank."""
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + s)
        x = torch.randn(6, DIMS[0], generator=g)
        loss = model(x).pow(2).mean() + 0.01 * torch.randn((), generator=g)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()


def gathered(model: Any, optim: Any) -> dict[str, Any]:
    """Every model and optimizer tensor as a full tensor (collective; same order on every rank), as numpy
    arrays: they cross the result queue by value."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in sorted(get_model_state_dict(model).items()):
        out[f"model/{k}"] = v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
    osd = get_optimizer_state_dict(model, optim)
    for fqn, st in sorted(osd["state"].items()):
        for k, v in sorted(st.items()):
            out[f"optim/{fqn}/{k}"] = v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
    return {k: v.numpy().copy() for k, v in out.items()}


def save_run(
    rank: int,
    world: int,
    *,
    root: str,
    run: str,
    saves: list[int],
    total: int,
    mesh_shape: tuple[int, ...] | None = None,
    blocking: bool = True,
    replicate: bool = False,
    plain: bool = False,
    mirrors: tuple[str, ...] = (),
    storage_options: dict | None = None,
    keep_last: int | None = None,
) -> dict[str, Any]:
    """Train ``total`` steps, saving after each step in ``saves``; the full state at each save and at the end."""
    from dist_guardian import Guardian

    model, optim = build(world, mesh_shape, replicate=replicate, plain=plain)
    state = {"model": model, "optim": optim, "data": {"position": 0}}
    g = Guardian(
        stores=[root, *mirrors],
        run=run,
        timeout=30,
        per_rank=("data",),
        storage_options=storage_options,
        keep_last=keep_last,
    )
    at: dict[int, Any] = {}
    results: list[Any] = []
    for s in range(total):
        train(model, optim, 1, s)
        state["data"]["position"] = s + 1 + 100 * rank
        if s in saves:
            results.append(g.save(state, step=s, blocking=blocking))
            at[s] = gathered(model, optim)
    g.wait()
    unmirrored = g.close()
    return {
        "unmirrored": unmirrored,
        "at": at,
        "final": gathered(model, optim),
        "committed": [(r.result() if hasattr(r, "result") else r).committed for r in results],
        "next_rand": torch.rand(3).tolist(),
    }


def resume_run(
    rank: int,
    world: int,
    *,
    root: str,
    run: str,
    total: int | None = None,
    mesh_shape: tuple[int, ...] | None = None,
    replicate: bool = False,
    data: bool = True,
    storage_options: dict | None = None,
    plain: bool = False,
    forbid_unpickle: bool = False,
) -> dict[str, Any]:
    """A freshly built model and an optimizer that never stepped, resumed from ``root`` (a store URL); then
    trained up to ``total``."""
    from dist_guardian import Guardian

    model, optim = build(world, mesh_shape, seed=99, replicate=replicate, plain=plain)
    state: dict[str, Any] = {"model": model, "optim": optim} | ({"data": {"position": -1}} if data else {})
    g = Guardian(
        stores=[root], run=run, timeout=30, per_rank=("data",) if data else (), storage_options=storage_options
    )
    unpickled: list[str] = []
    with _no_unpickling(unpickled) if forbid_unpickle else contextlib.nullcontext():
        r = g.resume(state)
    g.close()
    out: dict[str, Any] = {
        "unpickled": unpickled,
        "resumed": r.resumed,
        "step": r.step,
        "warnings": list(r.warnings),
        "attempts": [(a.step, a.outcome, [w for _, w in a.reasons]) for a in r.attempts],
        "data": dict(state.get("data", {})),
        "loaded": gathered(model, optim),
        "next_rand": torch.rand(3).tolist(),
    }
    if total is not None and r.resumed:
        train(model, optim, total - r.step - 1, r.step + 1)
        out["final"] = gathered(model, optim)
    return out


@contextlib.contextmanager
def _no_unpickling(seen: list[str]) -> Any:
    """Every unpickler entry point (pickle, torch.load) raises and is recorded while the block runs."""
    import pickle
    from unittest import mock

    def refuse(name: str) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            seen.append(name)
            raise AssertionError(f"{name} called during a sharded resume")

        return f

    with (
        mock.patch.object(pickle, "load", refuse("pickle.load")),
        mock.patch.object(pickle, "loads", refuse("pickle.loads")),
        mock.patch.object(pickle, "Unpickler", refuse("pickle.Unpickler")),
        mock.patch.object(torch, "load", refuse("torch.load")),
    ):
        yield


def shard_file_sizes(root: str) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(root, f)) for f in sorted(os.listdir(root))}


def dcp_save_run(rank: int, world: int, *, root: str, run: str, step: int) -> dict[str, Any]:
    """An FSDP2 job that checkpoints with ``torch.distributed.checkpoint.save`` (model and AdamW in FQN form)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optim = build(world)
    train(model, optim, step + 1, 0)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.save(sd, checkpoint_id=os.path.join(root, run, f"dcp-step-{step}"))
    return {"at": gathered(model, optim)}
