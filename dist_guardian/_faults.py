"""Test-only fault injection at named points of save and load.

``DIST_GUARDIAN_FAULT`` holds comma-separated rules ``POINT[@STEP]:RANK:ACTION``, e.g.
``during_load@200:1:hang`` or ``mid_data_write:0:kill``. RANK may be ``*``. ACTION is
``kill`` (SIGKILL ourselves), ``exit`` (``os._exit(137)``), ``hang``, ``raise`` (RuntimeError),
``raise-MemoryError``, ``raise-KeyError``, ``raise-KeyboardInterrupt``, ``raise-SystemExit``,
``raise-OSError``, ``sleep-SECONDS``, or ``corrupt`` (the caller damages what it just wrote or read).
Unset, every hook is a dictionary lookup and nothing else. Imports nothing of ours.

Every point is in :data:`POINTS` (a test checks it against every call site, so a typo in a
rule or a hook cannot silently never fire). Rules are validated when first read, which
:func:`check` forces at start-up (``Guardian()`` and ``resume``): a bad rule is a clear
``ValueError`` there, not a surprise mid-save. Armed rules log one WARNING per process, since
a variable inherited by a real job would otherwise arm kill and hang points silently.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

ENV = "DIST_GUARDIAN_FAULT"
POINTS = frozenset(
    {
        # saving (local commit, F10)
        "before_data_write",
        "mid_data_write",
        "after_data_fsync",
        "before_manifest",
        "after_manifest_before_rename",
        "after_rename_before_dirsync",
        # saving (object-store commit, F10, F13, F14)
        "before_s3_data",
        "mid_s3_data",
        "before_s3_manifest",
        "after_s3_manifest",
        # retention (F41)
        "mid_retention",
        # resume (F20, F23-F27)
        "after_broadcast",
        "during_load",
        "load_file",
        "before_vote",
        "mid_vote",
    }
)
_EXCEPTIONS = {
    "raise": RuntimeError,
    "raise-MemoryError": MemoryError,
    "raise-KeyError": KeyError,
    "raise-KeyboardInterrupt": KeyboardInterrupt,
    "raise-SystemExit": SystemExit,
}
_PLAIN_ACTIONS = frozenset({"kill", "exit", "hang", "corrupt", "raise-OSError"}) | frozenset(_EXCEPTIONS)
_cache: tuple[str, list[tuple[str, int | None, str, str]]] | None = None
_warned = False


def _parse(spec: str) -> list[tuple[str, int | None, str, str]]:
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":", 2)
        if len(fields) != 3:
            raise ValueError(f"{ENV}: rule {part!r} is not POINT[@STEP]:RANK:ACTION")
        point, rank, action = fields
        point, _, step = point.partition("@")
        if point not in POINTS:
            raise ValueError(f"{ENV}: rule {part!r} names no fault point; known points: {sorted(POINTS)}")
        if step and not step.isdecimal():
            raise ValueError(f"{ENV}: rule {part!r}: STEP {step!r} is not a number")
        if rank != "*" and not rank.isdecimal():
            raise ValueError(f"{ENV}: rule {part!r}: RANK {rank!r} is not a number or '*'")
        if action not in _PLAIN_ACTIONS and not _is_sleep(action):
            raise ValueError(f"{ENV}: rule {part!r}: unknown action {action!r}")
        rules.append((point, int(step) if step else None, rank, action))
    return rules


def _is_sleep(action: str) -> bool:
    if not action.startswith("sleep-"):
        return False
    try:
        return float(action[len("sleep-") :]) >= 0
    except ValueError:
        return False


def _rules() -> list[tuple[str, int | None, str, str]]:
    global _cache, _warned
    spec = os.environ.get(ENV, "")
    if _cache is not None and _cache[0] == spec:
        return _cache[1]
    rules = _parse(spec)
    _cache = (spec, rules)
    if rules and not _warned:
        _warned = True
        log.warning("fault injection is armed (%s=%r): a test-only setting; unset it in a real job", ENV, spec)
    return rules


def check() -> None:
    """Validate the rules now (raises ``ValueError`` naming the bad rule); logs once when any are armed."""
    if ENV in os.environ:
        _rules()


def _my_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def hit(point: str, *, rank: int | None = None, step: int | None = None) -> str | None:
    """Fire the rule for ``point`` on this rank, if any. Returns ``"corrupt"`` for the caller to act on."""
    if ENV not in os.environ:
        return None
    me = _my_rank() if rank is None else rank
    for p, s, r, action in _rules():
        if p != point or (r != "*" and int(r) != me) or (s is not None and s != step):
            continue
        return _act(point, action)
    return None


def _act(point: str, action: str) -> str | None:
    msg = f"injected fault at {point}"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    if action == "exit":
        os._exit(137)
    if action == "hang":
        while True:
            time.sleep(3600)
    if action == "corrupt":
        return "corrupt"
    if action in _EXCEPTIONS:
        raise _EXCEPTIONS[action](msg)
    if action == "raise-OSError":
        raise OSError(errno.EIO, msg)
    time.sleep(float(action[len("sleep-") :]))  # the only other action _parse lets through
    return None
