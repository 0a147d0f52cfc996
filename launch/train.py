"""Example trainer: a small MLP on synthetic data, resumed and checkpointed by dist_guardian.

Run it under torchrun (see launch/run_single_node.sh) or as plain ``python launch/train.py``.
Everything a bit-identical continuation needs is in ``state``: model, AdamW, scheduler, the
per-rank data position and the per-rank RNG (saved by dist_guardian by default).

``--fsdp`` shards the model with FSDP2 (``fully_shard`` per linear layer on a 1-D mesh of every
rank) instead of DDP: dist_guardian then saves each rank's shards and resumes them on any world size.

``--fail-at-step N`` makes ``--fail-rank`` die at step N in the first incarnation only
(``TORCHELASTIC_RESTART_COUNT=0``), so torchrun's restart has something to recover from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from dist_guardian import Guardian

log = logging.getLogger("train")


class SyntheticData:
    """A deterministic stream of batches: batch k of rank r depends only on (seed, r, k)."""

    def __init__(self, seed: int, rank: int, batch: int = 16, dim: int = 32):
        self.seed, self.rank, self.batch, self.dim = seed, rank, batch, dim
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.position)
        self.position += 1
        x = torch.randn(self.batch, self.dim, generator=g)
        y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(self.batch, 1, generator=g)
        return x, y

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])


def build_model(dim: int = 32, hidden: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.LayerNorm(hidden),
        torch.nn.Linear(hidden, 1),
    )


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """FSDP2 over a 1-D mesh of every rank: each linear layer, then the root."""
    if not dist.is_initialized():
        raise SystemExit("--fsdp needs a process group: launch under torchrun")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model: torch.nn.Module) -> dict[str, list]:
    """Every parameter and buffer as a full tensor (``full_tensor()`` of a sharded one, on every rank)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.tolist()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--stores",
        nargs="+",
        default=["checkpoints/", "tmp://example"],
        help="store URLs, primary first (default: %(default)s)",
    )
    p.add_argument("--run-name", "--run_name", default="example", help="dist_guardian run name")
    p.add_argument("--steps", type=int, default=50, help="train through this step (inclusive)")
    p.add_argument("--save-every", "--save_every", type=int, default=10)
    p.add_argument(
        "--lr-horizon",
        "--lr_horizon",
        type=int,
        default=1000,
        help="cosine schedule length in steps (independent of --steps, so a run can be extended)",
    )
    p.add_argument("--keep-last", "--keep_last", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="dist_guardian agreement timeout (s)")
    p.add_argument("--fail-at-step", "--fail_at_step", type=int, default=None)
    p.add_argument("--fail-rank", "--fail_rank", type=int, default=1)
    p.add_argument("--out", default=None, help="rank 0 writes a JSON summary here (resume record, final weights)")
    p.add_argument("--storage-options", "--storage_options", default=None, help="JSON, keyed by URL prefix")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP; needs torchrun")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join the torchrun group when launched by torchrun; world size 1 otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=max(timeout_s, 60.0)))
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = init_distributed(args.timeout)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = build_model()
    ddp = shard(model, world) if args.fsdp else torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.lr_horizon)
    data = SyntheticData(args.seed, rank)
    torch.manual_seed(args.seed * 7919 + rank)  # per-rank stream (dropout)
    state = {
        "model": model,
        "optim": optim,
        "sched": sched,
        "data": data,
        "local": {"loss_ema": torch.zeros(1, dtype=torch.float32)},
    }

    guardian = Guardian(
        stores=args.stores,
        run=args.run_name,
        compat={"model": "mlp-32-64", "seed": args.seed} | ({"sharding": "fsdp2"} if args.fsdp else {}),
        keep_last=args.keep_last,
        timeout=args.timeout,
        per_rank=("data", "local"),
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
    )
    result = guardian.resume(state)
    start = result.step + 1 if result.resumed else 0
    if rank == 0:
        print(
            f"[train] incarnation {restart}: "
            + (
                f"resumed from step {result.step} ({result.store}, tier {result.tier})"
                if result.resumed
                else "starting fresh"
            ),
            file=sys.stderr,
            flush=True,
        )

    loss = torch.zeros(())
    t0 = time.monotonic()
    for step in range(start, args.steps + 1):
        if args.fail_at_step is not None and step == args.fail_at_step and rank == args.fail_rank and restart == 0:
            print(f"[train] rank {rank}: simulated crash at step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        x, y = data.next()
        ddp.train()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        with torch.no_grad():
            state["local"]["loss_ema"].mul_(0.9).add_(0.1 * loss.detach())
        if step % args.save_every == 0 or step == args.steps:
            guardian.save(state, step=step, metrics={"loss": loss.item()})

    left = guardian.close()
    weights = full_weights(model)  # collective under FSDP: every rank gathers
    if rank == 0 and args.out:
        summary = {
            "resume": json.loads(result.to_json()),
            "final_step": args.steps,
            "loss": loss.item(),
            "train_seconds": time.monotonic() - t0,
            "unmirrored": left,
            "weights": weights,
            "restart_count": restart,
        }
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, args.out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk: leave without interpreter teardown, where a gloo thread freeing
    # the last collective's tensors can abort (DESIGN.md section 4).
    os._exit(0)


if __name__ == "__main__":
    main()
