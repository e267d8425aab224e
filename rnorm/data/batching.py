"""The last training batch of an epoch, for models that normalize with batch statistics.

An epoch of ``N`` training examples in batches of ``B`` ends with a batch of ``N mod B`` examples.
Batch normalization in training (``bn``, ``seqbn``: BN eq. 5) needs at least two samples to
compute a mean and a variance, and a batch of a few samples gives very noisy ones: MNIST's
5,001 training images in batches of 50 end with a batch of one, which ``NormLSTM`` refuses after
a whole epoch. The data modules' ``last_batch`` option says what happens to that short batch:

* ``"keep"``: it is trained on as it is;
* ``"drop"``: it is skipped (its examples are seen in other epochs, whose orders differ);
* ``"merge"``: it joins the batch before it (one batch of up to ``2B - 1`` examples), so that
  every example is still seen once per epoch;
* ``"auto"`` (the default): ``"merge"`` when the model being trained normalizes with batch
  statistics, ``"keep"`` otherwise. The data module asks the model it is attached to when
  Lightning requests the training loader (after both are set up); outside a ``Trainer`` it keeps.

>>> list(TrainingBatchSampler(range(7), batch_size=3, merge_last=True))
[[0, 1, 2], [3, 4, 5, 6]]
>>> list(TrainingBatchSampler(range(7), batch_size=3, drop_last=True))
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = [
    "LastBatch",
    "TrainingBatchSampler",
    "check_last_batch",
    "last_batch_policy",
    "loader",
    "training_batches",
    "uses_batch_statistics",
]

#: What to do with a short last training batch (see the module documentation).
LastBatch = Literal["auto", "keep", "merge", "drop"]
LAST_BATCH_CHOICES = ("auto", "keep", "merge", "drop")


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether any normalizer in ``module`` normalizes with statistics of the batch in training."""
    from rnorm.norms import Normalizer

    return any(isinstance(m, Normalizer) and m.batch_statistics is not None for m in module.modules())


def last_batch_policy(last_batch: LastBatch, trainer: Any) -> Literal["keep", "merge", "drop"]:
    """``last_batch`` with ``"auto"`` resolved for the model ``trainer`` trains (``None``: no trainer)."""
    check_last_batch(last_batch)
    if last_batch != "auto":
        return last_batch
    model = getattr(trainer, "lightning_module", None) if trainer is not None else None
    return "merge" if isinstance(model, nn.Module) and uses_batch_statistics(model) else "keep"


def check_last_batch(last_batch: str) -> None:
    """Raise ``ValueError`` unless ``last_batch`` is one of :data:`LastBatch`'s values."""
    if last_batch not in LAST_BATCH_CHOICES:
        raise ValueError(f"Expected last_batch to be one of {LAST_BATCH_CHOICES} but got {last_batch!r}")


class TrainingBatchSampler(BatchSampler):
    """Batches of ``batch_size`` from ``sampler``; a short last batch is kept, dropped or merged.

    A :class:`torch.utils.data.BatchSampler` (so that Lightning can put a distributed sampler in
    place of ``sampler``, and calls ``sampler.set_epoch`` before every epoch).

    Args:
        sampler: the epoch's order of examples (anything iterable with a length).
        batch_size: examples per batch.
        drop_last: drop a last batch shorter than ``batch_size``.
        merge_last: append a last batch shorter than ``batch_size`` to the batch before it.
    """

    def __init__(
        self, sampler: Sampler | Iterable, batch_size: int, drop_last: bool = False, merge_last: bool = False
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if drop_last and merge_last:
            raise ValueError("Expected at most one of drop_last and merge_last")
        self.merge_last = merge_last

    def __iter__(self) -> Iterator[list[Any]]:
        previous: list[Any] | None = None
        batch: list[Any] = []
        for item in self.sampler:
            batch.append(item)
            if len(batch) == self.batch_size:
                if previous is not None:
                    yield previous
                previous, batch = batch, []
        if batch and self.merge_last and previous is not None:
            previous, batch = previous + batch, []
        if previous is not None:
            yield previous
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 0 and not self.drop_last and not (self.merge_last and full > 0))


def training_batches(sampler: Sampler | Iterable, batch_size: int, last_batch: LastBatch, trainer: Any) -> TrainingBatchSampler:
    """The training loader's batch sampler for a data module's ``last_batch`` option and the model ``trainer`` trains."""
    policy = last_batch_policy(last_batch, trainer)
    return TrainingBatchSampler(sampler, batch_size, drop_last=policy == "drop", merge_last=policy == "merge")


def loader(dataset: Dataset, num_workers: int, **batching: Any) -> DataLoader:
    """A data module's loader: ``dataset`` in the main process (0) or ``num_workers`` kept-alive
    workers, batched by ``batch_size=`` or ``batch_sampler=``."""
    return DataLoader(dataset, num_workers=num_workers, persistent_workers=num_workers > 0, **batching)
