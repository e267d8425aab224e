"""Reproducible epochs: the same random numbers in epoch k whether or not the run was resumed."""

from __future__ import annotations

import os
import random

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class EpochSeed(Callback):
    """Reseeds every random generator at the start of each training epoch from (seed, epoch, rank).

    Lightning does not save random-generator states in checkpoints, so a run resumed from an
    end-of-epoch checkpoint would otherwise draw different initial-state noise, dropout masks and
    data orders than the uninterrupted run. Reseeding from ``(seed, epoch, global rank)`` makes
    epoch ``k`` identical in both (data modules shuffle from their own per-epoch seeds too), and
    gives each process of a distributed run its own stream.

    Args:
        seed: base seed; ``None`` uses the run's global seed (``seed_everything``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = (base * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank) % 2**63
        random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
