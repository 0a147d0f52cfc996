"""Wrong or partial state must never be reported as success (T05), and damage outside the tensors (T10).

Real files only: checkpoints written by ``Guardian.save``, foreign files by ``torch.save`` and
``torch.distributed.checkpoint.save``, damage done to the bytes on disk.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import helpers
import pytest
import torch

from dist_guardian import Guardian, formats

RUN = "r"
REPL = "replicated.dgt"


def _save_a_b(root: str) -> tuple[dict, dict]:
    """Native checkpoints A (step 100) and B (step 200); returns their snapshots."""
    saved = helpers.save_a_b([root], RUN)
    return saved.snap_a, saved.snap_b


def _resume(root: str, state: dict | None = None, **kw):
    state = helpers.make_state(seed=42) if state is None else state
    g = Guardian(stores=[root], run=RUN, **kw)
    try:
        return g.resume(state), state
    finally:
        g.close()


# ----------------------------------------------------------------------------- T05a: steps from foreign names


@pytest.mark.parametrize(
    "name, step",
    [
        ("step_300.pt", 300),
        ("checkpoint-300.pt", 300),
        ("global_step300.pt", 300),
        ("iter_300.pt", 300),
        ("epoch=3-step=900.ckpt", 900),
        ("dcp-step-300", 300),
        ("eval_export_20240501.pt", None),
        ("model_7.pt", None),
        ("checkpoint_20240501.pt", None),
        ("ckpt-2024-05-01.pt", None),
        ("step_1234567890123456789.pt", None),
    ],
)
def test_T05_step_from_name_only_when_the_name_says_step(name, step):
    assert formats.step_from_name(name) == step


def test_T05_dated_foreign_export_does_not_outrank_native(tmp_path):
    root = str(tmp_path / "ck")
    _snap_a, snap_b = _save_a_b(root)
    export = helpers.make_state(seed=7)
    torch.save({"model": export["model"].state_dict()}, os.path.join(root, RUN, "eval_export_20240501.pt"))
    r, state = _resume(root)
    assert r.resumed and r.step == 200 and r.tier == "V" and r.path == helpers.step_dir(root, RUN, 200)
    assert helpers.same(helpers.snapshot(state), snap_b)


def test_T05_step_in_the_content_wins_over_the_name(tmp_path):
    root = str(tmp_path / "ck")
    _snap_a, snap_b = _save_a_b(root)
    other = helpers.make_state(seed=7)
    # The name claims step 900000, the file itself says step 150: it is older than B.
    torch.save({"model": other["model"].state_dict(), "step": 150}, os.path.join(root, RUN, "checkpoint-900000.pt"))
    r, state = _resume(root)
    assert r.step == 200 and r.path == helpers.step_dir(root, RUN, 200)
    assert helpers.same(helpers.snapshot(state), snap_b)


# ----------------------------------------------------------------------------- T10: damage outside the tensors


def _damage_lr(path: str) -> None:
    """0.01 -> 0.03 in the optimizer's lr inside the header JSON: still valid JSON, same length."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        at = head.index(b'lr\\":0.01') + len(b'lr\\":0.0')
        f.seek(8 + at)
        f.write(b"3")
    with open(path, "rb") as f:
        f.seek(8)
        doc = json.loads(f.read(n))
    assert json.loads(doc["__metadata__"]["dist_guardian.tree"])["optim"]["param_groups"][0]["lr"] == 0.03


def test_T10_damaged_tree_is_tried_after_the_intact_older_checkpoint(tmp_path, caplog):
    root = str(tmp_path / "ck")
    snap_a, _snap_b = _save_a_b(root)
    b = helpers.step_dir(root, RUN, 200)
    _damage_lr(os.path.join(b, REPL))
    caplog.set_level(logging.INFO, logger="dist_guardian")
    r, state = _resume(root)
    assert r.resumed and r.step == 100 and r.tier == "V"
    assert helpers.same(helpers.snapshot(state), snap_a)
    assert [(a.path, a.outcome) for a in r.attempts] == [(b, "deferred"), (helpers.step_dir(root, RUN, 100), "loaded")]
    why = r.attempts[0].reasons[0][1]
    assert "tree_damaged:" in why and "state tree damaged in key 'optim'" in why
    assert "damaged_tensors" not in why  # every tensor is intact: only the tree is damaged


def test_T10_damaged_tree_still_loads_as_last_resort_with_a_named_warning(tmp_path, caplog):
    root = str(tmp_path / "ck")
    _save_a_b(root)
    import shutil

    shutil.rmtree(helpers.step_dir(root, RUN, 100))
    b = helpers.step_dir(root, RUN, 200)
    _damage_lr(os.path.join(b, REPL))
    caplog.set_level(logging.INFO, logger="dist_guardian")
    r, state = _resume(root)
    assert r.resumed and r.step == 200 and r.tier == "S"
    assert state["optim"].param_groups[0]["lr"] == 0.03  # what the damaged file holds, loaded knowingly
    warn = [w for w in r.warnings if w.startswith("checkpoint_suspect_loaded:")]
    assert len(warn) == 1 and f"tree_damaged: {os.path.join(b, REPL)}: state tree damaged in key 'optim'" in warn[0]
    logged = [
        rec
        for rec in caplog.records
        if rec.levelno == logging.WARNING and "checkpoint_suspect_loaded" in rec.getMessage()
    ]
    assert logged and "key 'optim'" in logged[0].getMessage()


def test_T10_damaged_tree_is_rejected_by_the_reject_policy(tmp_path):
    root = str(tmp_path / "ck")
    snap_a, _ = _save_a_b(root)
    _damage_lr(os.path.join(helpers.step_dir(root, RUN, 200), REPL))
    r, state = _resume(root, suspect="reject")
    assert r.step == 100 and [a.outcome for a in r.attempts] == ["failed", "loaded"]
    assert helpers.same(helpers.snapshot(state), snap_a)


def test_T10_tree_damage_seen_by_one_rank_defers_the_candidate_on_every_rank(tmp_path):
    import rank_fns
    from dg_harness import run_ranks

    root = str(tmp_path / "ck")
    out = run_ranks(rank_fns.save_steps, 2, timeout=90, stores=[root], run=RUN, steps=[100, 200])
    assert out.ok(), out.errors
    victim = os.path.join(helpers.step_dir(root, RUN, 200), "rank-00001-of-00002.dgt")
    with open(victim, "r+b") as f:  # rank 1's data position 102 -> 103, in its own file only
        (n,) = struct.unpack("<Q", f.read(8))
        at = f.read(n).index(b'position\\":102') + len(b'position\\":10')
        f.seek(8 + at)
        f.write(b"3")
    out = run_ranks(rank_fns.resume_state, 2, timeout=90, stores=[root], run=RUN)
    assert out.ok(), out.errors
    assert [out.results[r]["step"] for r in range(2)] == [100, 100]
    assert [out.results[r]["data"]["position"] for r in range(2)] == [1, 101]
    rec = json.loads(out.results[0]["record"])
    assert [a["outcome"] for a in rec["attempts"]] == ["deferred", "loaded"]
    assert [x["rank"] for x in rec["attempts"][0]["reasons"]] == [1]
    assert "state tree damaged in key 'data'" in rec["attempts"][0]["reasons"][0]["reason"]


# ----------------------------------------------------------------------------- T05b: another optimizer class


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _stepped(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return {"model": model, "optim": opt}


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1, momentum=0.9)


def _adamw(p):
    return torch.optim.AdamW(p, lr=1e-3)


@pytest.mark.parametrize(
    "saved, live, lacks", [(_sgd, _adamw, "'betas', 'eps']"), (_adamw, _sgd, "'dampening', 'momentum']")]
)
def test_T05_native_checkpoint_of_another_optimizer_class_is_a_failed_attempt(tmp_path, saved, live, lacks):
    root = str(tmp_path / "ck")
    m = _model()
    g = Guardian(stores=[root], run=RUN)
    assert g.save(_stepped(m, saved(m.parameters())), step=100).committed
    g.close()
    m2 = _model(1)
    state = _stepped(m2, live(m2.parameters()))
    before = json.dumps(state["optim"].state_dict()["param_groups"])
    r, _ = _resume(root, state)
    assert not r.resumed and [a.outcome for a in r.attempts] == ["failed"]
    why = r.attempts[0].reasons[0][1]
    assert f"'optim': optimizer param_groups[0] lacks [{lacks} that " in why and type(state["optim"]).__name__ in why
    assert json.dumps(state["optim"].state_dict()["param_groups"]) == before  # untouched
    _stepped(m2, state["optim"])  # and the next step still works


def test_T05_foreign_file_of_another_optimizer_class_falls_back_to_native(tmp_path):
    root = str(tmp_path / "ck")
    snap_a, _ = _save_a_b(root)
    m = _model(3)
    sgd = _stepped(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))["optim"]
    torch.save(
        {"model": m.state_dict(), "optim": sgd.state_dict(), "step": 300}, os.path.join(root, RUN, "checkpoint-300.pt")
    )
    r, state = _resume(root, partial_ok=True)  # the file holds no 'sched' nor 'trainer': the optimizer decides
    assert r.step == 200 and [a.outcome for a in r.attempts] == ["failed", "loaded"]
    assert "lacks ['betas'" in r.attempts[0].reasons[0][1]
    helpers.train(state, 1)  # AdamW steps with AdamW state


def test_T05_checkpoint_of_a_compatible_optimizer_class_still_loads(tmp_path):
    root = str(tmp_path / "ck")
    m = _model()
    g = Guardian(stores=[root], run=RUN)
    assert g.save(_stepped(m, torch.optim.Adam(m.parameters(), lr=1e-3)), step=100).committed
    g.close()
    m2 = _model(1)
    state = {"model": m2, "optim": torch.optim.AdamW(m2.parameters(), lr=1e-3)}
    r, _ = _resume(root, state)
    assert r.resumed and r.step == 100
    _stepped(m2, state["optim"])


# ----------------------------------------------------------------------------- T05c: DCP tensor properties


def test_T05_bf16_dcp_weights_are_never_cast_into_an_fp32_model(tmp_path):
    import torch.distributed.checkpoint as dcp

    root = str(tmp_path / "ck")
    bf16 = _model(5).to(torch.bfloat16)
    dcp.save({"model": bf16.state_dict()}, checkpoint_id=os.path.join(root, RUN, "dcp-step-300"))
    live = _model(6)
    before = helpers.model_tensors({"model": live})
    r, _ = _resume(root, {"model": live})
    assert not r.resumed and [a.outcome for a in r.attempts] == ["failed"]
    why = r.attempts[0].reasons[0][1]
    assert (
        "dtype_mismatch: tensor 'model.0.weight' is torch.bfloat16 (16, 8) in the DCP checkpoint, "
        "torch.float32 (16, 8) in the live state"
    ) in why
    assert helpers.same(helpers.model_tensors({"model": live}), before)  # untouched


def test_T05_dcp_of_another_shape_fails_naming_the_tensor_and_native_loads(tmp_path):
    import torch.distributed.checkpoint as dcp

    root = str(tmp_path / "ck")
    snap_a, snap_b = _save_a_b(root)
    wide = helpers.make_state(seed=5, hidden=32)
    dcp.save({"model": wide["model"].state_dict()}, checkpoint_id=os.path.join(root, RUN, "dcp-step-300"))
    r, state = _resume(root)
    assert r.step == 200 and [a.outcome for a in r.attempts] == ["failed", "loaded"]
    assert (
        "shape_mismatch: tensor 'model.0.weight' is torch.float32 (32, 8) in the DCP checkpoint"
        in r.attempts[0].reasons[0][1]
    )
    assert helpers.same(helpers.snapshot(state), snap_b)


def _rewrite_header(path: str, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        assert head.count(old) == 1, head.count(old)
        f.seek(8 + head.index(old))
        f.write(new)


def test_T10_damaged_tensor_index_is_last_resort_too(tmp_path):
    """exp_avg's dtype F32 -> I32 in the header: every tensor's bytes (and digest) are intact, the tree too,
    and the sanity gate skips integer tensors: only the file digest tells, and the candidate goes last."""
    root = str(tmp_path / "ck")
    snap_a, _ = _save_a_b(root)
    b = helpers.step_dir(root, RUN, 200)
    _rewrite_header(
        os.path.join(b, REPL), b'"optim/state/0/exp_avg":{"dtype":"F32"', b'"optim/state/0/exp_avg":{"dtype":"I32"'
    )
    r, state = _resume(root)
    assert r.step == 100 and [a.outcome for a in r.attempts] == ["deferred", "loaded"]
    assert "header damaged outside the tensors (every tensor digest matches)" in r.attempts[0].reasons[0][1]
    assert helpers.same(helpers.snapshot(state), snap_a)


def test_T10_manifest_without_tree_digests_still_detects_tree_damage(tmp_path):
    root = str(tmp_path / "ck")
    snap_a, _ = _save_a_b(root)
    b = helpers.step_dir(root, RUN, 200)
    mpath = os.path.join(b, "manifest.json")
    with open(mpath, "rb") as f:
        doc = json.loads(f.read())
    del doc["trees"]  # as an older dist_guardian wrote it
    os.chmod(mpath, 0o600)
    with open(mpath, "wb") as f:
        f.write(json.dumps(doc).encode())
    _damage_lr(os.path.join(b, REPL))
    r, state = _resume(root)
    assert r.step == 100 and [a.outcome for a in r.attempts] == ["deferred", "loaded"]
    assert "header damaged outside the tensors" in r.attempts[0].reasons[0][1]
    assert helpers.same(helpers.snapshot(state), snap_a)


def test_T10_cli_verify_names_the_damaged_tree_key(tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "ck")
    _save_a_b(root)
    b = helpers.step_dir(root, RUN, 200)
    _damage_lr(os.path.join(b, REPL))
    p = subprocess.run(
        [sys.executable, "-m", "dist_guardian.cli", "verify", b, "--json"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 4, p.stderr
    doc = json.loads(p.stdout)
    assert doc["tier"] == "S" and doc["reasons"][0].startswith(f"checksum_mismatch: {REPL} expected=")
    assert doc["reasons"][1] == (
        f"tree_damaged: {REPL}: state tree damaged in key 'optim' (not checkable by the sanity gate)"
    )
