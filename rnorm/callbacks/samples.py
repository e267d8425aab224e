"""Sample grids of a generative task (DRAW) after each validation, as PNG files and TensorBoard images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from rnorm.utils.png import write_png

__all__ = ["SampleGrids"]


class SampleGrids(Callback):
    """After each validation (not the sanity check), writes the task's sample grids.

    The task provides ``sample_grids(originals, reconstructions) -> {name: (H, W) image in [0, 1]}``
    and returns ``{"images": (B, H, W), "reconstructions": (B, H, W)}`` from ``validation_step``;
    the first ``num_images`` of the first validation batch are shown with their reconstructions.
    Each grid goes to ``<log_dir>/samples/epoch=EEE-<name>.png`` (written atomically) and, with a
    TensorBoard logger, to its images as ``samples/<name>``. :class:`~rnorm.tasks.DRAW` adds this
    callback itself (``configure_callbacks``).

    Args:
        num_images: validation images shown with their reconstructions.
    """

    def __init__(self, num_images: int) -> None:
        if num_images < 1:
            raise ValueError(f"Expected num_images >= 1 but got {num_images}")
        self.num_images = num_images
        self._first_batch: tuple[Tensor, Tensor] | None = None

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking and isinstance(outputs, dict):
            count = self.num_images
            self._first_batch = outputs["images"][:count].cpu(), outputs["reconstructions"][:count].cpu()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank asks: log_dir broadcasts
        originals, reconstructions = self._first_batch or (None, None)
        grids = pl_module.sample_grids(originals, reconstructions)  # every rank: it may normalize with synced bn
        self._first_batch = None
        if not trainer.is_global_zero:
            return
        for name, grid in grids.items():
            write_png(Path(log_dir) / "samples" / f"epoch={trainer.current_epoch:03d}-{name}.png", grid)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"samples/{name}", grid.unsqueeze(0), global_step=trainer.global_step)
