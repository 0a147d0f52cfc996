"""Trust round two, the argument and snapshot findings (T06, T07, T09): a save is a snapshot, a typo is a
ConfigError before any collective, and what save accepts resume accepts."""

from __future__ import annotations

import helpers
import numpy as np
import torch

from dist_guardian import Guardian


def test_T06_async_save_snapshots_numpy_arrays_nested_lists_and_metrics(tmp_path, monkeypatch):
    """Every mutable leaf is copied before ``save(blocking=False)`` returns, not only tensors."""
    monkeypatch.setenv("DIST_GUARDIAN_FAULT", "before_data_write:*:sleep-0.5")  # the writer starts late
    state = helpers.make_state(seed=3)
    arr = np.arange(6, dtype=np.float64)
    state["data"] = {"order": arr, "history": [[1, 2], [3]], "nested": {"seen": [0]}}
    metrics = {"losses": [0.5, 0.25]}
    g = Guardian(stores=[str(tmp_path / "ck")], run="r")
    fut = g.save(state, step=5, metrics=metrics, blocking=False)
    arr[:] = -1.0  # training goes on and changes everything in place, right away
    state["data"]["history"][0].append(99)
    state["data"]["nested"]["seen"][0] = 7
    metrics["losses"].append(9.0)
    res = fut.result(timeout=60)
    assert res.committed
    g.close()
    fresh = helpers.make_state(seed=9)
    fresh["data"] = {"order": np.zeros(6), "history": [], "nested": {"seen": [5]}}
    r = Guardian(stores=[str(tmp_path / "ck")], run="r").resume(fresh)
    assert r.step == 5
    got = fresh["data"]
    assert torch.equal(torch.as_tensor(got["order"]), torch.arange(6, dtype=torch.float64))
    assert got["history"] == [[1, 2], [3]] and got["nested"] == {"seen": [0]}
    from dist_guardian import manifest

    mf_path = next((tmp_path / "ck" / "r").glob("step-*")) / manifest.MANIFEST_NAME
    assert manifest.parse(mf_path.read_bytes()).metrics == {"losses": [0.5, 0.25]}


CLI_COMMANDS = (["ls"], ["plan"], ["prune", "--keep-last", "2"], ["bench", "--size-mb", "1", "--runs", "1"])


def _cli(*argv: str, cwd: str) -> tuple[int, str]:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "dist_guardian.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    return p.returncode, p.stdout + p.stderr


def test_T07_unknown_scheme_is_a_clear_usage_error_in_every_cli_command(tmp_path):
    from dist_guardian.cli import EXIT_USAGE

    for cmd in CLI_COMMANDS:
        rc, out = _cli(*cmd, "bogus://bucket/runs", cwd=str(tmp_path))
        assert rc == EXIT_USAGE, (cmd, out)
        assert "Traceback" not in out and "unknown URL scheme 'bogus'" in out, (cmd, out)
    rc, out = _cli("verify", "bogus://bucket/runs/r/step-000000000001", cwd=str(tmp_path))
    assert rc == EXIT_USAGE and "Traceback" not in out and "unknown URL scheme 'bogus'" in out, out


def test_T07_unknown_scheme_is_a_config_error_before_any_collective(tmp_path):
    """As a secondary store it used to make resume raise ResumeFailed, which launchers retry forever."""
    import pytest

    import dist_guardian
    from dist_guardian import ConfigError

    with pytest.raises(ConfigError, match="unknown URL scheme 'bogus'"):
        Guardian(stores=[str(tmp_path / "ck"), "bogus://bucket/runs"], run="r")
    with pytest.raises(ConfigError, match="unknown URL scheme 'bogus'"):
        dist_guardian.resume(lambda c, s: None, [str(tmp_path / "ck"), "bogus://x"], run="r")
    assert not (tmp_path / "ck").exists()  # nothing was created before the error


def test_T07_names_ending_in_a_newline_are_not_plain_names(tmp_path):
    import pytest

    from dist_guardian import ConfigError, manifest, stores

    for bad in ("r\n", "run-1\n", "tmp\n"):
        with pytest.raises(ConfigError, match="not a plain name"):
            Guardian(stores=[str(tmp_path / "ck")], run=bad)
        with pytest.raises(ConfigError):
            stores.resolve(f"tmp://{bad}")
        assert manifest.RUN_NAME_RE.match(bad) is None and manifest.FILE_NAME_RE.match(bad) is None
        assert stores.STAGING_RE.match(".staging-step-1-0123abcd\n") is None
    rc, out = _cli("ls", str(tmp_path / "ck"), "--run", "r\n", cwd=str(tmp_path))
    assert rc == 2 and "not a plain name" in out
    assert not any(p.name.endswith("\n") for p in tmp_path.rglob("*"))


def test_T09_save_refuses_a_symlinked_run_dir_that_resume_would_refuse(tmp_path):
    """``ln -s /big/disk/run run``: save used to commit through the link and every resume refused it."""
    import os

    target = tmp_path / "big" / "r"
    target.mkdir(parents=True)
    store = tmp_path / "ck"
    store.mkdir()
    os.symlink(str(target), str(store / "r"))
    state = helpers.make_state(seed=1)
    g = Guardian(stores=[str(store)], run="r")
    res = g.save(state, step=1)
    g.close()
    assert not res.committed and "run_dir_symlink" in (res.reason or ""), res
    assert os.listdir(target) == []  # nothing committed that no resume could load
    # A symlinked store root is followed, so linking the store instead works end to end.
    os.symlink(str(tmp_path / "big"), str(tmp_path / "linked"))
    g = Guardian(stores=[str(tmp_path / "linked")], run="r")
    assert g.save(state, step=2).committed
    g.close()
    fresh = helpers.make_state(seed=5)
    r = Guardian(stores=[str(tmp_path / "linked")], run="r").resume(fresh)
    assert r.resumed and r.step == 2


def test_flat_storage_options_are_a_clear_error_not_silently_dropped(tmp_path):
    import pytest

    from dist_guardian import ConfigError
    from dist_guardian.cli import main

    ck = str(tmp_path / "ck")
    for flat in (
        {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}},
        {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}},
        ["s3://b"],
    ):
        with pytest.raises(ConfigError, match="storage_options"):
            Guardian(stores=[ck, "s3://bucket/runs"], run="r", storage_options=flat)  # type: ignore[arg-type]
    Guardian(stores=[ck, "s3://bucket/runs"], run="r", storage_options={"s3://bucket": {"anon": True}})
    assert main(["ls", ck, "--storage-options", '{"anon": true}']) == 2
