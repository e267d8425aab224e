"""Layer normalization (Ba et al., 2016): statistics over the features of each sample and step.

Public defaults: ``gamma_init=1.0`` (the Norm-Prop paper's LN baseline), learnable β initialized
to 0 on every site, ``eps=1e-5``, biased variance. Being per sample, it needs no population
statistics and no mask: padded rows are normalized like any other and then discarded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnorm.functional.normalization import affine, layer_moments, normalize
from rnorm.norms.base import FusedStep, Normalizer
from rnorm.norms.registry import register


@register("ln", description="layer normalization over the features of each sample at each step (Ba et al.)")
class LayerNorm(Normalizer):
    """Layer normalization of one site.

    Args:
        site: ``"input"``, ``"recurrent"`` or ``"cell"``.
        num_features: size of the normalized vectors.
        gamma_init: initial γ.
        eps: added to the variance.
        learn_beta: learn a shift β (Ba et al. do, on every site).

    Example:
        >>> import torch
        >>> y = LayerNorm("cell", 5).step(torch.randn(3, 5), t=0)
        >>> torch.allclose(y.mean(-1), torch.zeros(3), atol=1e-6)
        True
    """

    def __init__(
        self, site: str, num_features: int, *, gamma_init: float = 1.0, eps: float = 1e-5, learn_beta: bool = True
    ) -> None:
        super().__init__(site, num_features)
        if eps <= 0:
            raise ValueError(f"Expected eps > 0, but got {eps}.")
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        self.beta = nn.Parameter(torch.zeros(num_features)) if learn_beta else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mean, var = layer_moments(x)
        return affine(normalize(x, mean, var, self.eps), self.gamma, self.beta)

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        return self.forward(x)

    def fused_step(self, num_steps: int) -> FusedStep:
        return FusedStep("layer", self.gamma, self.beta, self.eps)

    def output_std(self) -> float:
        return float(self.gamma.detach().abs().mean())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, learn_beta={self.beta is not None}"
