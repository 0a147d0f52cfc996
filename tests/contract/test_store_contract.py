"""The store contract: one set of behaviours dist_guardian relies on, run against every backend.

Each test runs on a local directory, on ``memory://`` and on S3 (the moto server of the
session, a fresh bucket per test). Where a backend differs on purpose the test says so
(a local store commits by rename, so it has no ``put_file``; an object store without a
manifest holds no candidate, while a local step dir without one is a legacy candidate).
"""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid

import corruption
import helpers
import pytest

from dist_guardian import Guardian, copying, discovery, loading, stores, verify
from dist_guardian.errors import ConfigError, StoreUnavailable

BACKENDS = ["local", "memory", "s3"]
RUN = "r"


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(kind, store, writer): ``writer(rel, data)`` writes behind the library's back (another client)."""
    kind = request.param
    if kind == "local":
        root = tmp_path / "store"
        root.mkdir()
        store = stores.resolve(str(root), 0)

        def write(rel: str, data: bytes) -> None:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

        def remove(rel: str) -> None:
            (root / rel).unlink()

        yield kind, store, write, remove
    elif kind == "memory":
        store = stores.resolve(f"memory://c-{uuid.uuid4().hex[:8]}/ckpt", 0)
        from fsspec.implementations.memory import MemoryFileSystem

        other = MemoryFileSystem(skip_instance_cache=True)  # another client of the same store
        yield (
            kind,
            store,
            (lambda rel, data: other.pipe_file(store.join(rel), data)),
            (lambda rel: other.rm_file(store.join(rel))),
        )
    else:
        bucket = request.getfixturevalue("s3")
        store = stores.resolve(bucket.url, 0, bucket.storage_options(deadline_s=10))
        yield (
            kind,
            store,
            (lambda rel, data: bucket.put(f"ckpt/{rel}", data)),
            (lambda rel: bucket.delete(f"ckpt/{rel}")),
        )


def _rels(entries):
    return sorted((e.rel, e.kind, e.size) for e in entries)


# ----------------------------------------------------------------------------- listing


def test_missing_prefix_lists_as_empty(backend):
    _, store, _, _ = backend
    assert stores.list_tree(store, "nothing-here") == []


def test_one_listing_shows_files_sizes_and_derived_dirs_up_to_max_depth(backend):
    _, store, write, _ = backend
    write("r/step-000000000100/manifest.json", b"{}")
    write("r/step-000000000100/rank-00000-of-00001.dgt", b"x" * 10)
    write("r/step-000000000100/deeper/ignored.bin", b"y" * 3)
    write("r/top.pt", b"z" * 5)
    got = _rels(stores.list_tree(store, "r", max_depth=2))
    assert ("step-000000000100", "dir", 0) in got
    assert ("step-000000000100/manifest.json", "file", 2) in got
    assert ("step-000000000100/rank-00000-of-00001.dgt", "file", 10) in got
    assert ("top.pt", "file", 5) in got
    assert not any(rel.startswith("step-000000000100/deeper/") for rel, _, _ in got)


def test_listing_sees_other_clients_writes_and_deletes(backend):
    """Listing caches are never trusted: another process's write and delete are seen at once."""
    _, store, write, remove = backend
    write("r/a.bin", b"1")
    assert [e.rel for e in stores.list_tree(store, "r")] == ["a.bin"]
    write("r/b.bin", b"22")
    remove("r/a.bin")
    assert _rels(stores.list_tree(store, "r")) == [("b.bin", "file", 2)]


def test_stat_object_gives_size_and_mtime_and_missing_is_file_not_found(backend):
    _, store, write, _ = backend
    write("r/a.bin", b"12345")
    e = stores.stat_object(store, "r/a.bin")
    assert e.size == 5 and e.mtime is not None and abs(e.mtime - time.time()) < 600
    with pytest.raises(FileNotFoundError):
        stores.stat_object(store, "r/missing.bin")


# ----------------------------------------------------------------------------- reading


def test_read_small_exact_bytes_cap_and_missing(backend):
    _, store, write, _ = backend
    write("r/m.json", b'{"a": 1}')
    assert stores.read_small(store, "r/m.json", 100) == b'{"a": 1}'
    with pytest.raises(OSError) as ei:
        stores.read_small(store, "r/m.json", 4)
    assert ei.value.errno == errno.EFBIG and not isinstance(ei.value, StoreUnavailable)
    with pytest.raises(FileNotFoundError):
        stores.read_small(store, "r/missing.json", 100)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_read_range_into_exact_bytes_and_every_piece_reported_once(backend, concurrency):
    _, store, write, _ = backend
    data = os.urandom(300_000)
    write("r/blob.bin", data)
    start, n = 1234, 250_000
    buf = bytearray(n)
    seen = []
    stores.read_range_into(
        store,
        "r/blob.bin",
        start,
        memoryview(buf),
        concurrency=concurrency,
        part_size=64 * 1024,
        on_chunk=lambda lo, hi: seen.append((lo, hi)),
    )
    assert bytes(buf) == data[start : start + n]
    covered = sorted(seen)
    pos = 0
    for lo, hi in covered:  # contiguous, no overlap, nothing missing
        assert lo == pos and hi > lo
        pos = hi
    assert pos == n


def test_read_past_the_end_is_an_oserror_not_a_partial_buffer(backend):
    _, store, write, _ = backend
    write("r/short.bin", b"a" * 100)
    buf = bytearray(200)
    with pytest.raises(OSError):
        stores.read_range_into(store, "r/short.bin", 0, memoryview(buf))


def test_read_of_a_missing_object_is_file_not_found(backend):
    _, store, _, _ = backend
    with pytest.raises(FileNotFoundError):
        stores.read_range_into(store, "r/missing.bin", 0, memoryview(bytearray(10)))


@pytest.mark.parametrize("backend", ["memory", "s3"], indirect=True)  # local files are read with pread instead
def test_stream_reader_reads_header_then_payload_from_one_stream(backend):
    kind, store, write, _ = backend
    data = os.urandom(200_000)
    write("r/s.bin", data)
    seen = []
    with stores.RemoteReader(store, "r/s.bin", len(data)) as r:
        head = r.read(8)
        rest = bytearray(len(data) - 8)
        r.readinto(rest, on_chunk=lambda lo, hi: seen.append(hi - lo))
    assert head + bytes(rest) == data and sum(seen) == len(data) - 8


# ----------------------------------------------------------------------------- writing


def test_exclusive_put_has_exactly_one_winner_and_keeps_the_first(backend):
    _, store, _, _ = backend
    stores.put_bytes_exclusive(store, "r/step-1/manifest.json", b"first")
    with pytest.raises(FileExistsError):
        stores.put_bytes_exclusive(store, "r/step-1/manifest.json", b"second")
    assert stores.read_small(store, "r/step-1/manifest.json", 100) == b"first"


def test_put_file_publishes_a_finished_file_with_its_size(backend, tmp_path):
    kind, store, _, _ = backend
    src = tmp_path / "src.bin"
    data = os.urandom(11 << 20 if kind == "s3" else 100_000)
    src.write_bytes(data)
    if kind == "local":
        with pytest.raises(ConfigError):
            stores.put_file(store, str(src), "r/x.bin")
        return
    if kind == "s3":  # several parts: a multipart upload, published only when complete
        store = stores.resolve(store.url, 0, {store.url: dict(store.storage_options, upload_part_size=5 << 20)})
    parts = []
    stores.put_file(store, str(src), "r/x.bin", on_part=lambda n, done: parts.append(n))
    assert _rels(stores.list_tree(store, "r")) == [("x.bin", "file", len(data))]
    buf = bytearray(len(data))
    stores.read_range_into(store, "r/x.bin", 0, memoryview(buf))
    assert bytes(buf) == data
    if kind == "s3":
        assert len(parts) == 3  # 5 + 5 + 1 MiB


def test_delete_is_idempotent_and_delete_tree_stays_under_its_prefix(backend):
    _, store, write, _ = backend
    for rel in ("r/step-1/a", "r/step-1/b", "r/step-10/a", "r/step-2/a"):
        write(rel, b"x")
    stores.delete(store, "r/step-2/a")
    stores.delete(store, "r/step-2/a")  # missing: not an error (retention resumes after a crash)
    stores.delete_tree(store, "r/step-1")
    left = sorted(e.rel for e in stores.list_tree(store, "r") if e.kind == "file")
    assert left == ["step-10/a"]


# ----------------------------------------------------------------------------- checkpoints through the contract


def _local_checkpoint(tmp_path, step=100):
    root = str(tmp_path / "src")
    state = helpers.make_state(seed=1)
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=step).committed
    g.close()
    return root, helpers.step_dir(root, RUN, step), helpers.model_tensors(state)


@pytest.mark.parametrize("concurrency", [None, 4])
def test_copied_checkpoint_is_discovered_verified_and_loads_identically(backend, tmp_path, concurrency):
    """None: the store's choice (one GET stream on a loopback endpoint); 4: parallel ranged reads of
    4 KiB parts, landing out of order while the digests follow the filled prefix."""
    kind, store, _, _ = backend
    if concurrency and not store.is_local:
        store = stores.resolve(
            store.url, 0, {store.url: dict(store.storage_options, concurrency=concurrency, part_size=4096)}
        )
    _, src_dir, tensors = _local_checkpoint(tmp_path)
    name = os.path.basename(src_dir)
    copying.copy_checkpoint(src_dir, store, RUN, name)
    copying.copy_checkpoint(src_dir, store, RUN, name)  # a mirror is idempotent
    with pytest.raises(FileExistsError):
        copying.copy_checkpoint(src_dir, store, RUN, name, exclusive=True)
    checked = verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
    assert [(c.step, c.tier) for c in checked] == [(100, "V")]
    tier, reasons = verify.verify_full(store, checked[0].rel)
    assert (tier, reasons) == ("V", [])
    staged = loading.load_native(checked[0], store, rank=0, world_size=1)
    assert not staged.suspect
    for k, v in tensors.items():
        assert (staged.tree["model"][k] == v).all()


def test_damaged_bytes_are_found_while_they_arrive(backend, tmp_path):
    """A flipped bit inside one tensor (same size): the load reports checksum_mismatch naming it."""
    kind, store, write, _ = backend
    _, src_dir, _ = _local_checkpoint(tmp_path)
    name = os.path.basename(src_dir)
    corruption.flip_bit_in_tensor(os.path.join(src_dir, "replicated.dgt"), bit=0, byte_in_elem=0)
    for f in sorted(os.listdir(src_dir)):
        with open(os.path.join(src_dir, f), "rb") as fh:
            write(f"{RUN}/{name}/{f}", fh.read())
    checked = verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
    assert [c.tier for c in checked] == ["V"]  # sizes match: only the checksums can tell
    staged = loading.load_native(checked[0], store, rank=0, world_size=1)
    assert len(staged.suspect) == 1 and staged.suspect[0].startswith("checksum_mismatch: ")
    assert "damaged_tensors=['model/0.weight']" in staged.suspect[0]


def test_data_without_a_manifest_is_no_candidate_on_an_object_store(backend, tmp_path):
    """The commit is the manifest: data alone is never a candidate remotely (locally: a legacy candidate, F08)."""
    kind, store, write, _ = backend
    _, src_dir, _ = _local_checkpoint(tmp_path)
    name = os.path.basename(src_dir)
    for f in sorted(os.listdir(src_dir)):
        if f != "manifest.json":
            with open(os.path.join(src_dir, f), "rb") as fh:
                write(f"{RUN}/{name}/{f}", fh.read())
    checked = verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
    assert len(checked) == 1
    if kind == "local":
        assert checked[0].tier == "L"
    else:
        assert checked[0].tier == "R" and checked[0].reasons[0].startswith("uncommitted: no manifest.json")


# ----------------------------------------------------------------------------- failures are OSErrors, bounded


def test_unreachable_endpoint_is_store_unavailable_within_the_deadline():
    """S3 only (the other backends have no endpoint): a closed port, tight deadline."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    opts = {
        "key": "testing",
        "secret": "testing",
        "deadline_s": 3,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
    }
    store = stores.resolve("s3://nobody/ckpt", 0, {"s3://nobody": opts})
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as ei:
        stores.list_tree(store, RUN)
    assert time.monotonic() - t0 < 3 * 1.5 + 1
    assert "store_unreachable store=s3://nobody/ckpt" in str(ei.value)
    assert ei.value.__cause__ is not None or "did not answer" in str(ei.value)


def test_missing_bucket_is_unavailable_not_empty(s3_server):
    store = stores.resolve(
        "s3://no-such-bucket-dg/ckpt", 0, {"s3://no-such-bucket-dg": s3_server.options(deadline_s=5)}
    )
    with pytest.raises(StoreUnavailable, match="the bucket does not exist"):
        stores.list_tree(store, RUN)


def test_stale_multipart_uploads_are_aborted_only_on_s3_and_only_under_the_prefix(backend):
    kind, store, _, _ = backend
    if kind != "s3":
        assert stores.abort_stale_uploads(store, RUN, older_than_s=0) == []
        return
    fs = stores.filesystem(store)
    bucket = store.root.split("/")[0]
    mine = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"ckpt/{RUN}/step-1/x.dgt")
    other = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="elsewhere/x.dgt")
    # moto reports every upload as initiated on 2010-11-10, so "too young" needs a threshold beyond that.
    assert stores.abort_stale_uploads(store, RUN, older_than_s=1e10) == []
    assert stores.abort_stale_uploads(store, RUN, older_than_s=0, keep=lambda key: True) == []  # a live writer's
    assert stores.abort_stale_uploads(store, RUN, older_than_s=0) == [f"ckpt/{RUN}/step-1/x.dgt"]
    left = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]
    assert mine["UploadId"] != other["UploadId"]


def test_storage_option_knobs_are_popped_and_checked(backend):
    kind, store, _, _ = backend
    opts = {store.url: {"deadline_s": 2, "stale_s": 5, "concurrency": 3, "part_size": 1 << 20}}
    if kind == "s3":
        opts[store.url] = dict(store.storage_options, **opts[store.url])
    s = stores.resolve(store.url, 0, opts)
    assert (s.deadline_s, s.stale_s, s.concurrency, s.part_size) == (2.0, 5.0, 3, 1 << 20)
    assert not set(s.storage_options) & {"deadline_s", "stale_s", "concurrency", "part_size"}
    with pytest.raises(ConfigError, match="deadline_s"):
        stores.resolve(store.url, 0, {store.url: {"deadline_s": 0}})
    with pytest.raises(ConfigError, match="upload_part_size"):
        stores.resolve(store.url, 0, {store.url: {"upload_part_size": 1024}})


# ----------------------------------------------------------------------------- read concurrency and progress


def test_read_concurrency_is_chosen_per_endpoint_and_overridable(s3):
    loop = stores.resolve(s3.url, 0, s3.storage_options())
    assert stores.is_loopback(loop) and stores.read_concurrency(loop) == stores.LOOPBACK_CONCURRENCY == 1
    real = stores.resolve("s3://bucket/x", 0, {"s3://bucket": {"anon": True}})
    assert not stores.is_loopback(real) and stores.read_concurrency(real) == stores.REMOTE_CONCURRENCY
    assert stores.read_concurrency(real, 3) == 3
    knob = stores.resolve("s3://bucket/x", 0, {"s3://bucket": {"concurrency": 5}})
    assert stores.read_concurrency(knob) == 5
    assert stores.read_concurrency(stores.resolve("memory://m/x", 0)) == 1


def test_measured_concurrency_is_remembered_for_the_store(s3):
    store = stores.resolve(s3.url, 0, s3.storage_options(part_size=256 * 1024))
    s3.put("ckpt/probe.bin", os.urandom(2 << 20))
    try:
        rates = stores.tune_read_concurrency(store, "probe.bin", choices=(1, 4))
        assert set(rates) == {1, 4} and all(r > 0 for r in rates.values())
        assert stores.read_concurrency(store) == max(rates, key=rates.get)
    finally:
        stores.remote._tuned.pop(store.key, None)


def test_progress_line_only_when_asked_or_on_a_tty(monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(stores.PROGRESS_ENV, raising=False)
    quiet = io.StringIO()
    t = stores.Transfer(10_000_000, "load step 200 from s3://b/x", stream=quiet, min_s=0.0)
    t.add(5_000_000)
    t.close()
    assert quiet.getvalue() == ""  # not a TTY, not asked: silent
    asked = io.StringIO()
    t = stores.Transfer(10_000_000, "load step 200 from s3://b/x", show=True, stream=asked, min_s=0.0)
    t.add(5_000_000)
    t.add(5_000_000)
    t.close()
    out = asked.getvalue()
    assert out.startswith("\r[dist_guardian] load step 200 from s3://b/x: 5.0/10.0 MB  50.0%") and out.endswith("\n")
    tty = Tty()
    t = stores.Transfer(1_000, "x", stream=tty, min_s=3600.0)  # a short transfer: under a second, nothing
    t.add(1_000)
    t.close()
    assert tty.getvalue() == ""
    t = stores.Transfer(1_000, "x", stream=tty, min_s=0.0)
    t.add(1_000)
    assert "1,000" not in tty.getvalue() and "0.0/0.0 MB" in tty.getvalue()
    monkeypatch.setenv(stores.PROGRESS_ENV, "0")
    off = Tty()
    t = stores.Transfer(1_000, "x", stream=off, show=True, min_s=0.0)
    t.add(1_000)
    assert off.getvalue() == ""
