"""FAULTS.md scenarios against a real S3 endpoint: the moto server of the session (never a mock of
s3fs), a fresh bucket per test, and a TCP chaos proxy in front of it that refuses, hangs,
throttles (503 SlowDown) or cuts transfers.

Standard fixture (FAULTS.md): committed A = step 100 and B = step 200, saved by ``Guardian``
into a local primary and mirrored to S3 (manifest last). Unless said otherwise the fault
targets B. "Nothing lost": every committed checkpoint present before a test is present
after it, in the local store and in the bucket. Every S3 option here is tight (a deadline
of a few seconds), so a test that goes wrong fails in seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass

import corruption
import helpers
import pytest
import rank_fns
import s3_rank_fns
from dg_harness import ctx, run_ranks
from helpers import assert_nothing_lost, committed, make_state, same, snapshot
from s3_helpers import ChaosProxy, MotoProcess

from dist_guardian import Guardian, NoReachableCheckpoint, copying, discovery, manifest, retention, stores, verify

RUN = "r"
REPL = "replicated.dgt"
DEADLINE = 3.0
A, B, C = "step-000000000100", "step-000000000200", "step-000000000300"


# ----------------------------------------------------------------------------- fixture and helpers


def opts(bucket, endpoint: str | None = None, **kw) -> dict:
    """storage_options for the bucket: tight timeouts, our deadline, optional proxy endpoint."""
    kw.setdefault("deadline_s", DEADLINE)
    return bucket.storage_options(endpoint, **kw)


def s3_committed(bucket, run: str = RUN) -> dict[str, str]:
    """The committed checkpoints in the bucket: dir name -> manifest digest (the "nothing lost" set)."""
    out = {}
    for k in bucket.keys(f"ckpt/{run}/"):
        parts = k.split("/")
        if len(parts) == 4 and parts[3] == manifest.MANIFEST_NAME and parts[2].startswith("step-"):
            out[parts[2]] = manifest.digest_bytes(bucket.get(k))
    return out


def keys_under(bucket, dirname: str, run: str = RUN) -> list[str]:
    return sorted(bucket.keys(f"ckpt/{run}/{dirname}/"))


@dataclass
class S3Std:
    root: str
    bucket: object
    url: str
    so: dict
    snap_a: dict
    snap_b: dict
    before: dict
    before_s3: dict

    def dir(self, name: str) -> str:
        return os.path.join(self.root, RUN, name)


def _save_a_b(tmp_path, bucket, **kw) -> S3Std:
    root = str(tmp_path / "ck")
    so = opts(bucket)
    saved = helpers.save_a_b([root, bucket.url], RUN, storage_options=so, **kw)
    assert saved.unmirrored == []
    before, before_s3 = committed(root, RUN), s3_committed(bucket)
    assert set(before) == set(before_s3) == {A, B}
    assert before == before_s3  # byte-identical manifests: the same checkpoints
    return S3Std(
        root=root,
        bucket=bucket,
        url=bucket.url,
        so=so,
        snap_a=saved.snap_a,
        snap_b=saved.snap_b,
        before=before,
        before_s3=before_s3,
    )


@pytest.fixture
def std(tmp_path, s3) -> S3Std:
    return _save_a_b(tmp_path, s3)


@pytest.fixture
def proxy(s3_server):
    p = ChaosProxy(s3_server.host, s3_server.port)
    yield p
    p.close()


def resume(stores_, so, *, seed: int = 42, **kw):
    """Resume into a fresh state; returns (result, state, seconds)."""
    state = make_state(seed=seed)
    kw.setdefault("mirror_timeout", 5.0)
    g = Guardian(stores=stores_, run=RUN, storage_options=so, **kw)
    t0 = time.monotonic()
    try:
        r = g.resume(state)
        dt = time.monotonic() - t0
    finally:
        g.close()
    return r, state, dt


def only_s3_checkpoint(tmp_path, bucket, so, step: int, *, seed: int = 7, blob_mb: float = 0.0) -> dict:
    """A checkpoint at ``step`` that exists in the bucket only (saved elsewhere, copied, removed locally)."""
    src = str(tmp_path / f"elsewhere-{step}")
    state = helpers.make_state(seed, blob_mb=blob_mb)
    g = Guardian(stores=[src], run=RUN)
    assert g.save(state, step=step).committed
    g.close()
    name = stores.step_dir_name(step)
    copying.copy_checkpoint(os.path.join(src, RUN, name), stores.resolve(bucket.url, 1, so), RUN, name)
    shutil.rmtree(src)
    return snapshot(state)


def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def put_paths(proxy, part: str) -> list[str]:
    """Paths (query strings dropped) of the PUT requests through the proxy that contain ``part``, in order."""
    out = []
    for line in proxy.lines:
        if line.startswith("PUT "):
            path = line.split()[1].split("?", 1)[0]
            if part in path:
                out.append(path)
    return out


def logged(caplog, token: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if token in r.getMessage()]


def elapsed_in(reason: str) -> float:
    m = re.search(r"elapsed=([0-9.]+)s", reason)
    assert m, reason
    return float(m.group(1))


@pytest.fixture(autouse=True)
def _log_level(caplog):
    caplog.set_level(logging.INFO, logger="dist_guardian")


# ----------------------------------------------------------------------------- F05 replicas


def test_F05_local_bit_flip_loads_the_intact_s3_replica_and_reports_repair(std, caplog):
    """Local B has a flipped mantissa bit (sizes fine, checksum not, values plausible): it is tried,
    found suspect and deferred; the intact S3 replica of the same step is loaded next, before any
    older checkpoint and before the suspect copy would be used."""
    corruption.flip_bit_in_tensor(os.path.join(std.dir(B), REPL), bit=0, byte_in_elem=0)
    r, state, _ = resume([std.root, std.url], std.so)
    assert (r.step, r.store, r.tier) == (200, std.url, "V")
    assert r.path == f"{std.url}/{RUN}/{B}"
    assert same(snapshot(state), std.snap_b)
    outcomes = [(a.path, a.outcome) for a in r.attempts]
    assert outcomes == [(std.dir(B), "deferred"), (f"{std.url}/{RUN}/{B}", "loaded")]
    assert "checksum_mismatch" in r.attempts[0].reasons[0][1]
    msg = logged(caplog, "replica_repair_needed")
    assert len(msg) == 1 and f"path={std.dir(B)}" in msg[0] and "pass repair=True" in msg[0]
    # Nothing deleted, nothing changed: the damaged copy is still there for repair.
    assert_nothing_lost(std.before, committed(std.root, RUN))
    assert_nothing_lost(std.before_s3, s3_committed(std.bucket))
    assert verify.verify_full(stores.resolve(std.root), f"{RUN}/{B}")[0] == "S"


def test_F05_repair_refetches_the_local_copy_from_s3_and_keeps_the_damaged_one_aside(std, caplog):
    corruption.flip_bit_in_tensor(os.path.join(std.dir(B), REPL))
    r, _, _ = resume([std.root, std.url], std.so, repair=True)  # close() waits for the repair
    assert (r.step, r.store) == (200, std.url)
    assert logged(caplog, "replica_repaired")
    assert verify.verify_full(stores.resolve(std.root), f"{RUN}/{B}") == ("V", [])
    aside = [n for n in os.listdir(os.path.join(std.root, RUN)) if n.startswith(f".quarantine-{B}-")]
    assert len(aside) == 1
    assert verify.verify_full(stores.resolve(std.root), f"{RUN}/{aside[0]}")[0] == "S"  # kept, as it was
    assert committed(std.root, RUN) == std.before
    # The next start loads the repaired local copy (the primary comes first).
    r2, state2, _ = resume([std.root, std.url], std.so)
    assert (r2.step, r2.store) == (200, std.root) and same(snapshot(state2), std.snap_b)


# ----------------------------------------------------------------------------- F13, F14 interrupted uploads


def test_F13_exception_mid_multipart_upload_publishes_no_object_and_no_manifest(tmp_path, s3, monkeypatch, caplog):
    """An exception raised from the upload callback after two parts (s3fs aborts the upload): the
    final data key never exists, nor the manifest, so C is no remote candidate. Then it catches up."""
    root = str(tmp_path / "ck")
    so = opts(s3, upload_part_size=5 << 20, upload_concurrency=1)
    state = helpers.make_state(0, blob_mb=12)
    monkeypatch.setenv("DIST_GUARDIAN_FAULT", "mid_s3_data@300:0:raise")
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, mirror_timeout=20)
    assert g.save(state, step=300).committed
    wait_for(lambda: logged(caplog, "mirror_deferred step=300"), 15, "the failed mirror")
    assert "injected fault at mid_s3_data" in logged(caplog, "mirror_deferred step=300")[0]
    assert keys_under(s3, C) == []  # no data object at its final key, no manifest
    assert s3.uploads(f"ckpt/{RUN}/") == []  # s3fs aborted the multipart upload
    s3store = stores.resolve(s3.url, 1, so)
    assert verify.verify_all(discovery.discover_store(s3store, RUN), run=RUN, compat=None).candidates == ()
    monkeypatch.delenv("DIST_GUARDIAN_FAULT")
    assert g.close() == []
    assert set(s3_committed(s3)) == {C}
    assert verify.verify_full(s3store, f"{RUN}/{C}") == ("V", [])


def test_F13_connection_cut_mid_put_leaves_no_object_at_the_final_key(tmp_path, s3, proxy, caplog):
    """The proxy drops the connection after 256 KiB of a 3 MB PUT (every retry too)."""
    root = str(tmp_path / "ck")
    so = opts(s3, proxy.endpoint)
    proxy.mode, proxy.cut_after = "cut", 256 * 1024
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, mirror_timeout=20)
    assert g.save(helpers.make_state(0, blob_mb=3), step=300).committed
    wait_for(lambda: logged(caplog, "mirror_deferred step=300"), 15, "the failed mirror")
    assert keys_under(s3, C) == []
    assert any(p.endswith(f"/{C}/{REPL}") for p in put_paths(proxy, f"/{C}/"))
    proxy.mode = "pass"
    assert g.close() == []
    assert set(s3_committed(s3)) == {C}
    assert verify.verify_full(stores.resolve(s3.url, 1, so), f"{RUN}/{C}") == ("V", [])


def test_F14_kill_9_during_multipart_upload_then_stale_upload_cleanup(tmp_path, s3, caplog):
    """A writer process is SIGKILLed after two parts of a multipart upload. Nothing is visible in
    list_objects_v2 under the step (no data, no manifest: no candidate); the open upload is aborted
    (mpu_aborted) and the dead writer's claim removed by the next start."""
    root = str(tmp_path / "ck")
    so = opts(s3, upload_part_size=5 << 20, upload_concurrency=1, stale_s=1.0)
    q = ctx().Queue()
    env = {"DIST_GUARDIAN_FAULT": "mid_s3_data@300:0:kill", "DIST_GUARDIAN_NODE_LOCAL_ROOT": str(tmp_path / "node0")}
    p = ctx().Process(
        target=s3_rank_fns.child_save, args=([root, s3.url], RUN, [300], so, env, q), kwargs={"blob_mb": 16}
    )
    p.start()
    p.join(60)
    assert p.exitcode == -9, f"the writer was not killed (exit code {p.exitcode})"
    assert committed(root, RUN).keys() == {C}  # the local commit happened before the mirror
    assert keys_under(s3, C) == []
    assert [k for k in s3.keys(f"ckpt/{RUN}/") if not k.startswith(f"ckpt/{RUN}/.writers/")] == []
    open_uploads = s3.uploads(f"ckpt/{RUN}/")
    assert [u["Key"] for u in open_uploads] == [f"ckpt/{RUN}/{C}/{REPL}"]
    s3store = stores.resolve(s3.url, 1, so)
    assert discovery.discover_store(s3store, RUN) == []
    time.sleep(1.2)  # the dead writer's claim becomes stale (stale_s=1)
    # The next start (resume of a new incarnation) cleans up in the background; close() waits for it.
    r, _, _ = resume([root, s3.url], so)
    assert (r.step, r.store) == (300, root)
    assert s3.uploads(f"ckpt/{RUN}/") == []
    assert logged(caplog, f"mpu_aborted store={s3.url} key=ckpt/{RUN}/{C}/{REPL}")
    assert logged(caplog, "stale_upload_removed")
    assert s3.keys(f"ckpt/{RUN}/") == [] or set(s3_committed(s3)) == {C}  # claim gone; C maybe caught up since


def test_F14_next_save_aborts_a_stale_upload_too(tmp_path, s3, caplog):
    """The same cleanup runs on the next save (first mirror to a store) when no resume came first."""
    so = opts(s3, stale_s=0.5)
    fs = stores.filesystem(stores.resolve(s3.url, 1, so))
    fs.call_s3("create_multipart_upload", Bucket=s3.name, Key=f"ckpt/{RUN}/{C}/{REPL}")
    time.sleep(0.6)
    g = Guardian(stores=[str(tmp_path / "ck"), s3.url], run=RUN, storage_options=so)
    assert g.save(make_state(1), step=400).committed
    assert g.close() == []
    assert s3.uploads() == []
    assert logged(caplog, "mpu_aborted")
    assert set(s3_committed(s3)) == {"step-000000000400"}


# ----------------------------------------------------------------------------- F15 damaged remote replica


@pytest.mark.parametrize("damage", ["short", "missing"])
def test_F15_remote_object_short_or_missing_makes_that_replica_R(std, damage):
    key = f"ckpt/{RUN}/{B}/{REPL}"
    if damage == "short":
        data = std.bucket.get(key)
        std.bucket.put(key, data[: len(data) // 2])
    else:
        std.bucket.delete(key)
    # The local B is healthy: it is used.
    r, state, _ = resume([std.root, std.url], std.so)
    assert (r.step, r.store) == (200, std.root) and same(snapshot(state), std.snap_b)
    # Without the local B, the damaged S3 B is rejected before any data is read: A is loaded.
    shutil.move(std.dir(B), str(std.dir(B)) + "-away")
    r, state, _ = resume([std.root, std.url], std.so)
    assert r.step == 100 and same(snapshot(state), std.snap_a)
    why = dict(r.rejected)[f"{std.url}/{RUN}/{B}"]
    assert why.startswith(f"size_mismatch: {REPL} expected=" if damage == "short" else f"missing: {REPL}")
    assert [a.outcome for a in r.attempts] == ["loaded"]  # B was never attempted
    shutil.move(str(std.dir(B)) + "-away", std.dir(B))
    assert_nothing_lost(std.before, committed(std.root, RUN))
    assert s3_committed(std.bucket) == std.before_s3  # the manifest is still there: nothing deleted


# ----------------------------------------------------------------------------- F16, F17 unreachable store


def test_F16_store_refuses_connections_local_candidate_loaded_within_the_deadline(tmp_path, std, proxy, caplog):
    only_s3_checkpoint(tmp_path, std.bucket, std.so, 300)  # S3 alone holds the newest: it would win
    proxy.mode = "refuse"
    so = opts(std.bucket, proxy.endpoint)
    r, state, dt = resume([std.root, std.url], so)
    assert (r.step, r.store) == (200, std.root) and same(snapshot(state), std.snap_b)
    ((store, why),) = r.unreachable
    assert store == std.url and "store_unreachable" in why
    assert elapsed_in(why) < 1.5 * DEADLINE
    assert dt < 1.5 * DEADLINE + 2.0  # the whole resume: discovery bounded by our deadline
    assert any(
        "store_unreachable store=" + std.url in m and "elapsed=" in m for m in logged(caplog, "store_unreachable")
    )
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F16_variant_nothing_local_and_s3_down_raises_no_reachable_checkpoint(tmp_path, std, proxy):
    """Both ranks raise NoReachableCheckpoint (exit non-zero under torchrun); nobody starts from scratch."""
    proxy.mode = "refuse"
    so = opts(std.bucket, proxy.endpoint)
    empty = str(tmp_path / "empty")
    out = run_ranks(
        s3_rank_fns.resume_report_error, 2, stores=[empty, std.url], run=RUN, storage_options=so, timeout=60
    )
    assert out.ok(), out.errors
    for rank in (0, 1):
        got = out.results[rank]
        assert got["error"].startswith("NoReachableCheckpoint: no checkpoint found, but a store was unreachable")
        assert got["resumed"] is None and got["untouched"]
    # The same in this process, through the public API.
    with pytest.raises(NoReachableCheckpoint):
        resume([empty, std.url], so)
    assert s3_committed(std.bucket) == std.before_s3


def test_F17_store_hangs_discovery_bounded_by_our_deadline_not_the_clients(tmp_path, std, proxy):
    """The proxy accepts and never answers. botocore/s3fs alone would wait read_timeout x attempts x
    retries (60 s x 5 x 3 here); our deadline (3 s) bounds it."""
    only_s3_checkpoint(tmp_path, std.bucket, std.so, 300)
    proxy.mode = "hang"
    so = opts(
        std.bucket,
        proxy.endpoint,
        retries=3,
        config_kwargs={"connect_timeout": 60, "read_timeout": 60, "retries": {"max_attempts": 5, "mode": "standard"}},
    )
    r, state, dt = resume([std.root, std.url], so)
    assert (r.step, r.store) == (200, std.root) and same(snapshot(state), std.snap_b)
    ((store, why),) = r.unreachable
    assert f"did not answer within {DEADLINE:.1f}s" in why
    assert elapsed_in(why) < 1.5 * DEADLINE
    assert dt < 1.5 * DEADLINE + 2.0


# ----------------------------------------------------------------------------- F18 throttling


def test_F18_503_slowdown_retried_within_the_deadline_with_bounded_requests(tmp_path, std, proxy):
    """Three 503 SlowDown answers: botocore's standard mode retries them with jittered exponential
    backoff (at most 1 + 2 + 4 s), inside our deadline of 10 s; every request is counted."""
    deadline = 10.0
    so = opts(
        std.bucket,
        proxy.endpoint,
        deadline_s=deadline,
        config_kwargs={"connect_timeout": 1, "read_timeout": 3, "retries": {"max_attempts": 4, "mode": "standard"}},
    )
    empty = str(tmp_path / "empty")
    r, _, _ = resume([empty, std.url], so)  # baseline: the same resume, nothing throttled
    assert r.step == 200
    baseline = proxy.requests
    proxy.requests = 0
    proxy.mode, proxy.throttle = "slowdown", 3
    r, state, dt = resume([empty, std.url], so)
    assert (r.step, r.store) == (200, std.url) and same(snapshot(state), std.snap_b)
    assert r.unreachable == ()
    assert proxy.throttle == 0  # every 503 was answered and retried
    assert baseline + 3 <= proxy.requests <= baseline + 3 + 2, (baseline, proxy.requests)
    assert dt < deadline + 2.0


def test_F18_throttled_direct_get_falls_back_to_botocore_retries(s3, proxy):
    """A whole-object read is one presigned GET read straight into the buffer; a 503 SlowDown on it
    hands the read to botocore, which retries: the bytes arrive, with one extra request per 503."""
    so = opts(
        s3,
        proxy.endpoint,
        config_kwargs={"connect_timeout": 1, "read_timeout": 3, "retries": {"max_attempts": 4, "mode": "standard"}},
    )
    store = stores.resolve(s3.url, 1, so)
    data = os.urandom(3 << 20)
    s3.put("ckpt/obj.bin", data)
    proxy.mode, proxy.throttle = "slowdown", 2
    buf = bytearray(len(data))
    with stores.RemoteReader(store, "obj.bin", len(data)) as r:
        r.readinto(buf)
    assert bytes(buf) == data and proxy.throttle == 0
    gets = [line for line in proxy.lines if line.startswith("GET ") and "/obj.bin" in line]
    assert len(gets) == 3 and "?" in gets[0].split()[1]  # the presigned one, then botocore's two tries


def test_F18_throttled_mirror_still_commits_manifest_last(tmp_path, s3, proxy):
    so = opts(
        s3,
        proxy.endpoint,
        config_kwargs={"connect_timeout": 1, "read_timeout": 3, "retries": {"max_attempts": 4, "mode": "standard"}},
    )
    proxy.mode, proxy.throttle = "slowdown", 3
    g = Guardian(stores=[str(tmp_path / "ck"), s3.url], run=RUN, storage_options=so, mirror_timeout=30)
    assert g.save(make_state(0), step=300).committed
    assert g.close() == []
    assert set(s3_committed(s3)) == {C} and proxy.throttle == 0
    puts = put_paths(proxy, f"/{C}/")
    assert puts[-1].endswith(f"/{C}/manifest.json") and len(puts) >= 3


# ----------------------------------------------------------------------------- F19 credentials


def test_F19_wrong_keys_store_unavailable_after_one_request_no_retry_storm(tmp_path, caplog):
    """A moto server of its own, with IAM authentication switched on: the wrong keys get a real 403."""
    srv = MotoProcess()
    px = None
    try:
        bucket = srv.new_bucket()
        std = _save_a_b(tmp_path, bucket)  # A and B mirrored with the right keys (before auth is on)
        only_s3_checkpoint(tmp_path, bucket, std.so, 300)  # S3 alone holds the newest
        srv.enable_auth()
        px = ChaosProxy(srv.host, srv.port)
        wrong = bucket.storage_options(
            px.endpoint,
            key="wrong-key",
            secret="wrong-secret",
            deadline_s=DEADLINE,
            config_kwargs={"connect_timeout": 1, "read_timeout": 3, "retries": {"max_attempts": 5, "mode": "standard"}},
            retries=5,
        )
        r, state, _ = resume([std.root, bucket.url], wrong)
        assert (r.step, r.store) == (200, std.root) and same(snapshot(state), std.snap_b)
        ((store, why),) = r.unreachable
        assert store == bucket.url and "store_auth_failed" in why
        assert px.requests == 1, px.lines  # one attempt: no botocore or s3fs retries of a 403
        assert logged(caplog, "store_auth_failed")
        # The store stays marked unavailable: a second start and a save's mirror send nothing.
        r2, _, _ = resume([std.root, bucket.url], wrong)
        assert r2.step == 200
        g = Guardian(stores=[std.root, bucket.url], run=RUN, storage_options=wrong, mirror_timeout=1.5)
        assert g.save(make_state(3), step=400).committed
        left = g.close()
        assert left and "store_auth_failed" in left[0]
        assert px.requests == 1, px.lines
        assert_nothing_lost(std.before, committed(std.root, RUN))
    finally:
        if px is not None:
            px.close()
        srv.stop()


# ----------------------------------------------------------------------------- F20 object gone before the load


def test_F20_object_deleted_between_discovery_and_load_all_ranks_move_to_A(tmp_path, s3):
    root = str(tmp_path / "ck")
    so = opts(s3)
    out = run_ranks(rank_fns.save_steps, 2, stores=[root, s3.url], run=RUN, steps=[100, 200], storage_options=so)
    assert out.ok(), out.errors
    assert out.results[0]["unmirrored"] == [] and set(s3_committed(s3)) == {A, B}
    shutil.rmtree(os.path.join(root, RUN, B))  # S3 holds the only B
    key = f"ckpt/{RUN}/{B}/rank-00000-of-00002.dgt"
    back = run_ranks(
        s3_rank_fns.resume_deleting_before_load,
        2,
        stores=[root, s3.url],
        run=RUN,
        storage_options=so,
        endpoint=s3.server.endpoint,
        bucket=s3.name,
        key=key,
        step=200,
    )
    assert back.ok(), back.errors
    assert back.results[0]["deleted"] == [key]
    for rank in (0, 1):
        got = back.results[rank]
        assert got["resumed"] and got["step"] == 100 and got["store"] == root
        assert got["data"] == {"position": 100 * rank + 1}
        record = json.loads(got["record"])
        first = record["attempts"][0]
        assert first["path"] == f"{s3.url}/{RUN}/{B}" and first["outcome"] == "failed"
        assert [x["rank"] for x in first["reasons"]] == [0] and "FileNotFoundError" in first["reasons"][0]["reason"]


# ----------------------------------------------------------------------------- F38 concurrent writers


def test_F38_manifest_put_if_none_match_has_exactly_one_winner(s3):
    """The commit point itself: two writers PUT the same manifest key at the same moment; S3 answers
    200 to one and 412 to the other."""
    store = stores.resolve(s3.url, 0, opts(s3))
    barrier = threading.Barrier(2)
    results: dict[int, str] = {}

    def writer(i: int) -> None:
        barrier.wait()
        try:
            stores.put_bytes_exclusive(store, f"{RUN}/{C}/manifest.json", f"writer {i}".encode())
            results[i] = "won"
        except FileExistsError as e:
            results[i] = f"lost: {e}"

    ts = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(v.split(":")[0] for v in results.values()) == ["lost", "won"], results
    winner = next(i for i, v in results.items() if v == "won")
    assert s3.get(f"ckpt/{RUN}/{C}/manifest.json") == f"writer {winner}".encode()


def test_F38_two_processes_save_the_same_step_to_s3_exactly_one_commits(tmp_path, s3, caplog):
    so = opts(s3)
    q = ctx().Queue()
    start_at = time.time() + 3.0  # both processes are up and waiting by then
    procs = []
    for i in (0, 1):
        nl = tmp_path / f"node{i}x"
        nl.mkdir(mode=0o700)
        env = {"DIST_GUARDIAN_NODE_LOCAL_ROOT": str(nl)}
        p = ctx().Process(
            target=s3_rank_fns.child_save,
            args=([s3.url], RUN, [300], so, env, q),
            kwargs={"seed": 10 + i, "start_at": start_at, "blob_mb": 2},
        )
        p.start()
        procs.append(p)
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    wins = [g for g in got if g["saves"][0]["committed"]]
    losses = [g for g in got if not g["saves"][0]["committed"]]
    assert len(wins) == 1 and len(losses) == 1, got
    assert "commit_conflict" in losses[0]["saves"][0]["reason"]
    # One complete checkpoint, all of it from the winner: every checksum matches its manifest.
    store = stores.resolve(s3.url, 0, so)
    assert set(s3_committed(s3)) == {C}
    assert verify.verify_full(store, f"{RUN}/{C}") == ("V", [])
    mf = json.loads(s3.get(f"ckpt/{RUN}/{C}/manifest.json"))
    assert mf["writer"]["pid"] == wins[0]["pid"]
    # Neither left its local staging behind.
    for i in (0, 1):
        assert [n for n in os.listdir(tmp_path / f"node{i}x") if n.startswith(".staging-")] == []


# ----------------------------------------------------------------------------- F40, F41 retention


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "uncommitted"])
def test_F40_local_retention_counts_only_verified_checkpoints(std, damage, caplog):
    """keep_last=2 with A, B verified and the newest C damaged: C does not count, A and B stay."""
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(make_state(5), step=300).committed
    g.close()
    c = std.dir(C)
    if damage == "truncated":
        os.truncate(os.path.join(c, REPL), 100)
    elif damage == "bit_flip":  # sizes still match: only a full verification sees it
        corruption.flip_bit_in_tensor(os.path.join(c, REPL))
    else:
        os.rename(c, os.path.join(std.root, RUN, ".staging-step-000000000300-0123456789abcdef"))
    assert retention.retain(stores.resolve(std.root), RUN, 2) == []
    assert {A, B} <= set(committed(std.root, RUN))
    if damage == "bit_flip":
        assert logged(caplog, f"retention_not_counted {c}")
        assert os.path.isdir(c)  # never deleted either


def test_F40_keep_last_1_is_raised_to_2_and_the_newest_verified_is_never_deleted(std, caplog):
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(make_state(5), step=300).committed
    g.close()
    store = stores.resolve(std.root)
    assert retention.retain(store, RUN, 1) == [std.dir(A)]
    assert logged(caplog, "keep_last=1 raised to 2")
    assert set(committed(std.root, RUN)) == {B, C}


@pytest.mark.parametrize("damage", ["no_manifest", "short_object"])
def test_F40_s3_retention_counts_only_committed_verified_checkpoints(tmp_path, std, damage):
    s3store = stores.resolve(std.url, 1, std.so)
    only_s3_checkpoint(tmp_path, std.bucket, std.so, 300)
    if damage == "no_manifest":
        std.bucket.delete(f"ckpt/{RUN}/{C}/manifest.json")
        std.bucket.delete(f"ckpt/{RUN}/.writers/{C}.json")
    else:
        key = f"ckpt/{RUN}/{C}/{REPL}"
        std.bucket.put(key, std.bucket.get(key)[:1000])
    assert retention.retain(s3store, RUN, 2) == []
    assert set(s3_committed(std.bucket)) >= {A, B}
    assert s3_committed(std.bucket)[A] == std.before_s3[A]


def _retain_in_child_and_kill(url: str, so: dict, tmp_path) -> int:
    q = ctx().Queue()
    env = {"DIST_GUARDIAN_FAULT": "mid_retention:0:kill", "DIST_GUARDIAN_NODE_LOCAL_ROOT": str(tmp_path / "node0")}
    p = ctx().Process(target=s3_rank_fns.child_retain, args=(url, so, RUN, 2, env, q))
    p.start()
    p.join(60)
    return p.exitcode


def test_F41_kill_during_local_retention_never_leaves_a_half_deleted_committed_checkpoint(tmp_path, std):
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(make_state(5), step=300).committed
    g.close()
    assert _retain_in_child_and_kill(std.root, {}, tmp_path) == -9
    names = os.listdir(os.path.join(std.root, RUN))
    assert A not in names and any(n.startswith(f".trash-{A}-") for n in names)  # renamed aside, atomically
    r, state, _ = resume([std.root], None)
    assert r.step == 300 and all(a.path != std.dir(A) for a in r.attempts)
    assert retention.retain(stores.resolve(std.root), RUN, 2) == []
    assert not any(n.startswith(".trash-") for n in os.listdir(os.path.join(std.root, RUN)))  # cleaned next time
    assert set(committed(std.root, RUN)) == {B, C}


def test_F41_kill_during_s3_retention_manifest_first_then_leftovers_cleaned(tmp_path, std, caplog):
    only_s3_checkpoint(tmp_path, std.bucket, std.so, 300)
    assert _retain_in_child_and_kill(std.url, std.so, tmp_path) == -9
    # A lost its manifest first: its data is left, but it is no candidate; B and C are intact.
    assert f"ckpt/{RUN}/{A}/manifest.json" not in std.bucket.keys()
    assert keys_under(std.bucket, A) != []
    s3store = stores.resolve(std.url, 1, std.so)
    checked = verify.verify_all(discovery.discover_store(s3store, RUN), run=RUN, compat=None).candidates
    assert sorted((c.step, c.tier) for c in checked) == [(100, "R"), (200, "V"), (300, "V")]
    r, _, _ = resume([str(tmp_path / "empty"), std.url], std.so)
    assert r.step == 300
    assert retention.retain(s3store, RUN, 2) == []  # nothing more to delete; the leftovers go
    assert keys_under(std.bucket, A) == []
    assert logged(caplog, "stale_upload_removed")
    assert set(s3_committed(std.bucket)) == {B, C}


# ----------------------------------------------------------------------------- F42, F43 mirrors


def test_F42_hung_mirror_keeps_local_checkpoints_until_their_remote_manifest_is_committed(tmp_path, s3, proxy, caplog):
    root = str(tmp_path / "ck")
    so = opts(s3, proxy.endpoint, deadline_s=1.5)
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, keep_last=2, mirror_timeout=30)
    state = make_state(0)
    for step in (100, 200):
        assert g.save(state, step=step).committed
    assert g.flush(20) == []
    proxy.mode = "hang"
    t0 = time.monotonic()
    for step in (300, 400, 500):
        assert g.save(state, step=step).committed
    assert time.monotonic() - t0 < 1.5  # three saves; waiting on the hung remote would cost 1.5 s each
    wait_for(
        lambda: any(os.path.join(root, RUN, C) in m for m in logged(caplog, "retention_blocked_unmirrored")),
        20,
        "retention to keep C",
    )
    wait_for(lambda: logged(caplog, "mirror_deferred step=300"), 20, "the hung mirror of C")
    assert committed(root, RUN).keys() == {A, B, C, "step-000000000400", "step-000000000500"}
    assert set(s3_committed(s3)) == {A, B}
    proxy.mode = "pass"
    assert g.close() == []
    # Mirrored with manifest last, then retention ran everywhere: keep_last=2 in each store.
    assert set(s3_committed(s3)) == {"step-000000000400", "step-000000000500"}
    assert set(committed(root, RUN)) == {"step-000000000400", "step-000000000500"}
    for step in (300, 400, 500):
        name = stores.step_dir_name(step)
        puts = put_paths(proxy, f"/{name}/")
        assert puts and puts[-1].endswith(f"/{name}/manifest.json")


def test_F43_store_refusing_during_save_defers_the_mirror_then_catches_up_manifest_last(tmp_path, s3, proxy, caplog):
    root = str(tmp_path / "ck")
    so = opts(s3, proxy.endpoint, deadline_s=2.0)
    proxy.mode = "refuse"
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, mirror_timeout=30)
    state = make_state(0)
    t0 = time.monotonic()
    r = g.save(state, step=300)
    assert r.committed and time.monotonic() - t0 < 1.5  # the local commit does not wait for S3
    assert committed(root, RUN).keys() == {C}
    wait_for(lambda: logged(caplog, "mirror_deferred step=300"), 15, "mirror_deferred")
    assert s3.keys() == []
    proxy.mode = "pass"
    assert g.close() == []
    assert set(s3_committed(s3)) == {C}
    puts = put_paths(proxy, f"/{C}/")
    assert puts[-1].rsplit("/", 1)[1] == "manifest.json"
    assert {p.rsplit("/", 1)[1] for p in puts} == {REPL, "rank-00000-of-00001.dgt", "manifest.json"}
    assert verify.verify_full(stores.resolve(s3.url, 1, so), f"{RUN}/{C}") == ("V", [])


def test_F43_mirror_deferred_before_a_restart_is_caught_up_by_the_next_start(tmp_path, s3, proxy):
    root = str(tmp_path / "ck")
    so = opts(s3, proxy.endpoint, deadline_s=1.5)
    proxy.mode = "refuse"
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, mirror_timeout=1.0)
    assert g.save(make_state(0), step=300).committed
    left = g.close()  # the job "dies" with the mirror pending
    assert left and "step 300" in left[0]
    proxy.mode = "pass"
    later = opts(s3, proxy.endpoint, deadline_s=10.0)  # the next incarnation (a new process: new connections)
    r, _, _ = resume([root, s3.url], later, mirror_timeout=20)  # the next start mirrors what S3 lacks
    assert r.step == 300 and r.unreachable == ()
    assert set(s3_committed(s3)) == {C}


def test_keep_last_applies_to_every_store_after_its_mirror_commits(tmp_path, s3):
    root = str(tmp_path / "ck")
    so = opts(s3)
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so, keep_last=2)
    state = make_state(0)
    for step in (100, 200, 300, 400):
        helpers.train(state, 1)
        assert g.save(state, step=step).committed
    assert g.close() == []
    assert set(committed(root, RUN)) == set(s3_committed(s3)) == {C, "step-000000000400"}
    assert s3.uploads() == []
    assert sorted(k.rsplit("/", 1)[1] for k in s3.keys(f"ckpt/{RUN}/.writers/")) == [
        f"{C}.json",
        "step-000000000400.json",
    ]


def test_async_save_commits_locally_then_mirrors_in_the_background(tmp_path, s3):
    root = str(tmp_path / "ck")
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=opts(s3), keep_last=2)
    state = make_state(0)
    futures = []
    for step in (100, 200, 300):
        helpers.train(state, 1)
        futures.append(g.save(state, step=step, blocking=False))
    snap = snapshot(state)
    assert g.flush(30) == []  # waits for the last background save, then for its mirror
    assert [f.result().committed for f in futures] == [True, True, True]
    assert set(s3_committed(s3)) == set(committed(root, RUN)) == {B, C}
    assert g.close() == []
    r, back, _ = resume([str(tmp_path / "fresh"), s3.url], opts(s3))
    assert (r.step, r.store) == (300, s3.url) and same(snapshot(back), snap)


# ----------------------------------------------------------------------------- remote primary, multi-rank


def test_remote_primary_commit_is_staged_locally_uploaded_manifest_last_and_resumes(
    tmp_path, s3, proxy, node_local_root
):
    so = opts(s3, proxy.endpoint)
    state = make_state(0)
    g = Guardian(stores=[s3.url], run=RUN, storage_options=so)
    r = g.save(state, step=300)
    assert r.committed and r.path == f"{s3.url}/{RUN}/{C}"
    assert g.close() == []
    assert [n for n in os.listdir(node_local_root) if n.startswith(".staging-")] == []
    puts = [p.rsplit("/", 1)[1] for p in put_paths(proxy, f"/{C}")]
    assert puts[-1] == "manifest.json" and f"{C}.json" == puts[0]  # claim first, manifest last
    r2, state2, _ = resume([s3.url], so)
    assert (r2.step, r2.store, r2.tier) == (300, s3.url, "V") and same(snapshot(state2), snapshot(state))


def test_multirank_resume_from_an_s3_only_candidate(tmp_path, s3):
    root = str(tmp_path / "ck")
    so = opts(s3)
    out = run_ranks(rank_fns.save_steps, 2, stores=[root, s3.url], run=RUN, steps=[10, 20], storage_options=so)
    assert out.ok(), out.errors
    assert out.results[0]["unmirrored"] == []
    shutil.rmtree(root)  # the local store is gone (a new machine): only S3 holds the checkpoints
    back = run_ranks(rank_fns.resume_state, 2, stores=[str(tmp_path / "fresh"), s3.url], run=RUN, storage_options=so)
    assert back.ok(), back.errors
    for rank in (0, 1):
        got = back.results[rank]
        assert got["resumed"] and got["step"] == 20 and got["store"] == s3.url and got["tier"] == "V"
        assert got["data"] == {"position": 100 * rank + 2}
        assert got["next"] == out.results[rank]["next"]  # per-rank RNG continues exactly
    assert len({json.dumps(back.results[r]["weights"], sort_keys=True) for r in (0, 1)}) == 1
