"""dist_guardian: every rank resumes from the best checkpoint that loads on every rank.

The public surface is small: :class:`Guardian` (resume, save, close), the lower-level
:func:`resume` for checkpoints another library wrote, the values it returns, and the
errors. ``Guardian`` and ``resume`` import torch lazily, so ``dist-guardian ls`` and
``plan`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .candidate import Attempt, Candidate, Loaded, ResumeResult
from .errors import (
    AgreementTimeout,
    CandidateListMismatch,
    CheckpointFormatError,
    CommitConflict,
    ConfigError,
    CoordinationError,
    DistGuardianError,
    InsecurePathError,
    NoReachableCheckpoint,
    PlanFormatError,
    ResumeFailed,
    SaveFailed,
    StoreError,
    StoreUnavailable,
)
from .policy import order
from .stores import Store
from .stores import read_whole as read_bytes  # for adapters: one file whole, opened safely (no symlink, no FIFO)
from .stores import resolve as resolve_store  # for adapters: a store URL -> Store
from .stores import write_small as write_bytes  # for adapters: an atomic local replace, one PUT remotely

__version__ = "0.1.0"

__all__ = [
    "Guardian",
    "resume",
    "read_torch_object",
    "read_bytes",
    "write_bytes",
    "resolve_store",
    "ResumeResult",
    "SaveResult",
    "Attempt",
    "Candidate",
    "Loaded",
    "Store",
    "order",
    "DistGuardianError",
    "ConfigError",
    "CheckpointFormatError",
    "StoreError",
    "StoreUnavailable",
    "InsecurePathError",
    "SaveFailed",
    "CommitConflict",
    "CoordinationError",
    "AgreementTimeout",
    "CandidateListMismatch",
    "ResumeFailed",
    "NoReachableCheckpoint",
    "PlanFormatError",
]

if TYPE_CHECKING:
    from .commit import SaveResult
    from .coordinator import resume
    from .foreign_loading import read_torch_object
    from .guardian import Guardian


def __getattr__(name: str) -> Any:
    if name == "Guardian":
        from .guardian import Guardian

        return Guardian
    if name == "resume":
        from .coordinator import resume

        return resume
    if name == "read_torch_object":  # a foreign torch.save file, read as a resume reads it (for load_fn)
        from .foreign_loading import read_torch_object

        return read_torch_object
    if name == "SaveResult":
        from .commit import SaveResult

        return SaveResult
    raise AttributeError(f"module 'dist_guardian' has no attribute {name!r}")
