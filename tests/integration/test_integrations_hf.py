"""``dist_guardian.integrations.hf`` with the real ``transformers.Trainer``: the callback's manifests, mirrors and
retention, and ``find_resume_checkpoint`` on a damaged newest checkpoint, with and without a mirror, on 1 and 2 ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import hf_helpers
import pytest
from dg_harness import run_ranks

from dist_guardian import ConfigError, Guardian, cli, hf_dirs
from dist_guardian.integrations.hf import GuardianCallback, find_resume_checkpoint

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hf_mirrored(tmp_path_factory):
    """checkpoint-2, -4, -6 in ``out`` and in the mirror ``mirror/out``, each with the callback's manifest."""
    base = tmp_path_factory.mktemp("hfm")
    out, mirror = str(base / "out"), str(base / "mirror")
    cb = GuardianCallback(stores=[mirror])
    hf_helpers.train(out, 6, callbacks=[cb])
    assert cb.flush() == []
    return out, mirror


@pytest.fixture
def run(hf_mirrored, tmp_path):
    out, mirror = (str(tmp_path / "out"), str(tmp_path / "mirror"))
    shutil.copytree(hf_mirrored[0], out)
    shutil.copytree(hf_mirrored[1], mirror)
    return out, mirror


def _verify(capsys, path):
    rc = cli.main(["verify", path, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_callback_records_every_file_and_mirrors_it(run, capsys):
    out, mirror = run
    ck = os.path.join(out, "checkpoint-6")
    mf = json.load(open(os.path.join(ck, "manifest.json")))
    assert sorted(mf["files"]) == sorted(n for n in os.listdir(ck) if n != "manifest.json")
    assert mf["step"] == 6 and mf["run"] == "out" and mf["writer"]["by"] == "dist_guardian.integrations.hf"
    assert sorted(os.listdir(os.path.join(mirror, "out"))) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert _verify(capsys, ck) == (0, {"path": ck, "tier": "V", "reasons": []})
    hf_helpers.flip_byte(os.path.join(ck, "model.safetensors"))
    rc, doc = _verify(capsys, ck)
    assert rc == 4 and doc["tier"] == "S"
    (why,) = [r for r in doc["reasons"] if r.startswith("checksum_mismatch: model.safetensors")]
    assert why.endswith("damaged_tensors=['transformer.wte.weight']")


def test_retention_follows_save_total_limit_and_keeps_what_a_mirror_lacks(tmp_path):
    out, mirror = str(tmp_path / "out"), str(tmp_path / "mirror")
    t = hf_helpers.train(out, 8, callbacks=[GuardianCallback(stores=[mirror])], save_total_limit=2)
    assert t.args.save_total_limit is None  # the Trainer's mtime rotation is ours now
    assert sorted(os.listdir(out)) == ["checkpoint-6", "checkpoint-8"]
    assert len(os.listdir(os.path.join(mirror, "out"))) == 4
    # A mirror that cannot be written: nothing local is deleted, since no copy exists elsewhere.
    out2, bad = str(tmp_path / "out2"), str(tmp_path / "not-a-dir")
    open(bad, "w").close()
    cb = GuardianCallback(stores=[bad], keep_last=2)
    hf_helpers.train(out2, 8, callbacks=[cb])
    assert sorted(os.listdir(out2)) == [f"checkpoint-{n}" for n in (2, 4, 6, 8)]
    assert len(cb.flush(timeout=5)) == 4


def test_damaged_newest_resumes_from_the_mirror_copy_and_reaches_max_steps(run, caplog):
    out, mirror = run
    hf_helpers.flip_byte(os.path.join(out, "checkpoint-6", "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="dist_guardian"):
        path = find_resume_checkpoint(out, stores=[mirror])
    assert path == os.path.join(out, "checkpoint-6")
    assert any(n.startswith(".quarantine-checkpoint-6-") for n in os.listdir(out))  # the damaged copy, kept
    assert (
        open(os.path.join(path, "model.safetensors"), "rb").read()
        == open(os.path.join(mirror, "out", "checkpoint-6", "model.safetensors"), "rb").read()
    )
    assert any("checkpoint_restored" in r.getMessage() for r in caplog.records)
    t = hf_helpers.trainer(out, 8)
    t.train(resume_from_checkpoint=path)
    assert t.state.global_step == 8


def test_damaged_newest_without_a_mirror_resumes_from_the_one_before(run):
    out, _ = run
    hf_helpers.flip_byte(os.path.join(out, "checkpoint-6", "model.safetensors"))
    path = find_resume_checkpoint(out)
    assert path == os.path.join(out, "checkpoint-4")
    t = hf_helpers.trainer(out, 8)
    t.train(resume_from_checkpoint=path)
    assert t.state.global_step == 8


def test_missing_local_copy_is_restored_from_the_mirror(run):
    out, mirror = run
    shutil.rmtree(os.path.join(out, "checkpoint-6"))
    assert find_resume_checkpoint(out, stores=[mirror]) == os.path.join(out, "checkpoint-6")
    assert json.load(open(os.path.join(out, "checkpoint-6", "manifest.json")))["step"] == 6


def test_missing_optimizer_skips_the_checkpoint_unless_partial_ok(run):
    out, _ = run
    ck = os.path.join(out, "checkpoint-6")
    os.remove(os.path.join(ck, "optimizer.pt"))  # lost after the manifest was recorded: never chosen
    assert find_resume_checkpoint(out, partial_ok=True) == os.path.join(out, "checkpoint-4")
    hf_dirs.record_manifest(ck, step=6, run="out")  # saved without one (save_only_model=True)
    assert find_resume_checkpoint(out) == os.path.join(out, "checkpoint-4")
    assert find_resume_checkpoint(out, partial_ok=True) == os.path.join(out, "checkpoint-6")


def test_none_only_when_nothing_loads_with_the_record_at_warning(run, caplog):
    out, _ = run
    for n in (2, 4, 6):
        hf_helpers.flip_byte(os.path.join(out, f"checkpoint-{n}", "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="dist_guardian"):
        assert find_resume_checkpoint(out) is None
    (msg,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("find_resume_checkpoint:")]
    assert '"resumed": false' in msg and "checkpoint-2" in msg


def test_two_ranks_agree_on_the_mirror_copy_and_each_restores_its_own_rng(run, tmp_path):
    out, mirror = run
    hf_helpers.flip_byte(os.path.join(out, "checkpoint-6", "model.safetensors"))
    per_rank = str(tmp_path / "per-rank" / "checkpoint-4")  # a store that is one checkpoint dir
    shutil.copytree(os.path.join(out, "checkpoint-4"), per_rank)
    os.remove(os.path.join(per_rank, "manifest.json"))
    heads = hf_helpers.write_rank_rng(per_rank, 2)
    got = run_ranks(hf_helpers.find_on_rank, 2, timeout=120.0, output_dir=out, stores=[mirror], per_rank_dir=per_rank)
    assert got.ok(), got.errors
    assert [got.results[r]["path"] for r in (0, 1)] == [os.path.join(out, "checkpoint-6")] * 2
    assert sum(n.startswith(".quarantine-") for n in os.listdir(out)) == 1
    assert [(got.results[r]["resumed"], got.results[r]["step"]) for r in (0, 1)] == [(True, 4)] * 2
    assert [got.results[r]["torch_rng"] for r in (0, 1)] == heads and heads[0] != heads[1]


def test_guardian_names_a_damaged_tensor_and_the_gate_bounds_it_by_the_saved_max(run):
    # The callback's manifest records each tensor's digest and max|x|: a resume through Guardian names the
    # damaged tensor, and the sanity gate refuses an absurd value (10x the saved max|x|) before it is applied.
    out, _ = run
    model = os.path.join(out, "checkpoint-6", "model.safetensors")
    hf_helpers.set_float(model, "transformer.wte.weight", 3.5e21)
    g = Guardian(stores=[out], run="out")
    state = hf_helpers.live_state()
    r = g.resume(state)
    g.close()
    assert (r.resumed, r.step) == (True, 4)
    (why,) = [w for _, w in r.attempts[0].reasons]
    assert "damaged_tensors=['transformer.wte.weight']" in why and "sanity_gate_failed" in why
    assert float(state["model"].state_dict()["transformer.wte.weight"].abs().max()) < 1e3
    hf_helpers.set_float(model, "transformer.wte.weight", 0.01)  # damaged, but within the bound: loaded, reported
    g = Guardian(stores=[out], run="out")
    r = g.resume(hf_helpers.live_state())
    g.close()
    assert (r.step, r.tier) == (6, "S")
    assert any(w.startswith("checkpoint_suspect_loaded") and "transformer.wte.weight" in w for w in r.warnings)


def test_s3_mirror_restores_a_deleted_newest_checkpoint(tmp_path, s3):
    out = str(tmp_path / "out")
    opts = s3.storage_options()
    cb = GuardianCallback(stores=[s3.url], storage_options=opts, mirror_timeout=60)
    hf_helpers.train(out, 4, callbacks=[cb])
    keys = s3.keys("ckpt/out/")
    assert "ckpt/out/checkpoint-4/manifest.json" in keys and "ckpt/out/checkpoint-4/model.safetensors" in keys
    shutil.rmtree(os.path.join(out, "checkpoint-4"))
    path = find_resume_checkpoint(out, stores=[s3.url], storage_options=opts)
    assert path == os.path.join(out, "checkpoint-4")
    t = hf_helpers.trainer(out, 6)
    t.train(resume_from_checkpoint=path)
    assert t.state.global_step == 6


def test_retention_never_counts_a_checkpoint_without_a_good_manifest(run):
    out, mirror = run
    shutil.copytree(os.path.join(out, "checkpoint-6"), os.path.join(out, "checkpoint-8"))
    os.remove(os.path.join(out, "checkpoint-8", "manifest.json"))  # written, never recorded: not good
    with open(os.path.join(out, "checkpoint-6", "optimizer.pt"), "ab") as f:
        f.write(b"x")  # its size no longer matches its manifest: not good either
    assert hf_dirs.prune(out, 2, run="out") == []  # the good ones are 4 and 2: both kept
    hf_dirs.record_manifest(os.path.join(out, "checkpoint-8"), step=8, run="out")
    assert hf_dirs.prune(out, 2, run="out", protect=[os.path.join(out, "checkpoint-2")]) == []  # the best model
    assert hf_dirs.prune(out, 2, run="out", targets=hf_dirs.mirror_stores([mirror])) == [
        os.path.join(out, "checkpoint-2")
    ]  # 8 and 4 are the newest good; 6 is newer than 4 and stays
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_guardian_callback_options_are_checked_when_built():
    with pytest.raises(ConfigError, match=r"^GuardianCallback\(\) got unknown keyword\(s\) \['keep'\]; use: "):
        GuardianCallback(keep=3)
    with pytest.raises(ConfigError, match=r"^keep_last=0 must be None \(save_total_limit decides\) or a positive"):
        GuardianCallback(keep_last=0)
    with pytest.raises(ConfigError, match=r"^run='\.\./x' is not a plain name"):
        GuardianCallback(run="../x")
