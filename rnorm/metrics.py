"""Metrics of the papers' tasks, as torchmetrics Metrics (synchronized across processes)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from rnorm.functional.masking import lengths_to_mask


class BitsPerCharacter(Metric):
    """Mean cross-entropy in bits over every predicted character: ``sum(nats) / count / ln 2``.

    Summing nats and counts (not averaging batch means) makes the value over a whole stream exact
    however it was cut into batches and padded, and correct across processes.

    Example:
        >>> metric = BitsPerCharacter()
        >>> logits = torch.zeros(2, 3, 4)                   # uniform over 4 characters: 2 bits
        >>> metric.update(logits, torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 1]))
        >>> round(float(metric.compute()), 6)
        2.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor, lengths: Tensor | None = None) -> None:
        """Add a batch: ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)``, ``lengths`` ``(B,)`` or ``None``."""
        nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
        if lengths is not None:
            valid = lengths_to_mask(lengths, targets.shape[1], targets.device).t()  # (B, T)
            nats = nats * valid
            count = valid.sum()
        else:
            count = torch.tensor(targets.numel(), device=targets.device)
        self.nats += nats.sum().double()
        self.count += count

    def compute(self) -> Tensor:
        return (self.nats / self.count.clamp(min=1) / math.log(2)).float()
