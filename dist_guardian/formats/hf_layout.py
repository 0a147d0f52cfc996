"""Hugging Face Trainer checkpoint directories (``checkpoint-N/``), sniffed without torch.

Belongs here: which files of a ``checkpoint-N/`` directory hold what (model weights whole or
sharded, optimizer, scheduler, per-rank RNG, the trainer state), the step its
``trainer_state.json`` states, the consistency of a sharded model's index, and the narrow
allowlist of the globals the Trainer's ``rng_state*.pth`` files need (numpy's MT19937 state).
Nothing here opens a file: callers hand in names and bytes, so discovery and verification
stay torch-free and the CLI fast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

HF_DIR_RE = re.compile(r"^checkpoint-(\d{1,15})\Z")
TRAINER_STATE = "trainer_state.json"
MODEL_SAFETENSORS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
MODEL_BIN = "pytorch_model.bin"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors\Z")
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_RE = re.compile(r"^rng_state(?:_(\d{1,7}))?\.pth\Z")
# What the Trainer writes beside the state and dist_guardian never reads: ``training_args.bin`` is a
# pickled ``TrainingArguments`` (its globals are transformers classes, so it could only ever be R);
# the rest is configuration for people and for ``from_pretrained``.
SIDE_FILES = frozenset(
    {"training_args.bin", "config.json", "generation_config.json", "scaler.pt", "README.md", "adapter_config.json"}
)
# trainer_state.json keeps the whole log history: a long run writes megabytes, never gigabytes.
MAX_TRAINER_STATE_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
# The globals of the Trainer's ``rng_state*.pth`` beyond torch's weights-only list: numpy's RNG state
# is a (name, uint32 array, pos, has_gauss, cached) tuple, pickled through ndarray reconstruction.
# Only for those files; an ``optimizer.pt`` naming them is still judged by the plain list.
RNG_SAFE_GLOBALS = frozenset(
    {
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
    }
)


@dataclass(frozen=True, slots=True)
class HFFiles:
    """What each file of one ``checkpoint-N/`` directory is, by name."""

    model: tuple[str, ...]  # model.safetensors, or every shard, or pytorch_model.bin
    index: str | None  # model.safetensors.index.json of a sharded model
    optimizer: str | None
    scheduler: str | None
    rng: dict[int | None, str]  # rank (None: the single-process rng_state.pth) -> file name
    trainer_state: str | None
    side: tuple[str, ...]  # present, never read (training_args.bin...)

    @property
    def torch_files(self) -> tuple[str, ...]:
        """The ``torch.save`` files a load reads (their pickles are judged before that)."""
        out = [n for n in (self.optimizer, self.scheduler) if n]
        out += sorted(self.rng.values())
        out += [n for n in self.model if n.endswith(".bin")]
        return tuple(out)

    @property
    def rng_world_size(self) -> int | None:
        """How many ranks saved an RNG file (``rng_state_K.pth``), or None for a single-process save."""
        ranks = [r for r in self.rng if r is not None]
        return max(ranks) + 1 if ranks else None


def classify(names: Iterable[str]) -> HFFiles:
    """The role of each file name of a checkpoint directory (unknown names are neither read nor judged)."""
    names = set(names)
    shards = sorted(n for n in names if SHARD_RE.match(n))
    if MODEL_SAFETENSORS in names:
        model: tuple[str, ...] = (MODEL_SAFETENSORS,)
    elif shards:
        model = tuple(shards)
    elif MODEL_BIN in names:
        model = (MODEL_BIN,)
    else:
        model = ()
    rng: dict[int | None, str] = {}
    for n in names:
        m = RNG_RE.match(n)
        if m:
            rng[int(m.group(1)) if m.group(1) is not None else None] = n
    return HFFiles(
        model=model,
        index=MODEL_INDEX if MODEL_INDEX in names and model and model[0] != MODEL_SAFETENSORS else None,
        optimizer=OPTIMIZER if OPTIMIZER in names else None,
        scheduler=SCHEDULER if SCHEDULER in names else None,
        rng=rng,
        trainer_state=TRAINER_STATE if TRAINER_STATE in names else None,
        side=tuple(sorted(names & SIDE_FILES)),
    )


def looks_like_hf(dir_name: str, names: Iterable[str]) -> bool:
    """Whether a directory is a Trainer checkpoint: it holds ``trainer_state.json``, or it is named
    ``checkpoint-N`` and holds model weights (``save_only_model`` leaves no trainer state out)."""
    names = set(names)
    if TRAINER_STATE in names:
        return True
    return bool(HF_DIR_RE.match(dir_name)) and bool(classify(names).model)


def step_from_trainer_state(data: bytes) -> int | None:
    """``global_step`` of a ``trainer_state.json``, or None when it is not a non-negative integer."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    step = doc.get("global_step") if isinstance(doc, dict) else None
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return step
    return None


def index_problems(data: bytes, shards: Iterable[str], tensors: dict[str, set[str]] | None = None) -> list[str]:
    """What is inconsistent between a sharded model's index and its shards ([] when nothing).

    Every shard the index names must be present and be a shard name, every present shard named, and
    (given ``tensors``: shard -> tensor names from the headers) every tensor in the shard it names.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return [f"{MODEL_INDEX}: not valid JSON ({str(e)[:80]})"]
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        return [f"{MODEL_INDEX}: no weight_map of tensor -> shard names"]
    present = set(shards)
    named = set(wmap.values())
    out = []
    bad = sorted(n for n in named if not SHARD_RE.match(n))
    if bad:
        out.append(f"{MODEL_INDEX}: names files that are not shards: {bad[:5]}")
    missing = sorted(named - present - set(bad))
    if missing:
        out.append(f"missing: {MODEL_INDEX} names shards that are not there: {missing[:5]}")
    unnamed = sorted(present - named)
    if unnamed:
        out.append(f"{MODEL_INDEX}: shards present but not in the index: {unnamed[:5]}")
    totals = {int(m.group(2)) for n in present if (m := SHARD_RE.match(n))}
    if len(totals) == 1 and len(present) != next(iter(totals)):
        out.append(f"missing: {len(present)} of {next(iter(totals))} model shards present")
    if tensors is not None and not out:
        lost = sorted(t for t, shard in wmap.items() if t not in tensors.get(shard, set()))
        if lost:
            out.append(f"{MODEL_INDEX}: tensors not in the shard it names: {lost[:5]}")
    return out
