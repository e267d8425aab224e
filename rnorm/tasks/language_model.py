"""Character-level language modelling (Penn Treebank, text8: BN §5.2–5.3, NP §5.1)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from rnorm.functional.masking import lengths_to_mask
from rnorm.metrics import BitsPerCharacter
from rnorm.nn import NormLSTM
from rnorm.tasks.base import EncoderFactory, RecurrentTask, orthogonal_linear


class CharLanguageModel(RecurrentTask[NormLSTM]):
    """A NormLSTM predicting the next character at every step, scored in bits per character.

    Batches are ``(inputs, targets, lengths)``: ``inputs`` and ``targets`` ``(B, T)`` character
    ids, ``lengths`` ``(B,)`` (or ``(inputs, targets)`` when every sequence is full).

    Args:
        encoder: builds the NormLSTM from the input size (the paper: ``hidden_size`` 1000 on PTB).
        optimizer: builds the optimizer (the papers: Adam, lr 2e-3 on PTB, 1e-3 on text8).
        lr_scheduler: optional learning-rate schedule (NP §5.1: exponential decay).
        lr_scheduler_interval: step the schedule every optimizer ``step`` or every ``epoch``.
        input_encoding: ``onehot`` (the BN paper), ``embedding`` (learned), or ``orthogonal``:
            one-hot times a fixed, untrained random orthogonal matrix (NP §5.1, which Norm-Prop
            needs for normalized inputs).
        embedding_size: width of ``embedding`` and ``orthogonal`` inputs (default: the vocabulary size).
        vocab_size: ``None`` to take the data module's ``vocab_size``.

    Testing logs ``test/bpc`` over the whole test stream (the first test dataloader) and, for the
    data module's extra loaders of longer subsequences, ``test/bpc_length_L`` (BN Fig. 3b).
    """

    data_sizes = ("vocab_size",)

    def __init__(
        self,
        encoder: EncoderFactory,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        input_encoding: Literal["onehot", "embedding", "orthogonal"] = "onehot",
        embedding_size: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(encoder, optimizer, lr_scheduler, lr_scheduler_interval)
        if input_encoding == "onehot" and embedding_size is not None:
            raise ValueError("embedding_size applies to 'embedding' and 'orthogonal' inputs, not 'onehot'.")
        self.save_hyperparameters()
        self._build_if_sized()

    def build(self) -> None:
        vocab_size = self.hparams.vocab_size
        encoding = self.hparams.input_encoding
        width = vocab_size if encoding == "onehot" else (self.hparams.embedding_size or vocab_size)
        if encoding == "embedding":
            self.embedding = nn.Embedding(vocab_size, width)
        elif encoding == "orthogonal":
            matrix = torch.empty(vocab_size, width)
            nn.init.orthogonal_(matrix)
            self.register_buffer("input_matrix", matrix)  # fixed: saved with the model, never trained
        self.encoder = self._build_encoder(width)
        self.head = orthogonal_linear(self.encoder.hidden_size * self.encoder.num_directions, vocab_size)
        self.train_bpc, self.val_bpc = BitsPerCharacter(), BitsPerCharacter()
        self.test_bpc = nn.ModuleList()  # one per test dataloader, sized in on_test_start

    def encode_inputs(self, inputs: Tensor) -> Tensor:
        """Character ids ``(B, T)`` → input vectors ``(B, T, D)``."""
        encoding = self.hparams.input_encoding
        if encoding == "onehot":
            return F.one_hot(inputs, self.hparams.vocab_size).to(self.head.weight.dtype)
        if encoding == "embedding":
            return self.embedding(inputs)
        return self.input_matrix[inputs]  # one-hot times the fixed matrix is a row lookup

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Next-character logits ``(B, T, V)`` for character ids ``(B, T)``."""
        output, _ = self.encoder(self.encode_inputs(inputs), lengths)
        return self.head(output)

    @staticmethod
    def _nats(logits: Tensor, targets: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-character cross-entropy ``(B, T)``, zero at padding, and the ``(B, T)`` validity mask."""
        nats = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        if lengths is None:
            return nats, torch.ones_like(nats)
        valid = lengths_to_mask(lengths, targets.shape[1], targets.device).t().to(nats.dtype)
        return nats * valid, valid

    def _loss(self, logits: Tensor, targets: Tensor, lengths: Tensor | None) -> Tensor:
        nats, valid = self._nats(logits, targets, lengths)
        return nats.sum() / valid.sum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, lengths = self._unpack(batch)
        logits = self(inputs, lengths)
        loss = self._loss(logits, targets, lengths)
        self.train_bpc(logits.detach(), targets, lengths)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(targets), sync_dist=True)
        self.log("train/bpc", self.train_bpc, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets, lengths = self._unpack(batch)
        logits = self(inputs, lengths)
        self.val_bpc.update(logits, targets, lengths)
        self.log("val/loss", self._loss(logits, targets, lengths), on_epoch=True, batch_size=len(targets), sync_dist=True)
        # Logged as the metric object: its value over the whole stream, not a mean of batch means.
        self.log("val/bpc", self.val_bpc, on_epoch=True, prog_bar=True, batch_size=len(targets))

    def on_test_start(self) -> None:
        super().on_test_start()
        loaders = self.trainer.test_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        self.test_bpc = nn.ModuleList(BitsPerCharacter() for _ in range(count)).to(self.device)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, targets, lengths = self._unpack(batch)
        logits = self(inputs, lengths)
        metric = self.test_bpc[dataloader_idx]
        metric.update(logits, targets, lengths)
        self.log(self._test_metric_name(dataloader_idx), metric, on_epoch=True, add_dataloader_idx=False, batch_size=len(targets))

    def _test_metric_name(self, dataloader_idx: int) -> str:
        if dataloader_idx == 0:
            return "test/bpc"
        lengths = getattr(getattr(self.trainer, "datamodule", None), "test_lengths", None)
        if lengths is not None and dataloader_idx < len(lengths):
            return f"test/bpc_length_{lengths[dataloader_idx]}"
        return f"test/bpc_loader_{dataloader_idx}"

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per segment: ``log_prob`` ``(B, T)``, the natural-log probability the model gives each
        target character (0 past the segment's length), ``target`` ``(B, T)``, ``lengths`` ``(B,)``
        and ``bpc`` ``(B,)``, the segment's bits per character."""
        inputs, targets, lengths = self._unpack(batch)
        nats, valid = self._nats(self(inputs, lengths), targets, lengths)
        lengths = valid.sum(dim=1).long() if lengths is None else lengths
        bpc = nats.sum(dim=1) / valid.sum(dim=1).clamp(min=1) / math.log(2)
        return {"log_prob": -nats, "target": targets, "lengths": lengths, "bpc": bpc}

    def population_forward(self, batch: Any) -> None:
        inputs, _, lengths = self._unpack(batch)
        self.encoder(self.encode_inputs(inputs), lengths)
