"""Progress output that fits a terminal, and plain per-epoch lines when the output is a file.

Lightning's bar shows every metric logged with ``prog_bar=True``, twice for training metrics
(``_step`` and ``_epoch``) plus the version number: in 80 columns the bar itself disappears and the
validation metric is cut off. :class:`CompactProgressBar` shows the training loss and the
validation metric that decides the checkpoints (the ``ModelCheckpoint``'s ``monitor``; without
one, every validation metric but the loss). Redirected to a file, a bar writes each update as a
new line (hundreds of KB for a short job): :class:`EpochLines` writes one line per epoch instead.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar

__all__ = ["BAR_FORMAT", "CompactProgressBar", "EpochLines", "essential_metrics"]

#: tqdm's default layout without the rate (``2.00it/s``): ten more columns for the bar.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def essential_metrics(metrics: dict[str, Any], monitor: str | None) -> dict[str, Any]:
    """The training loss (of the last step) as ``loss``, then ``monitor`` or else every
    validation metric but the loss.

    >>> essential_metrics({"v_num": 0, "train/loss_step": 0.5, "train/acc_step": 0.9, "train/loss_epoch": 0.6,
    ...                    "val/loss": 0.7, "val/acc": 0.8}, "val/acc")
    {'loss': 0.5, 'val/acc': 0.8}
    """
    shown = {}
    for name in ("train/loss_step", "train/loss"):
        if name in metrics:
            shown["loss"] = metrics[name]
            break
    if monitor is not None and monitor in metrics:
        shown[monitor] = metrics[monitor]
    elif monitor is None:
        shown.update({k: v for k, v in metrics.items() if k.startswith("val/") and k != "val/loss"})
    return shown


def _monitor(trainer: Trainer) -> str | None:
    checkpoint = trainer.checkpoint_callback
    return checkpoint.monitor if isinstance(checkpoint, ModelCheckpoint) else None


class CompactProgressBar(TQDMProgressBar):
    """Lightning's progress bar with only :func:`essential_metrics` and no rate, so that it fits 80 columns."""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.bar_format = BAR_FORMAT
        return bar

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return essential_metrics(super().get_metrics(trainer, pl_module), _monitor(trainer))


class EpochLines(ProgressBar):
    """One line per training epoch, after its validation: ``epoch 3/10  loss 0.412  val/acc 0.874  (12.3 s)``."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = essential_metrics(self.get_metrics(trainer, pl_module), _monitor(trainer))
        values = "  ".join(f"{name} {_format(value)}" for name, value in metrics.items())
        total = f"/{trainer.max_epochs}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        elapsed = time.monotonic() - self._started
        print(f"epoch {trainer.current_epoch + 1}{total}  {values}  ({elapsed:.1f} s)", flush=True)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
