"""Sharded save and resharding resume of an FSDP2 state against torch.distributed.checkpoint (DCP).

Two gloo ranks on CPU hold a stack of ``fully_shard``-ed linear layers and their AdamW state
(fp32 weights, ``exp_avg``, ``exp_avg_sq``: --size-gb in all, default 2). Round by round,
interleaved, the same state is saved by ``Guardian.save`` (each rank its shards, fsync,
xxh3-128 and ``max|x|`` of every chunk, manifest, commit) and by ``dcp.save`` of
``get_state_dict`` (its ``FileSystemWriter`` fsyncs too); then resumed at the same world size
(2 -> 2) and, by a one-rank job, with resharding (2 -> 1): ``Guardian.resume`` (every chunk
read is hashed and checked) against ``dcp.load`` into ``get_state_dict`` plus
``set_state_dict``, first into the job's live state, then (``fresh``) into a freshly built model
and an optimizer that never stepped, as a restarted job resumes (DCP's ``get_state_dict``
creates the AdamW state there, inside the timing). A round's time is rank 0's between two
barriers; files are in the page cache (just written). The table shows medians and the ratios of the same run.

    python benchmarks/bench_sharded.py --size-gb 2 --runs 3 --out benchmarks/out/sharded.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HIDDEN = 2048


def _build(world: int, size_gb: float, *, step: bool = True) -> tuple[Any, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n_layers = max(1, round(size_gb * 1e9 / (12 * HIDDEN * HIDDEN)))  # fp32 weight + two fp32 moments
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(n_layers)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if not step:
        return model, optim
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _dcp_save(model: Any, optim: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load(model: Any, optim: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _guardian(path: str) -> Any:
    """One Guardian for the whole run, as a training job holds it; its gloo group is made before timing."""
    from dist_guardian import Guardian

    g = Guardian(stores=[path], run="bench", timeout=300.0, rng=False)
    _ = g.comm
    return g


def _dg_resume(g: Any, state: dict[str, Any], step: int) -> None:
    r = g.resume(state)
    assert r.resumed and r.step == step, r.to_json()


def _worker(rank: int, world: int, port: int, args: dict[str, Any], q: Any) -> None:
    logging.disable(logging.WARNING)
    try:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
        model, optim = _build(world, args["size_gb"])
        state = {"model": model, "optim": optim}
        root, times, runs = args["root"], {}, args["runs"]
        g = _guardian(os.path.join(root, "dg"))
        if args["mode"] == "save":
            for r in range(runs):
                times.setdefault("dist_guardian save", []).append(
                    _timed(lambda r=r: g.save(state, step=r))  # fsync, xxh3 and max|x| of every chunk, commit
                )
                dcp_dir = os.path.join(root, f"dcp-{r}")
                times.setdefault("DCP save", []).append(_timed(lambda d=dcp_dir: _dcp_save(model, optim, d)))
                if rank == 0 and r < runs - 1:  # only the last round's DCP checkpoint is loaded
                    shutil.rmtree(dcp_dir)
        tag = f"{args['saved_world']}->{world}"
        dcp_dir = os.path.join(root, f"dcp-{runs - 1}")
        for _ in range(runs):  # into the live state of this job (its optimizer state exists already)
            times.setdefault(f"dist_guardian resume {tag}", []).append(_timed(lambda: _dg_resume(g, state, runs - 1)))
            times.setdefault(f"DCP load {tag}", []).append(_timed(lambda: _dcp_load(model, optim, dcp_dir)))
        state.clear()
        model = optim = None  # freed before the fresh rounds build theirs
        _fresh_rounds(g, world, args, dcp_dir, tag, times)
        g.close()
        q.put((rank, "ok", times))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    q.close()
    q.join_thread()  # the report is flushed before the exit that skips interpreter teardown
    os._exit(0)


def _fresh_rounds(g: Any, world: int, args: dict[str, Any], dcp_dir: str, tag: str, times: dict) -> None:
    """As a restarted job resumes: a freshly built model and an optimizer that never stepped, each round."""
    for _ in range(args["runs"]):
        for name in (f"dist_guardian resume {tag} fresh", f"DCP load {tag} fresh"):
            m, o = _build(world, args["size_gb"], step=False)
            if name.startswith("dist"):
                t = _timed(lambda m=m, o=o: _dg_resume(g, {"model": m, "optim": o}, args["runs"] - 1))
            else:
                t = _timed(lambda m=m, o=o: _dcp_load(m, o, dcp_dir))
            times.setdefault(name, []).append(t)


def _run(world: int, args: dict[str, Any]) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    while len(got) < world:
        rank, kind, val = q.get(timeout=1800)
        if kind == "err":
            raise SystemExit(f"rank {rank} failed: {val}")
        got[rank] = val
    for p in procs:
        p.join()
    return got[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir, removed after)")
    p.add_argument("--out", default=None, help="append one JSON line here")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="bench-sharded-")
    try:
        base = {"size_gb": a.size_gb, "runs": a.runs, "root": root, "saved_world": 2}
        times = _run(2, {**base, "mode": "save"})
        times.update(_run(1, {**base, "mode": "load"}))
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    nbytes = a.size_gb * 1e9
    rows = []
    pairs = {"dist_guardian save": "DCP save"}
    for tag in ("2->2", "2->1", "2->2 fresh", "2->1 fresh"):
        pairs[f"dist_guardian resume {tag}"] = f"DCP load {tag}"
    for ours, theirs in pairs.items():
        for name in (ours, theirs):
            med = common.median(times[name])
            rows.append(
                {
                    "method": name,
                    "s": med,
                    "gbps": nbytes / med / 1e9,
                    "vs": common.median(times[theirs]) / common.median(times[ours]) if name == ours else None,
                }
            )
    print(f"\nFSDP2 state of {a.size_gb:g} GB at 2 gloo ranks, median of {a.runs} (page cache warm)")
    print(f"{'method':<36} {'s':>8} {'GB/s':>7} {'faster than DCP':>16}")
    for r in rows:
        vs = f"{r['vs']:.2f}x" if r["vs"] is not None else ""
        print(f"{r['method']:<36} {r['s']:>8.3f} {r['gbps']:>7.2f} {vs:>16}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps({"bench": "sharded", "machine": common.machine(), "times": times, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
