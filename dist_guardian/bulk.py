"""Bulk work over 100,000 small objects without the cyclic garbage collector walking them all.

Parsing a 100,000-tensor header, building its state tree or its manifest allocates hundreds
of thousands of containers; each allocation burst triggers a collection, and the full ones
walk every live object of the training process. Measured on a 100,000-tensor header:
``json.loads`` 0.66 s with the collector on, 0.19 s paused. Nothing made in these sections
is cyclic garbage, so pausing loses nothing; the collector runs again as soon as the last
section ends (sections may nest and may run in two threads at once).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off for the duration (restored to what it was when the outermost section began)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
