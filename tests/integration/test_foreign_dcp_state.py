"""PyTorch DCP checkpoints loaded into the user's whole state with ``set_state_dict`` semantics (issue 13).

Every checkpoint is written by the real ``dcp.save``, in the two layouts people use: the plain
``{"model": m.state_dict(), "optim": o.state_dict(), "sched": s.state_dict()}`` and the
``get_state_dict`` one of the DCP tutorial (optimizer state keyed by FQN, under a Stateful wrapper).
"""

from __future__ import annotations

import json
import os
import warnings

import helpers
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from dist_guardian import Guardian, cli

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _saved(seed: int = 3) -> dict:
    s = helpers.make_state(seed=seed)
    helpers.train(s, 3)
    return s


def _fresh(seed: int = 9) -> dict:
    """A fresh model, an AdamW that never stepped (empty state) and a StepLR on it (adds ``initial_lr``)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return {"model": model, "optim": opt, "sched": sched}


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, k): v for i, d in opt.state_dict()["state"].items() for k, v in d.items()}


def _assert_restored(fresh: dict, saved: dict) -> None:
    want, got = _opt_tensors(saved["optim"]), _opt_tensors(fresh["optim"])
    assert len(want) == 12 and set(got) == set(want), (len(got), len(want))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(saved))
    assert fresh["sched"].last_epoch == saved["sched"].last_epoch
    assert fresh["optim"].param_groups[0]["lr"] == saved["optim"].param_groups[0]["lr"]
    assert "initial_lr" in fresh["optim"].param_groups[0]


def test_plain_layout_into_a_fresh_adamw_with_steplr(tmp_path):
    saved = _saved()
    st = {
        "model": saved["model"].state_dict(),
        "optim": saved["optim"].state_dict(),
        "sched": saved["sched"].state_dict(),
    }
    dcp.save(st, checkpoint_id=str(tmp_path / "ck" / "r" / "step-300"))  # a torchtitan-style step dir under the run
    fresh = _fresh()
    r = Guardian(stores=[str(tmp_path / "ck")], run="r").resume(fresh)
    assert r.resumed and r.step == 300 and r.tier == "L", r.to_json()
    _assert_restored(fresh, saved)
    # Training goes on from the restored moments: one step gives the same weights on both.
    helpers.train(saved, 1, torch.Generator().manual_seed(1))
    helpers.train({**fresh, "trainer": {"seen": 0}}, 1, torch.Generator().manual_seed(1))
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(saved))


def test_get_state_dict_layout_under_a_stateful_wrapper(tmp_path):
    saved = _saved()

    class App:
        def state_dict(self):
            m, o = get_state_dict(saved["model"], saved["optim"])
            return {"model": m, "optim": o}

        def load_state_dict(self, sd):  # pragma: no cover - never loaded through torch here
            raise AssertionError

    dcp.save({"app": App(), "sched": saved["sched"].state_dict()}, checkpoint_id=str(tmp_path / "checkpoint-120"))
    fresh = _fresh()
    r = Guardian(stores=[str(tmp_path)], run="r").resume(fresh)
    assert r.resumed and r.step == 120, r.to_json()
    _assert_restored(fresh, saved)


def test_missing_required_key_is_one_short_reason(tmp_path):
    saved = _saved()
    dcp.save({"weights": saved["model"].state_dict()}, checkpoint_id=str(tmp_path / "checkpoint-5"))
    fresh = _fresh()
    r = Guardian(stores=[str(tmp_path)], run="r").resume(fresh)
    assert not r.resumed
    (att,) = [a for a in r.attempts if a.step == 5]
    why = att.reasons[0][1]
    assert "dcp_keys_missing" in why and "model" in why and "Traceback" not in why
    assert len(why) < 400 and "\n" not in why


def test_flipped_bytes_in_a_dcp_shard_never_reach_training(tmp_path, capsys):
    """DCP has no checksums: a weight of 3e25 is caught by the bound from the live model, and the older
    intact checkpoint is loaded instead; a shard cut short fails on the metadata's byte ranges."""
    saved = _saved()
    st = {"model": saved["model"].state_dict(), "optim": saved["optim"].state_dict()}
    dcp.save(st, checkpoint_id=str(tmp_path / "checkpoint-100"))
    dcp.save(st, checkpoint_id=str(tmp_path / "checkpoint-200"))
    d = tmp_path / "checkpoint-200"
    (shard,) = [f for f in os.listdir(d) if f.endswith(".distcp")]
    raw = bytearray((d / shard).read_bytes())
    w = saved["model"].state_dict()["0.weight"].numpy().tobytes()
    at = raw.find(w)
    assert at >= 0
    for k in range(16):
        raw[at + 4 * k + 3] = 0x6A
    (d / shard).write_bytes(bytes(raw))
    fresh = _fresh()
    del fresh["sched"]  # the checkpoint holds model and optimizer only: resume asks for what it has
    r = Guardian(stores=[str(tmp_path)], run="r").resume(fresh)
    assert r.resumed and r.step == 100, r.to_json()
    why = " ".join(t for a in r.attempts if a.step == 200 for _, t in a.reasons)
    assert "sanity_gate_failed: tensor model/0.weight" in why and "live state" in why, why
    assert float(fresh["model"][0].weight.detach().abs().max()) < 10
    os.truncate(d / shard, len(raw) // 2)
    assert cli.main(["verify", str(d), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["tier"] == "R" and rep["reasons"][0].startswith("truncated:"), rep
    assert cli.main(["verify", str(tmp_path / "checkpoint-100")]) == 0
    assert "PyTorch DCP directory" in capsys.readouterr().out


def test_a_minus_inf_mask_the_live_model_also_holds_loads(tmp_path):
    """Unchecked DCP tensors must be finite unless the live one is not either (a causal mask of -inf)."""

    def masked(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = torch.nn.Linear(4, 4)
        m.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))
        return m

    src = masked(1)
    dcp.save({"model": src.state_dict()}, checkpoint_id=str(tmp_path / "checkpoint-3"))
    dst = masked(2)
    r = Guardian(stores=[str(tmp_path)], run="r").resume({"model": dst})
    assert r.resumed and torch.equal(dst.weight, src.weight), r.to_json()


def test_foreign_loader_gets_the_whole_dcp_tree(tmp_path):
    saved = _saved()
    dcp.save({"weights": saved["model"].state_dict(), "n": 7}, checkpoint_id=str(tmp_path / "checkpoint-5"))
    seen = {}

    def mapper(obj, state):
        seen.update(obj)
        return {"model": obj["weights"]}

    fresh = _fresh()
    r = Guardian(stores=[str(tmp_path)], run="r", foreign_loader=mapper).resume({"model": fresh["model"]})
    assert r.resumed and r.step == 5, r.to_json()
    assert seen["n"] == 7
    assert helpers.same(helpers.model_tensors(fresh), helpers.model_tensors(saved))


def test_dtype_mismatch_is_refused(tmp_path):
    saved = _saved()
    bf16 = {k: v.to(torch.bfloat16) for k, v in saved["model"].state_dict().items()}
    dcp.save({"model": bf16}, checkpoint_id=str(tmp_path / "checkpoint-5"))
    fresh = _fresh()
    r = Guardian(stores=[str(tmp_path)], run="r").resume({"model": fresh["model"]})
    assert not r.resumed
    assert "dtype_mismatch" in r.attempts[0].reasons[0][1]


@pytest.mark.timeout(240)
def test_fsdp2_dcp_from_two_ranks_loads_into_fsdp2_on_two_and_a_plain_model_on_one(tmp_path):
    """A 2-rank FSDP2 job's ``get_state_dict`` DCP: into a fresh FSDP2 model + never-stepped AdamW on 2 ranks
    (DTensor targets, DCP reshards) and into an unsharded model on 1 rank; every tensor equal to the saved ones."""
    import foreign_rank_fns as f
    from dg_harness import run_ranks

    root = str(tmp_path / "ck")
    saved = run_ranks(f.fsdp2_save, 2, path=os.path.join(root, "r", "step-40"), timeout=120)
    assert saved.ok(), saved.errors
    want = saved.results[0]
    assert len([k for k in want if k.startswith("o.")]) == 12
    two = run_ranks(f.fsdp2_resume, 2, root=root, timeout=120)
    assert two.ok(), two.errors
    for r in range(2):
        got = two.results[r]
        assert got["resumed"] and got["step"] == 40, got["record"]
        assert got["full"] == pytest.approx(want), r
    one = run_ranks(f.plain_resume, 1, root=root, timeout=120)
    assert one.ok(), one.errors
    assert one.results[0]["resumed"], one.results[0]["record"]
    assert one.results[0]["full"] == pytest.approx(want)
