"""No empty run folder after a run that failed before it recorded anything."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["RemoveFailedRunDirectory"]


class RemoveFailedRunDirectory(Callback):
    """Deletes what a run created when it fails before its first training step.

    A run that stops on bad input (a missing data folder, a wrong option) leaves behind only what
    its start wrote — ``config.yaml``, an empty TensorBoard file — in a fresh ``version_N`` that
    the next run would skip. The folders the run created (the run's folder and those above it
    that did not exist when the callback was made) are removed, unless they hold a checkpoint.

    Args:
        run_dir: the run's folder (``trainer.log_dir``), before the run creates it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir).absolute()
        created = [folder for folder in [run_dir, *run_dir.parents] if not folder.exists()]
        #: The topmost folder the run will create, if any.
        self.created: Path | None = created[-1] if created else None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        created = self.created
        if created is None or not trainer.is_global_zero or trainer.global_step > 0 or not created.is_dir():
            return
        if next(created.rglob("*.ckpt"), None) is None:
            shutil.rmtree(created, ignore_errors=True)
