"""One error base for the package, with subclasses that keep their builtin meaning.

Every error a user can see derives from :class:`DistGuardianError`, and also from the
builtin exception whose meaning it carries (``ValueError`` for bad input, ``OSError`` for
storage, ``RuntimeError`` for coordination), so ``except OSError`` keeps working.
Messages name the object and the way out.

Belongs here too: :class:`Reason`, the value every failure reason is (a token, a detail and
whether it may pass), so the coordinator, retention and ``Comm`` decide on fields, never on
message text. The ``OSError``-derived errors take one constructor, ``X(reason, detail, *,
errno=..., store=...)``, and print the same text however they were built.
"""

from __future__ import annotations

import errno as _errno
import re
from dataclasses import dataclass

# The leading token of a reason's text: what :meth:`Reason.parse` reads back from JSON.
_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Reason:
    """Why something failed: ``token`` for code, ``detail`` for people, ``transient`` for the end of a resume.

    ``str()`` is the text logs, JSON records and tests read: ``"token: detail"``, or
    ``"token store=URL: detail"`` when ``store`` names the store that failed. Candidate
    reasons cross ranks as that text; :meth:`parse` gives the token back (the transient flag
    does not travel: ``policy`` decides it from the token).
    """

    token: str
    detail: str = ""
    transient: bool = False
    store: str = ""

    def __str__(self) -> str:
        head = f"{self.token} store={self.store}" if self.store else self.token
        return f"{head}: {self.detail}" if self.detail else head

    @classmethod
    def parse(cls, text: str) -> Reason:
        """The reason whose ``str()`` is ``text``: its token, store and detail (``transient`` is not in the text).

        Text not written as ``token: detail`` keeps its token; the rest becomes the detail as it stands.
        """
        m = _TOKEN_RE.match(text)
        token = m.group(0) if m else ""
        rest, store = text[len(token) :], ""
        if rest.startswith(" store="):
            store, _, detail = rest[len(" store=") :].partition(": ")
            return cls(token=token, detail=detail, store=store)
        return cls(token=token, detail=rest[2:] if rest.startswith(": ") else rest)


class DistGuardianError(Exception):
    """Base of every error raised by dist_guardian."""


class ConfigError(DistGuardianError, ValueError):
    """A bad argument: raised eagerly, identically on every rank."""


class CheckpointFormatError(DistGuardianError, ValueError):
    """A file or manifest is not what it claims to be (names the file and what is wrong)."""


class IncompleteRestore(CheckpointFormatError):
    """A foreign checkpoint would not restore everything ``state`` asks for; ``missing`` names each part."""

    def __init__(self, message: str, *, missing: tuple[str, ...]):
        super().__init__(message)
        self.missing = missing


class PlanningCapExceeded(CheckpointFormatError):
    """Verifying a candidate would cost more than planning allows one candidate (``what`` over ``cap``): tier R."""

    def __init__(self, what: str, cap: str):
        super().__init__(f"{what} is over the planning cap of {cap}")
        self.what, self.cap = what, cap


class PlanFormatError(DistGuardianError, ValueError):
    """A resume plan or candidate record (JSON from rank 0) is malformed: names the field and what is wrong."""


class _ReasonedOSError(DistGuardianError, OSError):
    """An ``OSError`` of ours: ``X(reason, detail, *, errno=..., store=...)``, the same ``str()`` however built.

    ``reason`` is the token, ``detail`` the text for people, ``store`` the store's URL when
    one failed; ``errno`` defaults to the class's ``default_errno`` so ``e.errno`` is always
    set, and ``str(e)`` (also ``e.strerror``) is ``str(e.why)``, never prefixed ``[Errno N]``.
    """

    default_errno = _errno.EIO
    transient = False

    def __init__(self, reason: str, detail: str = "", *, errno: int | None = None, store: str = ""):
        self.reason, self.detail, self.store = reason, detail, store
        super().__init__(self.default_errno if errno is None else errno, str(self.why))

    @property
    def why(self) -> Reason:
        """The error as a :class:`Reason` value."""
        return Reason(token=self.reason, detail=self.detail, transient=self.transient, store=self.store)

    def __str__(self) -> str:
        return str(self.why)

    def __reduce__(self):  # OSError pickles as (errno, strerror): rebuild through our constructor instead
        return (_rebuild, (type(self), self.reason, self.detail, self.errno, self.store))


def _rebuild(cls: type[_ReasonedOSError], reason: str, detail: str, errno: int, store: str) -> _ReasonedOSError:
    return cls(reason, detail, errno=errno, store=store)


class StoreError(_ReasonedOSError):
    """A store could not be used (unreachable, insecure, refused)."""


class StoreUnavailable(StoreError):
    """A store did not answer within its deadline, or refused us: it may answer later (transient)."""

    transient = True


class InsecurePathError(StoreError):
    """A path we were asked to use is foreign-owned, group/world-writable, a symlink or escapes its root."""

    default_errno = _errno.EPERM


class SaveFailed(_ReasonedOSError):
    """A save was abandoned; the previous checkpoints are untouched."""


class CommitConflict(SaveFailed):
    """Another writer committed the same step first (F38); our staging was discarded."""

    default_errno = _errno.EEXIST


class CoordinationError(DistGuardianError, RuntimeError):
    """A collective failed (timeout, dead peer). The coordination group is unusable afterwards."""


class AgreementTimeout(CoordinationError):
    """A vote did not complete within the timeout: a rank hangs or died (F23, F25)."""


class CandidateListMismatch(CoordinationError):
    """Ranks hold different plans after the broadcast (F27): nothing is applied."""


class ResumeFailed(DistGuardianError, RuntimeError):
    """No candidate loaded and starting fresh would risk losing progress (F33)."""


class AttemptCapReached(ResumeFailed):
    """``tried`` candidates failed to load and ``untried`` more remain: resume stops, never starting fresh (T04)."""

    def __init__(self, message: str, *, tried: int, untried: int):
        super().__init__(message)
        self.tried = tried
        self.untried = untried


class NoReachableCheckpoint(ResumeFailed):
    """No candidate could be reached while a store was down (F16 variant): never start fresh then."""
