"""config: every Guardian knob checked once, when the Guardian is built; exact messages, naming the argument."""

from __future__ import annotations

import logging
import re

import pytest

from dist_guardian import ConfigError, Guardian
from dist_guardian.config import GuardianConfig, ResumeConfig, guardian_config


def _build(tmp_path, **options):
    return guardian_config([str(tmp_path / "ck")], "r", options)


def _raises(tmp_path, message: str, **options) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _build(tmp_path, **options)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Guardian(stores=[str(tmp_path / "ck")], run="r", **options)


def test_negative_save_failures_is_refused(tmp_path):
    _raises(
        tmp_path,
        "save_failures=-5 must be a non-negative integer (failed saves in a row tolerated before one raises)",
        save_failures=-5,
    )


def test_non_integer_save_failures_is_refused(tmp_path):
    _raises(
        tmp_path,
        "save_failures=True must be a non-negative integer (failed saves in a row tolerated before one raises)",
        save_failures=True,
    )


def test_remote_concurrency_that_is_not_a_positive_integer_is_refused(tmp_path):
    for bad in ("many", 0):
        _raises(
            tmp_path,
            f"remote_concurrency={bad!r} must be None (the store decides) or a positive integer",
            remote_concurrency=bad,
        )


def test_negative_mirror_timeout_is_refused(tmp_path):
    _raises(tmp_path, "mirror_timeout=-1 must be a non-negative number of seconds", mirror_timeout=-1)


def test_timeout_that_is_not_positive_is_refused(tmp_path):
    _raises(tmp_path, "timeout=0 must be a positive number of seconds", timeout=0)


def test_keep_last_below_one_is_refused_and_one_is_raised_to_two(tmp_path, caplog):
    _raises(tmp_path, "keep_last=0 must be None or a positive integer", keep_last=0)
    with caplog.at_level(logging.WARNING, logger="dist_guardian.config"):
        assert _build(tmp_path, keep_last=1).keep_last == 2
    assert "keep_last=1 raised to 2" in caplog.text


def test_flags_that_are_not_booleans_are_refused(tmp_path):
    _raises(tmp_path, "rng='yes' must be True or False", rng="yes")
    _raises(tmp_path, "repair=1 must be True or False", repair=1)
    _raises(tmp_path, "progress='auto' must be None (only on a TTY), True or False", progress="auto")


def test_on_exhausted_and_suspect_name_their_values(tmp_path):
    _raises(tmp_path, "on_exhausted='retry': use 'fresh' or 'raise'", on_exhausted="retry")
    with pytest.raises(ConfigError, match=r"^suspect='maybe' is not a policy; use one of "):
        _build(tmp_path, suspect="maybe")


def test_key_lists_must_be_lists_of_names(tmp_path):
    _raises(
        tmp_path, "per_rank='data' must be a list (or other iterable) of names, not a single value", per_rank="data"
    )
    _raises(tmp_path, "required must hold state keys (strings); got 3", required=["model", 3])


def test_foreign_loader_must_be_callable(tmp_path):
    _raises(tmp_path, "foreign_loader=42 must be None or a function (obj, state) -> dict", foreign_loader=42)


def test_compat_must_be_json_able(tmp_path):
    with pytest.raises(ConfigError, match=r"^compat must be JSON-able: "):
        _build(tmp_path, compat={"model": object()})


def test_an_unknown_keyword_names_the_allowed_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^Guardian\(\) got unknown keyword\(s\) 'keep_lst'; use: stores, run, compat, "
    ):
        Guardian(stores=[str(tmp_path / "ck")], run="r", keep_lst=3)


def test_empty_stores_and_bad_run_names_are_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^stores is empty: give at least one store, e\.g\. stores=\['checkpoints/'\]$"
    ):
        Guardian(stores=[], run="r")
    with pytest.raises(ConfigError, match=r"^run='a/b' is not a plain name \(letters, digits, '\.', '_', '-'\)$"):
        Guardian(stores=[str(tmp_path / "ck")], run="a/b")


def test_defaults_build_frozen_values(tmp_path):
    cfg = _build(tmp_path)
    assert isinstance(cfg, GuardianConfig) and isinstance(cfg.resume, ResumeConfig)
    assert (cfg.keep_last, cfg.save_failures, cfg.mirror_timeout, cfg.rng, cfg.repair) == (None, 2, 600.0, True, False)
    assert (
        cfg.resume.stores == (str(tmp_path / "ck"),)
        and cfg.resume.timeout == 600.0
        and cfg.resume.storage_options == {}
    )
    with pytest.raises(AttributeError):
        cfg.keep_last = 5  # type: ignore[misc]
    assert not (tmp_path / "ck").exists()  # building a config touches no store


def test_resume_builds_the_same_config_and_names_unknown_keywords(tmp_path):
    import dist_guardian

    ck = str(tmp_path / "ck")
    with pytest.raises(
        ConfigError,
        match=r"^resume\(\) got unknown keyword\(s\) 'keep_last'; use: stores, run, compat, "
        r"layout, suspect, on_exhausted, timeout, attempt_timeout, storage_options, "
        r"extra_safe_globals, use_journal, apply_fn, comm, config$",
    ):
        dist_guardian.resume(lambda c, s: None, [ck], keep_last=3)
    with pytest.raises(ConfigError, match=r"^attempt_timeout=0 must be None \(0\.8 x timeout\) or a positive number"):
        dist_guardian.resume(lambda c, s: None, [ck], attempt_timeout=0)
    with pytest.raises(ConfigError, match=r"^use_journal='no' must be True or False$"):
        dist_guardian.resume(lambda c, s: None, [ck], use_journal="no")
    with pytest.raises(ConfigError, match=r"^resume\(\) got config= and stores or other options"):
        dist_guardian.resume(lambda c, s: None, [ck], config=ResumeConfig(stores=(ck,)))
    cfg = ResumeConfig(stores=(ck,), timeout=10)
    assert cfg.load_deadline == 8.0 and ResumeConfig(stores=(ck,), attempt_timeout=3).load_deadline == 3.0
    assert ResumeConfig(stores=(ck,), extra_safe_globals=[ResumeConfig, "a.B"]).safe_global_names == (
        "dist_guardian.config.ResumeConfig",
        "a.B",
    )
    r = dist_guardian.resume(lambda c, s: None, config=cfg)  # nothing there: a fresh start
    assert not r.resumed and not (tmp_path / "ck").exists()


def test_guardian_does_not_take_the_resume_function_knobs(tmp_path):
    with pytest.raises(ConfigError, match=r"^Guardian\(\) got unknown keyword\(s\) 'layout'; use: "):
        Guardian(stores=[str(tmp_path / "ck")], run="r", layout={})


def test_partial_ok_must_be_a_bool(tmp_path):
    _raises(
        tmp_path,
        "partial_ok='yes' must be True (a foreign checkpoint may restore part of state, with a warning) or False",
        partial_ok="yes",
    )
    assert _build(tmp_path, partial_ok=True).resume.partial_ok is True
    assert _build(tmp_path).resume.partial_ok is False
