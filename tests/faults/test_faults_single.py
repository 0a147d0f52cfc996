"""FAULTS.md scenarios in their single-process form: real files, real stores, no mocks of dist_guardian.

Standard fixture (FAULTS.md): committed A = step 100 and B = step 200, saved with
``Guardian.save`` into a local store; unless said otherwise the fault targets B. Every test
that damages a store checks the "nothing lost" invariant (``helpers.committed`` before and
after) and the exact tier/reason text the code produces. Multi-rank and S3 forms of these
scenarios live in test_faults_distributed*.py and test_faults_s3*.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import struct
import time
from dataclasses import dataclass

import helpers
import pytest
import torch
from corruption import flip_bit_in_tensor, flip_byte, tensor_offset, zip_member_span
from helpers import assert_nothing_lost, committed, make_state, same, snapshot

from dist_guardian import Guardian, ResumeFailed, manifest, retention, stores
from dist_guardian.errors import InsecurePathError

RUN = "r"
REPL = "replicated.dgt"
RANK0 = "rank-00000-of-00001.dgt"
LOGGER = "dist_guardian"


# ----------------------------------------------------------------------------- fixture and helpers


@dataclass
class Std:
    root: str
    run: str
    a: str  # A's step dir (step 100)
    b: str  # B's step dir (step 200)
    snap_a: dict
    snap_b: dict
    before: dict  # helpers.committed() right after A and B were saved

    def dir(self, step: int, gen: int | None = None) -> str:
        return os.path.join(self.root, self.run, stores.step_dir_name(step, gen))


def _save_a_b(root: str, run: str = RUN, **kw) -> Std:
    saved = helpers.save_a_b([root], run, **kw)
    before = committed(root, run)
    assert set(before) == {"step-000000000100", "step-000000000200"}
    return Std(
        root=root,
        run=run,
        a=helpers.step_dir(root, run, 100),
        b=helpers.step_dir(root, run, 200),
        snap_a=saved.snap_a,
        snap_b=saved.snap_b,
        before=before,
    )


@pytest.fixture
def std(tmp_path) -> Std:
    return _save_a_b(str(tmp_path / "ck"))


def resume(stores_, run: str = RUN, *, seed: int = 42, hidden: int = 16, **kw):
    """Resume into a fresh state (different weights than A and B); return (result, state)."""
    state = make_state(seed=seed, hidden=hidden)
    g = Guardian(stores=stores_ if isinstance(stores_, list) else [stores_], run=run, **kw)
    try:
        r = g.resume(state)
    finally:
        g.close()
    return r, state


def loaded_a(state, s: Std) -> bool:
    return same(snapshot(state), s.snap_a)


def loaded_b(state, s: Std) -> bool:
    return same(snapshot(state), s.snap_b)


def rejected(r) -> dict[str, str]:
    return dict(r.rejected)


def plan_of(stores_, run: str = RUN, *, compat=None, suspect="after_same_step", extra_safe=()):
    """Rank 0's plan, exactly as resume makes it, with every verdict (R included)."""
    from dist_guardian import planning

    store_list, refused = planning.resolve_stores(stores_ if isinstance(stores_, list) else [stores_], None)
    request = planning.PlanRequest(
        run=run, compat=compat, suspect=suspect, extra_safe_globals=tuple(extra_safe), use_journal=False
    )
    return planning.make_plan(store_list, request, refused=refused, include_rejected=True)


def verdict(plan, path: str):
    hits = [c for c in plan.listing if c.path == path]
    assert len(hits) == 1, f"{path} not listed exactly once: {[c.path for c in plan.listing]}"
    return hits[0]


def read_manifest_doc(step_dir: str) -> dict:
    with open(os.path.join(step_dir, manifest.MANIFEST_NAME), "rb") as f:
        return json.loads(f.read())


def write_manifest_bytes(step_dir: str, data: bytes) -> None:
    p = os.path.join(step_dir, manifest.MANIFEST_NAME)
    if os.path.lexists(p):
        os.unlink(p)
    with open(p, "wb") as f:
        f.write(data)


def clone_step(src: str, dst: str, step: int, *, files=None, **fields) -> None:
    """A copy of a committed checkpoint under another step (manifest rewritten to match)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != manifest.MANIFEST_NAME:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    doc = read_manifest_doc(src)
    doc["step"] = step
    if files is not None:
        doc["files"] = files
    doc.update(fields)
    write_manifest_bytes(dst, json.dumps(doc).encode())


def torch_state_file(path: str, seed: int, **extra) -> dict:
    """A bare torch.save file the way the seed world wrote them (no manifest); returns its snapshot."""
    st = make_state(seed=seed)
    st["trainer"] = {"epoch": seed, "seen": 1000 + seed}
    obj = {
        "model": st["model"].state_dict(),
        "optim": st["optim"].state_dict(),
        "sched": st["sched"].state_dict(),
        "trainer": dict(st["trainer"]),
        **extra,
    }
    torch.save(obj, path)
    return snapshot(st)


def tree_listing(top: str, *, exclude: tuple[str, ...] = ()) -> dict[str, tuple]:
    out = {}
    for dp, dns, fns in os.walk(top):
        dns[:] = [d for d in dns if os.path.join(dp, d) not in exclude]
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[os.path.relpath(p, top)] = (
                stat.S_IFMT(st.st_mode),
                st.st_size if stat.S_ISREG(st.st_mode) else 0,
                st.st_mtime_ns,
            )
    return out


def messages(caplog, level=logging.DEBUG) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


# ----------------------------------------------------------------------------- integrity and storage


def test_F01_truncated_data_file_falls_back(std, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = os.path.join(std.b, REPL)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    r, state = resume(std.root)
    assert r.resumed and r.step == 100 and r.tier == "V" and r.path == std.a
    assert loaded_a(state, std)
    assert rejected(r)[std.b] == f"size_mismatch: {REPL} expected={size} got={size // 2}"
    assert [a.path for a in r.attempts] == [std.a]  # B was rejected before any data was read
    assert (
        f"candidate_rejected id=0:{RUN}/step-000000000200 path={std.b} "
        f"reason=size_mismatch: {REPL} expected={size} got={size // 2}" in messages(caplog)
    )
    assert os.path.getsize(path) == size // 2  # quarantined, not deleted or "repaired"
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F01_truncated_per_rank_file_falls_back(std):
    path = os.path.join(std.b, RANK0)
    size = os.path.getsize(path)
    os.truncate(path, size - 1)
    r, state = resume(std.root)
    assert r.step == 100 and loaded_a(state, std)
    assert rejected(r)[std.b] == f"size_mismatch: {RANK0} expected={size} got={size - 1}"
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F01_truncated_primary_intact_mirror_replica_loads(tmp_path):
    """B truncated in the primary, intact in a second local store: B is loaded from the mirror."""
    mirror = str(tmp_path / "mirror")
    state = make_state(seed=0)
    g = Guardian(stores=[str(tmp_path / "ck"), "file://" + mirror], run=RUN)
    g.save(state, step=100)
    helpers.train(state, 1)
    g.save(state, step=200)
    snap_b = snapshot(state)
    assert g.close() == []
    root = str(tmp_path / "ck")
    before, before_m = committed(root, RUN), committed(mirror, RUN)
    assert set(before_m) == set(before) == {"step-000000000100", "step-000000000200"}
    b = helpers.step_dir(root, RUN, 200)
    os.truncate(os.path.join(b, REPL), 10)
    r, fresh = resume([root, "file://" + mirror])
    assert r.step == 200 and r.store == "file://" + mirror and r.tier == "V"
    assert r.path == helpers.step_dir(mirror, RUN, 200)
    assert same(snapshot(fresh), snap_b)
    assert rejected(r)[b].startswith(f"size_mismatch: {REPL} expected=")
    assert_nothing_lost(before, committed(root, RUN))
    assert_nothing_lost(before_m, committed(mirror, RUN))


def test_F02_zero_byte_data_file_falls_back(std):
    path = os.path.join(std.b, REPL)
    os.truncate(path, 0)
    r, state = resume(std.root)
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    assert rejected(r)[std.b] == f"empty: {REPL} is 0 bytes"
    assert os.path.exists(path)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F02_zero_byte_manifest_is_rejected_data_used_as_legacy(std):
    """A zero-byte manifest.json is rejected (empty_manifest). FAULTS F06: data files whose names
    match may be a legacy candidate; B's data files are intact, so B is tier L and loads."""
    write_manifest_bytes(std.b, b"")
    plan = plan_of(std.root)
    c = verdict(plan, std.b)
    assert c.tier == "L"
    assert "manifest_rejected: empty_manifest: manifest.json is empty" in c.reasons
    r, state = resume(std.root)
    assert r.step == 200 and r.tier == "L" and loaded_b(state, std)
    assert f"legacy_unverified_loaded: {std.b} has no manifest checksums" in r.warnings
    assert committed(std.root, RUN)[os.path.basename(std.a)] == std.before[os.path.basename(std.a)]


def test_F02_zero_byte_manifest_and_damaged_data_falls_back_to_A(std):
    write_manifest_bytes(std.b, b"")
    os.truncate(os.path.join(std.b, REPL), 0)
    r, state = resume(std.root)
    assert r.step == 100 and loaded_a(state, std)
    assert rejected(r)[std.b] == "manifest_rejected: empty_manifest: manifest.json is empty"


# F03: a bit flip in B's data: checksum mismatch found while loading (tier S).


def _flip_b(std: Std, *, bit: int, byte_in_elem: int) -> tuple[str, str]:
    path = os.path.join(std.b, REPL)
    flip_bit_in_tensor(path, tensor="model/0.weight", bit=bit, byte_in_elem=byte_in_elem)
    with open(path, "rb") as f:
        return path, f.read()


def test_F03_bit_flip_suspect_loaded_after_same_step(std, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path, damaged = _flip_b(std, bit=0, byte_in_elem=0)  # lowest mantissa bit: finite, within bounds
    r, state = resume(std.root)
    assert r.resumed and r.step == 200 and r.tier == "S" and r.path == std.b
    warn = [w for w in r.warnings if w.startswith("checkpoint_suspect_loaded:")]
    assert len(warn) == 1, r.warnings
    mf = read_manifest_doc(std.b)
    assert warn[0].startswith(
        f"checkpoint_suspect_loaded: {std.b} (step 200) loaded despite: rank 0: checksum_mismatch: {path}"
    )
    assert f"expected={mf['files'][REPL]['xxh3_128']} got=" in warn[0]
    assert "damaged_tensors=['model/0.weight']" in warn[0]
    assert "checkpoint_suspect_loaded" in messages(caplog, logging.WARNING)
    # What was applied is B, with exactly one element of one tensor differing.
    got = snapshot(state)
    w_got, w_b = got["model"]["0.weight"], std.snap_b["model"]["0.weight"]
    assert int((w_got != w_b).sum()) == 1 and torch.allclose(w_got, w_b)
    got["model"]["0.weight"] = w_b
    assert same(got, std.snap_b)
    with open(path, "rb") as f:
        assert f.read() == damaged  # kept as it is: nothing deletes or rewrites B
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F03_bit_flip_last_resort_loads_A(std):
    path, damaged = _flip_b(std, bit=0, byte_in_elem=0)
    r, state = resume(std.root, suspect="last_resort")
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    outcomes = [(a.path, a.tier, a.outcome) for a in r.attempts]
    assert outcomes == [(std.b, "S", "deferred"), (std.a, "V", "loaded")]
    assert "damaged_tensors=['model/0.weight']" in r.attempts[0].reasons[0][1]
    with open(path, "rb") as f:
        assert f.read() == damaged
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F03_bit_flip_reject_policy_loads_A(std):
    _flip_b(std, bit=0, byte_in_elem=0)
    r, state = resume(std.root, suspect="reject")
    assert r.step == 100 and loaded_a(state, std)
    assert [(a.path, a.outcome) for a in r.attempts] == [(std.b, "failed"), (std.a, "loaded")]
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F03_exponent_flip_1e38_fails_sanity_gate(std):
    """Top exponent bit of a weight near 0.3: a finite ~1e38, far above 10x the saved max|x|."""
    path = os.path.join(std.b, REPL)
    pos = tensor_offset(path, "model/0.weight")
    with open(path, "rb") as f:
        f.seek(pos)
        before = struct.unpack("<f", f.read(4))[0]
    flip_byte(path, pos + 3, 0x40)
    with open(path, "rb") as f:
        f.seek(pos)
        after = struct.unpack("<f", f.read(4))[0]
    assert 1e30 < abs(after) < float("inf") and abs(before) < 10  # the fault is what we claim
    r, state = resume(std.root)
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    fail = r.attempts[0]
    assert (fail.path, fail.outcome) == (std.b, "failed")
    why = fail.reasons[0][1]
    assert why.startswith(f"CheckpointFormatError: checksum_mismatch: {path}")
    assert "; sanity_gate_failed: tensor model/0.weight max|x|=" in why and "> 10x saved" in why
    assert_nothing_lost(std.before, committed(std.root, RUN))
    assert os.path.getsize(path) > 0


def test_F03_flip_to_nan_fails_sanity_gate(std):
    """A single bit flip yields NaN only from an exponent of 254; the closest real fault is to write
    a NaN bit pattern (exponent all ones) over one element of a tensor record of B."""
    path = os.path.join(std.b, REPL)
    pos = tensor_offset(path, "model/2.bias")
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack("<I", 0x7FC00001))
    r, state = resume(std.root)
    assert r.step == 100 and loaded_a(state, std)
    fail = r.attempts[0]
    assert (fail.path, fail.outcome) == (std.b, "failed")
    assert fail.reasons[0][1].startswith(f"CheckpointFormatError: checksum_mismatch: {path}")
    assert fail.reasons[0][1].endswith("; sanity_gate_failed: tensor model/2.bias holds NaN/Inf")
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F03_failed_candidate_is_quarantined_from_retention(std):
    """B failed its gate in this run: retention (keep_last=2) after two more saves skips B, and deletes
    only A, the oldest verified one it may delete."""
    path = os.path.join(std.b, REPL)
    pos = tensor_offset(path, "model/2.bias")
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack("<I", 0x7FC00001))
    state = make_state(seed=42)
    g = Guardian(stores=[std.root], run=RUN, keep_last=2)
    r = g.resume(state)
    assert r.step == 100 and [a.outcome for a in r.attempts] == ["failed", "loaded"]
    for step in (300, 400):
        helpers.train(state, 1)
        assert g.save(state, step=step).committed
    g.close()
    assert set(committed(std.root, RUN)) == {"step-000000000200", "step-000000000300", "step-000000000400"}
    assert committed(std.root, RUN)["step-000000000200"] == std.before["step-000000000200"]


def test_F03_intact_replica_in_second_local_store_loads_first(tmp_path):
    root, mirror = str(tmp_path / "ck"), str(tmp_path / "mirror")
    state = make_state(seed=0)
    g = Guardian(stores=[root, "file://" + mirror], run=RUN)
    g.save(state, step=100)
    helpers.train(state, 1)
    g.save(state, step=200)
    snap_b = snapshot(state)
    assert g.close() == []
    before = committed(root, RUN)
    b = helpers.step_dir(root, RUN, 200)
    flip_bit_in_tensor(os.path.join(b, REPL), tensor="model/0.weight", bit=0, byte_in_elem=0)
    r, fresh = resume([root, "file://" + mirror])
    assert r.step == 200 and r.tier == "V" and r.store == "file://" + mirror
    assert same(snapshot(fresh), snap_b)  # the intact copy, bit for bit
    assert [(a.path, a.outcome) for a in r.attempts] == [
        (b, "deferred"),
        (helpers.step_dir(mirror, RUN, 200), "loaded"),
    ]
    assert not any(w.startswith("checkpoint_suspect_loaded") for w in r.warnings)
    assert_nothing_lost(before, committed(root, RUN))


# F04: bit flip in a legacy bare .pt (no manifest): zip CRC mismatch -> tier S.


def _flip_legacy(path: str) -> None:
    off, size = zip_member_span(path, "/data/0")
    assert size > 0
    flip_byte(path, off + 1, 0x01)  # a mantissa bit of the first weight: torch.load would not notice


def test_F04_legacy_pt_bit_flip_is_suspect(std):
    path = os.path.join(std.root, "legacy_step300.pt")
    snap_l = torch_state_file(path, seed=7)
    _flip_legacy(path)
    torch.load(path, weights_only=True)  # the fault is silent to torch: it still loads
    c = verdict(plan_of(std.root), path)
    assert c.tier == "S" and c.step == 300
    assert c.reasons == ("checksum_mismatch: legacy_step300.pt: zip CRC32 mismatch in legacy_step300/data/0",)
    # last_resort: every V and L first, so B is loaded.
    r, state = resume(std.root, suspect="last_resort")
    assert r.step == 200 and r.tier == "V" and loaded_b(state, std)
    assert [a.path for a in r.attempts] == [std.b]
    # after_same_step (default): ordered like F03; nothing else at step 300, so it loads, with a warning.
    r, state = resume(std.root)
    assert r.step == 300 and r.tier == "S" and r.path == path
    assert any(
        w.startswith(f"checkpoint_suspect_loaded: {path} (step 300)") and "zip CRC32 mismatch" in w for w in r.warnings
    )
    assert same(snapshot(state)["trainer"], snap_l["trainer"])
    assert os.path.exists(path)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F04_clean_legacy_pt_is_tier_L_and_loaded_ahead_of_B(std):
    path = os.path.join(std.root, "legacy_step300.pt")
    snap_l = torch_state_file(path, seed=7)
    c = verdict(plan_of(std.root), path)
    assert c.tier == "L" and c.reasons == ("legacy_unverified: torch.save file, zip CRCs clean",)
    r, state = resume(std.root)
    assert r.step == 300 and r.tier == "L" and r.path == path
    assert f"legacy_unverified_loaded: {path} has no manifest checksums" in r.warnings
    got = snapshot(state)
    assert same(got["model"], snap_l["model"]) and got["trainer"] == snap_l["trainer"]
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F04_clean_legacy_wins_over_flipped_legacy_at_same_step(std):
    bad = os.path.join(std.root, "legacy_step300.pt")
    good = os.path.join(std.root, RUN, "ckpt_step300.pt")
    torch_state_file(bad, seed=7)
    _flip_legacy(bad)
    snap_good = torch_state_file(good, seed=8)
    r, state = resume(std.root)
    assert r.step == 300 and r.tier == "L" and r.path == good
    assert [a.path for a in r.attempts] == [good]
    assert same(snapshot(state)["model"], snap_good["model"])


# F06: manifest corrupt.


def _manifest_variant(doc: dict, variant: str) -> tuple[bytes, str]:
    """A damaged manifest.json (bytes) and the start of the reason the code must give for it."""
    good = json.dumps(doc, separators=(",", ":")).encode()
    if variant == "truncated_json":
        return good[: len(good) // 2], "manifest_rejected: bad_json: "
    if variant == "invalid_utf8":
        return good[:20] + b"\xff\xfe" + good[
            22:
        ], "manifest_rejected: bad_json: not UTF-8 (invalid start byte at byte 20)"
    if variant == "50MB_json":
        big = json.dumps({**doc, "metrics": {"pad": "x" * (50 << 20)}}).encode()
        return big, f"manifest_rejected: manifest_too_large: {len(big)} bytes > cap {manifest.MAX_MANIFEST_BYTES}"
    if variant == "step_-1":
        return json.dumps(
            {**doc, "step": -1}
        ).encode(), "manifest_rejected: bad_field: 'step'=-1 is outside [0, 999999999999999]"
    if variant == "world_size_1e9_float":
        assert b'"world_size":1,' in good
        return (
            good.replace(b'"world_size":1,', b'"world_size":1e9,'),
            "manifest_rejected: bad_field: 'world_size' must be an integer, got float",
        )
    if variant == "world_size_1e9_int":
        return (
            json.dumps({**doc, "world_size": 10**9}).encode(),
            "manifest_rejected: bad_field: 'world_size'=1000000000 is outside [1, 1048576]",
        )
    assert variant == "duplicate_keys"
    return good[:-1] + b',"step":200}', "manifest_rejected: duplicate_key: key 'step' appears twice"


VARIANTS = [
    "truncated_json",
    "invalid_utf8",
    "50MB_json",
    "step_-1",
    "world_size_1e9_float",
    "world_size_1e9_int",
    "duplicate_keys",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_F06_corrupt_manifest_rejected_data_kept_as_legacy(std, variant):
    """The manifest is rejected (never V). FAULTS F06: B's data files are present and named like
    ours, so B may be a legacy candidate: tier L, loaded with legacy_unverified_loaded. No crash, no hang."""
    doc = read_manifest_doc(std.b)
    data, reason = _manifest_variant(doc, variant)
    write_manifest_bytes(std.b, data)
    t0 = time.monotonic()
    c = verdict(plan_of(std.root), std.b)
    assert time.monotonic() - t0 < 5.0
    assert c.tier == "L"
    assert any(x.startswith(reason) for x in c.reasons), c.reasons
    r, state = resume(std.root)
    assert r.step == 200 and r.tier == "L" and loaded_b(state, std)
    assert f"legacy_unverified_loaded: {std.b} has no manifest checksums" in r.warnings
    assert committed(std.root, RUN)["step-000000000100"] == std.before["step-000000000100"]
    assert os.path.getsize(os.path.join(std.b, manifest.MANIFEST_NAME)) == len(data)  # kept as found


@pytest.mark.parametrize("variant", ["truncated_json", "duplicate_keys", "step_-1"])
def test_F06_corrupt_manifest_and_no_usable_data_loads_older(std, variant):
    """The same manifests over a data file that does not parse: no legacy fallback, so R and A loads."""
    doc = read_manifest_doc(std.b)
    data, reason = _manifest_variant(doc, variant)
    write_manifest_bytes(std.b, data)
    with open(os.path.join(std.b, REPL), "r+b") as f:
        f.write(b"\xff" * 8)  # header length now absurd
    r, state = resume(std.root)
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    assert rejected(r)[std.b].startswith(reason)


def test_F07_data_file_deleted_loads_A(std, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    os.unlink(os.path.join(std.b, RANK0))
    r, state = resume(std.root)
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    assert rejected(r)[std.b] == f"missing: {RANK0}"
    assert f"reason=missing: {RANK0}" in messages(caplog)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F08_bare_pt_without_manifest_is_legacy_and_loaded_when_best(std):
    path = os.path.join(std.root, RUN, "step_250.pt")
    snap = torch_state_file(path, seed=9)
    c = verdict(plan_of(std.root), path)
    assert c.tier == "L" and c.step == 250
    r, state = resume(std.root)
    assert r.step == 250 and r.tier == "L" and r.path == path
    assert f"legacy_unverified_loaded: {path} has no manifest checksums" in r.warnings
    got = snapshot(state)
    assert same(got["model"], snap["model"]) and got["trainer"] == snap["trainer"]
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F08_bare_pt_older_than_B_is_not_loaded(std):
    path = os.path.join(std.root, "step_150.pt")
    torch_state_file(path, seed=9)
    r, state = resume(std.root)
    assert r.step == 200 and r.tier == "V" and loaded_b(state, std)


def test_F08_committed_dir_without_manifest_is_legacy(std):
    os.unlink(os.path.join(std.b, manifest.MANIFEST_NAME))
    c = verdict(plan_of(std.root), std.b)
    assert c.tier == "L" and c.reasons == ("legacy_unverified: no manifest.json, so no checksums to check",)
    r, state = resume(std.root)
    assert r.step == 200 and r.tier == "L" and loaded_b(state, std)
    assert f"legacy_unverified_loaded: {std.b} has no manifest checksums" in r.warnings


def test_F08_legacy_is_never_counted_by_retention_as_verified(std):
    """keep_last=2 over A (V), B without manifest (L) and C (V): only A and C count, so nothing is deleted."""
    state = make_state(seed=3)
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(state, step=300).committed
    g.close()
    os.unlink(os.path.join(std.b, manifest.MANIFEST_NAME))
    store = stores.resolve(std.root)
    assert retention.retain(store, RUN, 2) == []
    assert os.path.isdir(std.a) and os.path.isdir(std.b)
    # Control: a third verified checkpoint D makes A (the oldest verified) go; legacy B stays.
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(state, step=400).committed
    g.close()
    assert retention.retain(store, RUN, 2) == [std.a]
    assert not os.path.exists(std.a) and os.path.isdir(std.b)


# F09: stale staging left by an interrupted save.


def test_F09_stale_staging_is_never_a_candidate(std):
    base = os.path.join(std.root, RUN)
    complete = os.path.join(base, ".staging-step-000000000300-0123456789abcdef")
    partial = os.path.join(base, ".staging-step-000000000300-fedcba9876543210")
    clone_step(std.b, complete, 300)  # complete: data and manifest, killed before the rename
    os.makedirs(partial)
    with open(os.path.join(std.b, REPL), "rb") as f:
        blob = f.read()
    with open(os.path.join(partial, REPL), "wb") as f:
        f.write(blob[: len(blob) // 3])
    plan = plan_of(std.root)
    assert {c.path for c in plan.listing} == {std.a, std.b}
    r, state = resume(std.root)
    assert r.step == 200 and loaded_b(state, std)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F09_clean_stale_staging_removes_only_old_staging_dirs(std, tmp_path):
    base = os.path.join(std.root, RUN)
    old = os.path.join(base, ".staging-step-000000000300-0123456789abcdef")
    young = os.path.join(base, ".staging-step-000000000301-00112233aabbccdd")
    clone_step(std.b, old, 300)
    os.makedirs(young)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    others = {
        ".dg-tmp-step-300-abcd": "dir",  # another tool's tmp name
        ".staging-step-000000000302-NOTHEX00": "dir",
        "staging-step-000000000303-0123456789abcdef": "dir",
        ".staging-notes": "dir",
        ".staging-step-000000000304-0123456789abcdef": "file",  # our name, but not a directory
        ".staging-step-000000000305-0123456789abcdef": "symlink",  # our name, a link to a dir elsewhere
    }
    for name, kind in others.items():
        p = os.path.join(base, name)
        if kind == "dir":
            os.makedirs(p)
            with open(os.path.join(p, "x"), "w") as f:
                f.write("x")
        elif kind == "file":
            with open(p, "w") as f:
                f.write("x")
        else:
            os.symlink(str(outside), p)
    aged = time.time() - 7200
    for name in [os.path.basename(old), os.path.basename(std.a), os.path.basename(std.b), *others]:
        os.utime(os.path.join(base, name), (aged, aged), follow_symlinks=False)
    store = stores.resolve(std.root)
    removed = stores.clean_stale_staging(store, RUN, older_than_s=3600)
    assert removed == [old]
    assert not os.path.lexists(old)
    assert os.path.isdir(young)  # our name, but fresh: an in-flight save
    for name in others:
        assert os.path.lexists(os.path.join(base, name)), name
    assert (outside / "keep.txt").read_text() == "keep"
    assert_nothing_lost(std.before, committed(std.root, RUN))
    # A later save runs the same cleanup (default threshold: 1 h): the aged young dir goes then.
    os.utime(young, (aged, aged))
    g = Guardian(stores=[std.root], run=RUN)
    assert g.save(make_state(seed=4), step=300).committed
    g.close()
    assert not os.path.lexists(young)
    assert all(os.path.lexists(os.path.join(base, n)) for n in others)


# ----------------------------------------------------------------------------- compatibility


def test_F31_incompatible_compat_skipped_before_load(tmp_path):
    root = str(tmp_path / "ck")
    sa = make_state(seed=0)
    g1 = Guardian(stores=[root], run=RUN, compat={"model": "mlp", "hidden": 16})
    g1.save(sa, step=100)
    g1.close()
    snap_a = snapshot(sa)
    g2 = Guardian(stores=[root], run=RUN, compat={"model": "mlp", "hidden": 32})
    g2.save(make_state(seed=1), step=200)
    g2.close()
    b = helpers.step_dir(root, RUN, 200)
    r, state = resume(root, compat={"model": "mlp", "hidden": 16})
    assert r.step == 100 and same(snapshot(state), snap_a)
    assert rejected(r)[b] == "incompatible: compat differs: hidden: checkpoint 32 != now 16"
    assert [a.path for a in r.attempts] == [helpers.step_dir(root, RUN, 100)]  # B was never read


def test_F31_all_incompatible_starts_fresh_loudly(std, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    r, state = resume(std.root, compat={"model": "mlp", "hidden": 32}, hidden=32)
    assert not r.resumed and r.step is None
    assert rejected(r) == {
        std.a: "incompatible: compat differs: hidden: not in checkpoint, now 32; model: not in checkpoint, now 'mlp'",
        std.b: "incompatible: compat differs: hidden: not in checkpoint, now 32; model: not in checkpoint, now 'mlp'",
    }
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(
        "starting FRESH: every candidate failed for a lasting reason; all are kept."
    )
    assert std.a in errors[0] and std.b in errors[0] and "hidden: not in checkpoint, now 32" in errors[0]
    assert_nothing_lost(std.before, committed(std.root, RUN))
    with pytest.raises(ResumeFailed, match="on_exhausted='raise'"):
        resume(std.root, compat={"model": "mlp"}, on_exhausted="raise")


def test_F31_hidden_size_differs_without_compat_is_never_applied(std, caplog):
    """No compat configured: the manifest's layout fingerprint (a hash of the sorted (name, shape,
    dtype) list of each module) differs from the live model's, so each candidate is rejected while
    planning, before any data is read; all fail, so the F33 rules start fresh with an ERROR naming it."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    state = make_state(seed=5, hidden=32)
    untouched = snapshot(state)
    g = Guardian(stores=[std.root], run=RUN)
    r = g.resume(state)
    g.close()
    assert not r.resumed
    assert same(snapshot(state), untouched)
    assert r.attempts == ()  # nothing was read
    why = "incompatible: layout of 'model' differs from the live state (parameter names, shapes or dtypes)"
    assert rejected(r) == {std.b: why, std.a: why}
    errors = messages(caplog, logging.ERROR)
    assert "starting FRESH" in errors and "layout of 'model' differs" in errors
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F32_manifest_from_the_future_is_unsupported_schema(std):
    doc = read_manifest_doc(std.b)
    doc["format"] = "dist_guardian/99"
    write_manifest_bytes(std.b, json.dumps(doc).encode())
    r, state = resume(std.root)
    assert r.step == 100 and r.tier == "V" and loaded_a(state, std)
    assert rejected(r)[std.b] == (
        "manifest_rejected: unsupported_schema: format 'dist_guardian/99' is newer or unknown; "
        "this reader knows dist_guardian/1"
    )
    assert [a.path for a in r.attempts] == [std.a]


def test_F32_unknown_format_is_rejected(std):
    doc = read_manifest_doc(std.b)
    doc["format"] = "orbax/1"
    write_manifest_bytes(std.b, json.dumps(doc).encode())
    r, state = resume(std.root)
    assert r.step == 100 and loaded_a(state, std)
    assert (
        rejected(r)[std.b] == "manifest_rejected: unsupported_schema: format 'orbax/1' is not a dist_guardian manifest"
    )


def _spy_torch_load(monkeypatch) -> list:
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_F34_legacy_pt_with_namespace_is_rejected_never_loaded_unsafely(std, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = os.path.join(std.root, RUN, "step_300.pt")
    torch_state_file(path, seed=7, args=argparse.Namespace(lr=0.1, name="x"))
    calls = _spy_torch_load(monkeypatch)
    r, state = resume(std.root)
    assert r.step == 200 and loaded_b(state, std)
    assert rejected(r)[path] == "unsafe_globals=['argparse.Namespace']"
    assert calls == []  # never unpickled at all, let alone with weights_only=False
    assert f"security_event: {path} needs unsafe_globals=['argparse.Namespace']; never loaded" in messages(
        caplog, logging.WARNING
    )


def test_F34_extra_safe_globals_opt_in_makes_it_loadable(std, monkeypatch):
    path = os.path.join(std.root, RUN, "step_300.pt")
    snap = torch_state_file(path, seed=7, args=argparse.Namespace(lr=0.1, name="x"))
    calls = _spy_torch_load(monkeypatch)
    r, state = resume(std.root, extra_safe_globals=[argparse.Namespace])
    assert r.step == 300 and r.tier == "L" and r.path == path
    assert calls == [True]
    assert same(snapshot(state)["model"], snap["model"])


def test_F34_package_source_never_loads_with_weights_only_false():
    import dist_guardian

    root = os.path.dirname(dist_guardian.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                src = f.read()
            assert "weights_only=False" not in src.replace(" ", ""), name


# ----------------------------------------------------------------------------- ordering, time and lineage


def test_F35_clock_skew_changes_nothing(std, caplog):
    """A's files and manifest say "3 h in the future", B's files say "3 h ago": B still wins."""
    future, past = time.time() + 3 * 3600, time.time() - 3 * 3600
    doc = read_manifest_doc(std.a)
    doc["created_unix"] = future
    write_manifest_bytes(std.a, json.dumps(doc).encode())
    for d, t in ((std.a, future), (std.b, past)):
        for n in os.listdir(d):
            os.utime(os.path.join(d, n), (t, t))
        os.utime(d, (t, t))
    r, state = resume(std.root)
    assert r.step == 200 and r.tier == "V" and loaded_b(state, std)
    skew = [w for w in r.warnings if w.startswith("clock_skew_detected:")]
    assert len(skew) == 1 and skew[0].startswith(f"clock_skew_detected: {std.a} was created 10")
    assert skew[0].endswith("s in the future (ignored for ordering)")
    # B's manifest skewed too: still the same choice, now two warnings.
    doc = read_manifest_doc(std.b)
    doc["created_unix"] = past
    write_manifest_bytes(std.b, json.dumps(doc).encode())
    skewed = committed(std.root, RUN)
    r2, state2 = resume(std.root)
    assert r2.step == 200 and loaded_b(state2, std)
    assert len([w for w in r2.warnings if w.startswith("clock_skew_detected:")]) == 1  # only the future one
    assert_nothing_lost(skewed, committed(std.root, RUN))


def test_F36_duplicate_step_from_two_lineages_prefers_generation_2(std, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # A rollback: the next incarnation resumes from B (gen 1), then saves step 200 again (gen 2).
    state = make_state(seed=11)
    g = Guardian(stores=[std.root], run=RUN)
    r = g.resume(state)
    assert r.step == 200 and r.generation == 2
    helpers.train(state, 2)
    res = g.save(state, step=200)
    g.close()
    snap_g2 = snapshot(state)
    g2_dir = std.dir(200, 2)
    assert res.committed and res.path == g2_dir
    assert f"lineage_fork step=200: {std.b} holds generation 1; committing generation 2 beside it" in messages(
        caplog, logging.WARNING
    )
    assert read_manifest_doc(g2_dir)["generation"] == 2 and read_manifest_doc(std.b)["generation"] == 1
    r, fresh = resume(std.root)
    assert r.step == 200 and r.path == g2_dir and r.tier == "V" and r.generation == 3
    assert same(snapshot(fresh), snap_g2)
    after = committed(std.root, RUN)
    assert_nothing_lost(std.before, after)  # both step-200 lineages (and A) are kept
    assert set(after) == {"step-000000000100", "step-000000000200", "step-000000000200-g2"}


def test_F36_generation_comes_from_the_manifest_not_the_name(std):
    """Swap the directory names: the order still follows the manifests' generations."""
    doc = read_manifest_doc(std.b)
    hi = std.dir(200, 7)
    clone_step(std.b, hi, 200, generation=1)  # a "-g7" name holding generation 1
    doc["generation"] = 5
    write_manifest_bytes(std.b, json.dumps(doc).encode())  # the plain name holds generation 5
    r, state = resume(std.root)
    assert r.path == std.b and r.step == 200 and loaded_b(state, std)
    assert [c.path for c in plan_of(std.root).candidates] == [std.b, hi, std.a]


# ----------------------------------------------------------------------------- security


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_F44_malicious_pickle_in_local_and_node_local_roots(std, node_local_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    marker = tmp_path / "pwned"
    nl = os.path.join(str(node_local_root), "nl")
    os.makedirs(os.path.join(nl, RUN), mode=0o700)
    os.chmod(nl, 0o700)
    planted = [
        os.path.join(std.root, RUN, "step-999999.pt"),
        os.path.join(nl, RUN, "step-999999.pt"),
        os.path.join(nl, "step-999998.pt"),
    ]
    for p in planted:
        torch.save({"model": _Evil(f"touch {marker}")}, p)
    # Control: the payload is live (unpickling it unsafely runs the command).
    control = tmp_path / "control_marker"
    torch.save({"model": _Evil(f"touch {control}")}, str(tmp_path / "control.pt"))
    torch.load(str(tmp_path / "control.pt"), weights_only=False)
    assert control.exists()
    r, state = resume([std.root, "tmp://nl"])
    assert r.step == 200 and r.path == std.b and loaded_b(state, std)
    rj = rejected(r)
    for p in planted:
        assert rj[p] == "unsafe_globals=['posix.system']"
    assert not marker.exists()
    sec = [m for m in messages(caplog, logging.WARNING).splitlines() if m.startswith("security_event:")]
    assert len(sec) == len(planted) and all("posix.system" in m for m in sec)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F44_raw_pickle_not_a_torch_zip_is_rejected(std, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    p = os.path.join(std.root, RUN, "step-999999.pt")
    with open(p, "wb") as f:
        pickle.dump(_Evil(f"touch {marker}"), f)
    r, state = resume(std.root)
    assert r.step == 200 and loaded_b(state, std)
    assert rejected(r)[p] == f"unloadable: {RUN}/step-999999.pt: not a torch zip archive (legacy or foreign format)"
    assert not marker.exists()


def _target_file() -> str:
    return "/etc/hostname" if os.path.isfile("/etc/hostname") else "/etc/passwd"


def test_F45_symlinked_data_file_is_rejected(std, node_local_root):
    nl = os.path.join(str(node_local_root), "nl")
    os.makedirs(os.path.join(nl, RUN), mode=0o700)
    os.chmod(nl, 0o700)
    for base in (os.path.join(std.root, RUN), os.path.join(nl, RUN)):
        d = os.path.join(base, "step-000000000500")
        clone_step(std.b, d, 500)
        os.unlink(os.path.join(d, REPL))
        os.symlink(_target_file(), os.path.join(d, REPL))
    r, state = resume([std.root, "tmp://nl"])
    assert r.step == 200 and r.path == std.b and loaded_b(state, std)
    rj = rejected(r)
    for base in (std.root, nl):
        assert rj[os.path.join(base, RUN, "step-000000000500")] == f"not_regular: {REPL} is a symlink"
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F45_directory_symlink_is_rejected_never_followed(std, node_local_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = str(elsewhere / "step-000000000500")
    clone_step(std.b, target, 500)  # a perfectly valid checkpoint, reachable only through the link
    nl = os.path.join(str(node_local_root), "nl")
    os.makedirs(os.path.join(nl, RUN), mode=0o700)
    os.chmod(nl, 0o700)
    links = [os.path.join(std.root, RUN, "step-000000000500"), os.path.join(nl, RUN, "step-000000000500")]
    for link in links:
        os.symlink(target, link)
    pt_target = str(elsewhere / "real_600.pt")
    torch_state_file(pt_target, seed=3)
    pt_link = os.path.join(std.root, RUN, "step_600.pt")
    os.symlink(pt_target, pt_link)
    listing_before = tree_listing(str(elsewhere))
    r, state = resume([std.root, "tmp://nl"])
    assert r.step == 200 and loaded_b(state, std)
    rj = rejected(r)
    for link in links:
        assert rj[link] == f"insecure: {link} is a symlink; refusing to follow it"
    assert rj[pt_link] == f"insecure: {pt_link} is a symlink; refusing to follow it"
    # Retention never follows it either: C makes three verified, A goes, the links and targets stay.
    g = Guardian(stores=[std.root], run=RUN, keep_last=2)
    assert g.save(make_state(seed=2), step=300).committed
    g.close()
    assert not os.path.exists(std.a) and os.path.isdir(std.b)
    for link in links:
        assert os.path.islink(link)
    assert tree_listing(str(elsewhere)) == listing_before


def test_F46_fifo_named_like_a_checkpoint_is_rejected_without_hanging(std):
    fifo_pt = os.path.join(std.root, RUN, "step-500.pt")
    os.mkfifo(fifo_pt)
    fifo_top = os.path.join(std.root, "ckpt_700.pth")
    os.mkfifo(fifo_top)
    mdir = std.dir(600)
    os.makedirs(mdir)
    os.mkfifo(os.path.join(mdir, manifest.MANIFEST_NAME))
    t0 = time.monotonic()
    r, state = resume(std.root)
    assert time.monotonic() - t0 < 10.0  # generous: the point is "no hang" (torch.load would block forever)
    assert r.step == 200 and loaded_b(state, std)
    rj = rejected(r)
    assert rj[fifo_pt] == f"not_regular: {fifo_pt} is not a regular file or directory"
    assert rj[fifo_top] == f"not_regular: {fifo_top} is not a regular file or directory"
    assert rj[mdir] == "manifest_rejected: not_regular: manifest.json is a other"
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F46_fifo_as_data_file_is_rejected_and_safe_open_does_not_block(std):
    path = os.path.join(std.b, REPL)
    os.unlink(path)
    os.mkfifo(path)
    t0 = time.monotonic()
    with pytest.raises(InsecurePathError, match="is not a regular file"):
        stores.open_regular(path)
    assert time.monotonic() - t0 < 2.0
    r, state = resume(std.root)
    assert r.step == 100 and loaded_a(state, std)
    assert rejected(r)[std.b] == f"not_regular: {REPL} is a other"
    assert_nothing_lost(std.before, committed(std.root, RUN))


@pytest.mark.parametrize("bad", ["../../../x", "/abs/x", "a/../../b", "x\u0000y"])
def test_F47_path_traversal_in_manifest_is_rejected(std, tmp_path, bad):
    # The files a traversal would reach, and the place an absolute name points to.
    escape_x = tmp_path / "x"  # <root>/r/step-…/../../../x
    escape_x.write_text("secret")
    escape_b = os.path.join(std.root, RUN, "b")  # <root>/r/step-…/a/../../b
    with open(escape_b, "w") as f:
        f.write("secret")
    control = tmp_path / "control"
    control.write_text("secret")
    old = time.time() - 86400 * 3
    for p in (str(escape_x), escape_b, str(control)):
        os.utime(p, (old - 86400, old))  # atime before mtime: any read would update it (relatime)
    t_control = os.stat(control).st_atime_ns
    control.read_text()
    atime_works = os.stat(control).st_atime_ns != t_control  # False on a noatime mount: then listings only
    d = std.dir(500)
    doc = read_manifest_doc(std.b)
    files = dict(doc["files"])
    files[bad] = files[REPL]
    clone_step(std.b, d, 500, files=files)
    outside = tree_listing(str(tmp_path), exclude=(std.root, str(tmp_path / "node0")))
    atimes = {p: os.stat(p).st_atime_ns for p in (str(escape_x), escape_b)}
    r, state = resume(std.root)
    assert r.step == 200 and loaded_b(state, std)
    assert rejected(r)[d] == f"manifest_rejected: path_escape: file name {bad!r} could leave the checkpoint directory"
    assert tree_listing(str(tmp_path), exclude=(std.root, str(tmp_path / "node0"))) == outside
    assert not os.path.exists("/abs/x")
    if atime_works:
        for p, t in atimes.items():
            assert os.stat(p).st_atime_ns == t, f"{p} was read"
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F47_manifest_parser_rejects_every_escape():
    for bad in ["../../../x", "/abs/x", "a/../../b", "x\u0000y", "..", ".", "a\\b"]:
        with pytest.raises(manifest.ManifestError) as ei:
            manifest.check_file_name(bad)
        assert ei.value.reason == "path_escape"


def _make_insecure(kind: str, node_local_root, tmp_path, monkeypatch) -> str:
    """Make the node-local root insecure; returns the directory whose listing must not change."""
    if kind == "mode_0777":
        os.chmod(node_local_root, 0o777)
        return str(node_local_root)
    if kind == "foreign_owner":
        os.chown(node_local_root, 65534, 65534)
        return str(node_local_root)
    if kind == "store_dir_0777":
        d = os.path.join(str(node_local_root), "nl")
        os.mkdir(d)
        os.chmod(d, 0o777)
        return d
    # symlink: the default $TMPDIR/dist_guardian-<euid> pre-created by an "attacker" as a link.
    attacker = tmp_path / "attacker"
    attacker.mkdir(mode=0o700)
    tmpdir = tmp_path / "T"
    tmpdir.mkdir()
    os.symlink(str(attacker), str(tmpdir / f"dist_guardian-{os.geteuid()}"))
    monkeypatch.delenv(stores.NODE_LOCAL_ENV)
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    return str(attacker)


@pytest.mark.parametrize("kind", ["mode_0777", "foreign_owner", "symlink", "store_dir_0777"])
def test_F48_insecure_node_local_root_is_refused(std, node_local_root, tmp_path, monkeypatch, kind):
    watched = _make_insecure(kind, node_local_root, tmp_path, monkeypatch)
    listing = tree_listing(watched)
    st_before = os.lstat(watched)
    r, state = resume([std.root, "tmp://nl"])
    assert r.step == 200 and loaded_b(state, std)
    assert [u[0] for u in r.unreachable] == ["tmp://nl"]
    why = r.unreachable[0][1]
    assert why.startswith("node_local_root_insecure: ")
    expect = {
        "mode_0777": "has mode 0777 (group/world-writable)",
        "foreign_owner": "is owned by uid 65534, not by us",
        "symlink": "is a symlink; refusing to follow it",
        "store_dir_0777": "has mode 0777 (group/world-writable)",
    }[kind]
    assert expect in why
    # Saving with the same stores: the primary commits, nothing is written to the refused root.
    g = Guardian(stores=[std.root, "tmp://nl"], run=RUN)
    assert g.save(make_state(seed=6), step=300).committed
    assert g.close() == []
    assert tree_listing(watched) == listing
    assert stat.S_IMODE(os.lstat(watched).st_mode) == stat.S_IMODE(st_before.st_mode)
    assert_nothing_lost(std.before, committed(std.root, RUN))


def test_F48_secure_node_local_root_is_used(std, node_local_root):
    """Control for F48: the same stores with a private root mirror there and list it."""
    g = Guardian(stores=[std.root, "tmp://nl"], run=RUN)
    assert g.save(make_state(seed=6), step=300).committed
    assert g.close() == []
    assert "step-000000000300" in committed(os.path.join(str(node_local_root), "nl"), RUN)
    r, _ = resume([std.root, "tmp://nl"])
    assert r.unreachable == () and r.step == 300


# ----------------------------------------------------------------------------- absurd inputs (F49 basics)


def test_F49_manifest_declaring_step_2_pow_64_is_rejected(std):
    d = std.dir(300)
    os.makedirs(d)
    doc = read_manifest_doc(std.b)
    doc["step"] = 2**64
    write_manifest_bytes(d, json.dumps(doc).encode())
    t0 = time.monotonic()
    r, state = resume(std.root)
    assert time.monotonic() - t0 < 10.0
    assert r.step == 200 and loaded_b(state, std)
    assert rejected(r)[d] == "manifest_rejected: bad_field: 'step'=18446744073709551616 is outside [0, 999999999999999]"


def test_F49_step_directory_beyond_the_cap_is_rejected(std):
    """A directory named step-2**64 with B's intact data and a matching manifest: the step is absurd, so R
    (it would otherwise be "newest" forever)."""
    d = os.path.join(std.root, RUN, f"step-{2**64}")
    clone_step(std.b, d, 2**64)
    legacy = os.path.join(std.root, RUN, f"step-{10**19}")
    clone_step(std.b, legacy, 0)
    os.unlink(os.path.join(legacy, manifest.MANIFEST_NAME))  # and a legacy one, without manifest
    r, state = resume(std.root)
    assert r.step == 200 and loaded_b(state, std)
    rj = rejected(r)
    assert rj[d] == f"bad_step: step {2**64} in the name is beyond the cap of {manifest.MAX_STEP}"
    assert rj[legacy] == f"bad_step: step {10**19} in the name is beyond the cap of {manifest.MAX_STEP}"


def test_F49_100MB_manifest_is_rejected_quickly(std):
    d = std.dir(300)
    os.makedirs(d)
    with open(os.path.join(d, manifest.MANIFEST_NAME), "wb") as f:
        f.truncate(100 << 20)  # 100 MB (sparse): it must be refused by its size, not read
    t0 = time.monotonic()
    r, state = resume(std.root)
    assert time.monotonic() - t0 < 10.0
    assert r.step == 200 and loaded_b(state, std)
    assert (
        rejected(r)[d]
        == f"manifest_rejected: manifest_too_large: {100 << 20} bytes > cap {manifest.MAX_MANIFEST_BYTES}"
    )


def test_F49_native_header_declaring_1e12_elements_is_rejected(std):
    d = std.dir(300)
    clone_step(std.b, d, 300)
    header = {"model/0.weight": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    blob = json.dumps(header).encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * 64
    with open(os.path.join(d, REPL), "wb") as f:
        f.write(data)
    doc = read_manifest_doc(d)
    doc["files"][REPL]["size"] = len(data)
    write_manifest_bytes(d, json.dumps(doc).encode())
    t0 = time.monotonic()
    r, state = resume(std.root)
    assert time.monotonic() - t0 < 10.0
    assert r.step == 200 and loaded_b(state, std)
    assert (
        rejected(r)[d] == f"bad_header: {REPL}: tensors cover {4 * 10**12} bytes but the file holds 64 after the header"
    )
    # Also when it is a bare legacy file (no manifest): rejected by the same header check.
    os.unlink(os.path.join(d, manifest.MANIFEST_NAME))
    r, _ = resume(std.root)
    assert r.step == 200
    assert (
        rejected(r)[d] == f"bad_header: {REPL}: tensors cover {4 * 10**12} bytes but the file holds 64 after the header"
    )
