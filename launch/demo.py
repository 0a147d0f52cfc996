"""`make demo`: a 2-rank CPU training that crashes, restarts, meets a corrupt checkpoint, and still loses nothing.

1. torchrun trains 2 ranks (gloo) with three stores: local ``demo-out/ckpt`` (primary),
   node-local ``tmp://dg-demo`` and a file-backed "remote" ``file://demo-out/remote``.
   Rank 1 crashes at step 25; torchrun restarts the job, which resumes from step 20.
2. The newest checkpoint (step 40) is damaged for rank 1 only: one exponent bit of its
   per-rank file, in the local and node-local copies. The remote copy stays intact.
3. A new launch resumes: both ranks try step 40 locally, rank 1 fails its checks, all
   move on together, and step 40 loads from the remote copy. Nothing is lost.

Prints a summary a person can read in ten seconds; the full decision record is saved in
``demo-out/decision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def torchrun(args: list[str], log_path: str, *, max_restarts: int = 0) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        os.path.join(HERE, "train.py"),
        *args,
    ]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=300).returncode
    return rc, time.monotonic() - t0


def damage_rank_file(step_dir: str, rank: int, world: int) -> str:
    """Flip the top exponent bit of the first float32 element of a per-rank file (same size, new checksum)."""
    from dist_guardian import formats

    path = os.path.join(step_dir, f"rank-{rank:05d}-of-{world:05d}.dgt")
    with open(path, "r+b") as f:
        header = formats.parse_header(f, os.path.getsize(path), name=path)
        entry = next(e for e in header.entries if e.dtype == "F32" and e.end > e.begin)
        pos = header.data_start + entry.begin + 3
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))
        f.flush()
        os.fsync(f.fileno())
    return f"{os.path.relpath(path, ROOT)} (tensor {entry.name})"


def _short(path: str | None) -> str:
    """A location as a person would type it from the project folder."""
    if not path:
        return "-"
    prefix = "file://" if path.startswith("file://") else ""
    bare = path[len(prefix) :]
    return prefix + os.path.relpath(bare, ROOT) if bare.startswith(ROOT) else path


def _reason(text: str) -> str:
    """Keep what a person needs from a failure reason: drop the hex digests and the full path."""
    import re

    text = re.sub(r" expected=[0-9a-f]{32} got=[0-9a-f]{32}", "", text)
    text = text.replace("CheckpointFormatError: ", "")
    return re.sub(r"(/[^ ;]+)/(rank-\d+-of-\d+\.dgt)", r"\2", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo-out"))
    args = p.parse_args(argv)
    from dist_guardian import stores

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    node_local = os.path.join(stores.node_local_base(), "dg-demo")
    shutil.rmtree(node_local, ignore_errors=True)  # our own scratch from an earlier demo
    store_args = ["--stores", os.path.join(out, "ckpt"), "tmp://dg-demo", "file://" + os.path.join(out, "remote")]
    common = [*store_args, "--run-name", "demo", "--save-every", "10", "--quiet"]

    print(
        "dist_guardian demo: 2 ranks on CPU (gloo), stores: local demo-out/ckpt (primary), "
        "node-local tmp://dg-demo, remote file://demo-out/remote\n",
        flush=True,
    )
    print("1. Training steps 0-40 under torchrun --max-restarts=1; rank 1 crashes at step 25 ...", flush=True)
    rc, t1 = torchrun(
        [*common, "--steps", "40", "--fail-at-step", "25", "--out", os.path.join(out, "phase1.json")],
        os.path.join(out, "phase1.log"),
        max_restarts=1,
    )
    if rc != 0:
        print(f"   torchrun failed (exit {rc}); see {os.path.join(out, 'phase1.log')}")
        return 1
    with open(os.path.join(out, "phase1.json")) as f:
        phase1 = json.load(f)["resume"]
    print(
        f"   rank 1 crashed at step 25; torchrun restarted the job, which resumed from step {phase1['step']} "
        f"({_short(phase1['path'])}, tier {phase1['tier']}) and trained to step 40.  [{t1:.0f}s]"
    )
    print(
        f"   steps {phase1['step'] + 1}-24 ran twice; "
        f"nothing up to the last checkpoint (step {phase1['step']}) was lost.\n"
    )

    print("2. Damaging the newest checkpoint (step 40) for rank 1 only, in the local and node-local copies:")
    for label, base in (
        ("demo-out/ckpt", os.path.join(out, "ckpt", "demo")),
        ("tmp://dg-demo", os.path.join(node_local, "demo")),
    ):
        what = damage_rank_file(os.path.join(base, "step-000000000040"), 1, 2)
        print(f"   {label}: flipped one exponent bit in {os.path.basename(what.split(' ')[0])} {what.split(' ', 1)[1]}")
    print()

    print("3. Restarting (a new torchrun launch) to train on to step 50 ...", flush=True)
    rc, t2 = torchrun(
        [*common, "--steps", "50", "--out", os.path.join(out, "phase3.json")], os.path.join(out, "phase3.log")
    )
    if rc != 0:
        print(f"   torchrun failed (exit {rc}); see {os.path.join(out, 'phase3.log')}")
        return 1
    with open(os.path.join(out, "phase3.json")) as f:
        summary = json.load(f)
    record = summary["resume"]
    with open(os.path.join(out, "decision.json"), "w") as f:
        json.dump(record, f, indent=2)
    print("   what resume did, in order:")
    for a in record["attempts"]:
        where = _short(a["store"])
        if a["outcome"] == "loaded":
            print(f"     LOADED step {a['step']} from {where} (tier {a['tier']}) on both ranks together")
        else:
            print(f"     {a['outcome'].upper()} step {a['step']} in {where}; every rank moved on together:")
            for r in a["reasons"]:
                print(f"        rank {r['rank']}: {_reason(r['reason'])[:300]}")
    for w in record["warnings"]:
        print(f"     warning: {w[:160]}")
    newest = 40
    lost = newest - record["step"] if record["resumed"] else newest
    print(
        f"\nSummary: resumed from step {record['step']} ({_short(record['store'])}); steps lost beyond the last "
        f"checkpoint: {lost}; training finished at step {summary['final_step']} "
        f"(loss {summary['loss']:.4f}).  [{t2:.0f}s]"
    )
    print(f"Full decision record: {_short(os.path.join(out, 'decision.json'))}; logs: {_short(out)}/phase*.log")
    ok = record["resumed"] and record["step"] == newest and "remote" in (record["path"] or "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
