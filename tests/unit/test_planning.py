"""The plan: pages of manifests newest first, order by policy, nothing read that is not needed."""

from __future__ import annotations

import os

import torch
from corruption import flip_in_zip_member
from helpers import committed

from dist_guardian import Guardian, planning, stores


def _make(root: str, steps: range) -> None:
    g = Guardian(stores=[root], run="r", rng=False)
    m = torch.nn.Linear(2, 2)
    for s in steps:
        assert g.save({"model": m}, step=s).committed
    g.close()


def test_first_page_reads_only_the_newest_manifests(tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    _make(root, range(30))
    reads = []
    real = stores.read_small
    monkeypatch.setattr(stores, "read_small", lambda store, rel, cap: reads.append(rel) or real(store, rel, cap))
    store = stores.resolve(root, 0)
    cur = planning.PlanCursor([store], planning.PlanRequest(run="r", suspect="after_same_step", use_journal=False))
    page = cur.next_page()
    assert [c.step for c in page.candidates] == list(range(29, 21, -1))
    assert page.more and len(reads) == planning.PAGE_STEPS  # one manifest per step of the page, none older
    steps = [c.step for c in page.candidates]
    while not cur.exhausted:
        steps += [c.step for c in cur.next_page().candidates]
    assert steps == list(range(29, -1, -1))


def test_resume_walks_into_later_pages_when_a_whole_page_fails(tmp_path):
    root = str(tmp_path / "ck")
    _make(root, range(20))
    before = committed(root, "r")
    for s in range(8, 20):  # the newest 12 steps are truncated: the whole first page and half the next
        p = os.path.join(root, "r", f"step-{s:012d}", "replicated.dgt")
        os.truncate(p, 40)
    m = torch.nn.Linear(2, 2)
    r = Guardian(stores=[root], run="r", rng=False).resume({"model": m})
    assert r.resumed and r.step == 7
    assert len(r.rejected) == 12 and all("size_mismatch" in why for _, why in r.rejected)
    assert committed(root, "r") == before


def test_last_resort_suspects_come_after_every_page(tmp_path):
    root = str(tmp_path / "ck")
    _make(root, range(12))
    # A foreign torch.save file with a flipped bit is S at plan time: under last_resort it must
    # come after every V of every page, not just after its own page.
    obj = {"model": torch.nn.Linear(2, 2).state_dict()}
    path = os.path.join(root, "step_50.pt")
    torch.save(obj, path)
    flip_in_zip_member(path, "data/0")
    plan = planning.make_plan(
        [stores.resolve(root, 0)], planning.PlanRequest(run="r", suspect="last_resort", use_journal=False)
    )
    tiers = [(c.step, c.tier) for c in plan.candidates]
    assert tiers[-1] == (50, "S") and [t for _, t in tiers[:-1]] == ["V"] * 12
