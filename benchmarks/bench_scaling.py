"""How resume cost grows: with checkpoint size, with the number of tensors, with the number of
checkpoints in a store. (Agreement cost against world size: bench_agreement.py.)

    python benchmarks/bench_scaling.py --out benchmarks/out/scaling.jsonl

- size: a verified load (Guardian.resume, checksums on) of 256 MB ... 4 GB, warm cache,
  against a raw readinto of the same file measured right before it;
- tensors: 256 MB split into 10 ... 100,000 tensors: save and resume time;
- checkpoints: 10 ... 10,000 committed checkpoints in one store: time of Guardian.resume
  (one listing, the newest page of manifests, one load) against `dist-guardian plan`
  (every manifest read), and the manifest reads each does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402


def resume_seconds(root: str, run: str = "bench") -> tuple[float, Guardian]:
    target = {"model": {}}
    t0 = time.perf_counter()
    r = Guardian(stores=[root], run=run, rng=False, timeout=3600).resume(target)
    dt = time.perf_counter() - t0
    assert r.resumed and r.tier == "V", r.to_json()
    common.touch(target)
    return dt, r


def by_size(base: str, sizes_mb: list[int], runs: int) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        root = os.path.join(base, f"size-{mb}")
        n = mb * 2**20 // 4
        cols = 4096
        state = {"model": {f"w{i}": torch.randn(max(1, n // cols // 8), cols) for i in range(8)}}
        Guardian(stores=[root], run="bench", rng=False).save(state, step=1)
        del state
        f = os.path.join(root, "bench", "step-000000000001", "replicated.dgt")
        size = os.path.getsize(f)
        buf = torch.empty(size, dtype=torch.uint8)
        buf.fill_(0)
        view = memoryview(buf.numpy())
        raw, dg = [], []
        for _ in range(runs):
            common.warm_cache(f)
            raw.append(common.timed(lambda: common.raw_read(f, view)))  # noqa: F821 (called here, before the del)
            common.warm_cache(f)
            dg.append(resume_seconds(root)[0])
        del view, buf  # frees the buffer before the next size
        rows.append(
            {
                "scale": "size",
                "mb": mb,
                "raw_s": common.median(raw),
                "resume_s": common.median(dg),
                "x_raw": common.median(raw) / common.median(dg),
                "gb_s": size / common.median(dg) / 1e9,
            }
        )
        shutil.rmtree(root)
        print(f"size {mb} MB done", flush=True)
    return rows


def by_tensors(base: str, counts: list[int], runs: int, total_mb: int = 256) -> list[dict]:
    rows = []
    for count in counts:
        root = os.path.join(base, f"tensors-{count}")
        per = max(1, total_mb * 2**20 // 4 // count)
        state = {"model": {f"t{i}": torch.randn(per) for i in range(count)}}
        saves, loads = [], []
        for r in range(runs):
            t0 = time.perf_counter()
            Guardian(stores=[root], run="bench", rng=False).save(state, step=r)
            saves.append(time.perf_counter() - t0)
            loads.append(resume_seconds(root)[0])
        rows.append(
            {"scale": "tensors", "tensors": count, "save_s": common.median(saves), "resume_s": common.median(loads)}
        )
        shutil.rmtree(root)
        print(f"tensors {count} done", flush=True)
    return rows


def clone_checkpoints(root: str, count: int) -> None:
    """``count`` committed checkpoints, fast: one real save, then hard links and rewritten manifests."""
    Guardian(stores=[root], run="bench", rng=False).save({"model": {"w": torch.randn(256)}}, step=0)
    src = os.path.join(root, "bench", "step-000000000000")
    doc = json.load(open(os.path.join(src, "manifest.json")))
    names = [n for n in os.listdir(src) if n != "manifest.json"]
    for step in range(1, count):
        d = os.path.join(root, "bench", f"step-{step:012d}")
        os.mkdir(d)
        for n in names:
            os.link(os.path.join(src, n), os.path.join(d, n))
        doc["step"] = step
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(doc, f)


def by_checkpoints(base: str, counts: list[int], runs: int) -> list[dict]:
    rows = []
    for count in counts:
        root = os.path.join(base, f"ckpts-{count}")
        clone_checkpoints(root, count)
        res, plans = [], []
        for _ in range(runs):
            res.append(resume_seconds(root)[0])
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "dist_guardian.cli", "plan", root, "--run", "bench", "--json"],
                capture_output=True,
                text=True,
            )
            plans.append(time.perf_counter() - t0)
            assert p.returncode == 0, p.stderr
        rows.append(
            {
                "scale": "checkpoints",
                "checkpoints": count,
                "resume_s": common.median(res),
                "plan_all_s": common.median(plans),
            }
        )
        shutil.rmtree(root)
        print(f"checkpoints {count} done", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="256,512,1024,2048,4096")
    p.add_argument("--tensors", default="10,100,1000,10000,100000")
    p.add_argument("--checkpoints", default="10,100,1000,10000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "scaling.jsonl"))
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="dg-scaling-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    try:
        rows = by_size(base, [int(x) for x in args.sizes_mb.split(",") if x], args.runs)
        rows += by_tensors(base, [int(x) for x in args.tensors.split(",") if x], args.runs)
        rows += by_checkpoints(base, [int(x) for x in args.checkpoints.split(",") if x], args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    common.print_table(
        "load time against checkpoint size (warm cache, checksums on)",
        [r for r in rows if r["scale"] == "size"],
        [
            ("mb", "MB", "d"),
            ("raw_s", "raw read s", ".3f"),
            ("resume_s", "resume s", ".3f"),
            ("gb_s", "GB/s", ".2f"),
            ("x_raw", "x raw", ".2f"),
        ],
    )
    common.print_table(
        "256 MB split into N tensors",
        [r for r in rows if r["scale"] == "tensors"],
        [("tensors", "tensors", "d"), ("save_s", "save s", ".3f"), ("resume_s", "resume s", ".3f")],
    )
    common.print_table(
        "N committed checkpoints in one store",
        [r for r in rows if r["scale"] == "checkpoints"],
        [
            ("checkpoints", "checkpoints", "d"),
            ("resume_s", "resume s (newest page only)", ".3f"),
            ("plan_all_s", "dist-guardian plan s (every manifest)", ".3f"),
        ],
    )
    common.write_jsonl(args.out, rows, {"bench": "scaling", **common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
