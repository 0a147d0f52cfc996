"""S3 throughput of dist_guardian against the best single-connection GET/PUT of the same object.

A moto S3 server runs in its own process on 127.0.0.1 (so it does not share the GIL with the
client). A checkpoint of --size MB (one large replicated file, the object compared) is
saved locally and mirrored to the bucket; then, interleaved round by round so drift hits
every row alike, each of --runs rounds measures:

  load  (the same object, ``replicated.dgt``):
        boto3 get_object().read()            one connection, one GET, into new bytes
        boto3 get_object() into new memory   one connection, 8 MiB reads copied into a fresh
                                             torch.empty buffer (what a staging load must fill)
        s3fs cat_file(max_concurrency=1)     one connection, one GET
        boto3 get_object() into a reused     the same into one buffer reused across rounds, so
          pre-touched buffer (reference)     its pages are already faulted in: network + copy
                                             only; shown for reference, not a staging load
        dist_guardian resume                 whole resume from an S3-only store: listing,
                                             manifest, one GET stream per file straight into
                                             staging, xxh3 checksums while bytes arrive, apply
        dist_guardian attempt                the same resume's load attempt alone (what the
                                             ResumeResult records: manifest, files, checksums)
        dist_guardian resume, N connections  --concurrency list: parallel ranged GETs
  save  (the same file):
        boto3 put_object(Body=bytes)         one request
        s3fs put_file (defaults)             50 MiB parts, 10 at a time
        dist_guardian mirror                 save with a local primary, then the background
                                             mirror (claim, files, size check, manifest last)
        dist_guardian remote-primary save    save() straight to s3:// (staged locally, uploaded,
                                             committed), what training waits for

Throughput is checkpoint bytes / wall seconds (GB = 1e9 B); "x best GET" divides by the best
single-connection GET of the same round (the first three rows), "x pre-touched" by the
reference row. moto copies the whole object for every GET, ranged
or not (research/performance.md), so on this server one stream is the right choice and
parallel ranges lose; on real S3 it is the other way round, which is why the store's
concurrency is a choice (``concurrency`` storage option, or ``Guardian(remote_concurrency=)``).

    python benchmarks/bench_s3.py --size 256 --runs 3
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dist_guardian import Guardian  # noqa: E402

RUN = "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ep = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(ep + "/moto-api/", timeout=1).read()
            return proc, ep
        except OSError:
            if time.monotonic() - t0 > 30 or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def make_state(mb: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 8
    per = mb * 1_000_000 // 4 // n
    return {"weights": {f"w{i}": torch.randn(per, generator=g) for i in range(n)}, "trainer": {"step": 1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="checkpoint size in MB (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default: %(default)s)")
    ap.add_argument("--concurrency", default="4,8", help="parallel-GET variants of the resume (default: %(default)s)")
    ap.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    import s3fs

    proc, ep = start_moto()
    tmp = tempfile.mkdtemp(prefix="bench-s3-")
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client = boto3.client("s3", endpoint_url=ep, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/ckpt"
        so = {
            f"s3://{bucket}": {
                "key": "testing",
                "secret": "testing",
                "deadline_s": 120,
                "client_kwargs": {"endpoint_url": ep, "region_name": "us-east-1"},
            }
        }
        fs = s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": ep, "region_name": "us-east-1"},
        )
        state = make_state(args.size)
        local = os.path.join(tmp, "local")
        g = Guardian(stores=[local, url], run=RUN, storage_options=so)
        assert g.save(state, step=1).committed
        assert g.close() == []
        step_dir = os.path.join(local, RUN, "step-000000000001")
        obj_path = os.path.join(step_dir, "replicated.dgt")
        obj_key = f"ckpt/{RUN}/step-000000000001/replicated.dgt"
        obj_bytes = os.path.getsize(obj_path)
        ckpt_bytes = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir))
        concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
        with open(obj_path, "rb") as f:
            payload = f.read()
        buf = torch.zeros(obj_bytes, dtype=torch.uint8).numpy()
        rows: dict[str, list[float]] = {}
        extra: dict[str, float] = {}

        def rec(name: str, seconds: float, nbytes: int) -> None:
            rows.setdefault(name, []).append(nbytes / seconds / 1e9)

        def get_read() -> None:
            assert len(client.get_object(Bucket=bucket, Key=obj_key)["Body"].read()) == obj_bytes

        def get_into(reuse: bool) -> None:
            target = buf if reuse else torch.empty(obj_bytes, dtype=torch.uint8).numpy()
            body = client.get_object(Bucket=bucket, Key=obj_key)["Body"]
            mv, pos = memoryview(target), 0
            while pos < obj_bytes:
                chunk = body.read(8 << 20)
                if not chunk:
                    break
                mv[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            assert pos == obj_bytes

        def cat1() -> None:
            assert len(fs.cat_file(f"{bucket}/{obj_key}", max_concurrency=1)) == obj_bytes

        def resume(conc: int | None) -> tuple[float, float]:
            empty = os.path.join(tmp, f"empty-{uuid.uuid4().hex[:6]}")
            target = make_state(args.size)
            gg = Guardian(stores=[empty, url], run=RUN, storage_options=so, remote_concurrency=conc, progress=False)
            t0 = time.perf_counter()
            r = gg.resume(target)
            dt = time.perf_counter() - t0
            gg.close()
            assert r.resumed and r.store == url and r.tier == "V", r.to_json()
            assert torch.equal(target["weights"]["w3"], state["weights"]["w3"])
            return dt, r.attempts[-1].seconds

        for rnd in range(args.runs):
            print(f"round {rnd + 1}/{args.runs}", file=sys.stderr, flush=True)
            rec("load: boto3 get_object().read() (1 connection)", common.timed(get_read), obj_bytes)
            rec(
                "load: boto3 get_object() into new memory (1 connection)",
                common.timed(lambda: get_into(False)),
                obj_bytes,
            )
            rec(
                "load: boto3 get_object() into a reused pre-touched buffer (reference)",
                common.timed(lambda: get_into(True)),
                obj_bytes,
            )
            rec("load: s3fs cat_file(max_concurrency=1)", common.timed(cat1), obj_bytes)
            dt, att = resume(None)
            rec("load: dist_guardian resume (store's choice: 1 stream)", dt, ckpt_bytes)
            rec("load: dist_guardian attempt (manifest+files+checksums)", att, ckpt_bytes)
            for c in concs:
                dt, _ = resume(c)
                rec(f"load: dist_guardian resume, {c} ranged connections", dt, ckpt_bytes)
            key = f"ckpt/put-{rnd}.bin"
            rec(
                "save: boto3 put_object(Body=bytes) (1 request)",
                common.timed(lambda: client.put_object(Bucket=bucket, Key=key, Body=payload)),
                obj_bytes,
            )
            rec(
                "save: s3fs put_file (defaults: 50 MiB parts x10)",
                common.timed(lambda: fs.put_file(obj_path, f"{bucket}/ckpt/putfile-{rnd}.bin")),
                obj_bytes,
            )
            gm = Guardian(stores=[os.path.join(tmp, f"m{rnd}"), url], run=f"mirror{rnd}", storage_options=so)
            t0 = time.perf_counter()
            assert gm.save(state, step=1).committed
            t1 = time.perf_counter()
            assert gm.close() == []
            t2 = time.perf_counter()
            rec("save: dist_guardian mirror (background, manifest last)", t2 - t1, ckpt_bytes)
            extra.setdefault("local save s (training waits)", 0.0)
            extra["local save s (training waits)"] = max(extra["local save s (training waits)"], t1 - t0)
            gp = Guardian(stores=[url], run=f"primary{rnd}", storage_options=so)
            t0 = time.perf_counter()
            assert gp.save(state, step=1).committed
            rec("save: dist_guardian remote-primary save()", time.perf_counter() - t0, ckpt_bytes)
            gp.close()

        best_get = [
            max(a, b, c)
            for a, b, c in zip(
                rows["load: boto3 get_object().read() (1 connection)"],
                rows["load: boto3 get_object() into new memory (1 connection)"],
                rows["load: s3fs cat_file(max_concurrency=1)"],
            )
        ]
        touched = rows["load: boto3 get_object() into a reused pre-touched buffer (reference)"]
        best_put = rows["save: boto3 put_object(Body=bytes) (1 request)"]
        table = []
        for name, vals in rows.items():
            ref = best_get if name.startswith("load") else best_put
            ratios = [v / r for v, r in zip(vals, ref)]
            row = {
                "operation": name,
                "median": statistics.median(vals),
                "min": min(vals),
                "max": max(vals),
                "ratio": statistics.median(ratios),
            }
            if name.startswith("load"):
                row["touched"] = statistics.median([v / r for v, r in zip(vals, touched)])
            table.append(row)
        common.print_table(
            f"S3 via moto (separate process) on 127.0.0.1: object {obj_bytes / 1e6:.0f} MB, "
            f"checkpoint {ckpt_bytes / 1e6:.0f} MB, "
            f"{args.runs} rounds; ratio = median of per-round (this / best single-connection GET) for loads, "
            f"(this / single put_object) for saves",
            table,
            [
                ("operation", "operation", "s"),
                ("median", "GB/s median", ".3f"),
                ("min", "min", ".3f"),
                ("max", "max", ".3f"),
                ("ratio", "x best single GET/PUT", ".2f"),
                ("touched", "x pre-touched", ".2f"),
            ],
        )
        print(
            "\nlocal save before the mirror (what training waits for): "
            f"{extra['local save s (training waits)']:.2f} s max"
        )
        if args.out:
            common.write_jsonl(args.out, table, {"bench": "s3", "size_mb": args.size, **common.machine()})
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
