"""Root-mean-square layer normalization (Zhang & Sennrich, 2019, *Root Mean Square Layer Normalization*).

Like layer normalization, statistics are taken over the features of each sample at each step, so
no population statistics and no mask are needed; unlike it, ``x`` is not centered, only rescaled
by its root mean square (Zhang & Sennrich eq. 4)::

    y = gamma * x / sqrt(mean(x ** 2 over features) + eps) (+ beta)

Public defaults: ``gamma_init=1.0``, no β (the paper drops the shift with the centering; pass
``learn_beta=True`` for it), ``eps=1e-5``.

This module registers nothing when imported: the distribution's entry point
``rms = "rnorm_plugins.rms:RMSNorm"`` in the ``rnorm.normalizers`` group names the class, and
:mod:`rnorm.norms.registry` registers it under ``"rms"`` at its first lookup.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnorm.functional import affine
from rnorm.norms import FusedStep, Normalizer


class RMSNorm(Normalizer):
    """RMS normalization over the features of each sample at each step, without centering (Zhang & Sennrich).

    Supports all three sites (``input``, ``recurrent``, ``cell``) and uses no batch statistics.

    Args:
        site: ``"input"``, ``"recurrent"`` or ``"cell"``.
        num_features: ``F``, size of the normalized vectors (``4H`` for input and recurrent, ``H``
            for the cell).
        gamma_init: initial value of the learnable gain γ, shape ``(F,)``.
        eps: added to the mean square; must be positive.
        learn_beta: also learn a shift β, shape ``(F,)``, initialized to 0.

    Example:
        >>> import torch
        >>> norm = RMSNorm("cell", 5)
        >>> y = norm.step(torch.randn(3, 5), t=0)                 # (B, F)
        >>> torch.allclose(y.square().mean(-1), torch.ones(3), atol=1e-3)
        True
        >>> tuple(norm(torch.randn(7, 3, 5)).shape)               # (T, B, F)
        (7, 3, 5)
    """

    def __init__(
        self, site: str, num_features: int, *, gamma_init: float = 1.0, eps: float = 1e-5, learn_beta: bool = False
    ) -> None:
        super().__init__(site, num_features)
        if not eps > 0:  # also rejects NaN
            raise ValueError(f"Expected eps > 0, but got {eps}.")
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.full((self.num_features,), float(gamma_init)))
        self.beta = nn.Parameter(torch.zeros(self.num_features)) if learn_beta else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize a whole sequence at once.

        Args:
            x: ``(T, B, F)`` (any leading shape works: statistics are over the last axis only).
            mask: ``(T, B)`` or ``None``; unused, every row is normalized on its own.

        Returns:
            ``(T, B, F)``.
        """
        inv_rms = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)  # (T, B, 1)
        return affine(x * inv_rms, self.gamma, self.beta)

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        """Normalize step ``t``: ``x`` ``(B, F)`` → ``(B, F)``; ``t`` and ``mask`` are unused."""
        return self.forward(x)

    def fused_step(self, num_steps: int) -> FusedStep:
        """The fused recurrence's ``"rms"`` kind: the same function without a call per step."""
        return FusedStep("rms", self.gamma, self.beta, self.eps)

    def output_std(self) -> float:
        """``mean(|γ|)``: for zero-mean unit-variance input the RMS is 1, so γ sets the scale."""
        return float(self.gamma.detach().abs().mean())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, learn_beta={self.beta is not None}"
