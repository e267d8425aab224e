"""Reproducible epochs: the same random numbers in epoch k whether or not the run was resumed."""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class EpochSeed(Callback):
    """Reseeds every random generator at each epoch's first training batch from (seed, epoch, rank).

    Lightning does not save random-generator states in checkpoints, so a run resumed from an
    end-of-epoch checkpoint would otherwise draw different initial-state noise, dropout masks and
    data orders than the uninterrupted run. Reseeding from ``(seed, epoch, global rank)`` makes
    epoch ``k`` identical in both (data modules shuffle from their own per-epoch seeds too), and
    gives each process of a distributed run its own stream.

    The reseed happens at the first batch, not at ``on_train_epoch_start``: creating the epoch's
    data-loader iterator draws a worker seed from the global generator, and a resumed run creates
    it at another moment than an uninterrupted one.

    Args:
        seed: base seed; ``None`` uses the run's global seed (``seed_everything``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = (base * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank) % 2**63
        random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
