"""Weight normalization of the input and recurrent weights (Salimans & Kingma; NP eq. 15 alone).

Each row ``i`` of the site's weight becomes ``γ_i W_i / ||W_i||₂``; the cell is left alone (no
variance compensation: that is what ``normprop`` adds). Public default: ``gamma_init=1.0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnorm.functional.normalization import row_normalize
from rnorm.norms.base import Normalizer
from rnorm.norms.registry import register


class RowScaledWeight(Normalizer):
    """Re-parametrizes a site's weight as ``γ ⊙ W / ||W_row||₂`` with a learnable γ per row ``(F,)``."""

    supported_sites = frozenset({"input", "recurrent"})
    default_gamma = 1.0

    def __init__(self, site: str, num_features: int, *, gamma_init: float | None = None) -> None:
        super().__init__(site, num_features)
        gamma_init = self.default_gamma if gamma_init is None else float(gamma_init)
        self.gamma = nn.Parameter(torch.full((num_features,), gamma_init))

    def transform_weight(self, weight: Tensor) -> Tensor:
        if weight.shape[0] != self.num_features:
            raise ValueError(f"Expected a weight with {self.num_features} rows, but got shape {tuple(weight.shape)}.")
        return self.gamma.unsqueeze(1) * row_normalize(weight)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x

    def output_std(self) -> float:
        # Rows of unit norm times unit-variance, uncorrelated inputs give unit variance, scaled by γ.
        return float(self.gamma.detach().abs().mean())


@register("wn", description="weight normalization: unit-norm weight rows scaled by a learnable gamma")
class WeightNorm(RowScaledWeight):
    """Weight normalization of the input or recurrent weight.

    Args:
        site: ``"input"`` or ``"recurrent"``.
        num_features: number of weight rows (``4H``).
        gamma_init: initial γ of every row (default 1.0).
    """
