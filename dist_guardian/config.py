"""Configuration: every ``Guardian(...)``, ``dist_guardian.resume(...)`` and CLI knob in frozen,
keyword-only values, validated once.

What belongs here: the config dataclasses, their defaults and every check of their values,
with messages that name the argument and the allowed values. A bad value raises
:class:`ConfigError` when the config is built, before any collective, identically on every
rank. No I/O beyond reading the fault-injection rules (``_faults.check``); no torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from . import _faults, stores
from .candidate import validate_suspect_policy
from .errors import ConfigError
from .layout import NAME_RE

log = logging.getLogger(__name__)

MIN_KEEP_LAST = 2  # the newest checkpoint alone could be the bad one (F40)
ON_EXHAUSTED = ("fresh", "raise")


@dataclass(frozen=True, kw_only=True, slots=True)
class ResumeConfig:
    """What resuming needs: where to look, what matches, how to load.

    Args:
        stores: store URLs, the first is the primary (where saves commit).
        run: the run name; a store may hold many runs (``<store>/<run>/step-.../``).
        compat: must match the checkpoint's to resume (F31); JSON-able.
        suspect: ``"after_same_step"`` | ``"last_resort"`` | ``"reject"`` (FAULTS.md).
        on_exhausted: ``"fresh"`` or ``"raise"`` (F33).
        timeout: seconds; bounds one load attempt and each vote.
        storage_options: per URL prefix, e.g. ``{"s3://bucket": {"anon": True}}``.
        required: keys that a foreign checkpoint must hold even with ``partial_ok`` (``None``: the
            ``nn.Module`` keys); without ``partial_ok`` it must restore every key of ``state``.
        extra_safe_globals: classes a foreign ``torch.save`` file may need (F34 opt-in).
        foreign_loader: ``fn(obj, state) -> dict`` mapping a foreign file onto ``state``.
        remote_concurrency: connections per remote file read; ``None`` lets the store decide.
        progress: a progress line on stderr for remote loads; ``None``: only on a TTY.
        layout: the live state's layout fingerprints (T02); ``Guardian.resume`` fills it in.
        attempt_timeout: seconds one load attempt may take on a rank; ``None``: 0.8 x ``timeout``,
            so a slow load is a failed attempt (all move on) rather than a dead coordination group.
        use_journal: demote crash-looping candidates (reads ``<primary>/<run>/.journal/``).
        partial_ok: resume from a foreign checkpoint that restores only part of ``state`` (the
            ``required`` keys at least), with a WARNING naming what keeps its current value; by
            default such a candidate fails and the next one is tried.
    """

    stores: tuple[str, ...]
    run: str = "default"
    compat: dict[str, Any] | None = None
    suspect: str = "after_same_step"
    on_exhausted: str = "fresh"
    timeout: float = 600.0
    storage_options: dict[str, dict[str, Any]] | None = None
    required: tuple[str, ...] | None = None
    extra_safe_globals: tuple[Any, ...] = ()
    foreign_loader: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    remote_concurrency: int | None = None
    progress: bool | None = None
    layout: dict[str, str] | None = None
    attempt_timeout: float | None = None
    use_journal: bool = True
    partial_ok: bool = False

    def __post_init__(self) -> None:
        if not self.stores:
            raise ConfigError("stores is empty: give at least one store, e.g. stores=['checkpoints/']")
        object.__setattr__(self, "stores", (self.stores,) if isinstance(self.stores, str) else tuple(self.stores))
        if not isinstance(self.run, str) or not NAME_RE.match(self.run):
            raise ConfigError(f"run={self.run!r} is not a plain name (letters, digits, '.', '_', '-')")
        for url in self.stores:
            stores.check_url(url)
        stores.check_storage_options(self.storage_options, self.stores)
        object.__setattr__(self, "storage_options", self.storage_options or {})
        _faults.check()
        validate_suspect_policy(self.suspect)
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ConfigError(f"on_exhausted={self.on_exhausted!r}: use 'fresh' or 'raise'")
        if not (_is_number(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout={self.timeout!r} must be a positive number of seconds")
        object.__setattr__(self, "timeout", float(self.timeout))
        if self.compat is not None:
            try:
                json.dumps(self.compat, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"compat must be JSON-able: {e}") from None
        if self.required is not None:
            object.__setattr__(self, "required", _names("required", self.required))
        object.__setattr__(self, "extra_safe_globals", tuple(_iterable("extra_safe_globals", self.extra_safe_globals)))
        if self.foreign_loader is not None and not callable(self.foreign_loader):
            raise ConfigError(f"foreign_loader={self.foreign_loader!r} must be None or a function (obj, state) -> dict")
        if self.remote_concurrency is not None and not (
            _is_int(self.remote_concurrency) and self.remote_concurrency > 0
        ):
            raise ConfigError(
                f"remote_concurrency={self.remote_concurrency!r} must be None (the store decides) or a positive integer"
            )
        if not isinstance(self.partial_ok, bool):
            raise ConfigError(
                f"partial_ok={self.partial_ok!r} must be True (a foreign checkpoint may restore part of state, "
                "with a warning) or False"
            )
        if self.progress not in (None, True, False):
            raise ConfigError(f"progress={self.progress!r} must be None (only on a TTY), True or False")
        self._check_resume_knobs()

    def _check_resume_knobs(self) -> None:
        """The knobs only :func:`dist_guardian.resume` callers set directly (``Guardian`` derives them)."""
        if self.layout is not None and not isinstance(self.layout, dict):
            raise ConfigError(f"layout={self.layout!r} must be None or a dict of layout fingerprints")
        if self.attempt_timeout is not None:
            if not (_is_number(self.attempt_timeout) and self.attempt_timeout > 0):
                raise ConfigError(
                    f"attempt_timeout={self.attempt_timeout!r} must be None (0.8 x timeout) "
                    "or a positive number of seconds"
                )
            object.__setattr__(self, "attempt_timeout", float(self.attempt_timeout))
        if not isinstance(self.use_journal, bool):
            raise ConfigError(f"use_journal={self.use_journal!r} must be True or False")

    @property
    def load_deadline(self) -> float:
        """Seconds one load attempt may take: it fires before the peers' vote timeout (``timeout``)."""
        return self.attempt_timeout if self.attempt_timeout is not None else 0.8 * self.timeout

    @property
    def safe_global_names(self) -> tuple[str, ...]:
        """``extra_safe_globals`` as qualnames: what the plan (rank 0, JSON) carries."""
        return tuple(g if isinstance(g, str) else f"{g.__module__}.{g.__qualname__}" for g in self.extra_safe_globals)


@dataclass(frozen=True, kw_only=True, slots=True)
class GuardianConfig:
    """Every knob of a :class:`~dist_guardian.Guardian`: resuming (``resume``) and saving.

    Args:
        resume: see :class:`ResumeConfig`.
        keep_last: retention; ``None`` keeps everything. 1 is raised to 2 (F40).
        per_rank: keys of ``state`` that differ per rank; the rest is written once by rank 0.
        rng: save and restore the per-rank RNG state.
        save_failures: consecutive failed saves tolerated with a warning before one raises.
        mirror_timeout: seconds ``close()`` waits for mirror uploads.
        repair: re-fetch a damaged local replica from the intact one that was loaded (F05).
    """

    resume: ResumeConfig
    keep_last: int | None = None
    per_rank: frozenset[str] = frozenset()
    rng: bool = True
    save_failures: int = 2
    mirror_timeout: float = 600.0
    repair: bool = False

    def __post_init__(self) -> None:
        if self.keep_last is not None:
            if not _is_int(self.keep_last) or self.keep_last < 1:
                raise ConfigError(f"keep_last={self.keep_last!r} must be None or a positive integer")
            if self.keep_last < MIN_KEEP_LAST:
                log.warning(
                    "keep_last=%d raised to %d: the newest checkpoint alone could be the bad one (F40)",
                    self.keep_last,
                    MIN_KEEP_LAST,
                )
                object.__setattr__(self, "keep_last", MIN_KEEP_LAST)
        object.__setattr__(self, "per_rank", frozenset(_names("per_rank", self.per_rank)))
        for name in ("rng", "repair"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (_is_int(self.save_failures) and self.save_failures >= 0):
            raise ConfigError(
                f"save_failures={self.save_failures!r} must be a non-negative integer "
                "(failed saves in a row tolerated before one raises)"
            )
        if not (_is_number(self.mirror_timeout) and self.mirror_timeout >= 0):
            raise ConfigError(f"mirror_timeout={self.mirror_timeout!r} must be a non-negative number of seconds")


_RESUME_KEYS = tuple(f.name for f in fields(ResumeConfig) if f.name not in ("stores", "run"))
_SAVE_KEYS = tuple(f.name for f in fields(GuardianConfig) if f.name != "resume")
# What ``dist_guardian.resume(load_fn, stores, **options)`` accepts: the loading knobs are its load_fn's business.
_RESUME_FN_KEYS = (
    "run",
    "compat",
    "layout",
    "suspect",
    "on_exhausted",
    "timeout",
    "attempt_timeout",
    "storage_options",
    "extra_safe_globals",
    "use_journal",
)
# What ``Guardian(...)`` accepts: layout is the live state's, filled in by ``Guardian.resume``.
_GUARDIAN_RESUME_KEYS = tuple(k for k in _RESUME_KEYS if k not in ("layout", "attempt_timeout", "use_journal"))


def guardian_config(stores: Sequence[str] | str, run: str, options: dict[str, Any]) -> GuardianConfig:
    """Build the config from ``Guardian(stores, run, **options)``; an unknown keyword names the allowed ones."""
    _refuse_unknown("Guardian()", options, ("stores", "run") + _GUARDIAN_RESUME_KEYS + _SAVE_KEYS)
    listed = (stores,) if isinstance(stores, str) else tuple(stores or ())
    resume = ResumeConfig(stores=listed, run=run, **{k: v for k, v in options.items() if k in _RESUME_KEYS})
    return GuardianConfig(resume=resume, **{k: v for k, v in options.items() if k in _SAVE_KEYS})


def resume_config(stores: Sequence[str] | str, options: dict[str, Any]) -> ResumeConfig:
    """Build the config from ``dist_guardian.resume(load_fn, stores, **options)``; unknown keywords named."""
    _refuse_unknown("resume()", options, ("stores",) + _RESUME_FN_KEYS + ("apply_fn", "comm", "config"))
    listed = (stores,) if isinstance(stores, str) else tuple(stores or ())
    return ResumeConfig(stores=listed, **options)


def _refuse_unknown(who: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{who} got unknown keyword(s) {', '.join(map(repr, unknown))}; use: {', '.join(allowed)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _iterable(name: str, v: Any) -> list[Any]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ConfigError(f"{name}={v!r} must be a list (or other iterable) of names, not a single value")
    return list(v)


def _names(name: str, v: Any) -> tuple[str, ...]:
    items = _iterable(name, v)
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise ConfigError(f"{name} must hold state keys (strings); got {bad[0]!r}")
    return tuple(items)
