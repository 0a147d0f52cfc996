"""A tiny LightningModule and a CPU Trainer that writes real ``.ckpt`` files (ModelCheckpoint).

Shared by the Lightning tests: the checkpoints are written by pytorch_lightning itself, so the
layouts (``epoch=E-step=S.ckpt``, ``-vN`` suffixes, ``last.ckpt``) and contents (``state_dict``,
``optimizer_states``, ``lr_schedulers``, ``global_step``) are the library's, not imitations.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

for _name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="pytorch_lightning")
warnings.filterwarnings("ignore", module="lightning_fabric")


class TinyModule(pl.LightningModule):
    """Linear(8, 16) -> ReLU -> Linear(16, 4), AdamW and a StepLR stepped every optimizer step."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.seen_steps: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.seen_steps.append(self.global_step)
        return self(x).pow(2).mean()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> Any:
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


def trainer(dirpath: str, max_steps: int, *, every: int = 10, plugins: Any = None, **ckpt_kw: Any) -> pl.Trainer:
    """A CPU Trainer with nothing but a ModelCheckpoint every ``every`` steps (keeps all, plus ``last.ckpt``)."""
    opts = {"every_n_train_steps": every, "save_top_k": -1, "save_last": True, **ckpt_kw}
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=dirpath, **opts)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        callbacks=[ckpt],
        plugins=plugins,
        num_sanity_val_steps=0,
    )


def fit(dirpath: str, max_steps: int, *, seed: int = 0, ckpt_path: str | None = None, **kw: Any) -> TinyModule:
    """Train a fresh TinyModule to ``max_steps`` (resuming from ``ckpt_path`` when given); returns it."""
    module = TinyModule(seed)
    trainer(dirpath, max_steps, **kw).fit(module, ckpt_path=ckpt_path)
    return module


def ckpts(dirpath: str) -> list[str]:
    return sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt"))
