"""Distributed agreement faults (FAULTS.md F21-F30, F33, F38, F39) with real processes and real gloo.

Every test runs 2 or 4 ranks as separate processes (tests/support/dg_harness.py), on real files,
with the fault hook ``DIST_GUARDIAN_FAULT`` set per rank. Standard fixture: committed
checkpoints A = step 100 and B = step 200 (and C = step 300 where a test needs it), saved
once per world size by a real multi-rank save and copied into each test's own store.
Every test is bounded: short agreement timeouts, a harness deadline, and a check that no
rank process is left alive (every exit code is known when the harness returns).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any

import pytest
import rank_fns_faults as rf
import torch
from corruption import flip_bit_in_tensor
from dg_harness import RankOutcome, run_ranks, run_ranks_backend
from helpers import assert_nothing_lost, committed, step_dir

from dist_guardian import journal, manifest

RUN = "r"
A, B, C = 100, 200, 300
SHORT = 4.0  # Guardian(timeout=...) for the hang/crash scenarios: bounds each vote and each attempt
MARGIN = 8.0  # generous: two cores shared with other test sessions


# ----------------------------------------------------------------------------- fixtures and helpers

_TEMPLATES: dict[tuple, tuple[str, dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def template_root(tmp_path_factory):
    return tmp_path_factory.mktemp("templates")


def _template(base, world: int, steps: tuple[int, ...] = (A, B, C), blob_mb: dict[int, float] | None = None):
    """A store holding committed checkpoints at ``steps``, saved by ``world`` real ranks (cached per module)."""
    key = (str(base), world, steps, json.dumps(blob_mb or {}, sort_keys=True))
    if key not in _TEMPLATES:
        root = os.path.join(str(base), f"w{world}-{'-'.join(map(str, steps))}-{len(_TEMPLATES)}")
        out = run_ranks(rf.save_fixture, world, timeout=60, stores=[root], run=RUN, steps=list(steps), blob_mb=blob_mb)
        assert out.ok(), out.errors
        assert all(all(v for v in out.results[r]["committed"].values()) for r in range(world))
        _TEMPLATES[key] = (root, out.results)
    return _TEMPLATES[key]


def _store_with(tmp_path, template, steps=(A, B), name: str = "ck") -> str:
    """This test's own store ``<tmp_path>/<name>``: a copy of the template's committed ``steps``."""
    src, _ = template
    dst = os.path.join(str(tmp_path), name)
    os.makedirs(os.path.join(dst, RUN))
    for s in steps:
        shutil.copytree(step_dir(src, RUN, s), step_dir(dst, RUN, s))
    return dst


def _digest(template, rank: int, step: int) -> dict[str, Any]:
    return template[1][rank]["digests"][step]


def _digest_json(template, rank, step) -> str:
    return json.dumps(_digest(template, rank, step), sort_keys=True)


def _report_dir(tmp_path) -> str:
    d = os.path.join(str(tmp_path), "reports")
    os.makedirs(d, exist_ok=True)
    return d


def _reports(report_dir: str) -> dict[int, dict[str, Any]]:
    out = {}
    for p in glob.glob(os.path.join(report_dir, "rank-*.json")):
        with open(p) as f:
            out[int(os.path.basename(p)[5:-5])] = json.load(f)
    return out


def _clear_reports(report_dir: str) -> None:
    for p in glob.glob(os.path.join(report_dir, "rank-*.json")):
        os.unlink(p)


def _journal_entry(root: str, step: int) -> dict[str, Any] | None:
    for p in glob.glob(os.path.join(root, RUN, journal.JOURNAL_DIR, "*.json")):
        with open(p) as f:
            doc = json.load(f)
        if doc.get("step") == step:
            return doc
    return None


def _forkserver_children() -> list[int]:
    """Live processes forked by the harness's forkserver (the rank processes), from /proc."""
    from multiprocessing import forkserver

    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server is None:
        return []
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server and fields[0] != "Z":
            kids.append(int(d))
    return kids


def _assert_all_exited(out: RankOutcome) -> None:
    """No rank process outlives the harness call: every exit code is known and no rank process is left."""
    assert all(code is not None for code in out.exitcodes.values()), out.exitcodes
    deadline = time.monotonic() + 3.0
    while _forkserver_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _forkserver_children(), f"rank processes still alive: {_forkserver_children()}"


def _assert_loaded(out: RankOutcome, template, world: int, step: int) -> None:
    """Every rank resumed ``step`` and holds exactly that checkpoint's state (no mix of two)."""
    assert out.ok(), out.errors
    _assert_all_exited(out)
    paths = {out.results[r]["path"] for r in range(world)}
    assert len(paths) == 1, paths
    for r in range(world):
        got = out.results[r]
        assert got["resumed"] and got["step"] == step, json.dumps(got["record"])[:3000]
        assert json.dumps(got["digest"], sort_keys=True) == _digest_json(template, r, step), (
            f"rank {r} differs from step {step}: " + _diff(got["digest"], _digest(template, r, step))
        )
        assert got["next"] == template[1][r]["next"][step]


def _diff(a: Any, b: Any, path: str = "") -> str:
    """The first places where two digest trees differ (for assertion messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        parts = [_diff(a.get(k), b.get(k), f"{path}/{k}") for k in sorted(set(a) | set(b))]
        return "; ".join(p for p in parts if p)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        parts = [_diff(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b))]
        return "; ".join(p for p in parts if p)
    return "" if a == b else f"{path}: {a!r} != {b!r}"


def _decisions(record: dict[str, Any]) -> list:
    """What every rank must agree on in a decision record (timings are per rank)."""
    return [(a["candidate_id"], a["path"], a["outcome"], a["reasons"]) for a in record["attempts"]] + [
        record["resumed"],
        record["step"],
        record["path"],
    ]


def _rank_logs(out: RankOutcome, rank: int = 0) -> str:
    return "\n".join(out.results[rank]["logs"])


def _node_env(tmp_path, world: int, nodes: dict[int, str]) -> dict[int, dict[str, str]]:
    """Two "nodes" on one machine: each rank gets its node's private node-local root (0700)."""
    env = {}
    for r in range(world):
        root = os.path.join(str(tmp_path), nodes[r])
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        env[r] = {"DIST_GUARDIAN_NODE_LOCAL_ROOT": root}
    return env


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("world", [2, 4])
def test_multirank_round_trip_exact_state_and_per_rank_rng(tmp_path, template_root, world):
    """No fault: every rank resumes the newest checkpoint with every tensor of model, optimizer and
    scheduler, its own data position and its own RNG state exactly as saved, so the next random
    numbers (python, numpy, torch) on every rank are the ones the saving run would have drawn."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl, steps=(A, B, C))
    out = run_ranks(rf.resume_fixture, world, timeout=60, stores=[ck], run=RUN)
    _assert_loaded(out, tpl, world, C)
    assert len({json.dumps(out.results[r]["next"]) for r in range(world)}) == world  # per-rank streams differ
    assert [out.results[r]["data"]["position"] for r in range(world)] == [100 * r + 3 for r in range(world)]


# ----------------------------------------------------------------------------- F21


@pytest.mark.parametrize("world", [2, 4])
def test_F21_missing_shard_in_one_ranks_view_all_ranks_load_A(tmp_path, template_root, world):
    """Each rank reads the checkpoints through its own node-local copy ("tmp://ck", one node per
    rank); B's file is gone only from the last rank's view. Rank 0 sees a complete B and plans it,
    the availability vote drops it before any data is read, every rank loads A, and rank 0's log
    and the decision record name the rank and its reason."""
    tpl = _template(template_root, world)
    env = _node_env(tmp_path, world, {r: f"node{r}" for r in range(world)})
    for r in range(world):
        _store_with(os.path.join(env[r]["DIST_GUARDIAN_NODE_LOCAL_ROOT"]), tpl, name="ck")
    last = world - 1
    view = os.path.join(env[last]["DIST_GUARDIAN_NODE_LOCAL_ROOT"], "ck")
    victim = os.path.join(step_dir(view, RUN, B), f"rank-{last:05d}-of-{world:05d}.dgt")
    os.unlink(victim)
    before = committed(view, RUN)
    out = run_ranks(rf.resume_fixture, world, timeout=60, env=env, stores=["tmp://ck"], run=RUN)
    _assert_loaded(out, tpl, world, A)
    rec = out.results[0]["record"]
    b = [a for a in rec["attempts"] if a["step"] == B]
    assert len(b) == 1 and b[0]["outcome"] == "unavailable", rec["attempts"]
    assert [x["rank"] for x in b[0]["reasons"]] == [last]
    assert b[0]["reasons"][0]["reason"] == f"missing: {victim}"
    assert [a["outcome"] for a in rec["attempts"]] == ["unavailable", "loaded"]
    logs = _rank_logs(out, 0)
    b0 = step_dir(os.path.join(env[0]["DIST_GUARDIAN_NODE_LOCAL_ROOT"], "ck"), RUN, B)
    assert f"candidate_unavailable id={b0} ranks=[{last}]" in logs
    assert f"rank {last}: missing: {victim}" in logs
    # The record is identical on every rank.
    assert all(_decisions(out.results[r]["record"]) == _decisions(rec) for r in range(world))
    assert_nothing_lost(before, committed(view, RUN))


def test_F21_missing_shard_on_shared_store_rejected_before_the_vote(tmp_path, template_root):
    """On a shared store rank 0 sees the missing file too: B is rejected while planning (never
    attempted, named in the record with its reason) and every rank loads A."""
    world = 2
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    os.unlink(os.path.join(step_dir(ck, RUN, B), "rank-00001-of-00002.dgt"))
    out = run_ranks(rf.resume_fixture, world, timeout=60, stores=[ck], run=RUN)
    _assert_loaded(out, tpl, world, A)
    rec = out.results[0]["record"]
    assert [a["step"] for a in rec["attempts"]] == [A]
    assert [r["path"] for r in rec["rejected"]] == [step_dir(ck, RUN, B)]
    assert "rank-00001-of-00002.dgt" in rec["rejected"][0]["reason"]


# ----------------------------------------------------------------------------- F22


@pytest.mark.parametrize("world", [2, 4])
def test_F22_node_local_candidate_on_node0_only_is_dropped_and_B_loads(tmp_path, template_root, world):
    """C (step 300) exists only in node0's node-local store ("tmp://nl"); the other node's ranks
    vote it unavailable before any data is read (they never attempt it), every rank loads B from
    the shared store, and the decision record and rank 0's log name exactly node1's ranks.
    (Staging C to shared storage first is not implemented in the package: not tested here.)"""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    node1 = [1] if world == 2 else [2, 3]
    env = _node_env(tmp_path, world, {r: ("node1" if r in node1 else "node0") for r in range(world)})
    nl0 = os.path.join(env[0]["DIST_GUARDIAN_NODE_LOCAL_ROOT"], "nl")
    os.makedirs(os.path.join(nl0, RUN), mode=0o700)
    os.chmod(nl0, 0o700)
    shutil.copytree(step_dir(tpl[0], RUN, C), step_dir(nl0, RUN, C))
    out = run_ranks(rf.resume_fixture, world, timeout=60, env=env, stores=[ck, "tmp://nl"], run=RUN)
    _assert_loaded(out, tpl, world, B)
    rec = out.results[0]["record"]
    assert rec["path"] == step_dir(ck, RUN, B)
    c = [a for a in rec["attempts"] if a["step"] == C]
    assert len(c) == 1 and c[0]["outcome"] == "unavailable" and c[0]["store"] == "tmp://nl", rec["attempts"]
    assert [x["rank"] for x in c[0]["reasons"]] == node1
    assert all(x["reason"].startswith("missing: ") for x in c[0]["reasons"])
    assert [a["outcome"] for a in rec["attempts"]] == ["unavailable", "loaded"]  # C never attempted
    assert f"candidate_unavailable id={step_dir(nl0, RUN, C)} ranks={node1}" in _rank_logs(out, 0)
    assert all(_decisions(out.results[r]["record"]) == _decisions(rec) for r in range(world))
    assert os.path.isfile(os.path.join(step_dir(nl0, RUN, C), manifest.MANIFEST_NAME))  # kept


# ----------------------------------------------------------------------------- F23, F24, F25, F28 (crash loops)


def _start(tmp_path, world, ck, rule, *, hang: bool, timeout_s: float = SHORT) -> tuple[RankOutcome, dict]:
    """One (re)start of the job with the fault ``rule`` on rank 1; returns the outcome and the reports."""
    rep = _report_dir(tmp_path)
    _clear_reports(rep)
    t0 = time.monotonic()
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=timeout_s + 2 * MARGIN,
        pg_timeout_s=timeout_s,
        env={1: {"DIST_GUARDIAN_FAULT": rule}},
        stores=[ck],
        run=RUN,
        dg_timeout=timeout_s,
        report_dir=rep,
        watchdog_s=(timeout_s + MARGIN) if hang else None,
    )
    _assert_all_exited(out)
    assert time.monotonic() - t0 < timeout_s + 2 * MARGIN
    return out, _reports(rep)


def _assert_survivors_failed(
    out: RankOutcome, reports: dict, world: int, *, types: tuple[str, ...], within: float
) -> None:
    for r in range(world):
        if r == 1:
            continue
        assert out.error_type(r) in types, (r, out.errors.get(r), out.results.get(r))
        assert out.exitcodes[r] not in (0, None), out.exitcodes  # exits non-zero: the launcher restarts
        rep = reports[r]
        assert rep["elapsed"] < within, (r, rep["elapsed"], rep["error"])
        if rep["error_type"] == "AgreementTimeout":  # it was the vote timeout that fired, as configured
            assert rep["elapsed"] > 0.9 * SHORT and f"no answer from every rank within {SHORT:.1f}s" in rep["error"], (
                rep
            )
        else:
            assert "a peer failed or died" in rep["error"], rep["error"]
        assert rep["unchanged"], f"rank {r} applied something before failing"
        # After the failed collective the group is never touched again: a later vote raises at
        # once without a collective, and close() skips its final vote.
        assert rep["broken"], rep
        assert rep["probe"].startswith("CoordinationError: coordination group unusable since"), rep["probe"]
        assert rep["probe_s"] < 0.5 and rep["close_s"] < 1.0, rep
    assert 1 not in out.results  # the faulted rank never returned


EXIT_CODES = {"hang": 143, "exit": 137, "kill": -9}  # hang: torn down by the (simulated) agent, never by the harness


def _crash_loop(
    tmp_path, template_root, world, rule, *, hang: bool, first_types: tuple[str, ...], within: float, outcome_word: str
) -> None:
    """Two starts die on B; the journal counts them; the third start demotes B and loads A."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    before = committed(ck, RUN)
    for n in (1, 2):
        out, reports = _start(tmp_path, world, ck, rule, hang=hang)
        _assert_survivors_failed(out, reports, world, types=first_types, within=within)
        assert out.exitcodes[1] == EXIT_CODES[rule.rsplit(":", 1)[1]], out.exitcodes
        entry = _journal_entry(ck, B)
        assert entry is not None and entry["started"] == n and entry["finished"] == 0, entry
        assert entry["path"] == step_dir(ck, RUN, B)
        assert entry.get("last_outcome") == outcome_word, entry
        assert journal.UNFINISHED_LIMIT == 2
    # Third start, same fault: B has 2 unfinished attempts, so it is tried last and A loads.
    out, _ = _start(tmp_path, world, ck, rule, hang=hang)
    _assert_loaded(out, tpl, world, A)
    rec = out.results[0]["record"]
    assert [(a["step"], a["outcome"]) for a in rec["attempts"]] == [(A, "loaded")]
    assert f"crash_loop_demoted {step_dir(ck, RUN, B)}: 2 attempts" in _rank_logs(out, 0)
    demoted = f"crash_loop_demoted: {step_dir(ck, RUN, B)}: at least 2 attempts never finished; tried last"
    assert all(demoted in out.results[r]["record"]["warnings"] for r in range(world))  # in the decision record
    assert _journal_entry(ck, A)["finished"] == 1 and _journal_entry(ck, A)["last_outcome"] == "loaded"
    assert_nothing_lost(before, committed(ck, RUN))


@pytest.mark.parametrize("world", [2, 4])
def test_F23_rank_hangs_during_load_survivors_time_out_then_crash_loop_demotes_B(tmp_path, template_root, world):
    """Rank 1 hangs inside the load of B (the whole process stuck, not just a slow read). Every
    other rank raises AgreementTimeout within the vote timeout plus a margin and exits non-zero;
    the hung rank is torn down as torchrun's agent would (it never answers). The journal records
    the unfinished attempt (reason timeout). A second start with the same fault dies the same way;
    the third start demotes B (2 unfinished attempts) and every rank loads A."""
    _crash_loop(
        tmp_path,
        template_root,
        world,
        "during_load@200:1:hang",
        hang=True,
        first_types=("AgreementTimeout",),
        within=SHORT + MARGIN,
        outcome_word="timeout",
    )


@pytest.mark.parametrize("world", [2, 4])
def test_F24_rank_crashes_during_load_peers_fail_promptly_then_crash_loop_demotes_B(tmp_path, template_root, world):
    """Rank 1 exits (os._exit(137)) while loading B. The peers raise a CoordinationError at once
    (a dead peer, not a timeout: well under the vote timeout), the journal records the attempt,
    and a restart behaves as in F23."""
    _crash_loop(
        tmp_path,
        template_root,
        world,
        "during_load@200:1:exit",
        hang=False,
        first_types=("CoordinationError",),
        within=SHORT * 0.75,
        outcome_word="peer_failed",
    )


@pytest.mark.parametrize("world", [2, 4])
def test_F25_rank_killed_before_vote_no_deadlock_then_crash_loop_demotes_B(tmp_path, template_root, world):
    """Rank 1 is SIGKILLed right before the vote on B: no deadlock, every survivor exits non-zero
    within the bound, no later collective touches the failed group, and the restart behaviour of
    F23 follows."""
    _crash_loop(
        tmp_path,
        template_root,
        world,
        "before_vote@200:1:kill",
        hang=False,
        first_types=("CoordinationError", "AgreementTimeout"),
        within=SHORT + MARGIN,
        outcome_word="peer_failed",
    )


@pytest.mark.parametrize("world", [2, 4])
def test_F25_rank_killed_inside_the_vote_all_reduce_no_deadlock(tmp_path, template_root, world):
    """Rank 1 is SIGKILLed inside ``vote_min``, just before its all-reduce, while its peers are
    already in the collective: no deadlock, every survivor raises within the bound, nothing is
    applied, and no later collective is attempted on the failed group. (This fault fires on every
    vote, whatever the candidate, so the restart loop is shown by the before_vote test.)"""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    out, reports = _start(tmp_path, world, ck, "mid_vote:1:kill", hang=False)
    _assert_survivors_failed(
        out, reports, world, types=("CoordinationError", "AgreementTimeout"), within=SHORT + MARGIN
    )
    assert out.exitcodes[1] == -9
    assert _journal_entry(ck, B)["started"] == 1 and _journal_entry(ck, B)["finished"] == 0


def test_F28_load_oom_killed_rank_peers_fail_promptly_then_crash_loop_demotes_B(tmp_path, template_root):
    """The OOM killer's form of F28: rank 1 gets SIGKILL while loading B. Peers fail promptly,
    and the journal stops the endless restart loop on B: the third start loads A."""
    _crash_loop(
        tmp_path,
        template_root,
        2,
        "during_load@200:1:kill",
        hang=False,
        first_types=("CoordinationError",),
        within=SHORT * 0.75,
        outcome_word="peer_failed",
    )


# ----------------------------------------------------------------------------- F26


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("exc", ["RuntimeError", "MemoryError", "KeyError"])
def test_F26_python_exception_during_load_is_caught_and_all_ranks_advance_to_A(tmp_path, template_root, world, exc):
    """Rank 1 raises inside the load of B: it is caught, rank 1 still joins the vote with "fail",
    every rank advances to A together, and the record and rank 0's log carry the type and message."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    action = "raise" if exc == "RuntimeError" else f"raise-{exc}"
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=60,
        env={1: {"DIST_GUARDIAN_FAULT": f"during_load@200:1:{action}"}},
        stores=[ck],
        run=RUN,
        dg_timeout=SHORT,
    )
    _assert_loaded(out, tpl, world, A)
    rec = out.results[0]["record"]
    msg = "'injected fault at during_load'" if exc == "KeyError" else "injected fault at during_load"
    assert [(a["step"], a["outcome"]) for a in rec["attempts"]] == [(B, "failed"), (A, "loaded")]
    assert rec["attempts"][0]["reasons"] == [{"rank": 1, "reason": f"{exc}: {msg}"}]
    assert f"rank 1: {exc}: {msg}" in _rank_logs(out, 0)
    assert all(_decisions(out.results[r]["record"]) == _decisions(rec) for r in range(world))
    entry = _journal_entry(ck, B)
    assert entry["started"] == entry["finished"] == 1 and entry["last_outcome"] == "failed"  # not a crash loop


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit"])
def test_F26_keyboard_interrupt_and_system_exit_are_not_swallowed(tmp_path, template_root, exc):
    """KeyboardInterrupt / SystemExit raised inside the load propagate out of resume() on that rank
    (never turned into a "fail" vote); the peer then fails promptly and nothing is applied anywhere."""
    world = 2
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    out, reports = _start(tmp_path, world, ck, f"during_load@200:1:raise-{exc}", hang=False)
    assert out.error_type(1) == exc, out.errors
    assert reports[1]["error_type"] == exc and reports[1]["unchanged"]
    assert out.error_type(0) == "CoordinationError", out.errors
    assert reports[0]["unchanged"] and reports[0]["elapsed"] < SHORT + MARGIN


# ----------------------------------------------------------------------------- F27


@pytest.mark.parametrize("world", [2, 4])
def test_F27_plan_altered_on_one_rank_after_broadcast_raises_everywhere_nothing_applied(tmp_path, template_root, world):
    """Rank 1's copy of the plan loses its first entry after the broadcast. The plan-hash check
    (MIN and MAX all-reduce of the SHA-256) raises CandidateListMismatch on every rank, before
    any data is read, and no rank's state is touched."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    rep = _report_dir(tmp_path)
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=60,
        env={1: {"DIST_GUARDIAN_FAULT": "after_broadcast:1:corrupt"}},
        stores=[ck],
        run=RUN,
        dg_timeout=SHORT,
        report_dir=rep,
        probe_after_failure=False,
    )
    _assert_all_exited(out)
    reports = _reports(rep)
    for r in range(world):
        assert out.error_type(r) == "CandidateListMismatch", out.errors
        assert "ranks hold different plans after the broadcast; nothing is applied" in reports[r]["error"]
        assert reports[r]["unchanged"]
    assert _journal_entry(ck, B) is None  # no attempt was started


# ----------------------------------------------------------------------------- F28 (allocation failure)


BLOB_MB = 320.0


def test_F28_rlimit_as_allocation_failure_on_one_rank_all_ranks_agree_to_move_on(tmp_path, template_root):
    """Rank 1 runs under RLIMIT_AS (its address space after joining the group + 200 MB: torch, gloo and the load
    thread still work), and B holds a 320 MB replicated tensor. Rank 1's allocation for B fails
    (torch raises "can't allocate memory"), the failure is caught and travels as a "fail" vote,
    rank 0 (which loaded B fine) drops it too, and every rank loads A (small): nothing applied
    from B anywhere. The process-death form of F28 (the OOM killer's SIGKILL) is
    test_F28_load_oom_killed_rank_peers_fail_promptly_then_crash_loop_demotes_B."""
    world = 2
    tpl = _template(template_root, world, steps=(A, B), blob_mb={B: BLOB_MB})
    ck = _store_with(tmp_path, tpl)
    assert os.path.getsize(os.path.join(step_dir(ck, RUN, B), "replicated.dgt")) > BLOB_MB * (1 << 20)
    out = run_ranks(_rlimit_rank, world, timeout=90, stores=[ck], run=RUN, dg_timeout=30.0)
    _assert_loaded(out, tpl, world, A)
    assert out.results[1]["limit"] is not None and out.results[0]["limit"] is None
    rec = out.results[0]["record"]
    assert [(a["step"], a["outcome"]) for a in rec["attempts"]] == [(B, "failed"), (A, "loaded")]
    reasons = rec["attempts"][0]["reasons"]
    assert [x["rank"] for x in reasons] == [1], reasons  # rank 0 loaded B; only rank 1 failed
    assert "can't allocate memory" in reasons[0]["reason"] or reasons[0]["reason"].startswith("MemoryError"), reasons
    assert _journal_entry(ck, B)["finished"] == 1  # a caught failure, not a crash loop


def _rlimit_rank(rank: int, world: int, **kw):
    return rf.resume_fixture(rank, world, rlimit_as_headroom_mb=200.0 if rank == 1 else None, **kw)


# ----------------------------------------------------------------------------- F29


@pytest.mark.parametrize("world", [2, 4])
def test_F29_failure_after_part_of_B_is_staged_no_rank_holds_a_mix(tmp_path, template_root, world):
    """Rank 1 fails after B's replicated file (model, optimizer, scheduler) is read into staging and
    before its per-rank file is read. Staging is applied only after a unanimous yes: every tensor of
    model, optimizer and scheduler, the trainer and data trees and the RNG state equal A's exactly
    on every rank, and differ from B's (no rank holds a mix of A and B)."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=60,
        env={1: {"DIST_GUARDIAN_FAULT": "load_file@200:1:raise"}},
        stores=[ck],
        run=RUN,
        dg_timeout=SHORT,
    )
    _assert_loaded(out, tpl, world, A)  # exact digests of every tensor against A's, on every rank
    rec = out.results[0]["record"]
    assert [(a["step"], a["outcome"]) for a in rec["attempts"]] == [(B, "failed"), (A, "loaded")]
    assert rec["attempts"][0]["reasons"] == [{"rank": 1, "reason": "RuntimeError: injected fault at load_file"}]
    for r in range(world):
        got, b = out.results[r]["digest"], _digest(tpl, r, B)
        for key in ("model", "optim", "sched", "trainer", "data", "__rng__"):
            assert got[key] != b[key], f"rank {r}: {key} holds B's value"


# ----------------------------------------------------------------------------- F30


@pytest.mark.parametrize("new_world", [2, 3])
def test_F30_world_size_4_to_fewer_replicated_loads_per_rank_remapped(tmp_path, template_root, new_world):
    """Saved by 4 ranks, resumed by 2 and by 3: the replicated state (model, optimizer, scheduler,
    trainer) loads on every rank; rank r takes saved rank r's per-rank state (data position and
    RNG) deterministically, and the result carries ``world_size_changed from=4 to=N``."""
    tpl = _template(template_root, 4)
    ck = _store_with(tmp_path, tpl)
    outs = [run_ranks(rf.resume_fixture, new_world, timeout=60, stores=[ck], run=RUN) for _ in range(2)]
    for out in outs:
        assert out.ok(), out.errors
        _assert_all_exited(out)
        for r in range(new_world):
            got = out.results[r]
            assert got["resumed"] and got["step"] == B and got["tier"] == "V"
            assert any(w.startswith(f"world_size_changed from=4 to={new_world}") for w in got["warnings"]), got[
                "warnings"
            ]
            # Replicated and per-rank state: exactly saved rank r's (the replicated part is the same on all 4).
            assert json.dumps(got["digest"], sort_keys=True) == _digest_json(tpl, r, B), _diff(
                got["digest"], _digest(tpl, r, B)
            )
            assert got["data"] == {"position": 100 * r + 2}
            assert got["next"] == tpl[1][r]["next"][B]
    # Deterministic: two resumes give the same per-rank assignment and the same numbers.
    assert [outs[0].results[r]["next"] for r in range(new_world)] == [
        outs[1].results[r]["next"] for r in range(new_world)
    ]


def test_F30_world_size_2_to_3_new_rank_gets_a_rederived_rng(tmp_path, template_root):
    """Saved by 2 ranks, resumed by 3: ranks 0 and 1 continue their own streams; rank 2 (new) takes
    rank 0's data position and a deterministically re-derived RNG, different from every saved one."""
    tpl = _template(template_root, 2)
    ck = _store_with(tmp_path, tpl)
    outs = [run_ranks(rf.resume_fixture, 3, timeout=60, stores=[ck], run=RUN) for _ in range(2)]
    for out in outs:
        assert out.ok(), out.errors
        assert [out.results[r]["step"] for r in range(3)] == [B] * 3
        for r in (0, 1):
            assert out.results[r]["next"] == tpl[1][r]["next"][B]
        assert out.results[2]["data"] == {"position": 2}  # rank 2 % 2 == 0: rank 0's per-rank state
        assert out.results[2]["next"] not in (tpl[1][0]["next"][B], tpl[1][1]["next"][B])
        assert any("from=2 to=3" in w and "re-derived RNG" in w for w in out.results[2]["warnings"])
    assert outs[0].results[2]["next"] == outs[1].results[2]["next"]


# ----------------------------------------------------------------------------- F11/F12 multi-rank form


@pytest.mark.parametrize("world", [2, 4])
def test_F11_F12_multirank_save_one_rank_fails_to_write_every_rank_abandons(tmp_path, template_root, world):
    """Rank 1's write of step 300 fails half-way (OSError EIO at mid_data_write). Every rank learns
    it and abandons the save (SaveResult.committed False, the same reason on every rank), the
    staging dir is removed, no step 300 exists, A and B are untouched, and a resume still loads B."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    before = committed(ck, RUN)
    out = run_ranks(
        _resume_then_save, world, timeout=60, stores=[ck], run=RUN, step=C, fault={C: "mid_data_write:1:raise-OSError"}
    )
    assert out.ok(), out.errors
    _assert_all_exited(out)
    reasons = {out.results[r]["reasons"][C] for r in range(world)}
    assert [out.results[r]["committed"][C] for r in range(world)] == [False] * world
    assert len(reasons) == 1
    reason = reasons.pop()
    assert reason.startswith("rank 1: save_failed errno=EIO: OSError: [Errno 5] injected fault at mid_data_write"), (
        reason
    )
    assert "save of step 300 abandoned on every rank; previous checkpoints untouched" in "\n".join(
        out.results[0]["logs"]
    )
    names = os.listdir(os.path.join(ck, RUN))
    assert not [n for n in names if n.startswith(".staging-")], names
    assert committed(ck, RUN) == before
    back = run_ranks(rf.resume_fixture, world, timeout=60, stores=[ck], run=RUN)
    assert back.ok(), back.errors
    assert {back.results[r]["step"] for r in range(world)} == {B}


def _resume_then_save(rank: int, world: int, *, stores, run, step, fault):
    return rf.save_fixture(rank, world, stores=stores, run=run, steps=[step], fault=fault)


# ----------------------------------------------------------------------------- F33


def _corrupt_beyond_checks(ck: str, step: int) -> None:
    """Flip an exponent bit in the replicated file: sizes stay right (the plan keeps it as V), the
    checksum then fails while loading (suspect) and so does the sanity gate (max|x| way over 10x)."""
    flip_bit_in_tensor(os.path.join(step_dir(ck, RUN, step), "replicated.dgt"))


@pytest.mark.parametrize("world", [2, 4])
def test_F33_all_candidates_corrupt_all_stores_reachable_fresh_start_loudly_and_kept(tmp_path, template_root, world):
    """A and B are corrupt beyond the sanity checks; every store answers. Every candidate is tried
    in order on every rank, then the default on_exhausted="fresh" starts fresh LOUDLY (an ERROR
    naming every candidate's reason), ``resumed`` is False, ``attempts`` lists both, the state is
    untouched, and both failed candidates survive retention (keep_last=2 over three new saves)."""
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    for s in (A, B):
        _corrupt_beyond_checks(ck, s)
    before = committed(ck, RUN)
    out = run_ranks(rf.resume_then_save, world, timeout=60, stores=[ck], run=RUN, steps=[300, 400, 500], keep_last=2)
    assert out.ok(), out.errors
    _assert_all_exited(out)
    for r in range(world):
        got = out.results[r]
        assert got["resumed"] is False and got["unchanged"]
        assert [(a["step"], a["outcome"]) for a in got["record"]["attempts"]] == [(B, "failed"), (A, "failed")]
        for a in got["record"]["attempts"]:
            assert sorted(x["rank"] for x in a["reasons"]) == list(range(world))
            assert all("sanity_gate_failed" in x["reason"] for x in a["reasons"]), a["reasons"]
        assert got["committed"] == [True, True, True]
    errors = [line for line in out.results[0]["logs"] if line.startswith("ERROR")]
    assert len(errors) == 1 and "starting FRESH: every candidate failed for a lasting reason; all are kept" in errors[0]
    assert step_dir(ck, RUN, A) in errors[0] and step_dir(ck, RUN, B) in errors[0]
    # Retention ran after each save (keep_last=2) and never deleted a failed candidate.
    after = committed(ck, RUN)
    assert_nothing_lost(before, after)
    assert {"step-000000000400", "step-000000000500"} <= set(after)


def test_F33_all_candidates_fail_and_a_store_is_unreachable_raises_ResumeFailed(tmp_path, template_root):
    """A and B are corrupt, and the second store (S3 at 127.0.0.1:9, nothing listening) cannot be
    listed: the failure may be transient, so every rank raises ResumeFailed instead of starting
    fresh (torchrun retries later), and the state is untouched."""
    world = 2
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    for s in (A, B):
        _corrupt_beyond_checks(ck, s)
    dead = {
        "s3://dg-unreachable": {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
            "config_kwargs": {
                "connect_timeout": 1,
                "read_timeout": 1,
                "retries": {"max_attempts": 1, "mode": "standard"},
            },
            "retries": 0,
            "deadline_s": 4.0,
        }
    }
    rep = _report_dir(tmp_path)
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=60,
        stores=[ck, "s3://dg-unreachable/ck"],
        run=RUN,
        storage_options=dead,
        report_dir=rep,
    )
    _assert_all_exited(out)
    reports = _reports(rep)
    for r in range(world):
        assert out.error_type(r) == "ResumeFailed", out.errors
        assert (
            "a store was unreachable or an attempt timed out (maybe transient); not starting fresh"
            in reports[r]["error"]
        )
        assert "store s3://dg-unreachable/ck: unreachable" in reports[r]["error"]
        assert reports[r]["unchanged"]


def test_F33_all_candidates_fail_one_by_attempt_timeout_raises_ResumeFailed(tmp_path, template_root):
    """A is corrupt; B's load on rank 1 outlives its attempt deadline (0.8 x timeout): that rank
    votes fail with a timeout, which may be transient, so after A fails too every rank raises
    ResumeFailed rather than starting fresh."""
    world = 2
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    _corrupt_beyond_checks(ck, A)
    rep = _report_dir(tmp_path)
    out = run_ranks(
        rf.resume_fixture,
        world,
        timeout=60,
        env={1: {"DIST_GUARDIAN_FAULT": "load_file@200:1:sleep-12"}},
        stores=[ck],
        run=RUN,
        dg_timeout=6.0,
        report_dir=rep,
    )
    _assert_all_exited(out)
    reports = _reports(rep)
    for r in range(world):
        assert out.error_type(r) == "ResumeFailed", out.errors
        assert "not starting fresh" in reports[r]["error"]
        assert "rank 1: TimeoutError: timeout: the load did not finish within 4.8s" in reports[r]["error"]
        assert reports[r]["unchanged"]


def test_F33_on_exhausted_raise_always_raises(tmp_path, template_root):
    """on_exhausted="raise": every candidate failing for lasting reasons raises ResumeFailed on every rank."""
    world = 2
    tpl = _template(template_root, world)
    ck = _store_with(tmp_path, tpl)
    for s in (A, B):
        _corrupt_beyond_checks(ck, s)
    before = committed(ck, RUN)
    rep = _report_dir(tmp_path)
    out = run_ranks(rf.resume_fixture, world, timeout=60, stores=[ck], run=RUN, on_exhausted="raise", report_dir=rep)
    _assert_all_exited(out)
    reports = _reports(rep)
    for r in range(world):
        assert out.error_type(r) == "ResumeFailed", out.errors
        assert "every candidate failed and on_exhausted='raise'" in reports[r]["error"]
        assert step_dir(ck, RUN, A) in reports[r]["error"] and step_dir(ck, RUN, B) in reports[r]["error"]
        assert reports[r]["unchanged"]
    assert_nothing_lost(before, committed(ck, RUN))


# ----------------------------------------------------------------------------- F38, F39


def _full_verify(root: str, rel: str) -> tuple[str, list[str]]:
    from dist_guardian import stores, verify

    return verify.verify_full(stores.resolve(root), rel)


def _manifest_of(path: str) -> manifest.Manifest:
    with open(os.path.join(path, manifest.MANIFEST_NAME), "rb") as f:
        return manifest.parse(f.read())


@pytest.mark.parametrize("late", [0, 1])
def test_F38_two_writers_same_step_same_root_exactly_one_commit_wins(tmp_path, template_root, late):
    """Two independent jobs save step 300 into the same local root at once; one of them reaches
    its rename while the other's complete staging dir is still there (a 1.5 s delay at
    after_manifest_before_rename on one of them). Exactly one commit wins; the loser's rename fails, it reports
    ``commit_conflict`` (SaveResult.committed False) and deletes its staging; the committed
    checkpoint is entirely the winner's (full checksum verification, writer pid, exact state)."""
    tpl = _template(template_root, 2)
    ck = _store_with(tmp_path, tpl)
    before = committed(ck, RUN)
    out = run_ranks(
        rf.independent_writer,
        2,
        timeout=60,
        root=ck,
        run=RUN,
        step=C,
        role={0: "writer", 1: "writer"},
        fault={late: "after_manifest_before_rename:0:sleep-1.5"},
    )
    assert out.ok(), out.errors
    _assert_all_exited(out)
    wins = [r for r in range(2) if out.results[r]["committed"]]
    assert len(wins) == 1, [out.results[r]["reason"] for r in range(2)]
    w, lo = out.results[wins[0]], out.results[1 - wins[0]]
    assert w["path"] == step_dir(ck, RUN, C)
    assert lo["committed"] is False and lo["path"] is None
    assert "commit_conflict" in lo["reason"], lo["reason"]
    assert any("commit_conflict" in line for line in lo["logs"])
    names = os.listdir(os.path.join(ck, RUN))
    assert not [n for n in names if n.startswith(".staging-")], names
    assert sorted(n for n in names if n.startswith("step-")) == [
        "step-000000000100",
        "step-000000000200",
        "step-000000000300",
    ]
    tier, reasons = _full_verify(ck, f"{RUN}/step-000000000300")
    assert tier == "V", reasons
    assert _manifest_of(step_dir(ck, RUN, C)).writer["pid"] == w["pid"]
    assert_nothing_lost(before, committed(ck, RUN))
    # The committed state is exactly the winner's (world size 1 writer, so resume at world size 1).
    back = run_ranks(rf.resume_fixture, 1, timeout=60, stores=[ck], run=RUN)
    assert back.ok(), back.errors
    assert back.results[0]["step"] == C
    assert json.dumps(back.results[0]["digest"], sort_keys=True) == json.dumps(w["digest"], sort_keys=True)


def test_F39_zombie_writer_of_old_generation_commits_after_new_incarnation(tmp_path, template_root):
    """An old incarnation (generation 1) is saving step 300 and its commit is delayed (6 s at
    after_manifest_before_rename); meanwhile the new incarnation starts, resumes B (so it is
    generation 2) and commits step 300. When the zombie's commit lands it does not overwrite:
    it lands beside it as step-300-g1 with its lower generation, and a resume prefers the new
    lineage's checkpoint at the equal step."""
    tpl = _template(template_root, 2)
    ck = _store_with(tmp_path, tpl)
    out = run_ranks(
        rf.independent_writer,
        2,
        timeout=60,
        root=ck,
        run=RUN,
        step=C,
        role={0: "zombie", 1: "new"},
        fault={0: "after_manifest_before_rename:0:sleep-6"},
        wait_for_staging_s=10.0,
    )
    assert out.ok(), out.errors
    _assert_all_exited(out)
    zombie, new = out.results[0], out.results[1]
    assert new["saw_zombie_staging"] and new["resumed_step"] == B and new["generation"] == 2
    assert zombie["generation"] == 1
    assert new["commit_time"] < zombie["commit_time"]  # the scenario really happened in this order
    assert new["committed"] and new["path"] == step_dir(ck, RUN, C)
    assert zombie["committed"] and zombie["path"] == step_dir(ck, RUN, C) + "-g1"
    assert any("lineage_fork step=300" in line for line in zombie["logs"])
    # Nothing overwritten: the new lineage's checkpoint is intact and still its own.
    mf = _manifest_of(step_dir(ck, RUN, C))
    assert mf.generation == 2 and mf.writer["pid"] == new["pid"]
    assert _manifest_of(step_dir(ck, RUN, C) + "-g1").generation == 1
    for rel in ("step-000000000300", "step-000000000300-g1"):
        assert _full_verify(ck, f"{RUN}/{rel}")[0] == "V"
    # At equal step the new lineage wins, and its state is exactly the new incarnation's.
    back = run_ranks(rf.resume_fixture, 1, timeout=60, stores=[ck], run=RUN)
    assert back.ok(), back.errors
    assert back.results[0]["path"] == step_dir(ck, RUN, C)
    assert json.dumps(back.results[0]["digest"], sort_keys=True) == json.dumps(new["digest"], sort_keys=True)


def test_F38_two_writers_same_step_same_s3_prefix_exactly_one_commit_wins(tmp_path, s3):
    """The same race with an S3 primary (moto server): both jobs try to claim and commit step 300
    under one prefix at once (one delayed 1.5 s before its manifest PUT). Exactly one commit wins,
    the other reports commit_conflict, and the committed checkpoint verifies fully and holds
    exactly the winner's state: no object of the loser under it."""
    opts = s3.storage_options()
    out = run_ranks(
        rf.independent_writer,
        2,
        timeout=60,
        root=s3.url,
        run=RUN,
        step=C,
        storage_options=opts,
        role={0: "writer", 1: "writer"},
        fault={1: "before_s3_manifest:0:sleep-1.5"},
    )
    assert out.ok(), out.errors
    _assert_all_exited(out)
    wins = [r for r in range(2) if out.results[r]["committed"]]
    assert len(wins) == 1, [out.results[r]["reason"] for r in range(2)]
    w, lo = out.results[wins[0]], out.results[1 - wins[0]]
    assert "commit_conflict" in lo["reason"], lo["reason"]
    keys = s3.keys("ckpt/")
    assert [k for k in keys if k.endswith(manifest.MANIFEST_NAME)] == [
        f"ckpt/{RUN}/step-000000000300/{manifest.MANIFEST_NAME}"
    ]
    from dist_guardian import stores as dg_stores
    from dist_guardian import verify

    store = dg_stores.resolve(s3.url, 0, opts)
    tier, reasons = verify.verify_full(store, f"{RUN}/step-000000000300")
    assert tier == "V", reasons
    mbytes = dg_stores.read_small(
        store, f"{RUN}/step-000000000300/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES
    )
    assert manifest.parse(mbytes).writer["pid"] == w["pid"]
    back = run_ranks(rf.resume_fixture, 1, timeout=60, stores=[s3.url], run=RUN, storage_options=opts)
    assert back.ok(), back.errors
    assert back.results[0]["step"] == C
    assert json.dumps(back.results[0]["digest"], sort_keys=True) == json.dumps(w["digest"], sort_keys=True)


# ----------------------------------------------------------------------------- NCCL default group


def _round_trip(tmp_path, backend: str, device_kind: str) -> None:
    root = str(tmp_path / "ck")
    saved = run_ranks_backend(
        rf.round_trip_on_device, 2, backend, phase="save", root=root, run=RUN, device_kind=device_kind
    )
    assert saved.ok(), saved.errors
    assert all(saved.results[r]["committed"] == [True, True] for r in range(2))
    back = run_ranks_backend(
        rf.round_trip_on_device, 2, backend, phase="resume", root=root, run=RUN, device_kind=device_kind
    )
    assert back.ok(), back.errors
    _assert_all_exited(back)
    for r in range(2):
        got = back.results[r]
        assert got["resumed"] and got["step"] == 20
        assert json.dumps(got["digest"], sort_keys=True) == json.dumps(saved.results[r]["digest"], sort_keys=True)
        assert got["next"] == saved.results[r]["next"]  # CPU and (on GPUs) CUDA streams continue exactly
        assert got["param_device"] == (f"cuda:{r}" if device_kind == "cuda" else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_default_group_multirank_save_resume_round_trip(tmp_path):
    """The 2-rank save + resume round trip with NCCL as the default group and the model on the GPUs:
    dist_guardian coordinates on its own gloo group; every tensor (on the GPU) and the per-rank CPU
    and CUDA RNG streams come back exactly, and NCCL collectives keep working after the resume."""
    _round_trip(tmp_path, "nccl", "cuda")
