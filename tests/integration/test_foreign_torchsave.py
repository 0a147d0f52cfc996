"""Plain ``torch.save`` files and bare safetensors files, as a user's own script leaves them (issue 13).

Every file here is written by the real ``torch.save`` / the real safetensors writer; the damage is
done to the bytes on disk, as a bad disk or a partial copy would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import helpers
import torch

from dist_guardian import Guardian, planning, stores

PY = sys.executable


def _seed_style(state: dict, step: int) -> dict:
    return {"model": state["model"].state_dict(), "optimizer": state["optim"].state_dict(), "step": step}


def _ls(root: str) -> dict[str, int]:
    store = stores.resolve(root, 0)
    plan = planning.make_plan([store], planning.PlanRequest(run="r"), include_rejected=True)
    return {os.path.basename(c.path): c.step for c in plan.listing}


def _flip_member(path: str, data: bytes, byte_in_float: int = 3, value: int = 0x60, count: int = 16) -> str:
    """Overwrite one byte of each of ``count`` float32s in the zip member whose bytes are ``data``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if zf.read(i) == data)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + n + m
        for k in range(count):
            f.seek(start + 4 * k + byte_in_float)
            f.write(bytes([value]))
    return info.filename


def test_memoised_step_key_and_content_over_names(tmp_path):
    """``latest.pt`` holding ``{"step": 300}`` after an optimizer (whose "step" string is memoised) is step 300,
    not -1; ``model_v2.pt`` is not step 2; a file's own step wins over its name; ``epoch`` is the last resort."""
    root = str(tmp_path)
    s = helpers.make_state(seed=1)
    torch.save(_seed_style(s, 100), tmp_path / "checkpoint_step_100.pt")
    torch.save(_seed_style(s, 300), tmp_path / "latest.pt")
    torch.save({"model": s["model"].state_dict()}, tmp_path / "model_v2.pt")
    torch.save({"model": s["model"].state_dict(), "global_step": 250}, tmp_path / "checkpoint_step_7.pt")
    torch.save({"model": s["model"].state_dict(), "epoch": 4, "inner": {"step": 9}}, tmp_path / "epoch_only.pt")
    steps = _ls(root)
    assert steps == {
        "latest.pt": 300,
        "checkpoint_step_7.pt": 250,
        "checkpoint_step_100.pt": 100,
        "epoch_only.pt": 4,
        "model_v2.pt": -1,
    }, steps
    fresh = helpers.make_state(seed=2)
    r = Guardian(stores=[root], run="r").resume({"model": fresh["model"], "optim": fresh["optim"]})
    assert r.resumed and r.step == 300 and r.path.endswith("latest.pt"), r.to_json()


def test_flipped_bytes_in_adam_moment_never_reach_training(tmp_path):
    """A seed-style ``checkpoint_step_300.pt`` with 16 bytes of one exp_avg overwritten: its zip CRC names the
    damaged tensor, nothing bounds it (the fresh optimizer has no exp_avg), so the intact step 200 loads."""
    root = str(tmp_path)
    s = helpers.make_state(seed=1)
    torch.save(_seed_style(s, 200), tmp_path / "checkpoint_step_200.pt")
    helpers.train(s, 1)
    torch.save(_seed_style(s, 300), tmp_path / "checkpoint_step_300.pt")
    moment = s["optim"].state_dict()["state"][0]["exp_avg"]
    _flip_member(str(tmp_path / "checkpoint_step_300.pt"), moment.numpy().tobytes())
    out = subprocess.run(
        [PY, "-m", "dist_guardian.cli", "verify", str(tmp_path / "checkpoint_step_300.pt"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 4, out.stderr
    assert json.loads(out.stdout)["tier"] == "S" and "Traceback" not in out.stderr
    fresh = helpers.make_state(seed=2)
    fresh["optim"] = torch.optim.AdamW(fresh["model"].parameters(), lr=1e-2)  # fresh: no exp_avg to bound it
    st = {"model": fresh["model"], "optim": fresh["optim"]}
    r = Guardian(stores=[root], run="r").resume(st)
    assert r.resumed and r.step == 200, r.to_json()
    failed = next(a for a in r.attempts if a.step == 300)
    why = " ".join(t for _, t in failed.reasons)
    assert "sanity_gate_failed" in why and "optim/state/0/exp_avg" in why, why
    assert "intact neighbour" in why and "checkpoint_step_200.pt" in why, why
    worst = max(float(v.abs().max()) for d in st["optim"].state_dict()["state"].values() for v in d.values())
    assert worst < 1e3


def test_mild_damage_in_a_moment_is_bounded_by_the_neighbour_and_none_without_one(tmp_path):
    """Low mantissa bytes of an exp_avg changed: within the bound of the intact step 200's exp_avg, so step 300
    loads as a suspect with the bound in the record; alone in its directory, nothing bounds it and it fails."""
    s = helpers.make_state(seed=1)
    torch.save(_seed_style(s, 200), tmp_path / "checkpoint_step_200.pt")
    helpers.train(s, 1)
    torch.save(_seed_style(s, 300), tmp_path / "checkpoint_step_300.pt")
    moment = s["optim"].state_dict()["state"][0]["exp_avg"].numpy().tobytes()
    _flip_member(str(tmp_path / "checkpoint_step_300.pt"), moment, byte_in_float=0, value=0x5A)
    fresh = helpers.make_state(seed=2)
    st = {"model": fresh["model"], "optim": torch.optim.AdamW(fresh["model"].parameters(), lr=1e-2)}
    r = Guardian(stores=[str(tmp_path)], run="r").resume(st)
    assert r.resumed and r.step == 300 and r.tier == "S", r.to_json()
    assert any("sanity_bound: optim/state/0/exp_avg" in w and "checkpoint_step_200.pt" in w for w in r.warnings)
    os.remove(tmp_path / "checkpoint_step_200.pt")
    st = {"model": fresh["model"], "optim": torch.optim.AdamW(fresh["model"].parameters(), lr=1e-2)}
    r = Guardian(stores=[str(tmp_path)], run="r").resume(st)
    assert not r.resumed
    assert "nothing bounds it" in r.attempts[0].reasons[0][1]


def test_flipped_model_weight_is_judged_against_the_live_state(tmp_path):
    """A damaged weight is bounded by the live model's same tensor: an exponent flip fails the gate (named,
    with its bound), a flip of low mantissa bytes stays within it and loads as a suspect, with the bound recorded."""
    s = helpers.make_state(seed=1)
    w = s["model"].state_dict()["0.weight"]
    huge, mild = tmp_path / "huge", tmp_path / "mild"
    for d in (huge, mild):
        d.mkdir()
        torch.save(_seed_style(s, 100), d / "checkpoint_step_100.pt")
        torch.save(_seed_style(s, 300), d / "checkpoint_step_300.pt")
    _flip_member(str(huge / "checkpoint_step_300.pt"), w.numpy().tobytes())
    _flip_member(str(mild / "checkpoint_step_300.pt"), w.numpy().tobytes(), byte_in_float=0, value=0x11)
    fresh = helpers.make_state(seed=2)
    r = Guardian(stores=[str(huge)], run="r").resume({"model": fresh["model"], "optim": fresh["optim"]})
    assert r.step == 100
    why = " ".join(t for a in r.attempts if a.step == 300 for _, t in a.reasons)
    assert "sanity_gate_failed: tensor model/0.weight" in why and "the live state" in why, why
    assert float(fresh["model"][0].weight.detach().abs().max()) < 10
    fresh = helpers.make_state(seed=2)
    r = Guardian(stores=[str(mild)], run="r").resume({"model": fresh["model"], "optim": fresh["optim"]})
    assert r.step == 300 and r.tier == "S", r.to_json()
    assert any("checkpoint_suspect_loaded" in x for x in r.warnings)
    assert any("sanity_bound: model/0.weight" in x and "live state" in x for x in r.warnings), r.warnings


def test_bare_safetensors_file_is_a_candidate(tmp_path):
    from safetensors.torch import save_file

    s = helpers.make_state(seed=4)
    save_file({k: v.contiguous() for k, v in s["model"].state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert _ls(str(tmp_path)) == {"model.safetensors": -1}
    fresh = helpers.make_state(seed=5)
    r = Guardian(stores=[str(tmp_path)], run="r").resume({"model": fresh["model"]})
    assert r.resumed and r.tier == "L", r.to_json()
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(s))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 8)
    plan = planning.make_plan([stores.resolve(str(tmp_path), 0)], planning.PlanRequest(run="r"), include_rejected=True)
    assert plan.listing[0].tier == "R" and any("unloadable" in x for x in plan.listing[0].reasons)


def test_sharded_safetensors_set_is_one_candidate(tmp_path):
    from safetensors.torch import save_file

    s = helpers.make_state(seed=4)
    sd = {k: v.contiguous() for k, v in s["model"].state_dict().items()}
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert _ls(str(tmp_path)) == {"model-00001-of-00002.safetensors": -1}
    fresh = helpers.make_state(seed=5)
    r = Guardian(stores=[str(tmp_path)], run="r").resume({"model": fresh["model"]})
    assert r.resumed, r.to_json()
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(s))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    plan = planning.make_plan([stores.resolve(str(tmp_path), 0)], planning.PlanRequest(run="r"), include_rejected=True)
    assert plan.listing[0].tier == "R" and any(x.startswith("missing:") for x in plan.listing[0].reasons)


def test_verify_on_a_foreign_file(tmp_path):
    s = helpers.make_state(seed=1)
    p = tmp_path / "checkpoint_step_300.pt"
    torch.save(_seed_style(s, 300), p)
    out = subprocess.run([PY, "-m", "dist_guardian.cli", "verify", str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tier L" in out.stdout and "every zip CRC32 matches" in out.stdout and "step 300" in out.stdout
    assert "Not a directory" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    buf = io.BytesIO(p.read_bytes()[:-300])
    (tmp_path / "cut.pt").write_bytes(buf.getvalue())
    out = subprocess.run(
        [PY, "-m", "dist_guardian.cli", "verify", str(tmp_path / "cut.pt")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "tier R" in out.stdout and "Traceback" not in out.stderr
