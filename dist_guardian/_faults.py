"""Test-only fault injection at named points of save and load.

``DIST_GUARDIAN_FAULT`` holds comma-separated rules ``POINT[@STEP]:RANK:ACTION``, e.g.
``during_load@200:1:hang`` or ``mid_data_write:0:kill``. RANK may be ``*``. ACTION is
``kill`` (SIGKILL ourselves), ``exit`` (``os._exit(137)``), ``hang``, ``raise`` (RuntimeError),
``raise-MemoryError``, ``raise-KeyError``, ``raise-KeyboardInterrupt``, ``raise-SystemExit``,
``raise-OSError``, or ``corrupt`` (the caller damages what it just wrote or read).
Unset, every hook is a dictionary lookup and nothing else. Imports nothing of ours.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "DIST_GUARDIAN_FAULT"
_cache: tuple[str, list[tuple[str, int | None, str, str]]] | None = None


def _rules() -> list[tuple[str, int | None, str, str]]:
    global _cache
    spec = os.environ.get(ENV, "")
    if _cache is not None and _cache[0] == spec:
        return _cache[1]
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, rank, action = part.split(":", 2)
        point, _, step = point.partition("@")
        rules.append((point, int(step) if step else None, rank, action))
    _cache = (spec, rules)
    return rules


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
    if action == "raise":
        raise RuntimeError(msg)
    if action == "raise-MemoryError":
        raise MemoryError(msg)
    if action == "raise-KeyError":
        raise KeyError(msg)
    if action == "raise-KeyboardInterrupt":
        raise KeyboardInterrupt(msg)
    if action == "raise-SystemExit":
        raise SystemExit(msg)
    if action == "raise-OSError":
        raise OSError(errno.EIO, msg)
    if action.startswith("sleep-"):
        time.sleep(float(action[len("sleep-") :]))
        return None
    raise ValueError(f"{ENV}: unknown action {action!r}")
