"""Honest results for foreign checkpoints: ``resumed=True`` only when everything ``state`` asks for came back.

Belongs here: the one rule every foreign load (``torch.save`` file, DCP directory, Lightning
``.ckpt``, Hugging Face ``checkpoint-N/``) passes before its vote. A key of ``state`` that the
checkpoint does not restore, or a part a loader could not map (``Staged.not_restored``), fails
the attempt with :class:`~dist_guardian.errors.IncompleteRestore` naming each part, so the next
candidate is tried; with ``partial_ok=True`` it loads, with a warning listing what keeps its
current value. Native checkpoints are not judged here: their keys are the ones that were saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .errors import IncompleteRestore
from .staging import Staged

log = logging.getLogger(__name__)

PARTIAL_TOKEN = "partial_restore"


def judge(staged: Staged, state: dict[str, Any], *, path: str, partial_ok: bool, required: Iterable[str] = ()) -> None:
    """Raise unless ``staged`` restores all of ``state`` (``partial_ok``: all of ``required``, the rest warned).

    The parts that were not restored are named once each, with why when the loader said
    (``'sched': no scheduler.pt in the checkpoint``), so the record reads as a list.
    """
    named = {p.split(":", 1)[0].strip("'\" ") for p in staged.not_restored}
    parts = list(staged.not_restored)
    parts += [f"{k!r}: not in the checkpoint" for k in state if k not in staged.tree and k not in named]
    if not parts:
        return
    req = set(required)
    hard = [p for p in parts if p.split(":", 1)[0].strip("'\" ") in req] if partial_ok else parts
    if hard:
        raise IncompleteRestore(
            f"incomplete: {path} does not restore {hard}; resume restores everything state asks for "
            "(pass partial_ok=True to resume from it anyway)",
            missing=tuple(hard),
        )
    staged.warnings.append(f"{PARTIAL_TOKEN}: {path}: not restored, keeping their current values: {parts}")
