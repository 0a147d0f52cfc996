"""One error base for the package, with subclasses that keep their builtin meaning.

Every error a user can see derives from :class:`DistGuardianError`, and also from the
builtin exception whose meaning it carries (``ValueError`` for bad input, ``OSError`` for
storage, ``RuntimeError`` for coordination), so ``except OSError`` keeps working.
Messages name the object and the way out.
"""

from __future__ import annotations


class DistGuardianError(Exception):
    """Base of every error raised by dist_guardian."""


class ConfigError(DistGuardianError, ValueError):
    """A bad argument: raised eagerly, identically on every rank."""


class CheckpointFormatError(DistGuardianError, ValueError):
    """A file or manifest is not what it claims to be (names the file and what is wrong)."""


class PlanningCapExceeded(CheckpointFormatError):
    """Verifying a candidate would cost more than planning allows one candidate (``what`` over ``cap``): tier R."""

    def __init__(self, what: str, cap: str):
        super().__init__(f"{what} is over the planning cap of {cap}")
        self.what, self.cap = what, cap


class PlanFormatError(DistGuardianError, ValueError):
    """A resume plan or candidate record (JSON from rank 0) is malformed: names the field and what is wrong."""


class StoreError(DistGuardianError, OSError):
    """A store could not be used (unreachable, insecure, refused)."""


class StoreUnavailable(StoreError):
    """A store did not answer within its deadline, or refused us. Possibly transient."""


class InsecurePathError(StoreError):
    """A path we were asked to use is foreign-owned, group/world-writable, a symlink or escapes its root."""


class SaveFailed(DistGuardianError, OSError):
    """A save was abandoned; the previous checkpoints are untouched."""


class CommitConflict(SaveFailed):
    """Another writer committed the same step first (F38); our staging was discarded."""


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
