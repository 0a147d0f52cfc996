"""Load and save throughput of dist_guardian against the baselines, measured in the same run.

For a transformer-like state (bf16 matrices, fp32 norms, fp32 Adam moments; --size GiB)
it measures, interleaved round by round (so drift hits every row alike), the median of
--runs runs of:

  load: raw readinto (8 MiB chunks, pre-touched buffer, one thread) of the same bytes;
        torch.load; torch.load(mmap=True) + clone; safetensors load_file + clone;
        DCP load; the seed's way (torch.load + a separate sha256 pass over the file);
        dist_guardian resume (checksums on, every byte verified)
  save: raw write+fsync of the same bytes; torch.save + fsync; safetensors save + fsync;
        DCP save; dist_guardian save (fsync, checksums, per-tensor max|x|, atomic commit)

warm (file in the page cache) and cold (pages dropped with posix_fadvise(DONTNEED)).
Ratios against raw read/write are the headline; absolute GB/s are secondary.

    python benchmarks/bench_load_save.py --size 2 --runs 3 --out benchmarks/out/load_save.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402


def flat_tensors(tree, prefix="", out=None):
    out = {} if out is None else out
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            flat_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=float, default=2.0, help="state size in GiB (default %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on the disk of this checkout)")
    p.add_argument("--no-cold", action="store_true", help="skip cold-cache rows")
    p.add_argument("--no-dcp", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "load_save.jsonl"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    base = tempfile.mkdtemp(prefix="dg-bench-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    try:
        return run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(args, base: str) -> int:
    import safetensors.torch as st
    import torch.distributed.checkpoint as dcp

    print(f"building a {args.size:.2f} GiB transformer-like state ...", flush=True)
    state = common.transformer_state(int(args.size * 2**30))
    nbytes = common.state_bytes(state)
    flat = flat_tensors(state)
    print(f"{nbytes / 1e9:.3f} GB in {len(flat)} tensors", flush=True)

    pt = os.path.join(base, "state.pt")
    sf = os.path.join(base, "state.safetensors")
    dcp_dir = os.path.join(base, "dcp")
    raw = os.path.join(base, "raw.bin")
    dg_root = os.path.join(base, "dg")
    torch.save(state, pt)
    st.save_file({k: v.contiguous() for k, v in flat.items()}, sf)
    if not args.no_dcp:
        dcp.save(state, checkpoint_id=dcp_dir)
    g = Guardian(stores=[dg_root], run="bench", rng=False)
    g.save(state, step=0)
    dg_file = os.path.join(dg_root, "bench", "step-000000000000", "replicated.dgt")
    file_size = os.path.getsize(dg_file)
    buf = torch.empty(file_size, dtype=torch.uint8)
    buf.fill_(1)  # pre-touched
    mv = memoryview(buf.numpy())
    with open(dg_file, "rb") as f:
        f.readinto(mv)

    def dg_resume():
        target = {"model": {}, "optim": {}, "trainer": {}}
        r = Guardian(stores=[dg_root], run="bench", rng=False, timeout=3600).resume(target)
        assert r.resumed and r.tier == "V", r.to_json()
        return target

    def seed_way():
        obj = torch.load(pt, weights_only=True)
        h = hashlib.sha256()
        with open(pt, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return obj

    def dcp_load():
        target = {
            "model": {k: torch.empty_like(v) for k, v in state["model"].items()},
            "optim": {
                "state": {
                    k: {n: torch.empty_like(t) for n, t in v.items()} for k, v in state["optim"]["state"].items()
                },
                "param_groups": state["optim"]["param_groups"],
            },
            "trainer": dict(state["trainer"]),
        }
        dcp.load(target, checkpoint_id=dcp_dir)
        return target

    loads = {
        "raw readinto": (lambda: common.raw_read(dg_file, mv), dg_file, file_size),
        "torch.load": (lambda: common.touch(torch.load(pt, weights_only=True)), pt, os.path.getsize(pt)),
        "torch.load(mmap)+clone": (
            lambda: {k: v.clone() for k, v in flat_tensors(torch.load(pt, weights_only=True, mmap=True)).items()},
            pt,
            os.path.getsize(pt),
        ),
        "safetensors+clone": (lambda: {k: v.clone() for k, v in st.load_file(sf).items()}, sf, os.path.getsize(sf)),
        "seed (torch.load+sha256)": (lambda: common.touch(seed_way()), pt, os.path.getsize(pt)),
        "dist_guardian resume": (lambda: common.touch(dg_resume()), os.path.join(dg_root, "bench"), file_size),
    }
    if not args.no_dcp:
        loads["DCP load"] = (lambda: common.touch(dcp_load()), dcp_dir, nbytes)

    counter = [0]

    def dg_save():
        counter[0] += 1
        root = os.path.join(base, f"dgsave-{counter[0]}")
        r = Guardian(stores=[root], run="bench", rng=False).save(state, step=counter[0])
        assert r.committed
        shutil.rmtree(root)

    pending = []

    def dg_async_blocked():
        """Only what training waits for: the copy into reusable buffers (the rest runs in the background)."""
        counter[0] += 1
        root = os.path.join(base, f"dgasync-{counter[0]}")
        g = async_guardians.setdefault("g", Guardian(stores=[root], run="bench", rng=False))
        pending.append(g.save(state, step=counter[0], blocking=False))

    async_guardians: dict = {}

    def torch_save_fsync():
        path = os.path.join(base, "save.pt")
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)

    def sf_save_fsync():
        path = os.path.join(base, "save.safetensors")
        st.save_file({k: v.contiguous() for k, v in flat.items()}, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.unlink(path)

    def dcp_save():
        d = os.path.join(base, f"dcpsave-{counter[0]}")
        dcp.save(state, checkpoint_id=d)
        for f in os.listdir(d):
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        shutil.rmtree(d)

    def raw_write():
        common.raw_write_fsync(raw, mv)
        os.unlink(raw)

    saves = {
        "raw write+fsync": raw_write,
        "torch.save+fsync": torch_save_fsync,
        "safetensors+fsync": sf_save_fsync,
        "dist_guardian save": dg_save,
        "dist_guardian async save (training blocked)": dg_async_blocked,
    }
    if not args.no_dcp:
        saves["DCP save+fsync"] = dcp_save

    times: dict[tuple[str, str], list[float]] = {}
    modes = ["warm"] + ([] if args.no_cold else ["cold"])
    for r in range(args.runs + 1):  # round 0 is an untimed warm-up
        for mode in modes:
            for name, (fn, path, _) in loads.items():
                prep = (
                    (lambda p=path: common.warm_cache(p)) if mode == "warm" else (lambda p=path: common.drop_cache(p))
                )
                t = common.timed(fn, prep)
                if r:
                    times.setdefault(("load", f"{name} [{mode}]"), []).append(t)
        for name, fn in saves.items():
            os.sync()
            t = common.timed(fn)
            while pending:  # the background part of an async save is not what training waits for
                assert pending.pop().result().committed
            if r:
                times.setdefault(("save", name), []).append(t)
        print(f"round {r}/{args.runs} done", flush=True)

    med = {k: common.median(v) for k, v in times.items()}
    rows = []
    for (kind, name), t in med.items():
        mode = name.rsplit("[", 1)[-1].rstrip("]") if kind == "load" else "warm"
        size = nbytes
        row = {
            "kind": kind,
            "method": name,
            "seconds": t,
            "gb_s": size / t / 1e9,
            "runs": len(times[(kind, name)]),
            "min": min(times[(kind, name)]),
            "max": max(times[(kind, name)]),
        }
        if kind == "load":
            rawt = med[("load", f"raw readinto [{mode}]")]
            row["x_raw"] = rawt / t
            dg = med[("load", f"dist_guardian resume [{mode}]")]
            row["dg_speedup"] = t / dg
        else:
            row["x_raw"] = med[("save", "raw write+fsync")] / t
            row["dg_speedup"] = t / med[("save", "dist_guardian save")]
        rows.append(row)
    meta = {"bench": "load_save", "size_gb": nbytes / 1e9, "tensors": len(flat), **common.machine()}
    common.print_table(
        f"load/save of {nbytes / 1e9:.2f} GB ({len(flat)} tensors), median of {args.runs} "
        f"(x_raw: throughput relative to raw read/write of the same bytes; "
        f"dg_speedup: how much faster dist_guardian is than this row)",
        rows,
        [
            ("method", "method", "s"),
            ("seconds", "s", ".3f"),
            ("gb_s", "GB/s", ".2f"),
            ("x_raw", "x raw", ".2f"),
            ("dg_speedup", "dg speedup", ".2f"),
            ("min", "min s", ".3f"),
            ("max", "max s", ".3f"),
        ],
    )
    common.write_jsonl(args.out, rows, meta)
    print(f"\nmachine: {meta}")
    print(f"JSON lines appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
