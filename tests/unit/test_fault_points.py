"""The test-only fault hook itself: every point is registered, a bad rule fails at start-up, armed rules warn."""

from __future__ import annotations

import ast
import glob
import logging
import os

import pytest
import repo_paths

from dist_guardian import Guardian, _faults

PKG = repo_paths.PACKAGE_DIR


def _call_site_points() -> set[str]:
    """Literal point names at every ``_faults.hit("...")`` and ``hook("...")`` call in the package."""
    found: set[str] = set()
    for path in glob.glob(os.path.join(PKG, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            first = node.args[0]
            if name in ("hit", "hook") and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def test_every_fault_point_at_a_call_site_is_registered_and_every_registered_one_is_used():
    assert _call_site_points() == set(_faults.POINTS)


@pytest.mark.parametrize(
    "rule",
    [
        "during_laod:1:hang",  # a typo in the point
        "during_load:1:hang-forever",  # an unknown action
        "during_load:one:hang",  # a bad rank
        "during_load@x:1:hang",  # a bad step
        "during_load:1",  # a missing field
        "during_load:1:sleep-soon",
    ],
)
def test_a_bad_rule_is_a_clear_error_at_start_up(rule, monkeypatch, tmp_path):
    import dist_guardian

    monkeypatch.setenv(_faults.ENV, rule)
    with pytest.raises(ValueError, match=_faults.ENV):
        Guardian(stores=[str(tmp_path / "ck")], run="r")
    with pytest.raises(ValueError, match=_faults.ENV):
        dist_guardian.resume(lambda c, s: None, [str(tmp_path / "ck")], run="r")


def test_armed_rules_warn_once_per_process(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(_faults, "_warned", False)
    monkeypatch.setattr(_faults, "_cache", None)
    monkeypatch.setenv(_faults.ENV, "during_load@5:1:hang")
    caplog.set_level(logging.WARNING, logger="dist_guardian")
    for _ in range(3):
        Guardian(stores=[str(tmp_path / "ck")], run="r")
    msgs = [r.getMessage() for r in caplog.records if "fault injection is armed" in r.getMessage()]
    assert len(msgs) == 1 and "during_load@5:1:hang" in msgs[0]
