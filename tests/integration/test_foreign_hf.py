"""Hugging Face Trainer output dirs as foreign candidates: found, verified, loaded into ``state`` in full, honestly.

The checkpoints are written once per module by the real ``transformers.Trainer`` (checkpoint-2, -4, -6);
each test copies them before damaging anything. Each finding of issue 13 that concerns HF is a test here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

import hf_helpers
import pytest
import torch

from dist_guardian import Guardian, cli, discovery, formats, stores, verify
from dist_guardian.formats import hf_layout

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "out")
    hf_helpers.train(out, 6)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


@pytest.fixture
def out(hf_run, tmp_path):
    dst = str(tmp_path / "out")
    shutil.copytree(hf_run, dst)
    return dst


def _resume(store, state=None, **kw):
    state = hf_helpers.live_state() if state is None else state
    g = Guardian(stores=[store], run="default", **kw)
    try:
        return g.resume(state), state
    finally:
        g.close()


def _ls(capsys, *args):
    assert cli.main(["ls", *args, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)["listing"]


def test_output_dir_lists_one_candidate_per_checkpoint_with_the_trainer_step(out, capsys):
    # Before: `dist-guardian ls out` printed (none).
    shutil.move(os.path.join(out, "checkpoint-6"), os.path.join(out, "checkpoint-600"))  # the content's step wins
    rows = _ls(capsys, out)
    assert [(r["kind"], r["step"], r["tier"]) for r in rows] == [("hf", 6, "L"), ("hf", 4, "L"), ("hf", 2, "L")]
    assert all(not any("unsafe" in why for why in r["reasons"]) for r in rows)


def test_one_checkpoint_dir_as_the_store_is_one_candidate_not_its_files(out, capsys, caplog):
    # Before: its files were separate candidates at step -1, rng_state.pth and training_args.bin were R with a
    # security_event WARNING on every resume, model.safetensors ignored.
    ck = os.path.join(out, "checkpoint-4")
    rows = _ls(capsys, ck)
    assert [(r["kind"], r["step"], r["tier"], r["path"]) for r in rows] == [("hf", 4, "L", ck)]
    with caplog.at_level(logging.DEBUG, logger="dist_guardian"):
        r, state = _resume(ck)
    assert r.resumed and r.step == 4 and r.tier == "L"
    assert not [x for x in caplog.records if "security_event" in x.getMessage()]
    assert not [x for x in caplog.records if x.levelno >= logging.WARNING and "training_args" in x.getMessage()]
    assert hf_helpers.same_tensors(
        {k: v for k, v in state["model"].state_dict().items() if k != "lm_head.weight"}, hf_helpers.saved(ck)["model"]
    )


def test_resume_restores_model_optimizer_scheduler_and_rng(out):
    ref = hf_helpers.saved(os.path.join(out, "checkpoint-6"))
    r, state = _resume(out)
    assert (r.resumed, r.step, r.path) == (True, 6, os.path.join(out, "checkpoint-6"))
    sd = state["model"].state_dict()
    assert hf_helpers.same_tensors({k: v for k, v in sd.items() if k in ref["model"]}, ref["model"])
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])  # the tied head the Trainer leaves out
    got = state["optim"].state_dict()
    assert len(got["state"]) == len(ref["optim"]["state"]) == 16
    assert all(torch.equal(got["state"][i]["exp_avg"], ref["optim"]["state"][i]["exp_avg"]) for i in got["state"])
    assert state["sched"].last_epoch == ref["sched"]["last_epoch"] == 6
    rng = torch.load(os.path.join(out, "checkpoint-6", "rng_state.pth"), weights_only=False)
    assert torch.equal(torch.get_rng_state(), rng["cpu"])
    state["optim"].step()  # the restored state trains on


def test_rng_globals_are_allowlisted_for_rng_files_only(out):
    # rng_state.pth needs numpy's reconstruct/ndarray/dtype: allowed there, still unsafe in optimizer.pt.
    import numpy as np

    buf = io.BytesIO()
    torch.save({"state": {}, "param_groups": [], "x": np.zeros(3, dtype=np.uint32)}, buf)
    data = buf.getvalue()
    assert "numpy.ndarray" in formats.sniff_torch_file(io.BytesIO(data), len(data), "optimizer.pt").unsafe_globals
    rng = formats.sniff_torch_file(io.BytesIO(data), len(data), "rng_state.pth", hf_layout.RNG_SAFE_GLOBALS)
    assert rng.unsafe_globals == ()
    with open(os.path.join(out, "checkpoint-6", "optimizer.pt"), "wb") as f:
        f.write(data)
    cands = verify.verify_all(discovery.discover_store(stores.resolve(out, 0), "default"), run="default", compat=None)
    by_step = {c.step: c for c in cands.candidates}
    why = by_step[6].reasons[0]
    assert by_step[6].tier == "R" and "unsafe_globals=" in why and "optimizer.pt" in why
    assert by_step[4].tier == "L"


def test_missing_optimizer_fails_that_candidate_or_warns_with_partial_ok(out, caplog):
    os.remove(os.path.join(out, "checkpoint-6", "optimizer.pt"))
    r, state = _resume(out)
    assert (r.resumed, r.step) == (True, 4)
    assert [a.outcome for a in r.attempts] == ["failed", "loaded"]
    why = r.attempts[0].reasons[0][1]
    assert why.startswith("IncompleteRestore: incomplete:") and "'optim': no optimizer file" in why
    with caplog.at_level(logging.WARNING, logger="dist_guardian"):
        r, state = _resume(out, partial_ok=True)
    assert (r.resumed, r.step) == (True, 6)
    warned = [x.getMessage() for x in caplog.records if x.levelno == logging.WARNING]
    assert any(w.startswith("partial_restore:") and "'optim'" in w for w in warned), warned
    assert any(w.startswith("partial_restore:") for w in r.warnings)
    assert state["optim"].state_dict()["state"] == {}  # kept its current (fresh) value


def test_state_key_the_checkpoint_cannot_hold_is_named(out):
    state = hf_helpers.live_state()
    state["data"] = {"epoch": 0}
    r, _ = _resume(out, state)
    assert not r.resumed and [a.outcome for a in r.attempts] == ["failed"] * 3
    assert all("'data': not in the checkpoint" in a.reasons[0][1] for a in r.attempts)


def test_fresh_start_is_a_warning_naming_the_stores_and_what_they_hold(tmp_path, caplog):
    store = tmp_path / "elsewhere"
    store.mkdir()
    (store / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="dist_guardian"):
        r, _ = _resume(str(store))
    assert not r.resumed
    (msg,) = [x.getMessage() for x in caplog.records if "starting FRESH" in x.getMessage()]
    assert str(store) in msg and "notes.txt" in msg


def test_sharded_model_loads_from_every_shard_and_a_missing_shard_is_rejected(out, hf_run):
    ck = os.path.join(out, "checkpoint-6")
    model = hf_helpers.tiny_model()
    model.load_state_dict(hf_helpers.saved(ck)["model"], strict=False)
    model.tie_weights()
    os.remove(os.path.join(ck, "model.safetensors"))
    model.save_pretrained(ck, max_shard_size="4KB")
    shards = sorted(n for n in os.listdir(ck) if hf_layout.SHARD_RE.match(n))
    assert len(shards) > 1 and hf_layout.MODEL_INDEX in os.listdir(ck)
    ref = hf_helpers.saved(os.path.join(hf_run, "checkpoint-6"))["model"]
    r, state = _resume(out)
    assert (r.resumed, r.step) == (True, 6)
    assert hf_helpers.same_tensors({k: v for k, v in state["model"].state_dict().items() if k in ref}, ref)
    os.remove(os.path.join(ck, shards[-1]))
    r, _ = _resume(out)
    assert r.step == 4 and any("missing:" in why and "checkpoint-6" in p for p, why in r.rejected)


def test_truncated_safetensors_is_rejected_before_reading_and_the_older_loads(out):
    path = os.path.join(out, "checkpoint-6", "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    r, _ = _resume(out)
    assert r.step == 4 and [a.outcome for a in r.attempts] == ["loaded"]
    assert any("bad_header" in why for _, why in r.rejected)


def test_crc_mismatch_in_optimizer_is_suspect(out):
    path = os.path.join(out, "checkpoint-6", "optimizer.pt")
    data = bytearray(open(path, "rb").read())
    i = data.find(b"data/0") + 200  # inside the first tensor's stored bytes
    data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    store = stores.resolve(out, 0)
    cands = verify.verify_all(discovery.discover_store(store, "default"), run="default", compat=None).candidates
    c6 = next(c for c in cands if c.step == 6)
    assert c6.tier == "S" and any("zip CRC32 mismatch" in why for why in c6.reasons)


def test_pytorch_model_bin_is_the_model_when_there_is_no_safetensors(out):
    ck = os.path.join(out, "checkpoint-6")
    ref = hf_helpers.saved(ck)["model"]
    torch.save(ref, os.path.join(ck, "pytorch_model.bin"))
    os.remove(os.path.join(ck, "model.safetensors"))
    r, state = _resume(out)
    assert (r.resumed, r.step) == (True, 6)
    assert hf_helpers.same_tensors({k: v for k, v in state["model"].state_dict().items() if k in ref}, ref)


def test_a_symlink_inside_a_checkpoint_dir_is_never_followed(out, tmp_path):
    ck = os.path.join(out, "checkpoint-6")
    outside = tmp_path / "outside.pt"
    shutil.move(os.path.join(ck, "optimizer.pt"), outside)
    os.symlink(outside, os.path.join(ck, "optimizer.pt"))
    os.symlink(os.path.join(out, "checkpoint-4"), os.path.join(out, "checkpoint-8"))
    r, _ = _resume(out)
    assert r.step == 4
    rejected = dict(r.rejected)
    assert rejected[ck].startswith("not_regular: optimizer.pt")
    assert rejected[os.path.join(out, "checkpoint-8")].startswith("insecure:")
