"""Hugging Face Trainer runs for the foreign-layout and adapter tests: a tiny GPT-2 built from a config
(no download), a list-of-dicts dataset, and the live state a user resumes into.

Every checkpoint here is written by the real ``transformers.Trainer`` (a few seconds on CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (8,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def trainer(output_dir: str, max_steps: int, *, callbacks: Sequence[Any] = (), seed: int = 0, **args: Any) -> Trainer:
    """A Trainer over the tiny model that saves every ``save_steps`` (default 2) under ``output_dir``."""
    targs = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        save_steps=args.pop("save_steps", 2),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
        seed=seed,
        **args,
    )
    return Trainer(model=tiny_model(seed), args=targs, train_dataset=dataset(), callbacks=list(callbacks))


def train(output_dir: str, max_steps: int, **kw: Any) -> Trainer:
    t = trainer(output_dir, max_steps, **kw)
    t.train()
    return t


def live_state(max_steps: int = 6, seed: int = 5) -> dict[str, Any]:
    """What a user resumes into: a fresh model and the optimizer and scheduler the Trainer would build."""
    args = TrainingArguments(output_dir="unused", max_steps=max_steps, report_to=[], use_cpu=True, learning_rate=1e-2)
    t = Trainer(model=tiny_model(seed), args=args)
    t.create_optimizer_and_scheduler(num_training_steps=max_steps)
    return {"model": t.model, "optim": t.optimizer, "sched": t.lr_scheduler}


def saved(path: str) -> dict[str, Any]:
    """What one ``checkpoint-N/`` holds, read as the Trainer itself would (the test's reference)."""
    from safetensors.torch import load_file

    return {
        "model": load_file(os.path.join(path, "model.safetensors")),
        "optim": torch.load(os.path.join(path, "optimizer.pt"), weights_only=True),
        "sched": torch.load(os.path.join(path, "scheduler.pt"), weights_only=True),
    }


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def find_on_rank(rank: int, world: int, *, output_dir: str, stores: list[str]) -> str | None:
    """A harness rank: ``find_resume_checkpoint`` collectively, on every rank."""
    from dist_guardian.integrations.hf import find_resume_checkpoint

    return find_resume_checkpoint(output_dir, stores=stores, timeout=60.0)


def flip_byte(path: str, offset_from_end: int = 10) -> None:
    """One bit pattern changed inside the data of a file (the last tensor of a safetensors file)."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        b = f.read(1)
        f.seek(-offset_from_end, 2)
        f.write(bytes([b[0] ^ 0xFF]))


def set_float(path: str, tensor: str, value: float) -> None:
    """Overwrite the first element of one float32 tensor of a safetensors file in place (its size unchanged)."""
    import struct

    from dist_guardian import formats

    with open(path, "r+b") as f:
        header = formats.parse_header(f, os.path.getsize(path), name=path)
        (entry,) = [e for e in header.entries if e.name == tensor]
        assert entry.dtype == "F32"
        f.seek(header.data_start + entry.begin)
        f.write(struct.pack("<f", value))
