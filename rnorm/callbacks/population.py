"""Exact population statistics before evaluation (BN §3: "averaging the minibatch estimates")."""

from __future__ import annotations

import logging
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from rnorm.norms import BatchStatisticsNorm, estimate_population_statistics

log = logging.getLogger(__name__)


class PopulationStatistics(Callback):
    """Re-estimates the population statistics of ``bn``/``seqbn`` before validation (and test).

    With ``mode="exact"`` the statistics of every step are replaced, before each validation during
    ``fit``, by the average of the minibatch estimates over ``num_batches`` training batches (the
    paper's method; see :func:`rnorm.norms.estimate_population_statistics`), so the checkpoint
    written after that validation carries them. ``mode="running"`` keeps the running averages
    updated during training. A model without batch-statistics strategies is left alone.

    Args:
        mode: ``exact`` or ``running``.
        num_batches: training batches averaged per estimate.
        on_test: also re-estimate before ``test`` (needs the training data); by default testing
            uses the statistics stored in the model or checkpoint.
    """

    def __init__(self, mode: Literal["exact", "running"] = "exact", num_batches: int = 100, on_test: bool = False) -> None:
        if num_batches < 1:
            raise ValueError(f"Expected num_batches >= 1, but got {num_batches}.")
        self.mode, self.num_batches, self.on_test = mode, num_batches, on_test

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # nothing trained yet / validate-only runs use what the model carries
        self._estimate(trainer, pl_module, trainer.train_dataloader)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_test:
            datamodule = trainer.datamodule
            if datamodule is None:
                raise ValueError("PopulationStatistics(on_test=True) needs a data module to draw training batches from.")
            datamodule.setup("fit")
            self._estimate(trainer, pl_module, datamodule.train_dataloader())

    def _estimate(self, trainer: Trainer, pl_module: LightningModule, loader) -> None:
        if self.mode != "exact" or not any(isinstance(m, BatchStatisticsNorm) for m in pl_module.modules()):
            return
        used = estimate_population_statistics(
            pl_module,
            loader,
            num_batches=self.num_batches,
            forward=lambda module, batch: module.population_forward(trainer.strategy.batch_to_device(batch)),
        )
        # Every validation of every epoch: a debug message (`logging.getLogger("rnorm").setLevel(logging.DEBUG)`).
        log.debug("Population statistics re-estimated from %d training batches.", used)
