"""The identity strategy: with ``none`` on every site a :class:`~rnorm.nn.NormLSTM` is a plain LSTM."""

from __future__ import annotations

from torch import Tensor

from rnorm.norms.base import Normalizer
from rnorm.norms.registry import register


@register("none", description="identity: no normalization (a plain LSTM on every site)")
class Identity(Normalizer):
    """Leaves its site untouched."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x
