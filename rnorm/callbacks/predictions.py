"""``rnorm predict``'s output: one file of every example's predictions, written atomically.

The file is a ``dict`` of CPU tensors saved with ``torch.save``; read it back with
``torch.load(path, weights_only=True)``. ``index`` ``(N,)`` holds each example's position in the
prediction set (the test split), and every other key is what the task's ``predict_step``
returns per example, the batches concatenated in order (a dimension that differs between
batches, such as the reader's document length, is padded with 0), plus what the task's
``prediction_extras()`` adds. Per task (see each task's ``predict_step``):

* ``SequenceClassifier``: ``prediction`` ``(N,)``, ``probabilities`` ``(N, C)``, ``target`` ``(N,)``;
* ``CharLanguageModel``: ``log_prob`` ``(N, L)`` natural-log probability of each target
  character (0 past ``lengths``), ``target`` ``(N, L)`` ids (-100 past ``lengths``),
  ``lengths`` ``(N,)``, ``bpc`` ``(N,)``: one row per test segment, in stream order;
* ``AttentiveReader``: ``prediction`` ``(N,)`` entity, ``probabilities`` ``(N, E)``,
  ``attention`` ``(N, Td)`` (0 on padding), ``document_lengths`` ``(N,)``, ``answer`` ``(N,)``;
* ``DRAW``: ``nll_bound``, ``recon``, ``kl`` ``(N,)`` in nats, ``reconstruction`` ``(N, H, W)``
  pixel probabilities, and ``samples`` ``(S, H, W)``: ``num_samples`` draws from the prior.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["PredictionWriter", "collate_predictions"]

FILE_NAME = "predictions.pt"


def collate_predictions(outputs: Sequence[Any]) -> dict[str, Tensor]:
    """Concatenate per-batch outputs (dicts of batch-first tensors, or tensors) into one dict.

    Tensors whose trailing sizes differ between batches are padded with 0 to the largest.

    >>> collate_predictions([{"a": torch.ones(2, 1)}, {"a": torch.ones(1, 3)}])["a"].tolist()
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    batches = [output if isinstance(output, dict) else {"prediction": output} for output in outputs]
    collated = {}
    for key in batches[0] if batches else ():
        tensors = [batch[key].detach().cpu() for batch in batches]
        shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
        padded = []
        for tensor in tensors:
            pad = []  # F.pad's order: last dimension first, (before, after) each
            for size, target in zip(reversed(tensor.shape[1:]), reversed(shape)):
                pad += [0, target - size]
            padded.append(torch.nn.functional.pad(tensor, pad) if any(pad) else tensor)
        collated[key] = torch.cat(padded)
    return collated


class PredictionWriter(BasePredictionWriter):
    """Writes what ``rnorm predict`` computes to one file (format: this module's documentation).

    Under several processes each writes its own share, to ``predictions.rank{R}.pt``; ``index``
    says which examples it holds.

    Args:
        path: the file; ``None``: ``predictions.pt`` in the run's folder (``trainer.log_dir``:
            ``lightning_logs/version_N/``, or ``version_N/`` without a logger).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        #: The file written by the last prediction run.
        self.written: Path | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank asks: log_dir broadcasts
        if predictions and isinstance(predictions[0], list):
            raise ValueError("PredictionWriter writes the predictions of one dataloader, but predict got several")
        collated = collate_predictions(predictions)
        count = len(next(iter(collated.values()))) if collated else 0
        indices = [int(i) for batch in _one_dataloader(batch_indices) for i in batch]
        collated["index"] = torch.tensor(indices if len(indices) == count else range(count), dtype=torch.long)
        extras = getattr(pl_module, "prediction_extras", None)
        if callable(extras):
            collated.update({key: value.detach().cpu() for key, value in extras().items()})
        path = Path(self.path) if self.path is not None else Path(log_dir) / FILE_NAME
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        buffer = io.BytesIO()
        torch.save(collated, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        self.written = path
        print(f"Predictions for {count} examples written to {path}", flush=True)


def _one_dataloader(batch_indices: Sequence[Any] | None) -> Sequence[Sequence[int]]:
    """Lightning's batch indices (per dataloader, then per batch) of the one dataloader, per batch."""
    if not batch_indices:
        return []
    first = batch_indices[0]
    nested = isinstance(first, list) and bool(first) and isinstance(first[0], list)
    return first if nested else batch_indices
