"""T04: no hang and no quadratic or unbounded work in the resume path, whatever a store holds.

Real files and real processes throughout: FIFOs where helper files are written, thousands
of small foreign files, a manifest naming 20,000 files.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import stat
import threading
import time

import helpers
import pytest
import repo_paths
import torch
from helpers import make_state, same, snapshot

from dist_guardian import Guardian, cli, coordinator, journal, manifest, planning, stores
from dist_guardian.errors import AttemptCapReached, InsecurePathError

RUN = "r"
PKG = pathlib.Path(repo_paths.PACKAGE_DIR)


def _save_b(root: str) -> dict:
    """One committed checkpoint (step 200) in ``root``; returns its snapshot."""
    state = make_state(seed=0)
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=200).committed
    g.close()
    return snapshot(state)


def _resume(root: str, **kw):
    state = make_state(seed=42)
    g = Guardian(stores=[root], run=RUN, **kw)
    try:
        return g.resume(state), state
    finally:
        g.close()


def _journal_path(root: str, step: int) -> str:
    plan = planning.make_plan(
        planning.resolve_stores([root], None)[0],
        planning.PlanRequest(run=RUN, suspect="after_same_step", use_journal=False),
    )
    (c,) = [c for c in plan.candidates if c.step == step]
    return os.path.join(root, journal._rel(RUN, c))


# ----------------------------------------------------------------------------- (a) FIFOs where we write


def test_T04_fifo_at_the_journal_entry_is_left_untouched_and_resume_is_prompt(tmp_path, caplog):
    root = str(tmp_path / "ck")
    snap = _save_b(root)
    entry = _journal_path(root, 200)
    os.makedirs(os.path.dirname(entry))
    os.mkfifo(entry)
    caplog.set_level(logging.WARNING, logger="dist_guardian")
    t0 = time.monotonic()
    r, state = _resume(root, timeout=30.0)
    assert time.monotonic() - t0 < 10.0
    assert r.resumed and r.step == 200 and same(snapshot(state), snap)
    assert stat.S_ISFIFO(os.lstat(entry).st_mode)  # never replaced, never opened for writing
    assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]  # no temporary left behind
    writes = [rec.getMessage() for rec in caplog.records if "could not write the resume journal" in rec.getMessage()]
    assert writes and all(f"{entry} is not a regular file (mode prw" in m and "left as it is" in m for m in writes)


def test_T04_fifo_at_the_old_journal_temporary_name_does_not_hang_resume(tmp_path):
    # The journal used to write "<entry>.<pid>.tmp" with O_TRUNC and no O_NONBLOCK: a FIFO there blocked forever.
    root = str(tmp_path / "ck")
    _save_b(root)
    entry = _journal_path(root, 200)
    os.makedirs(os.path.dirname(entry))
    fifo = f"{entry}.{os.getpid()}.tmp"
    os.mkfifo(fifo)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=_resume(root, timeout=30.0)[0]), daemon=True)
    t.start()
    t.join(15.0)
    hung = t.is_alive()
    if hung:  # release the blocked writer so the thread ends
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        t.join(15.0)
    assert not hung, "resume blocked on a FIFO in the journal directory"
    assert out["r"].step == 200
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("write", ["create_exclusive", "write_new_file", "replace_file", "put_bytes_exclusive"])
def test_T04_every_local_write_refuses_a_fifo_without_blocking(tmp_path, write):
    (tmp_path / "d").mkdir()
    path = str(tmp_path / "d" / "x.json")
    os.mkfifo(path)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        if write == "create_exclusive":
            os.close(stores.create_exclusive(path))
        elif write == "put_bytes_exclusive":
            stores.put_bytes_exclusive(stores.resolve(str(tmp_path)), "d/x.json", b"{}")
        else:
            getattr(stores, write)(path, b"{}")
    assert time.monotonic() - t0 < 2.0
    assert isinstance(ei.value, FileExistsError if write != "replace_file" else InsecurePathError)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and os.listdir(tmp_path / "d") == ["x.json"]


def test_T04_every_open_in_the_package_goes_through_the_safe_helpers():
    """No builtin open() and no os.open() outside the two checked helpers of ``stores`` (a sweep of the source)."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        mod = ".".join(path.relative_to(PKG).with_suffix("").parts)
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if isinstance(f, ast.Name) and f.id == "open":
                    found.append((mod, fn.name, "open"))
                elif isinstance(f, ast.Attribute) and f.attr == "open" and ast.unparse(f.value) == "os":
                    found.append((mod, fn.name, "os.open"))
    assert sorted(set(found)) == [
        ("stores.local", "_open_checked", "os.open"),
        ("stores.local", "fsync_dir", "os.open"),
    ]


# ----------------------------------------------------------------------------- (b) foreign files are paged


def test_T04_foreign_files_are_verified_a_page_at_a_time(tmp_path, caplog):
    root = str(tmp_path / "ck")
    snap = _save_b(root)
    n = 400
    for i in range(n):  # not zips: each is opened and sniffed, then rejected
        with open(os.path.join(root, RUN, f"dump-step-{1000 + i}.pt"), "wb") as f:
            f.write(b"not a torch file")
    for i in range(n // 4):  # no step in the name: after the named ones
        with open(os.path.join(root, RUN, f"junk-{chr(97 + i // 26)}{chr(97 + i % 26)}.pt"), "wb") as f:
            f.write(b"not a torch file")
    store_list, _ = planning.resolve_stores([root], None)
    cur = planning.PlanCursor(store_list, planning.PlanRequest(run=RUN, suspect="after_same_step", use_journal=False))
    first = cur.next_page()
    assert len(first.rejected) == planning.PAGE_FOREIGN and first.more
    assert [c.step for c in first.candidates] == [200]
    assert sorted(p.rsplit("-", 1)[1] for p, _ in first.rejected)[-1] == f"{1000 + n - 1}.pt"  # newest names first
    caplog.set_level(logging.INFO, logger="dist_guardian")
    r, state = _resume(root)
    assert r.step == 200 and same(snapshot(state), snap)
    assert len(r.rejected) == planning.PAGE_FOREIGN
    sniffed = [rec for rec in caplog.records if rec.getMessage().startswith("candidate_rejected")]
    assert len(sniffed) == planning.PAGE_FOREIGN
    # `ls` still shows everything.
    full = planning.make_plan(
        store_list, planning.PlanRequest(run=RUN, suspect="after_same_step", use_journal=False), include_rejected=True
    )
    assert len(full.listing) == 1 + n + n // 4


# ----------------------------------------------------------------------------- (c) attempts are capped


def test_T04_attempts_are_capped_and_never_start_fresh_with_candidates_left(tmp_path):
    root = str(tmp_path / "ck")
    os.makedirs(os.path.join(root, RUN))
    src = str(tmp_path / "one.bin")
    torch.save({"not_the_model": torch.zeros(2)}, src)  # sniffs clean (tier L), fails to map onto the state
    data = pathlib.Path(src).read_bytes()
    n = coordinator.MAX_ATTEMPTS + 16
    for i in range(n):
        pathlib.Path(root, RUN, f"dump_{i:04d}.bin").write_bytes(data)
    with pytest.raises(AttemptCapReached) as ei:
        _resume(root, timeout=60.0)
    assert ei.value.tried == coordinator.MAX_ATTEMPTS and ei.value.untried >= 1
    assert str(ei.value).startswith(f"attempt_cap_reached: {coordinator.MAX_ATTEMPTS} candidates failed to load")
    assert len(os.listdir(os.path.join(root, RUN, journal.JOURNAL_DIR))) == coordinator.MAX_ATTEMPTS
    assert len(os.listdir(os.path.join(root, RUN))) == n + 1  # nothing deleted


def test_T04_attempt_cap_stops_every_rank_together(tmp_path):
    from dg_harness import run_ranks
    from rank_fns import resume_state

    root = str(tmp_path / "ck")
    os.makedirs(os.path.join(root, RUN))
    src = str(tmp_path / "one.bin")
    torch.save({"not_the_model": torch.zeros(2)}, src)
    data = pathlib.Path(src).read_bytes()
    for i in range(coordinator.MAX_ATTEMPTS + 1):
        pathlib.Path(root, RUN, f"dump_{i:04d}.bin").write_bytes(data)
    out = run_ranks(resume_state, 2, timeout=90, stores=[root], run=RUN)
    for r in range(2):
        assert out.error_type(r) == "AttemptCapReached", out.errors
        assert "at least 1 remain untried; not starting fresh" in out.errors[r], out.errors[r]


# ----------------------------------------------------------------------------- (d) one manifest, many files


def test_T04_ls_of_a_20k_file_manifest_is_linear(tmp_path, capsys):
    n = 20_000
    d = helpers.step_dir(str(tmp_path), RUN, 100)
    os.makedirs(d)
    files = []
    for i in range(n):
        name = f"rank-{i:05d}-of-{n:05d}.dgt"
        open(os.path.join(d, name), "wb").close()
        files.append(manifest.FileEntry(name=name, size=1, digest="0" * 32, rank=i))
    data = manifest.build(
        manifest.ManifestDraft(
            run=RUN,
            step=100,
            generation=1,
            world_size=n,
            created_unix=time.time(),
            compat={},
            metrics={},
            files=files,
            tensors={},
            torch_version="x",
            writer={},
        )
    )
    pathlib.Path(d, manifest.MANIFEST_NAME).write_bytes(data)
    t0 = time.perf_counter()
    rc = cli.main(["ls", str(tmp_path), "--run", RUN])
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    # Every file is checked (each is 0 bytes, the manifest says 1), and the whole listing is linear:
    # a scan of the directory's children per manifest file took 6 s here (O(files^2)).
    assert rc == 1 and f"empty: rank-{n - 1:05d}-of-{n:05d}.dgt is 0 bytes" in out
    assert took < 3.0, f"ls of a {n}-file manifest took {took:.1f}s"
