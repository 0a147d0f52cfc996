"""Coordination collectives on a dedicated gloo group with an explicit timeout.

Every vote and broadcast of dist_guardian runs here, on a gloo group of its own (also in
NCCL jobs: an NCCL timeout tears the process down, a gloo one raises where we can catch
it). Payloads are JSON bytes in uint8 tensors, never pickles. Without a process group, or
at world size 1, every call is a local no-op. After a collective fails (timeout, dead
peer) the group is unusable: every later call raises at once instead of touching it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from . import _faults
from .errors import AgreementTimeout, CandidateListMismatch, CoordinationError

log = logging.getLogger(__name__)

# What a failed collective raises: torch's DistError family derives from RuntimeError, a bad tensor is a
# ValueError, and a timeout raised as such is the builtin TimeoutError.
_COLLECTIVE_ERRORS = (RuntimeError, ValueError, TimeoutError)


def _is_timeout(e: BaseException) -> bool:
    """Whether a failed collective ran out of time (AgreementTimeout) rather than lost a peer.

    Decided on the type where there is one: the builtin ``TimeoutError``. torch has no timeout
    type: gloo (torch 2.13, measured with two ranks) raises a plain ``RuntimeError`` both for a
    collective that timed out ("Timed out waiting 2000ms for recv operation to complete") and
    for a dead peer ("Connection closed by peer"), and its ``DistError`` subclasses say a timeout
    in words too. Only for a ``RuntimeError`` is the text read, as the one way to tell them apart.
    """
    if isinstance(e, TimeoutError):
        return True
    if not isinstance(e, RuntimeError):
        return False
    msg = str(e).lower()
    return "timed out" in msg or "timeout" in msg


class Comm:
    """The coordination channel of one Guardian (or one ``resume`` call)."""

    def __init__(self, timeout_s: float, group: Any = None, *, create: bool = True):
        self.timeout_s = float(timeout_s)
        self.broken: str | None = None
        self._own_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.group = group
        if self.world_size > 1 and group is None and create:
            # Collective: every rank creates the group in the same order.
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
            self._own_group = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Destroy our own gloo group, so nothing of ours is in flight at interpreter exit."""
        if self._own_group and self.group is not None and self.broken is None:
            try:
                dist.destroy_process_group(self.group)
            except Exception as e:  # a dead peer: nothing left to clean
                log.debug("destroying the coordination group failed: %s", e)
        self.group = None
        self._own_group = False

    # ------------------------------------------------------------------ primitives

    def _guard(self, step: str):
        if self.broken is not None:
            raise CoordinationError(f"coordination group unusable since {self.broken}; not attempting {step}")

    def _fail(self, step: str, e: BaseException) -> CoordinationError:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        self.broken = step
        if _is_timeout(e):
            return AgreementTimeout(
                f"[rank={self.rank}] {step}: no answer from every rank within {self.timeout_s:.1f}s "
                f"(a rank hangs or died): {msg}"
            )
        return CoordinationError(f"[rank={self.rank}] {step}: a peer failed or died: {msg}")

    def broadcast_json(self, obj: Any, step: str) -> Any:
        """Collective: call on every rank. Rank 0's ``obj`` is returned on every rank (JSON, no pickle)."""
        if not self.distributed:
            return obj
        self._guard(step)
        try:
            if self.rank == 0:
                data = json.dumps(obj, separators=(",", ":")).encode()
                n = torch.tensor([len(data)], dtype=torch.int64)
            else:
                n = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(n, src=0, group=self.group)
            buf = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if self.rank == 0
                else torch.empty(int(n.item()), dtype=torch.uint8)
            )
            if int(n.item()):
                dist.broadcast(buf, src=0, group=self.group)
        except _COLLECTIVE_ERRORS as e:
            raise self._fail(step, e) from e
        return obj if self.rank == 0 else json.loads(bytes(buf.numpy()).decode())

    def vote_min(self, value: int, step: str) -> int:
        """Collective: call on every rank. The minimum of every rank's ``value`` (one all-reduce)."""
        if not self.distributed:
            return value
        self._guard(step)
        t = torch.tensor([value], dtype=torch.int64)
        _faults.hit("mid_vote", rank=self.rank)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        except _COLLECTIVE_ERRORS as e:
            raise self._fail(step, e) from e
        return int(t.item())

    def vote_bits(self, bits: list[bool], step: str) -> list[bool]:
        """Collective: call on every rank. Element-wise AND of every rank's bits (a MIN all-reduce)."""
        if not self.distributed or not bits:
            return list(bits)
        self._guard(step)
        t = torch.tensor([1 if b else 0 for b in bits], dtype=torch.uint8)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        except _COLLECTIVE_ERRORS as e:
            raise self._fail(step, e) from e
        return [bool(x) for x in t.tolist()]

    def gather_strings(self, text: str, step: str, max_len: int = 2000) -> list[str]:
        """Collective: call on every rank. Every rank's short string, on every rank (only after a failed vote)."""
        if not self.distributed:
            return [text]
        self._guard(step)
        data = text.encode()[:max_len]
        try:
            n = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, n, group=self.group)
            width = max(int(s.item()) for s in sizes) or 1
            mine = torch.zeros(width, dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            out = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(out, mine, group=self.group)
        except _COLLECTIVE_ERRORS as e:
            raise self._fail(step, e) from e
        return [bytes(o[: int(s.item())].numpy()).decode(errors="replace") for o, s in zip(out, sizes, strict=True)]

    def check_same(self, payload: bytes, step: str) -> None:
        """Collective: call on every rank. Raise :class:`CandidateListMismatch` unless every rank holds
        the same bytes (F27).

        MIN and MAX all-reduce of the SHA-256 digest, as DeepSpeed validates checkpoint tags.
        """
        if not self.distributed:
            return
        self._guard(step)
        digest = torch.tensor(list(hashlib.sha256(payload).digest()), dtype=torch.int64)
        lo, hi = digest.clone(), digest.clone()
        try:
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        except _COLLECTIVE_ERRORS as e:
            raise self._fail(step, e) from e
        if not torch.equal(lo, hi) or not torch.equal(lo, digest):
            raise CandidateListMismatch(
                f"[rank={self.rank}] {step}: ranks hold different plans after the broadcast; nothing is applied"
            )
