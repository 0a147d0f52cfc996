"""F11 (disk full) and F12 (fsync EIO) with real kernel faults, not the test-only fault hook.

- F11, RLIMIT_FSIZE: a child process saves C with ``RLIMIT_FSIZE`` below C's size and SIGXFSZ
  ignored, so the kernel fails the write with EFBIG half-way through a data file (the
  per-process form of "the disk is full").
- F11, tmpfs: the store lives on an 8 MiB tmpfs (``mount -t tmpfs -o size=8m``); C does not fit,
  so ``write`` gets a real ENOSPC from the kernel.
- F11/F12, thin-provisioned disk full: an ext4 on a loop device whose sparse backing file lives on
  a small tmpfs. The writes land in the page cache; the error surfaces only at ``fsync``, when the
  kernel writes back to a backing store that has no room (ENOSPC from fsync: the fsyncgate path).
- F12, fsync EIO: a faithful EIO needs a failing device. This kernel has no device-mapper
  (no dm-error / dm-flakey) and libfiu's ``fiu-run`` is not installed (and would be an injected
  fault anyway). The closest real fault: an ext4 on a loop device whose backing file is made
  immutable (``chattr +i``) after A and B are written. C's bytes reach the page cache, then the
  writeback of ``fsync`` fails in the loop driver (EPERM on the backing file, BLK_STS_IOERR), and
  ``fsync`` returns a real EIO from the kernel. C must be abandoned and never renamed, with no
  fsync retry on the same file (fsyncgate).

Each expects ``SaveResult.committed`` False with ``save_failed errno=<name>``, no C committed, A
and B untouched (every checksum), no staging left where the filesystem still accepts the cleanup,
and a later resume that loads B. The mounts need root (CI runs as root): each test tries the
real mount first and skips, naming the reason, only when that attempt fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import helpers
import pytest
import repo_paths
import torch
from helpers import assert_nothing_lost, committed, make_state, same, snapshot

from dist_guardian import Guardian, stores, verify

RUN = "r"
C = 300


# ----------------------------------------------------------------------------- helpers


def _save_a_b(root: str) -> dict:
    saved = helpers.save_a_b([root], RUN)
    before = committed(root, RUN)
    assert set(before) == {"step-000000000100", "step-000000000200"}
    return {"before": before, "snap_b": saved.snap_b}


def _big_state(mib: int) -> dict:
    state = make_state(seed=3)
    state["big"] = torch.randn(mib << 18)  # mib MiB of float32
    return state


def _staging(root: str) -> list[str]:
    return [n for n in os.listdir(os.path.join(root, RUN)) if stores.STAGING_RE.match(n)]


def _assert_a_b_intact_and_b_loads(root: str, fixture: dict) -> None:
    after = committed(root, RUN)
    assert after == fixture["before"], f"C must never be committed: {sorted(after)}"
    assert not [n for n in os.listdir(os.path.join(root, RUN)) if n.startswith(f"step-{C:012d}")]
    store = stores.resolve(root)
    for step in (100, 200):
        assert verify.verify_full(store, f"{RUN}/{stores.step_dir_name(step)}") == ("V", []), step
    state = make_state(seed=42)
    g = Guardian(stores=[root], run=RUN)
    try:
        r = g.resume(state)
    finally:
        g.close()
    assert r.resumed and r.step == 200 and r.tier == "V", r.to_json()
    assert same(snapshot(state), fixture["snap_b"])
    assert_nothing_lost(fixture["before"], committed(root, RUN))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, loop devices and chattr need root (CI runs as root)")


def _try(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run a setup command as root; a refusal fails the test, naming the reason (never a silent skip)."""
    try:
        p = _run(cmd)
    except FileNotFoundError as e:
        pytest.fail(f"{what}: {cmd[0]} is not installed ({e})")
    if p.returncode != 0:
        pytest.fail(f"{what}: `{' '.join(cmd)}` failed with {p.returncode}: {p.stderr.strip()[:300]}")
    return p


def _umount(path: str) -> None:
    if _run(["umount", path]).returncode != 0:
        _run(["umount", "-l", path])


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size (MiB) at a fresh directory; unmounted after the test."""
    mounted: list[str] = []

    def mount(size_mib: int, name: str = "tmpfs") -> str:
        d = tmp_path / name
        d.mkdir()
        _try(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(d)],
            "a real ENOSPC needs a small tmpfs (mount as root)",
        )
        mounted.append(str(d))
        return str(d)

    yield mount
    for d in reversed(mounted):
        _umount(d)


@pytest.fixture
def loop_ext4(tmp_path):
    """An ext4 filesystem on a loop device over ``backing`` (a sparse image file); torn down after the test."""
    state: dict = {"mounts": [], "loops": [], "immutable": []}

    def make(image: str, size_mib: int, mnt_name: str = "mnt") -> str:
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        _try(["mkfs.ext4", "-q", "-F", image], "ext4 image for a loop device")
        loop = _try(["losetup", "-f", "--show", image], "a loop device (losetup as root)").stdout.strip()
        state["loops"].append(loop)
        mnt = tmp_path / mnt_name
        mnt.mkdir()
        # commit=600: the journal is not flushed behind our back before the save we fault.
        _try(["mount", "-o", "errors=continue,commit=600", loop, str(mnt)], "mounting the loop device")
        state["mounts"].append(str(mnt))
        return str(mnt)

    def make_immutable(path: str) -> None:
        _try(["chattr", "+i", path], "making the loop device's backing file immutable (chattr as root)")
        state["immutable"].append(path)

    make.make_immutable = make_immutable  # type: ignore[attr-defined]
    yield make
    for p in state["immutable"]:
        _run(["chattr", "-i", p])
    for m in reversed(state["mounts"]):
        _umount(m)
    for loop in state["loops"]:
        _run(["losetup", "-d", loop])


# ----------------------------------------------------------------------------- F11: RLIMIT_FSIZE

CHILD = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
import helpers
from dist_guardian import Guardian

root, limit = sys.argv[2], int(sys.argv[3])
state = helpers.make_state(seed=3)
state["big"] = torch.randn(1 << 20)  # 4 MiB: over the limit
g = Guardian(stores=[root], run="r")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
res = g.save(state, step=300)
g.close()
print(json.dumps({"committed": res.committed, "reason": res.reason}))
"""


def test_F11_rlimit_fsize_save_fails_cleanly_and_B_loads(tmp_path):
    root = str(tmp_path / "ck")
    fx = _save_a_b(root)
    env = {k: v for k, v in os.environ.items() if k != "DIST_GUARDIAN_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(
        [sys.executable, "-c", CHILD, repo_paths.SUPPORT_DIR, root, str(1 << 20)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["committed"] is False
    assert "save_failed errno=EFBIG" in res["reason"], res["reason"]
    assert "File too large" in res["reason"]
    assert _staging(root) == [], "the staging dir must be removed"
    _assert_a_b_intact_and_b_loads(root, fx)


# ----------------------------------------------------------------------------- F11: tmpfs ENOSPC


@NEEDS_ROOT
def test_F11_tmpfs_disk_full_real_enospc_save_fails_cleanly(tmpfs):
    d = tmpfs(8)
    root = os.path.join(d, "ck")
    fx = _save_a_b(root)
    g = Guardian(stores=[root], run=RUN)
    try:
        res = g.save(_big_state(12), step=C)  # 12 MiB into 8 MiB
        assert res.committed is False
        assert "save_failed errno=ENOSPC" in res.reason, res.reason
        assert "No space left on device" in res.reason
        assert _staging(root) == [], "the staging dir must be removed (it frees the space it took)"
        assert shutil.disk_usage(d).free > 6 << 20  # the partial file went with it
        # Training continues: the next save that fits commits normally.
        ok = g.save(make_state(seed=5), step=400)
        assert ok.committed and ok.path == helpers.step_dir(root, RUN, 400)
    finally:
        g.close()
    assert verify.verify_full(stores.resolve(root), f"{RUN}/{stores.step_dir_name(400)}") == ("V", [])
    shutil.rmtree(helpers.step_dir(root, RUN, 400))  # then "a later resume loads B"
    _assert_a_b_intact_and_b_loads(root, fx)


@NEEDS_ROOT
def test_F11_F12_thin_provisioned_disk_full_error_surfaces_at_fsync(tmp_path, tmpfs, loop_ext4):
    """ext4 on a loop device whose sparse 64 MiB image sits on a 12 MiB tmpfs: C's writes succeed into the
    page cache, then the kernel's writeback finds no room behind the device and ``fsync`` fails (ENOSPC,
    BLK_STS_NOSPC). The save is abandoned at its data fsync: C is never renamed, B still loads."""
    back = tmpfs(12, "backing")
    mnt = loop_ext4(os.path.join(back, "disk.img"), 64)
    root = os.path.join(mnt, "ck")
    fx = _save_a_b(root)
    os.sync()
    free_behind = shutil.disk_usage(back).free
    assert free_behind < 12 << 20
    fsynced: list[tuple[str, int | None]] = []
    g = Guardian(stores=[root], run=RUN)
    try:
        with _patched_fsync(fsynced):
            res = g.save(_big_state(24), step=C)  # 24 MiB: far more than the backing tmpfs holds
    finally:
        g.close()
    assert res.committed is False
    assert "save_failed errno=ENOSPC" in res.reason or "save_failed errno=EIO" in res.reason, res.reason
    failed = [(path, err) for path, err in fsynced if err is not None]
    assert failed and failed[0][1] in (errno.ENOSPC, errno.EIO), fsynced
    assert os.path.basename(failed[0][0]) == "replicated.dgt", "the error must come from C's data fsync"
    assert [p for p, _ in fsynced].count(failed[0][0]) == 1, "fsyncgate: a failed file is never fsynced again"
    _assert_a_b_intact_and_b_loads(root, fx)


# ----------------------------------------------------------------------------- F12: fsync EIO


class _patched_fsync:
    """Record every ``os.fsync`` (path of the fd, errno or None) while the save runs."""

    def __init__(self, calls: list):
        self.calls = calls
        self.real = os.fsync

    def __enter__(self):
        real, calls = self.real, self.calls

        def spy(fd):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = f"fd:{fd}"
            try:
                real(fd)
            except OSError as e:
                calls.append((path, e.errno))
                raise
            calls.append((path, None))

        os.fsync = spy
        return self

    def __exit__(self, *exc):
        os.fsync = self.real


@NEEDS_ROOT
def test_F12_fsync_eio_from_a_failing_device_abandons_C_never_renamed(tmp_path, loop_ext4):
    img = str(tmp_path / "disk.img")
    mnt = loop_ext4(img, 48)
    root = os.path.join(mnt, "ck")
    fx = _save_a_b(root)
    os.sync()  # A and B are on the device
    loop_ext4.make_immutable(img)  # from now on every write to the device fails in the loop driver
    fsynced: list[tuple[str, int | None]] = []
    g = Guardian(stores=[root], run=RUN)
    try:
        with _patched_fsync(fsynced):
            res = g.save(_big_state(4), step=C)
    finally:
        g.close()
    assert res.committed is False
    assert "save_failed errno=EIO" in res.reason, res.reason
    assert "Input/output error" in res.reason
    failed = [(p, e) for p, e in fsynced if e is not None]
    assert failed and failed[0][1] == errno.EIO, fsynced
    assert os.path.basename(failed[0][0]) == "replicated.dgt", "the EIO must come from C's data fsync"
    paths = [p for p, _ in fsynced]
    assert paths.count(failed[0][0]) == 1, "fsyncgate: the file whose fsync failed is never fsynced again"
    assert all(os.path.basename(p) != "manifest.json" for p in paths), "nothing after the failed fsync was written"
    # The device rejects writes, so the staging dir may or may not be removable; it is never a candidate.
    _assert_a_b_intact_and_b_loads(root, fx)
