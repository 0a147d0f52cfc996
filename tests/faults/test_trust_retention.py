"""Retention and the lineage generation against foreign checkpoints in the same run dir.

T02: retention and ``prune`` count and delete only within one (compat, layout) group, and
``prune`` treats the other stores on its command line as mirrors, like the library.
T03: one planted manifest (any store) never blocks saving, and every number a writer can
produce round-trips through every reader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import torch
from helpers import committed, make_state, same, snapshot

from dist_guardian import Guardian, cli, manifest, planning, stores

RUN = "r"


def save_steps(root: str | list[str], steps, *, compat=None, hidden: int = 16, keep_last=None, seed: int = 0):
    """Real saves of ``steps`` by one Guardian; returns the snapshot of the state saved at each step."""
    state = make_state(seed=seed, hidden=hidden)
    g = Guardian(stores=root if isinstance(root, list) else [root], run=RUN, compat=compat, keep_last=keep_last)
    snaps = {}
    for s in steps:
        assert g.save(state, step=s).committed
        snaps[s] = snapshot(state)
    g.close()
    return snaps


def name(step: int) -> str:
    return stores.step_dir_name(step)


# ----------------------------------------------------------------------------- T02 retention groups


def test_T02_library_retention_never_counts_or_deletes_other_compat_or_layout(tmp_path):
    """Foreign compat (a) and layout (hidden 32) checkpoints newer than ours must not push ours out."""
    root = str(tmp_path / "ck")
    ours = {"model": "b"}
    save_steps(root, [100, 200], compat={"model": "a"})
    save_steps(root, [300, 400], compat=ours, hidden=32)
    save_steps(root, [150, 250], compat=ours, keep_last=2)
    left = set(committed(root, RUN))
    assert left == {name(s) for s in (100, 200, 300, 400, 150, 250)}, left
    snaps = save_steps(root, [260], compat=ours, keep_last=2, seed=1)
    left = set(committed(root, RUN))
    assert left == {name(s) for s in (100, 200, 300, 400, 250, 260)}, left  # only our own oldest (150) went
    state = make_state(seed=9)
    g = Guardian(stores=[root], run=RUN, compat=ours)
    r = g.resume(state)
    g.close()
    assert r.resumed and r.step == 260
    assert same(snapshot(state), snaps[260])


def test_T02_prune_never_deletes_the_newest_of_any_group_and_compat_restricts(tmp_path, capsys):
    root = str(tmp_path / "ck")
    save_steps(root, [100, 200, 300], compat={"model": "a"})
    save_steps(root, [150, 250], compat={"model": "b"})
    save_steps(root, [50, 120], compat={"model": "b"}, hidden=32)
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--compat", '{"model": "b"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: []}  # compat b: two in each layout, none to go
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--compat", '{"model": "a"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: [os.path.join(root, RUN, name(100))]}
    save_steps(root, [90], compat={"model": "b"}, hidden=32)
    assert cli.main(["prune", root, "--run", RUN, "--keep-last", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {root: [os.path.join(root, RUN, name(50))]}
    assert set(committed(root, RUN)) == {name(s) for s in (200, 300, 150, 250, 90, 120)}


def test_T02_prune_keeps_a_local_step_that_no_mirror_holds(tmp_path, capsys):
    """``prune PRIMARY MIRROR``: the mirror rules of the library (F42), with the other stores as mirrors."""
    primary, mirror = str(tmp_path / "local"), str(tmp_path / "mirror")
    save_steps(primary, [100, 200, 300, 400, 500])
    for s in (200, 500):
        shutil.copytree(os.path.join(primary, RUN, name(s)), os.path.join(mirror, RUN, name(s)))
    assert cli.main(["prune", primary, mirror, "--run", RUN, "--keep-last", "2", "--json"]) == 0
    deleted = json.loads(capsys.readouterr().out)["deleted"]
    # 300 exists only here and the mirror (one newer: 500) would keep it; 200 is held; 100 the mirror would not keep.
    assert deleted == {primary: [os.path.join(primary, RUN, name(s)) for s in (200, 100)], mirror: []}
    assert set(committed(primary, RUN)) == {name(s) for s in (300, 400, 500)}
    assert set(committed(mirror, RUN)) == {name(s) for s in (200, 500)}


def test_T02_newer_foreign_checkpoints_in_the_mirror_do_not_free_an_unmirrored_one(tmp_path, capsys):
    """The mirror holds two newer checkpoints of another compat, none of ours: it would keep our 100 (F42)."""
    primary, mirror = str(tmp_path / "local"), str(tmp_path / "mirror")
    save_steps(primary, [100, 200, 300], compat={"model": "a"})
    save_steps(mirror, [400, 500], compat={"model": "b"})
    assert cli.main(["prune", primary, mirror, "--run", RUN, "--keep-last", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {primary: [], mirror: []}
    assert set(committed(primary, RUN)) == {name(s) for s in (100, 200, 300)}


# ----------------------------------------------------------------------------- T03 generations and number bounds


def plant_generation(mpath: str, generation: int, put=None) -> None:
    """Rewrite a real manifest with another generation (what a hostile or foreign writer can commit)."""
    with open(mpath, "rb") as f:
        doc = json.loads(f.read())
    doc["generation"] = generation
    data = json.dumps(doc).encode()
    manifest.parse(data)  # a manifest every reader accepts
    if put is None:
        with open(mpath, "wb") as f:
            f.write(data)
    else:
        put(data)


def test_T03_planted_max_generation_manifest_never_blocks_the_next_save(tmp_path, caplog):
    root = str(tmp_path / "ck")
    save_steps(root, [100])
    planted = os.path.join(root, RUN, name(100), manifest.MANIFEST_NAME)
    plant_generation(planted, manifest.MAX_GENERATION)
    state = make_state(seed=3)
    g = Guardian(stores=[root], run=RUN)
    with caplog.at_level(logging.WARNING, logger="dist_guardian"):
        r = g.resume(state)
    assert r.resumed and r.step == 100 and r.generation == manifest.MAX_GENERATION
    assert any("generation_capped" in m and os.path.join(root, RUN, name(100)) in m for m in caplog.messages)
    assert g.save(state, step=200).committed
    saved = snapshot(state)
    g.close()
    state = make_state(seed=4)
    g = Guardian(stores=[root], run=RUN)
    r = g.resume(state)
    g.close()
    assert r.resumed and r.step == 200 and same(snapshot(state), saved)


def test_T03_planted_max_generation_in_the_s3_mirror_never_blocks_the_next_save(tmp_path, s3):
    root, so = str(tmp_path / "ck"), s3.storage_options()
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so)
    assert g.save(make_state(seed=1), step=100).committed
    assert g.close() == []
    key = f"ckpt/{RUN}/{name(100)}/{manifest.MANIFEST_NAME}"
    local = str(tmp_path / "m.json")
    with open(local, "wb") as f:
        f.write(s3.get(key))
    plant_generation(local, manifest.MAX_GENERATION, put=lambda data: s3.put(key, data))
    state = make_state(seed=3)
    g = Guardian(stores=[root, s3.url], run=RUN, storage_options=so)
    assert g.resume(state).generation == manifest.MAX_GENERATION
    assert g.save(state, step=200).committed
    assert g.close() == []
    g = Guardian(stores=[s3.url], run=RUN, storage_options=so)
    r = g.resume(make_state(seed=4))
    g.close()
    assert r.resumed and r.step == 200


def test_T03_a_commit_at_the_largest_generation_is_visible_to_the_next_start(tmp_path):
    """Generation MAX_GENERATION beside an older lineage of the same step: step-N-g<13 digits>."""
    root = str(tmp_path / "ck")
    save_steps(root, [100])
    plant_generation(os.path.join(root, RUN, name(100), manifest.MANIFEST_NAME), manifest.MAX_GENERATION - 1)
    state = make_state(seed=5)
    g = Guardian(stores=[root], run=RUN)
    assert g.resume(state).generation == manifest.MAX_GENERATION
    res = g.save(state, step=100)
    saved = snapshot(state)
    g.close()
    assert res.committed and os.path.basename(res.path) == stores.step_dir_name(100, manifest.MAX_GENERATION)
    state = make_state(seed=6)
    g = Guardian(stores=[root], run=RUN)
    r = g.resume(state)
    g.close()
    assert r.resumed and r.path == res.path and same(snapshot(state), saved)


def test_T03_every_written_number_round_trips_through_every_reader(tmp_path):
    from dist_guardian import discovery, verify
    from dist_guardian.candidate import Candidate, FileRef
    from dist_guardian.save import rank_file_name, write_tree

    for step in (0, 1, manifest.MAX_STEP):
        for gen in (None, 0, 1, manifest.MAX_GENERATION):
            m = stores.STEP_DIR_RE.match(stores.step_dir_name(step, gen))
            assert m and int(m.group(1)) == step and (m.group(2) is None if gen is None else int(m.group(2)) == gen)
        m = stores.STAGING_RE.match(stores.new_staging_name(step))
        assert m and int(m.group(1)) == step
    for bad in ("step-000000000100\n", "step-1-g2\n", ".staging-step-000000000001-0123456789abcdef\n"):
        assert not stores.STEP_DIR_RE.match(bad) and not stores.STAGING_RE.match(bad)
    for world in (1, manifest.MAX_WORLD_SIZE):
        m = discovery.RANK_FILE_RE.match(rank_file_name(world - 1, world))
        assert m and (int(m.group(1)), int(m.group(2))) == (world - 1, world)
    assert not discovery.RANK_FILE_RE.match(rank_file_name(0, 1) + "\n")
    # Writer -> manifest -> directory -> discovery -> verify -> plan JSON -> every rank, at the extremes at once.
    gen, world, step = manifest.MAX_GENERATION, manifest.MAX_WORLD_SIZE, manifest.MAX_STEP
    big = manifest.FileEntry(
        name=rank_file_name(world - 1, world), size=manifest.MAX_FILE_SIZE, digest="0" * 32, rank=world - 1
    )
    mf = manifest.parse(
        manifest.build(
            manifest.ManifestDraft(
                run=RUN,
                step=step,
                generation=gen,
                world_size=world,
                created_unix=0.0,
                compat={},
                metrics={},
                files=[big],
                tensors={},
                torch_version="x",
                writer={},
            )
        )
    )
    assert (mf.step, mf.generation, mf.world_size, mf.files[0].size, mf.files[0].rank) == (
        step,
        gen,
        world,
        manifest.MAX_FILE_SIZE,
        world - 1,
    )
    root = str(tmp_path / "ck")
    d = os.path.join(root, RUN, stores.step_dir_name(step, gen))
    os.makedirs(d)
    w = write_tree(os.path.join(d, big.name), {"x": torch.zeros(3)}, rank=world - 1, step=step, file_rank=world - 1)
    with open(os.path.join(d, manifest.MANIFEST_NAME), "wb") as f:
        f.write(
            manifest.build(
                manifest.ManifestDraft(
                    run=RUN,
                    step=step,
                    generation=gen,
                    world_size=world,
                    created_unix=0.0,
                    compat={},
                    metrics={},
                    files=[w.entry],
                    tensors={w.entry.name: w.stats},
                    torch_version="x",
                    writer={},
                )
            )
        )
    store = stores.resolve(root)
    sightings = discovery.discover_store(store, RUN)
    assert [(s.step, s.generation_hint) for s in sightings] == [(step, gen)]
    (c,) = verify.verify_all(sightings, run=RUN, compat=None).candidates
    assert c.tier == "V", c.reasons
    assert verify.verify_full(store, c.rel) == ("V", [])
    assert (c.step, c.generation, c.world_size, c.files[0].rank) == (step, gen, world, world - 1)
    assert Candidate.from_json(json.loads(json.dumps(c.to_json()))) == c
    big_c = dataclasses.replace(c, files=(FileRef(name=big.name, size=big.size, digest=big.digest, rank=big.rank),))
    assert Candidate.from_json(json.loads(json.dumps(big_c.to_json()))) == big_c
    plan = planning.make_plan([store], planning.PlanRequest(run=RUN, suspect="after_same_step"))
    assert plan.generation == gen and planning.Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
