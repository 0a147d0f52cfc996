"""Bytes moved by one transfer: the clock of the stall deadline, and the progress line on a terminal.

Belongs here: :class:`Transfer` and nothing else. A deadline that counts from the last
byte moved lets a slow but moving transfer finish while a frozen one is cut.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

PROGRESS_ENV = "DIST_GUARDIAN_PROGRESS"


class Transfer:
    """Bytes moved by one transfer: feeds the stall deadline and, on a terminal, a progress line.

    The line goes to stderr only for transfers that last over ``min_s`` (about a second),
    and only when stderr is a TTY, unless ``show=True`` (or ``DIST_GUARDIAN_PROGRESS=1``)
    asks for it; ``show=False`` (or ``DIST_GUARDIAN_PROGRESS=0``) silences it.
    """

    def __init__(self, total: int, label: str, *, show: bool | None = None, stream: Any = None, min_s: float = 1.0):
        self.total = int(total)
        self.label = label
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        env = os.environ.get(PROGRESS_ENV)
        if env == "0":
            show = False
        elif show is None and env == "1":
            show = True
        if show is None:
            try:
                show = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                show = False
        self.show = show
        self._next = self.t0 + min_s
        self._shown = False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += n
            self.last = now
            if self.show and now >= self._next:
                self._next = now + 0.25
                self._render(now)

    def touch(self) -> None:
        """Progress without bytes (a request answered): the stall deadline starts again."""
        self.last = time.monotonic()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-9)

    def _render(self, now: float, end: str = "") -> None:
        el = max(now - self.t0, 1e-9)
        pct = f" {100.0 * self.done / self.total:5.1f}%" if self.total else ""
        line = (
            f"\r[dist_guardian] {self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB{pct} "
            f"{self.done / el / 1e6:,.1f} MB/s {el:.1f}s"
        )
        try:
            self.stream.write(line + end)
            self.stream.flush()
            self._shown = True
        except (OSError, ValueError):
            self.show = False

    def close(self) -> None:
        with self._lock:
            if self.show and self._shown:
                self._render(time.monotonic(), end="\n")
