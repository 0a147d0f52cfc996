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
    """What a user resumes into: a fresh model, and the optimizer and scheduler the Trainer builds for it
    (AdamW over a decay and a no-decay group, a linear schedule), built without ``TrainingArguments`` so
    that a harness rank needs no accelerate launch environment."""
    from transformers import get_linear_schedule_with_warmup

    model = tiny_model(seed)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  # self is unused
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.0},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW(groups, lr=1e-2)
    return {"model": model, "optim": optim, "sched": get_linear_schedule_with_warmup(optim, 0, max_steps)}


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


def find_on_rank(rank: int, world: int, *, output_dir: str, stores: list[str], per_rank_dir: str) -> dict[str, Any]:
    """A harness rank: ``find_resume_checkpoint`` collectively, then ``Guardian.resume`` of a checkpoint dir
    that holds one RNG file per rank (``rng_state_K.pth``)."""
    from dist_guardian import Guardian
    from dist_guardian.integrations.hf import find_resume_checkpoint

    path = find_resume_checkpoint(output_dir, stores=stores, timeout=60.0)
    g = Guardian(stores=[per_rank_dir], timeout=60.0)
    r = g.resume(live_state())
    g.close()
    return {"path": path, "resumed": r.resumed, "step": r.step, "torch_rng": torch.get_rng_state()[:64].tolist()}


def write_rank_rng(ck: str, world: int) -> list[list[int]]:
    """Replace ``rng_state.pth`` by ``rng_state_K.pth`` files as a ``world``-process Trainer writes them
    (python, numpy and torch state, each rank seeded apart); returns each rank's torch state head."""
    import random

    import numpy as np

    os.remove(os.path.join(ck, "rng_state.pth"))
    heads = []
    for k in range(world):
        random.seed(k)
        np.random.seed(k)
        torch.manual_seed(100 + k)
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
        torch.save(state, os.path.join(ck, f"rng_state_{k}.pth"))
        heads.append(state["cpu"][:64].tolist())
    return heads


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
