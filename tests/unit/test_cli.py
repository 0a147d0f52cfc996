"""``dist-guardian ls/plan/verify/prune`` as a user runs them: real subprocesses, real stores.

Exit codes (dist_guardian/cli.py): 0 ok; 1 nothing usable (no candidate, a rejected
checkpoint); 2 bad usage; 3 a store was unreachable or refused; 4 a suspect checkpoint.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import corruption
import helpers
import pytest
import torch
from helpers import committed, make_state, same, snapshot

from dist_guardian import Guardian

RUN = "r"
REPL = "replicated.dgt"


def cli(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (``python -m dist_guardian.cli`` or the console script)."""
    if script:
        exe = os.path.join(os.path.dirname(sys.executable), "dist-guardian")
        assert os.access(exe, os.X_OK), f"console script missing: {exe} (pyproject declares it)"
        cmd = [exe, *args]
    else:
        cmd = [sys.executable, "-m", "dist_guardian.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def tree(top: str) -> dict[str, tuple]:
    out = {}
    for dp, dns, fns in os.walk(top):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def four(tmp_path):
    """Committed steps 100..400 in one local store (generation 1), and the state saved at each."""
    root = str(tmp_path / "ck")
    state = make_state(seed=0)
    g = Guardian(stores=[root], run=RUN)
    snaps = {}
    for s in (100, 200, 300, 400):
        assert g.save(state, step=s).committed
        snaps[s] = snapshot(state)
        helpers.train(state, 1)
    g.close()
    return root, snaps


def test_ls_lists_every_candidate_with_tier_and_reasons(four):
    root, _ = four
    os.truncate(os.path.join(helpers.step_dir(root, RUN, 400), REPL), 7)
    before = tree(root)
    p = cli("ls", root, "--run", RUN, script=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"run {RUN}: candidates"
    assert len(lines) == 5
    assert (
        "step        400" in lines[1] and "tier R" in lines[1] and "size_mismatch: replicated.dgt expected=" in lines[1]
    )
    for line, step in zip(lines[2:], (300, 200, 100)):
        assert f"step {step:>10}" in line and "tier V" in line and helpers.step_dir(root, RUN, step) in line
    assert tree(root) == before  # read-only


def test_ls_json_parses_and_includes_rejected(four):
    root, _ = four
    os.unlink(os.path.join(helpers.step_dir(root, RUN, 300), "rank-00000-of-00001.dgt"))
    p = cli("ls", root, "--run", RUN, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    tiers = {c["step"]: (c["tier"], c["reasons"]) for c in doc["listing"]}
    assert tiers == {400: ("V", []), 300: ("R", ["missing: rank-00000-of-00001.dgt"]), 200: ("V", []), 100: ("V", [])}
    assert [c["step"] for c in doc["candidates"]] == [400, 200, 100]
    assert doc["rejected"] == [[helpers.step_dir(root, RUN, 300), "missing: rank-00000-of-00001.dgt"]]
    assert doc["unreachable"] == [] and doc["generation"] == 2


def test_ls_empty_store_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    p = cli("ls", str(tmp_path / "empty"), "--run", RUN)
    assert p.returncode == 1
    assert p.stdout.splitlines() == [f"run {RUN}: candidates", "  (none)"]


def test_plan_order_is_what_resume_does(four):
    root, snaps = four
    p = cli("plan", root, "--run", RUN, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [c["step"] for c in doc["candidates"]] == [400, 300, 200, 100]
    # Truncate the first entry: the plan skips it, and resume loads the next one it names.
    os.truncate(os.path.join(helpers.step_dir(root, RUN, 400), REPL), 7)
    p = cli("plan", root, "--run", RUN, "--json")
    planned = [c["path"] for c in json.loads(p.stdout)["candidates"]]
    assert planned == [helpers.step_dir(root, RUN, s) for s in (300, 200, 100)]
    state = make_state(seed=9)
    g = Guardian(stores=[root], run=RUN)
    r = g.resume(state)
    g.close()
    assert r.path == planned[0] and same(snapshot(state), snaps[300])


def test_plan_text_and_suspect_policy(four):
    root, _ = four
    # A legacy torch.save file at step 500 with a flipped bit: zip CRC mismatch, tier S.
    st = make_state(seed=3)
    pt = os.path.join(root, "legacy_step500.pt")
    torch.save({"model": st["model"].state_dict()}, pt)
    import struct
    import zipfile

    with zipfile.ZipFile(pt) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    with open(pt, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + n + m
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 1]))
    p = cli("plan", root, "--run", RUN)
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0] == f"run {RUN}: resume would try, in this order"
    assert lines[1].startswith("  1. step        500") and "tier S" in lines[1] and "zip CRC32 mismatch" in lines[1]
    p = cli("plan", root, "--run", RUN, "--suspect", "last_resort", "--json")
    assert [c["step"] for c in json.loads(p.stdout)["candidates"]] == [400, 300, 200, 100, 500]
    p = cli("plan", root, "--run", RUN, "--suspect", "reject", "--json")
    assert [c["step"] for c in json.loads(p.stdout)["candidates"]] == [400, 300, 200, 100]


def test_plan_compat_mismatch_exits_1(four):
    root, _ = four
    p = cli("plan", root, "--run", RUN, "--compat", '{"model": "other"}', "--json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["candidates"] == []
    assert all(
        why == "incompatible: compat differs: model: not in checkpoint, now 'other'" for _, why in doc["rejected"]
    )
    assert len(doc["rejected"]) == 4


def test_plan_refused_store_exits_3(four, node_local_root):
    root, _ = four
    os.chmod(node_local_root, 0o777)
    p = cli("plan", root, "tmp://nl", "--run", RUN, "--json")
    assert p.returncode == 3, p.stderr
    doc = json.loads(p.stdout)
    assert [u[0] for u in doc["unreachable"]] == ["tmp://nl"]
    assert doc["unreachable"][0][1].startswith("node_local_root_insecure: ")
    assert [c["step"] for c in doc["candidates"]] == [400, 300, 200, 100]  # the other store is still used
    p = cli("ls", root, "tmp://nl", "--run", RUN)
    assert p.returncode == 3 and "store tmp://nl: UNREACHABLE: node_local_root_insecure" in p.stdout


def test_verify_exit_codes(four):
    root, _ = four
    d = helpers.step_dir(root, RUN, 200)
    p = cli("verify", d)
    assert p.returncode == 0 and p.stdout.strip() == f"{d}: tier V (every checksum matches)"
    p = cli("verify", "file://" + d, "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == {"path": "file://" + d, "tier": "V", "reasons": []}
    # Suspect: one flipped mantissa bit; exit 4, and the damaged tensor is named.
    corruption.flip_bit_in_tensor(os.path.join(d, REPL), tensor="model/2.weight", bit=0, byte_in_elem=0)
    p = cli("verify", d, "--json")
    assert p.returncode == 4
    doc = json.loads(p.stdout)
    assert doc["tier"] == "S" and len(doc["reasons"]) == 1
    assert doc["reasons"][0].startswith(f"checksum_mismatch: {REPL} expected=")
    assert doc["reasons"][0].endswith("damaged_tensors=['model/2.weight']")
    # Rejected: truncated data, or no such checkpoint; exit 1.
    d3 = helpers.step_dir(root, RUN, 300)
    os.truncate(os.path.join(d3, REPL), 100)
    p = cli("verify", d3, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["tier"] == "R"
    p = cli("verify", helpers.step_dir(root, RUN, 999))
    assert p.returncode == 1 and "tier R" in p.stdout


def test_prune_dry_run_deletes_nothing_then_prune_deletes_oldest(four):
    root, _ = four
    before_tree = tree(root)
    before = committed(root, RUN)
    p = cli("prune", root, "--run", RUN, "--keep-last", "2", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["dry_run"] is True
    assert doc["deleted"] == {root: [helpers.step_dir(root, RUN, 200), helpers.step_dir(root, RUN, 100)]}
    assert tree(root) == before_tree and committed(root, RUN) == before
    p = cli("prune", root, "--run", RUN, "--keep-last", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"{root}: deleted 2"
    after = committed(root, RUN)
    assert set(after) == {"step-000000000300", "step-000000000400"}
    assert {k: before[k] for k in after} == after
    assert not [n for n in os.listdir(os.path.join(root, RUN)) if n.startswith(".trash-")]


def test_prune_keep_last_1_is_raised_to_2_and_never_counts_unverified(four):
    root, _ = four
    os.truncate(os.path.join(helpers.step_dir(root, RUN, 400), REPL), 7)  # newest is R: not counted, kept
    p = cli("prune", root, "--run", RUN, "--keep-last", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["deleted"] == {root: [helpers.step_dir(root, RUN, 100)]}
    assert set(committed(root, RUN)) == {"step-000000000200", "step-000000000300", "step-000000000400"}


def test_bad_usage_exits_2(four):
    root, _ = four
    before = tree(root)
    assert cli().returncode == 2
    assert cli("frobnicate", root).returncode == 2
    assert cli("prune", root, "--run", RUN).returncode == 2  # --keep-last is required
    p = cli("prune", root, "--run", RUN, "--keep-last", "0")
    assert p.returncode == 2 and "keep_last must be at least 1" in p.stderr
    p = cli("plan", root, "--compat", "{not json")
    assert p.returncode == 2 and "bad JSON argument" in p.stderr
    for bad_run in ("../etc", "..", "a/b"):  # a run name must not reach outside the store
        p = cli("ls", root, "--run", bad_run)
        assert p.returncode == 2 and "is not a plain name" in p.stderr, bad_run
    p = cli("prune", root, "--run", "..", "--keep-last", "2")
    assert p.returncode == 2
    assert tree(root) == before


def test_ls_plan_verify_prune_import_no_torch(four):
    root, _ = four
    d = helpers.step_dir(root, RUN, 100)
    for args in (
        ["ls", root, "--run", RUN],
        ["plan", root, "--run", RUN],
        ["verify", d],
        ["prune", root, "--run", RUN, "--keep-last", "2", "--dry-run"],
    ):
        code = (
            f"import sys; from dist_guardian.cli import main; rc = main({args!r}); "
            "sys.stdout.flush(); print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH'); sys.exit(rc)"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (args, p.stderr)
        assert p.stdout.strip().splitlines()[-1] == "NO_TORCH", args


def test_verify_checks_storage_options_through_the_resume_config(tmp_path, capsys):
    from dist_guardian.cli import EXIT_USAGE, main

    path = str(tmp_path / "ck" / "r" / "step-000000000001")
    assert main(["verify", path, "--storage-options", '{"anon": true}']) == EXIT_USAGE
    assert "the entry 'anon' holds a bool, so this looks like a flat fsspec dict" in capsys.readouterr().err
