"""Load and save of dist_guardian against its limits and its peers, measured fairly in one run.

Fair means: every saver writes a NEW path each round (on this VM a new-file write costs
about 3x an overwrite of a file just written); the rows run in a new random order every
round, so drift and a neighbour's load hit every row alike; the loader's limit is a raw read
into FRESH memory with the same number of threads as dist_guardian's reader (next to the read
into already-touched memory); safetensors loads are followed by a copy (``load_file`` maps
lazily; no row maps a file lazily, so every byte is in memory when a row ends); and each row also
runs once in a process of its own, for its peak RSS (on top of the state the process holds, as a
resuming job holds its model) and its time there: a long-lived benchmark process hands a
loader that allocates many 16 MiB buffers heap memory that earlier rows already faulted in
(glibc's dynamic mmap threshold), which a resuming process does not have.

    python benchmarks/bench_load_save.py --case many --runs 3      # 100,000 tensors of 640 floats (256 MB)
    python benchmarks/bench_load_save.py --case big --size 1 --runs 3  # 1 GiB, 64 x 16 MiB + 200 small

Rows named "limit" are what the machine gives (the bar's reference); rows named "peer" are the
other checkpoint libraries. The load average before and after the run is printed with the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402

READ_THREADS = 4  # formats.read_and_hash's default: dist_guardian's reader and the fresh-memory limit alike
CHUNK = 32 << 20

LIMIT, PEER, OURS = "limit", "peer", "dist_guardian"


def make_state(case: str, size_gib: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if case == "many":
        return {"model": {f"experts.{i}.w": torch.randn(640, generator=g) for i in range(100_000)}}
    n_big = max(1, int(size_gib * 64))
    big = {f"layers.{i}.w": torch.randn(4 << 20, generator=g) for i in range(n_big)}  # 16 MiB each
    small = {f"norms.{i}.w": torch.randn(1024, generator=g) for i in range(200)}
    return {"model": {**big, **small}}


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": t for k, v in state.items() for n, t in v.items()}


# ----------------------------------------------------------------------------- the raw limits


def raw_write_new(path: str, mv: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        pos = 0
        while pos < len(mv):
            pos += os.write(fd, mv[pos : pos + (8 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read_fresh(path: str, threads: int = READ_THREADS) -> torch.Tensor:
    """Fresh memory (``torch.empty``), filled by ``threads`` parallel ``preadv`` calls: the loader's limit."""
    size = os.path.getsize(path)
    buf = torch.empty(size, dtype=torch.uint8)
    mv = buf.numpy().data
    fd = os.open(path, os.O_RDONLY)

    def read(lo: int) -> None:
        hi, pos = min(lo + CHUNK, size), lo
        while pos < hi:
            pos += os.preadv(fd, [mv[pos:hi]], pos)

    try:
        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(read, range(0, size, CHUNK)))
    finally:
        os.close(fd)
    return buf


def fsync_path(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


# ----------------------------------------------------------------------------- rows


class Rows:
    """Every row as a callable, prepared files under ``base``; savers get a new path per call."""

    def __init__(self, base: str, state: dict[str, Any] | None, *, dcp: bool):
        import safetensors.torch as st

        self.base, self.state, self.st, self.n = base, state, st, 0
        self.files = {k: os.path.join(base, v) for k, v in (("pt", "state.pt"), ("sf", "state.safetensors"))}
        self.files.update(dcp=os.path.join(base, "dcp"), dg=os.path.join(base, "dg"), raw=os.path.join(base, "raw.bin"))
        self.dcp = dcp

    def prepare(self) -> None:
        import torch.distributed.checkpoint as dcp

        s, f = self.state, self.files
        assert s is not None
        torch.save(s, f["pt"])
        self.st.save_file(flat(s), f["sf"])
        if self.dcp:
            dcp.save(s, checkpoint_id=f["dcp"])
        assert Guardian(stores=[f["dg"]], run="bench", rng=False).save(s, step=0).committed
        shutil.copyfile(self.dg_file(), f["raw"])

    def dg_file(self) -> str:
        return os.path.join(self.files["dg"], "bench", "step-000000000000", "replicated.dgt")

    def new_path(self, name: str) -> str:
        self.n += 1
        return os.path.join(self.base, f"new-{self.n}-{name}")

    def loads(self) -> dict[str, tuple[str, Callable[[], Any]]]:
        f, st = self.files, self.st
        touched = torch.empty(os.path.getsize(f["raw"]), dtype=torch.uint8).fill_(1)

        def seed_way() -> Any:
            obj = torch.load(f["pt"], weights_only=True)
            h = hashlib.sha256()
            with open(f["pt"], "rb", buffering=0) as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            return obj

        def dg_resume() -> Any:
            target: dict[str, Any] = {"model": {}}
            r = Guardian(stores=[f["dg"]], run="bench", rng=False, timeout=3600).resume(target)
            assert r.resumed and r.tier == "V", r.to_json()
            return target

        rows = {
            "raw read, touched memory, 1 thread": (LIMIT, lambda: common.raw_read(f["raw"], touched.numpy().data)),
            f"raw read, fresh memory, {READ_THREADS} threads": (LIMIT, lambda: raw_read_fresh(f["raw"])),
            "torch.load": (PEER, lambda: torch.load(f["pt"], weights_only=True)),
            "safetensors load_file + copy": (PEER, lambda: {k: v.clone() for k, v in st.load_file(f["sf"]).items()}),
            "seed's way (torch.load + sha256)": (PEER, seed_way),
            "dist_guardian resume": (OURS, dg_resume),
        }
        if self.dcp:
            rows["DCP load"] = (PEER, self._dcp_load)
        return rows

    def _dcp_load(self) -> Any:
        import torch.distributed.checkpoint as dcp

        assert self.state is not None
        target = {k: {n: torch.empty_like(t) for n, t in v.items()} for k, v in self.state.items()}
        dcp.load(target, checkpoint_id=self.files["dcp"])
        return target

    def saves(self) -> dict[str, tuple[str, Callable[[], Any]]]:
        s = self.state
        assert s is not None
        raw = torch.empty(os.path.getsize(self.files["raw"]), dtype=torch.uint8)
        with open(self.files["raw"], "rb") as fh:
            fh.readinto(raw.numpy().data)

        def torch_save() -> None:
            p = self.new_path("pt")
            with open(p, "wb") as fh:
                torch.save(s, fh)
                fh.flush()
                os.fsync(fh.fileno())

        def sf_save() -> None:
            p = self.new_path("sf")
            self.st.save_file(flat(s), p)
            fsync_path(p)

        def dg_save() -> None:
            assert Guardian(stores=[self.new_path("dg")], run="bench", rng=False).save(s, step=1).committed

        rows = {
            "raw write + fsync, new file": (LIMIT, lambda: raw_write_new(self.new_path("raw"), raw.numpy().data)),
            "torch.save + fsync, new file": (PEER, torch_save),
            "safetensors save_file + fsync, new file": (PEER, sf_save),
            "dist_guardian save (new step dir)": (OURS, dg_save),
        }
        if self.dcp:
            rows["DCP save + fsync, new dir"] = (PEER, self._dcp_save)
        return rows

    def _dcp_save(self) -> None:
        import torch.distributed.checkpoint as dcp

        p = self.new_path("dcp")
        dcp.save(self.state, checkpoint_id=p)
        fsync_path(p)

    def cleanup_new(self) -> None:
        for x in os.listdir(self.base):
            if x.startswith("new-"):
                p = os.path.join(self.base, x)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)


# ----------------------------------------------------------------------------- peak RSS, one process per row


def rss_child(args: argparse.Namespace) -> int:
    """Run one row once in this fresh process; print its peak RSS and the RSS it started the row with."""
    load = args.rss_row.startswith("load:")
    state = make_state(args.case, args.size)
    rows = Rows(args.rss_base, state, dcp=not args.no_dcp)
    if load:  # a resuming job holds its live state; the row's own copy comes on top
        table = rows.loads()
    else:
        table = rows.saves()
    fn = table[args.rss_row.split(":", 1)[1]][1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS: what the state's construction took is not counted
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    print(json.dumps({"before": before, "peak": _status_kb("VmHWM"), "seconds": seconds}))
    rows.cleanup_new()
    return 0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss(args: argparse.Namespace, base: str, kind: str, name: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", args.case, "--size", str(args.size)]
    cmd += ["--rss-row", f"{kind}:{name}", "--rss-base", base] + (["--no-dcp"] if args.no_dcp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        return {"error": out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("many", "big"), default="many")
    p.add_argument("--size", type=float, default=1.0, help="GiB of the big case (default %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir next to this script)")
    p.add_argument("--no-dcp", action="store_true")
    p.add_argument("--no-rss", action="store_true", help="skip the per-row peak RSS processes")
    p.add_argument("--seed", type=int, default=None, help="row order seed (default: random, printed)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "load_save.jsonl"))
    p.add_argument("--rss-row", help=argparse.SUPPRESS)
    p.add_argument("--rss-base", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_row:
        return rss_child(args)
    base = tempfile.mkdtemp(prefix="dg-bench-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    try:
        return run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: str) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    load0 = os.getloadavg()
    state = make_state(args.case, args.size)
    nbytes, ntensors = common.state_bytes(state), len(flat(state))
    print(f"case {args.case}: {nbytes / 1e9:.3f} GB in {ntensors} tensors; row order seed {seed}", flush=True)
    rows = Rows(base, state, dcp=not args.no_dcp)
    rows.prepare()
    table = {("load", k): v for k, v in rows.loads().items()} | {("save", k): v for k, v in rows.saves().items()}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.runs + 1):  # round 0: an untimed warm-up
        order = list(table)
        rnd.shuffle(order)
        for path in rows.files.values():  # every loader reads from the page cache
            if os.path.exists(path):
                common.warm_cache(path)
        for key in order:
            os.sync()
            t = common.timed(table[key][1])
            if r:
                times.setdefault(key, []).append(t)
        rows.cleanup_new()
        print(f"round {r}/{args.runs} done", flush=True)
    out = summarize(times, table, nbytes)
    if not args.no_rss:
        for row in out:
            rss = peak_rss(args, base, row["kind"], row["method"])
            row["peak_rss_gb"] = rss.get("peak", 0) / 1e9 or None
            # what the row added on top of a process that holds the state, as a multiple of the state
            row["rss_x_state"] = 1 + (rss["peak"] - rss["before"]) / nbytes if "peak" in rss else None
            row["fresh_process_s"] = rss.get("seconds")
    load1 = os.getloadavg()
    meta = {"bench": "load_save", "case": args.case, "bytes": nbytes, "tensors": ntensors, "seed": seed}
    meta |= {"loadavg_before": load0, "loadavg_after": load1, **common.machine()}
    common.print_table(
        f"{args.case}: {nbytes / 1e9:.3f} GB in {ntensors} tensors, median of {args.runs} rounds in random order; "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after",
        out,
        [
            ("kind", "kind", "s"),
            ("role", "role", "s"),
            ("method", "row", "s"),
            ("seconds", "s", ".3f"),
            ("min", "min", ".3f"),
            ("max", "max", ".3f"),
            ("dg_speedup", "dist_guardian faster by", ".2f"),
            ("fresh_process_s", "s, in a fresh process", ".3f"),
            ("peak_rss_gb", "peak RSS GB", ".2f"),
            ("rss_x_state", "(state + row's peak) / state", ".2f"),
        ],
    )
    common.write_jsonl(args.out, out, meta)
    print(f"\nJSON lines appended to {args.out}")
    return 0


def summarize(times: dict, table: dict, nbytes: int) -> list[dict[str, Any]]:
    med = {k: common.median(v) for k, v in times.items()}
    ours = {"load": med[("load", "dist_guardian resume")], "save": med[("save", "dist_guardian save (new step dir)")]}
    return [
        {
            "kind": kind,
            "role": table[(kind, name)][0],
            "method": name,
            "seconds": t,
            "min": min(times[(kind, name)]),
            "max": max(times[(kind, name)]),
            "gb_s": nbytes / t / 1e9,
            "dg_speedup": t / ours[kind],
        }
        for (kind, name), t in sorted(med.items(), key=lambda kv: (kv[0][0], table[kv[0]][0], kv[1]))
    ]


if __name__ == "__main__":
    sys.exit(main())
