"""The Attentive Reader (Hermann et al., 2015) with normalized LSTMs, as in BN §5.4 and Appendix C.

A document ``d`` and a cloze query ``q`` are embedded word by word and encoded by NormLSTMs. With
``y_d(t)`` the document encoder's output at position ``t`` (``[forward_t; backward_t]`` when
bidirectional) and ``u`` the query encoding (the forward direction's last state, and the backward
direction's first output when bidirectional)::

    m(t) = tanh(N_ym(W_ym y_d(t)) + N_um(W_um u) + b_m)
    s(t) ∝ exp(w_ms · m(t))               over the document's unpadded positions only
    r    = Σ_t s(t) y_d(t)
    g    = tanh(N_rg(W_rg r) + N_ug(W_ug u) + b_g)
    p(a | d, q) ∝ exp(W_a g)              over the entities a present in the document

``N_·`` is the identity for the baseline and BN-LSTM, and batch normalization of each term going
into a tanh for BN-everywhere, BN-e* and BN-e** (BN §5.4): any strategy registered in
:mod:`rnorm.norms` (``attention_norm``), acting at its ``input`` site. The document term is
normalized as a ``(T, B, F)`` sequence with its padding mask, the others as ``(1, B, F)``; each
term's bias is dropped in favour of one bias after the sum, which normalization would cancel
otherwise. Which variant is which lies in the encoder's strategies and direction (the YAMLs of
``configs/qa``): BN-e* puts ``seqbn`` on the LSTMs' input terms, BN-e** is BN-e* made
bidirectional, its backward direction reversing only the unpadded part of each sequence.

>>> import functools, torch
>>> from rnorm.nn import NormLSTM
>>> model = AttentiveReader(functools.partial(NormLSTM, hidden_size=6, bidirectional=True), vocab_size=20,
...                         num_entities=4, embedding_size=5).eval()
>>> document, query = torch.tensor([[3, 9, 4, 0], [5, 8, 0, 0]]), torch.tensor([[2, 7], [2, 0]])
>>> with torch.no_grad():
...     out = model.read(document, torch.tensor([3, 2]), query, torch.tensor([2, 1]))
>>> tuple(out.logits.shape), out.attention.sum(1).round(decimals=6).tolist(), out.attention[1, 2:].tolist()
((2, 4), [1.0, 1.0], [0.0, 0.0])
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rnorm import norms
from rnorm.functional.masking import lengths_to_mask
from rnorm.nn import NormLSTM
from rnorm.nn.normalized_sum import NormalizedSum
from rnorm.tasks.base import EncoderFactory, RecurrentTask, orthogonal_linear

__all__ = ["AttentionReadout", "AttentiveReader", "ReaderOutput"]


class ReaderOutput(NamedTuple):
    """What the reader computes for a batch: ``logits`` ``(B, E)`` (``-inf`` off the candidates
    when they are given) and ``attention`` ``(B, Td)``, ``s(t)``, exactly 0 on padding."""

    logits: Tensor
    attention: Tensor


class AttentionReadout(nn.Module):
    """``m(t)``, the attention ``s(t)`` over unpadded positions, and the read vector ``r``.

    Args:
        document_size: width of ``y_d(t)``.
        query_size: width of ``u``.
        attention_size: width of ``m(t)``.
        norm: the strategy of ``N_ym`` and ``N_um`` (see :class:`~rnorm.nn.NormalizedSum`).
        norm_kwargs: its hyperparameters.
    """

    def __init__(
        self,
        document_size: int,
        query_size: int,
        attention_size: int,
        norm: str = "none",
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.memory = NormalizedSum([document_size, query_size], attention_size, norm, norm_kwargs)
        self.score = nn.Linear(attention_size, 1, bias=False)  # w_ms; a bias would cancel in the softmax
        nn.init.orthogonal_(self.score.weight)

    def forward(self, y: Tensor, u: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` ``(T, B, Dy)``, ``u`` ``(B, Du)``, ``mask`` ``(T, B)`` → ``s`` ``(T, B)`` and ``r`` ``(B, Dy)``."""
        m = torch.tanh(self.memory((y, mask), (u.unsqueeze(0), None)))  # (T, B, A)
        scores = self.score(m).squeeze(-1).masked_fill(~mask, float("-inf"))  # (T, B)
        s = scores.softmax(dim=0)  # exactly 0 at padding: exp(-inf)
        r = (s.unsqueeze(-1) * y).sum(dim=0)  # (B, Dy)
        return s, r


class AttentiveReader(RecurrentTask[NormLSTM]):
    """Hermann et al.'s Attentive Reader: embeddings, NormLSTM encoders, attention, an entity softmax.

    Batches are the dicts of :class:`rnorm.data.QADataModule`: ``document`` ``(B, Td)``,
    ``document_lengths``, ``query`` ``(B, Tq)``, ``query_lengths``, ``candidates`` ``(B, E)`` bool
    and ``answer`` ``(B,)``. The loss is the cross-entropy over the candidates; an example whose
    answer is not a candidate (the relevance filter stripped it) cannot be answered: it is left out
    of the loss and counted as an error. ``train/error``, ``val/error`` and ``test/error`` are
    error rates over all examples, ``*/loss`` the mean loss over the answerable ones.

    Args:
        encoder: builds the document NormLSTM from the embedding size; its ``bidirectional``
            decides ``y_d(t) = [forward_t; backward_t]`` (BN-e**) or ``forward_t``.
        optimizer: builds the optimizer (BN Appendix C: Adam, lr 8e-5; 8e-4 for BN-e* and BN-e**).
        lr_scheduler: optional learning-rate schedule.
        lr_scheduler_interval: step the schedule every optimizer ``step`` or every ``epoch``.
        query_encoder: builds the query NormLSTM; ``None``: another one from ``encoder`` (same
            settings, its own weights).
        embedding_size: width of the word embeddings (not given in the BN paper).
        attention_size: width of ``m(t)`` and ``g``; ``None``: the document encoding's width.
        attention_norm: the strategy of the four terms entering the attention's and the output's
            tanh (``none``; ``seqbn`` or ``bn`` for BN-everywhere): any name of ``rnorm normalizers``.
        attention_norm_kwargs: its hyperparameters.
        vocab_size: ``None`` to take the data module's ``vocab_size``.
        num_entities: ``None`` to take the data module's ``num_entities``.
    """

    data_sizes = ("vocab_size", "num_entities")

    def __init__(
        self,
        encoder: EncoderFactory,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        query_encoder: EncoderFactory | None = None,
        embedding_size: int = 200,
        attention_size: int | None = None,
        attention_norm: str = "none",
        attention_norm_kwargs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        num_entities: int | None = None,
    ) -> None:
        super().__init__(encoder, optimizer, lr_scheduler, lr_scheduler_interval)
        if embedding_size < 1 or (attention_size is not None and attention_size < 1):
            raise ValueError(
                f"Expected embedding_size >= 1 and attention_size >= 1 (or None) but got {embedding_size} "
                f"and {attention_size}"
            )
        norms.get(attention_norm)  # an unknown name fails here, listing the registered ones
        self.query_encoder_factory = query_encoder
        self.save_hyperparameters()
        self._build_if_sized()

    def build(self) -> None:
        hp = self.hparams
        self.embedding = nn.Embedding(hp.vocab_size, hp.embedding_size, padding_idx=0)
        self.encoder = self._build_encoder(hp.embedding_size)
        self.query_encoder = self._build_encoder(hp.embedding_size, self.query_encoder_factory or self.encoder_factory)
        document_size = self.encoder.hidden_size * self.encoder.num_directions
        query_size = self.query_encoder.hidden_size * self.query_encoder.num_directions
        width = hp.attention_size or document_size
        self.readout = AttentionReadout(document_size, query_size, width, hp.attention_norm, hp.attention_norm_kwargs)
        self.joint = NormalizedSum([document_size, query_size], width, hp.attention_norm, hp.attention_norm_kwargs)
        self.head = orthogonal_linear(width, hp.num_entities)
        self.error = nn.ModuleDict({f"{stage}_error": MeanMetric() for stage in ("train", "val", "test")})

    def _build_encoder(self, input_size: int, factory: EncoderFactory | None = None) -> NormLSTM:
        encoder = (factory or self.encoder_factory)(input_size)
        if not isinstance(encoder, NormLSTM):
            raise TypeError(f"Expected the encoder factory to build a NormLSTM, but it built {type(encoder).__name__}.")
        if not encoder.batch_first:
            raise ValueError("The Attentive Reader's encoders must be batch_first (the default).")
        return encoder

    # -- the network -----------------------------------------------------------------------------
    def read(
        self,
        document: Tensor,
        document_lengths: Tensor,
        query: Tensor,
        query_lengths: Tensor,
        candidates: Tensor | None = None,
    ) -> ReaderOutput:
        """Entity logits and attention for ids ``document`` ``(B, Td)`` and ``query`` ``(B, Tq)``.

        ``candidates`` ``(B, E)`` bool, if given, sets the other entities' logits to ``-inf``.
        """
        B, Td = document.shape
        y, _ = self.encoder(self.embedding(document), document_lengths)  # (B, Td, Dy), 0 at padding
        _, (h_n, _) = self.query_encoder(self.embedding(query), query_lengths)
        directions = self.query_encoder.num_directions
        u = torch.cat(list(h_n[-directions:]), dim=1)  # (B, Du): [forward last; backward first]
        mask = lengths_to_mask(document_lengths, Td, document.device)  # (Td, B)
        s, r = self.readout(y.transpose(0, 1), u, mask)  # (Td, B), (B, Dy)
        g = torch.tanh(self.joint((r.unsqueeze(0), None), (u.unsqueeze(0), None))).squeeze(0)  # (B, A)
        logits = self.head(g)  # (B, E)
        if candidates is not None:
            logits = logits.masked_fill(~candidates, float("-inf"))
        return ReaderOutput(logits, s.t())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Entity logits ``(B, E)`` of a batch dict, ``-inf`` off the candidates."""
        return self._read_batch(batch).logits

    def _read_batch(self, batch: dict[str, Tensor]) -> ReaderOutput:
        keys = ("document", "document_lengths", "query", "query_lengths", "candidates")
        return self.read(*(batch[key] for key in keys))

    # -- training and evaluation -----------------------------------------------------------------
    @staticmethod
    def _loss_and_errors(logits: Tensor, answer: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy over answerable examples (0 with a graph if none), per-example errors, and their count."""
        answerable = candidates.gather(1, answer.unsqueeze(1)).squeeze(1)  # (B,)
        errors = (~answerable | (logits.argmax(dim=1) != answer)).float()
        if answerable.any():
            loss = F.cross_entropy(logits[answerable], answer[answerable])
        else:  # nothing to learn from; keep the graph so that every step backpropagates
            loss = logits.masked_fill(~candidates, 0.0).sum() * 0.0
        return loss, errors, answerable.sum()

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        loss, errors, answerable = self._loss_and_errors(logits, batch["answer"], batch["candidates"])
        error = self.error[f"{stage}_error"]
        error.update(errors)
        on_step = stage == "train"
        size = len(errors)
        answered = max(int(answerable), 1)
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=answered, sync_dist=True
        )
        self.log(f"{stage}/error", error, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``{"prediction": (B,) entity, "probabilities": (B, E), "attention": (B, Td), "document_lengths": (B,),
        "answer": (B,)}``."""
        out = self._read_batch(batch)
        some = batch["candidates"].any(dim=1, keepdim=True)
        probabilities = torch.where(some, out.logits.softmax(dim=1), 0.0)  # no candidate: no probability
        return {
            "prediction": out.logits.argmax(dim=1),
            "probabilities": probabilities,
            "attention": out.attention,
            "document_lengths": batch["document_lengths"],
            "answer": batch["answer"],
        }

    def population_forward(self, batch: dict[str, Tensor]) -> None:
        """The training forward pass: encoders and the normalized attention terms see the batch as in training."""
        self(batch)
