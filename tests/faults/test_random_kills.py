"""F10, random-time form: SIGKILL a saving process at a random moment, then resume; nothing is ever lost.

A driver process (started once; torch imported once) forks the saving processes, one per rank,
and SIGKILLs one or all of them after a random delay measured from the moment they start saving
(a clock, not a named point: the kill lands wherever the save happens to be: writing data,
hashing, fsyncing, committing, mirroring). The delays are drawn from a fixed seed over the
duration of an uninterrupted save, measured first, so CI sees the same schedule every run.
The state is ~20 MiB, so a save takes tens of milliseconds and kills land mid-write.

After every kill the test checks, in its own process:

- every checkpoint committed before the kill is still committed, byte for byte (``assert_nothing_lost``);
- every committed checkpoint, in every store, verifies fully (``verify.verify_full``: tier V);
- resume loads the newest committed checkpoint, tier V, from the primary;
- S3 mirror: no object listing ever shows a ``manifest.json`` without every file it names, at
  the size it names (multipart and single-PUT uploads alternate).

Between iterations the test itself deletes all but the newest few committed checkpoints (the
housekeeping a retention policy would do), so the loop stays within a few hundred MB.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import repo_paths
import torch
from helpers import assert_nothing_lost, committed

from dist_guardian import Guardian, manifest, stores, verify

RUN = "r"
BIG_MIB = 20
SHARD_MIB = 4
SEED = 20260520

DRIVER = r"""
import datetime, json, os, select, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import torch.distributed as dist
import helpers
from dist_guardian import Guardian

cfg = json.loads(sys.argv[2])
world, big, shard = cfg["world"], cfg["big_mib"], cfg["shard_mib"]


def build(rank, step):
    state = helpers.make_state(seed=0)
    state["big"] = torch.randn(big << 18, generator=torch.Generator().manual_seed(1))
    state["shard"] = torch.full((shard << 18,), float(rank))
    state["data"] = {"position": 1000 * rank + step}
    state["trainer"]["seen"] = step
    return state


build(0, 0)  # lazy imports of torch (optimizers, schedulers) once, before any fork


def child(rank, step, port, ready_w, opts):
    code = 0
    try:
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        if world > 1:
            store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=15))
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=10)
            )
        state = build(rank, step)
        g = Guardian(stores=cfg["stores"], run=cfg["run"], timeout=10, per_rank=("data", "shard"),
                     storage_options=opts, mirror_timeout=60)
        os.write(ready_w, b"r")
        res = g.save(state, step=step)
        g.close()
        code = 0 if res.committed else 11
    except BaseException:
        code = 12
    os._exit(code)


for line in sys.stdin:
    cmd = json.loads(line)
    step, delay, victims = cmd["step"], cmd["delay"], cmd["victims"]
    opts = cmd.get("storage_options") or cfg.get("storage_options")
    master = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=15)) if world > 1 else None
    port = master.port if master is not None else 0
    pids, readers = [], []
    for rank in range(world):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(rank, step, port, w, opts)
        os.close(w)
        pids.append(pid)
        readers.append(r)
    waiting = set(readers)
    t_end = time.monotonic() + 60
    while waiting and time.monotonic() < t_end:
        ready, _, _ = select.select(list(waiting), [], [], 1.0)
        for fd in ready:
            os.read(fd, 1)
            waiting.discard(fd)
    t0 = time.monotonic()
    status = {}
    left = dict(enumerate(pids))

    def reap():
        for rank, pid in list(left.items()):
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status[rank] = {"signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
                                "exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                                "t": time.monotonic() - t0}
                del left[rank]

    if delay is not None:
        # Sleep until the kill time, unless every victim finished before it (no kill then).
        while time.monotonic() < t0 + delay and any(v in left for v in victims):
            time.sleep(0.001)
            reap()
        for v in victims:
            if v in left:
                os.kill(pids[v], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while left:
        reap()
        if left and time.monotonic() > deadline:
            for pid in left.values():
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.002)
    elapsed = time.monotonic() - t0
    for fd in readers:
        os.close(fd)
    del master
    print(json.dumps({"status": status, "elapsed": elapsed}), flush=True)
"""


class Driver:
    def __init__(self, tmp_path, **cfg):
        cfg.setdefault("big_mib", BIG_MIB)
        cfg.setdefault("shard_mib", SHARD_MIB)
        cfg.setdefault("run", RUN)
        env = {k: v for k, v in os.environ.items() if k != "DIST_GUARDIAN_FAULT"}
        env["OMP_NUM_THREADS"] = "1"
        self.log = open(tmp_path / f"driver-{cfg['world']}.log", "w")
        self.p = subprocess.Popen(
            [sys.executable, "-c", DRIVER, repo_paths.SUPPORT_DIR, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def save(self, step: int, delay: float | None, victims=(0,), **extra) -> dict:
        self.p.stdin.write(json.dumps({"step": step, "delay": delay, "victims": list(victims), **extra}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"driver died: see {self.log.name}"
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()
            self.p.wait()
        self.log.close()


def resume_state(big_mib: int, shard_mib: int) -> dict:
    from helpers import make_state

    state = make_state(seed=42)
    state["big"] = torch.zeros(big_mib << 18)
    state["shard"] = torch.zeros(shard_mib << 18)
    state["data"] = {"position": -1}
    return state


class Checker:
    """The invariants after each kill, across the local stores (and optionally an S3 mirror)."""

    def __init__(
        self,
        root: str,
        mirror: str | None,
        urls: list[str],
        storage_options=None,
        bucket=None,
        big_mib: int = BIG_MIB,
        shard_mib: int = SHARD_MIB,
    ):
        self.root, self.mirror, self.urls = root, mirror, urls
        self.sizes = (big_mib, shard_mib)
        self.storage_options, self.bucket = storage_options, bucket
        self.verified: set[tuple[str, str, str]] = set()
        self.before = {d: committed(d, RUN) for d in self.local_dirs()}
        self.s3_before: set[str] = set()
        self.kills = 0

    def local_dirs(self) -> list[str]:
        return [d for d in (self.root, self.mirror) if d]

    def check(self, it: int, outcome: dict) -> int | None:
        if any(s["signal"] == 9 for s in outcome["status"].values()):
            self.kills += 1
        newest = None
        for d in self.local_dirs():
            after = committed(d, RUN)
            assert_nothing_lost(self.before[d], after)
            store = stores.resolve(d)
            for name, digest in after.items():
                key = (d, name, digest)
                if key not in self.verified:
                    tier, reasons = verify.verify_full(store, f"{RUN}/{name}")
                    assert (tier, reasons) == ("V", []), (
                        f"iteration {it}: committed {d}/{name} is broken: {tier} {reasons}"
                    )
                    self.verified.add(key)
                steps = [int(n.split("-")[1]) for n in after]
                newest = max([newest or -1] + steps)
        if self.bucket is not None:
            self.check_s3(it)
        state = resume_state(*self.sizes)
        # mirror_timeout: a save killed inside its S3 upload leaves a fresh claim on that step, and the
        # catch-up mirror of this resume then defers (commit_conflict) until the claim is stale_s old;
        # close() must not sit out mirror_timeout for it on every iteration.
        g = Guardian(stores=self.urls, run=RUN, storage_options=self.storage_options, timeout=60, mirror_timeout=1)
        try:
            r = g.resume(state)
        finally:
            g.close()
        if newest is None:
            assert not r.resumed
        else:
            assert r.resumed and r.step == newest and r.tier == "V", f"iteration {it}: {r.to_json()}"
            assert r.store == self.urls[0]
            assert state["trainer"]["seen"] == newest and state["data"]["position"] == newest  # rank 0's own state
            assert float(state["shard"][0]) == 0.0
        if self.bucket is not None:
            self.check_s3(it)  # the catch-up mirror of the resume obeys the same rule
        return newest

    def check_s3(self, it: int) -> None:
        """Every manifest in the bucket has every file it names, at the right size; nothing committed vanished."""
        client = self.bucket.server.client()
        sizes: dict[str, int] = {}
        token = None
        while True:
            kw = {"Bucket": self.bucket.name, "Prefix": ""}
            if token:
                kw["ContinuationToken"] = token
            page = client.list_objects_v2(**kw)
            sizes.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        manifests = sorted(k for k in sizes if k.endswith("/" + manifest.MANIFEST_NAME))
        s3_store = stores.resolve(self.bucket.url, 0, self.storage_options)
        for key in manifests:
            mf = manifest.parse(self.bucket.get(key))
            prefix = key[: -len(manifest.MANIFEST_NAME)]
            for f in mf.files:
                assert sizes.get(prefix + f.name) == f.size, (
                    f"iteration {it}: s3://{self.bucket.name}/{key} is visible but {f.name} is "
                    f"{sizes.get(prefix + f.name)} bytes, not {f.size}"
                )
            vkey = ("s3", key, manifest.digest_bytes(self.bucket.get(key)))
            if vkey not in self.verified:
                rel = key.split("/", 1)[1][: -len("/" + manifest.MANIFEST_NAME)]
                rel = rel[len("ckpt/") :] if rel.startswith("ckpt/") else rel
                assert verify.verify_full(s3_store, rel) == ("V", []), f"iteration {it}: {key} does not verify"
                self.verified.add(vkey)
        missing = self.s3_before - set(manifests)
        assert not missing, f"iteration {it}: committed S3 checkpoints vanished: {sorted(missing)}"
        self.s3_before = set(manifests)

    def prune(self, keep: int = 3) -> None:
        """Test housekeeping between kills (not under test): keep the newest few committed checkpoints."""
        for d in self.local_dirs():
            names = sorted(committed(d, RUN))
            for n in names[:-keep]:
                shutil.rmtree(os.path.join(d, RUN, n))
            self.before[d] = committed(d, RUN)
        if self.bucket is not None:
            dirs = sorted({k.rsplit("/", 2)[0] for k in self.s3_before})
            for prefix in dirs[:-keep]:
                self.bucket.delete(prefix + "/" + manifest.MANIFEST_NAME)
                for k in self.bucket.keys(prefix + "/"):
                    self.bucket.delete(k)
            self.s3_before = {k for k in self.s3_before if k.rsplit("/", 2)[0] in dirs[-keep:]}


def _loop(
    driver: Driver, checker: Checker, n: int, rng: random.Random, *, world: int, extra=lambda i: {}
) -> list[dict]:
    # Calibrate: how long an uninterrupted save (and its mirror) takes here, now. Every save that ends
    # before its kill time updates the estimate (the median of the last five), so a machine that gets
    # faster or slower (other jobs share it) still sees most kills land inside the save.
    step = 1000
    times = []
    for _ in range(3):
        out = driver.save(step, None, **extra(step))
        assert all(s["exit"] == 0 for s in out["status"].values()), out
        times.append(max(s["t"] for s in out["status"].values()))
        checker.check(-1, out)
        step += 1
    log = []
    for i in range(n):
        t = sorted(times[-5:])[len(times[-5:]) // 2]
        delay = rng.uniform(0.0, 1.2 * t)
        victims = [rng.randrange(world)] if world == 1 or rng.random() < 0.6 else list(range(world))
        out = driver.save(step, delay, victims, **extra(step))
        name = stores.step_dir_name(step)
        where = {d: name in committed(d, RUN) for d in checker.local_dirs()}
        if checker.bucket is not None:  # before the resume's catch-up mirror can add it
            where["s3"] = any(k.endswith(f"/{name}/{manifest.MANIFEST_NAME}") for k in checker.bucket.keys())
        log.append({"step": step, "delay": round(delay, 4), "victims": victims, "committed": where, **out})
        if not any(s["signal"] == 9 for s in out["status"].values()):
            times.append(max(s["t"] for s in out["status"].values()))
        checker.check(i, out)
        checker.prune()
        step += 1
    return log


@pytest.mark.slow
def test_F10_random_kills_single_rank_local_store_with_file_mirror(tmp_path):
    root, mirror = str(tmp_path / "ck"), str(tmp_path / "mirror")
    urls = [root, "file://" + mirror]
    driver = Driver(tmp_path, world=1, stores=urls)
    try:
        checker = Checker(root, mirror, urls)
        log = _loop(driver, checker, 16, random.Random(SEED), world=1)
    finally:
        driver.close()
    # The schedule really interrupted saves, at different places (not all before or after the save).
    assert checker.kills >= 8, log  # of 16
    killed = [e for e in log if e["status"]["0"]["signal"] == 9]
    # Kills landed before the commit (C never appeared), and some after it (C committed, mirror or not).
    assert any(not e["committed"][root] for e in killed), log


@pytest.mark.slow
def test_F10_random_kills_two_ranks_local_store_with_file_mirror(tmp_path):
    root, mirror = str(tmp_path / "ck"), str(tmp_path / "mirror")
    urls = [root, "file://" + mirror]
    driver = Driver(tmp_path, world=2, stores=urls)
    try:
        checker = Checker(root, mirror, urls)
        log = _loop(driver, checker, 14, random.Random(SEED + 1), world=2)
    finally:
        driver.close()
    assert checker.kills >= 7, log  # of 14
    assert any(not e["committed"][root] for e in log if any(s["signal"] == 9 for s in e["status"].values())), log
    # Some runs lost one rank only: its peer must have given up cleanly (an error exit, not a hang).
    lone = [e for e in log if len(e["victims"]) == 1 and e["status"][str(e["victims"][0])]["signal"] == 9]
    for e in lone:
        other = e["status"][str(1 - e["victims"][0])]
        assert other["signal"] in (None, 9) and (other["exit"] in (0, 11, 12) or other["signal"] == 9), e


@pytest.mark.slow
def test_F10_random_kills_with_s3_mirror_never_shows_a_manifest_without_its_data(tmp_path, s3):
    root = str(tmp_path / "ck")
    opts = s3.storage_options()
    urls = [root, s3.url]
    multipart = s3.storage_options(upload_part_size=5 << 20)

    def extra(step: int) -> dict:
        return {"storage_options": multipart if step % 2 else opts}  # single PUTs and multipart uploads

    # Smaller here: the moto server runs in this process and takes ~20 MB/s; 7 MiB still goes up in
    # two 5 MiB parts (multipart) or one PUT, both taking tens of milliseconds.
    sizes = {"big_mib": 6, "shard_mib": 1}
    driver = Driver(tmp_path, world=1, stores=urls, storage_options=opts, **sizes)
    try:
        checker = Checker(root, None, urls, storage_options=opts, bucket=s3, **sizes)
        log = _loop(driver, checker, 10, random.Random(SEED + 2), world=1, extra=extra)
    finally:
        driver.close()
    assert checker.kills >= 5, log  # of 10
    killed = [e for e in log if e["status"]["0"]["signal"] == 9]
    # Some kills landed inside the S3 mirror: C committed locally, and (yet) no manifest in S3.
    assert any(e["committed"][root] and not e["committed"]["s3"] for e in killed), log
    assert checker.s3_before, "the S3 mirror never committed anything: the test proved nothing"
