"""Sequence classification from the final hidden state (sequential and permuted MNIST, BN §5.1)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from rnorm.nn import NormLSTM
from rnorm.tasks.base import EncoderFactory, RecurrentTask, orthogonal_linear


class SequenceClassifier(RecurrentTask[NormLSTM]):
    """A NormLSTM encoder and a linear softmax classifier on its final hidden state.

    Batches are ``(x, y)`` or ``(x, y, lengths)``: ``x`` ``(B, T, D)``, ``y`` ``(B,)``; the final
    hidden state is taken at each sequence's last real step (of the last layer; both directions
    concatenated when bidirectional).

    Args:
        encoder: builds the NormLSTM from the input size, e.g.
            ``{class_path: rnorm.nn.NormLSTM, init_args: {hidden_size: 100}}`` in YAML.
        optimizer: builds the optimizer (BN §5.1: RMSProp, lr 1e-3, squared-gradient decay ``alpha`` 0.9).
        lr_scheduler: optional learning-rate schedule.
        lr_scheduler_interval: step the schedule every optimizer ``step`` or every ``epoch``.
        input_size: features per step; ``None`` to take the data module's ``input_size``.
        num_classes: ``None`` to take the data module's ``num_classes``.
    """

    data_sizes = ("input_size", "num_classes")

    def __init__(
        self,
        encoder: EncoderFactory,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        input_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(encoder, optimizer, lr_scheduler, lr_scheduler_interval)
        self.save_hyperparameters()
        self._build_if_sized()

    def build(self) -> None:
        num_classes = self.hparams.num_classes
        self.encoder = self._build_encoder(self.hparams.input_size)
        self.head = orthogonal_linear(self.encoder.hidden_size * self.encoder.num_directions, num_classes)
        self.metrics = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("train_acc", "val_acc", "test_acc")}
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits ``(B, num_classes)`` for inputs ``x`` ``(B, T, D)``."""
        _, (h_n, _) = self.encoder(x, lengths)
        directions = self.encoder.num_directions
        final = torch.cat(list(h_n[-directions:]), dim=1)  # (B, directions * H), last layer
        return self.head(final)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y, lengths = self._unpack(batch)
        logits = self(x, lengths)
        loss = F.cross_entropy(logits, y)
        accuracy = self.metrics[f"{stage}_acc"]
        accuracy(logits, y)
        on_step = stage == "train"
        # sync_dist: under DDP the epoch value averages every process's batches (the accuracy
        # metric object synchronizes itself).
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"prediction": (B,), "probabilities": (B, num_classes)}``, and ``"target"`` ``(B,)`` when
        the batch has labels (``(x, y)`` or ``(x, y, lengths)``; a bare ``x`` has none)."""
        if isinstance(batch, (tuple, list)):
            x, y, lengths = self._unpack(batch)
        else:
            x, y, lengths = batch, None, None
        probabilities = self(x, lengths).softmax(dim=-1)
        out = {"prediction": probabilities.argmax(dim=-1), "probabilities": probabilities}
        return out if y is None else {**out, "target": y}

    def population_forward(self, batch: Any) -> None:
        x, _, lengths = self._unpack(batch)
        self.encoder(x, lengths)
