"""Lightning ``.ckpt`` files written by a real ``pl.Trainer`` + ``ModelCheckpoint`` (issue 13).

Found with the step of their content (``global_step``), ``-vN`` and ``last.ckpt`` names
understood, and mapped in full: the model from ``state_dict``, the optimizer from
``optimizer_states``, the scheduler from ``lr_schedulers``.
"""

from __future__ import annotations

import os

import lightning_helpers as lh
import pytest
import torch

from dist_guardian import Guardian, planning, stores


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two fits into the same dir (the second writes ``-v1`` names), 30 steps each, a checkpoint every 10."""
    d = str(tmp_path_factory.mktemp("lightning") / "ckpts")
    lh.fit(d, 30)
    lh.fit(d, 30)
    return d


def _listing(root: str) -> dict[str, tuple[int, str]]:
    plan = planning.make_plan([stores.resolve(root, 0)], planning.PlanRequest(run="r"), include_rejected=True)
    return {os.path.basename(c.path): (c.step, c.tier) for c in plan.listing}


def test_steps_from_content_never_from_v_suffixes(run_dir):
    got = _listing(run_dir)
    assert set(lh.ckpts(run_dir)) == set(got)
    assert got["epoch=0-step=10-v1.ckpt"] == (10, "L") and got["epoch=1-step=30-v1.ckpt"] == (30, "L")
    assert got["last-v1.ckpt"][0] == 30 and got["last.ckpt"][0] == 30
    assert all(step in (10, 20, 30) for step, _ in got.values()), got


def _state(inner: bool) -> dict:
    m = lh.TinyModule(seed=7)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return {"model": m.net if inner else m, "optim": opt, "sched": sched}


@pytest.mark.parametrize("inner", [False, True], ids=["lightning_module", "inner_net"])
def test_ckpt_restores_model_optimizer_and_scheduler(run_dir, inner):
    want = torch.load(os.path.join(run_dir, "epoch=1-step=30.ckpt"), weights_only=True)
    st = _state(inner)
    r = Guardian(stores=[run_dir], run="r").resume(st)
    assert r.resumed and r.step == 30, r.to_json()
    assert not [w for w in r.warnings if w.startswith("missing_optional_key")], r.warnings
    osd = st["optim"].state_dict()
    saved = want["optimizer_states"][0]
    assert len(osd["state"]) == 4 and all(
        torch.equal(osd["state"][i][k], saved["state"][i][k]) for i in saved["state"] for k in saved["state"][i]
    )
    assert st["sched"].last_epoch == want["lr_schedulers"][0]["last_epoch"] == 30
    model_sd = st["model"].state_dict()
    for k, v in want["state_dict"].items():
        assert torch.equal(model_sd[k.removeprefix("net.") if inner else k], v)


def test_truncated_newest_ckpt_falls_back_to_the_previous(tmp_path):
    d = str(tmp_path / "ck")
    lh.fit(d, 20, every=10, save_last=False)
    newest = os.path.join(d, "epoch=1-step=20.ckpt")
    os.truncate(newest, os.path.getsize(newest) // 2)
    st = _state(False)
    r = Guardian(stores=[d], run="r").resume(st)
    assert r.resumed and r.step == 10 and r.path.endswith("epoch=0-step=10.ckpt"), r.to_json()


def test_verify_on_a_lightning_ckpt(run_dir):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dist_guardian.cli", "verify", os.path.join(run_dir, "last-v1.ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "tier L" in out.stdout and "step 30 (from the content)" in out.stdout, out
    assert "Traceback" not in out.stderr
