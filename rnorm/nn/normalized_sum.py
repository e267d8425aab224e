"""A sum of normalized linear terms, ``Σ_i N_i(W_i x_i) + b``, each term with its own strategy.

The argument of a nonlinearity that several inputs feed, each normalized separately: BN §5.4
normalizes each term entering the Attentive Reader's tanh nonlinearities (BN-everywhere), as
BN eq. 6 normalizes ``W_h h_{t-1}`` and ``W_x x_t`` separately inside the LSTM. Any registered
strategy acts at its ``input`` site: weight-based ones (``wn``, ``normprop``) transform the weight,
activation-based ones (``bn``, ``seqbn``, ``ln``) the product, with a padding mask per term.

>>> import torch
>>> layer = NormalizedSum([3, 2], 4, norm="ln")
>>> layer((torch.randn(5, 2, 3), None), (torch.randn(1, 2, 2), None)).shape
torch.Size([5, 2, 4])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnorm import norms

__all__ = ["NormalizedSum"]


class NormalizedSum(nn.Module):
    """``Σ_i N_i(W_i x_i) + b``: the argument of a nonlinearity fed by several inputs (see the module).

    Each term has its own weight (orthogonally initialized, no bias) and its own normalizer, built
    from ``norm`` at the ``input`` site; weight-based strategies (``wn``, ``normprop``) transform
    the weight, activation-based ones the product.

    Args:
        in_features: the width of each input.
        out_features: the width of the sum.
        norm: a registered strategy name (``none``, ``bn``, ``seqbn``, ``ln``, …).
        norm_kwargs: its hyperparameters.
    """

    def __init__(
        self, in_features: list[int], out_features: int, norm: str = "none", norm_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        factory = norms.resolve(norm, **(norm_kwargs or {}))
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(out_features, n)) for n in in_features)
        for weight in self.weights:
            nn.init.orthogonal_(weight)
        self.norms = nn.ModuleList(factory(site="input", num_features=out_features) for _ in in_features)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, *terms: tuple[Tensor, Tensor | None]) -> Tensor:
        """Terms ``(x, mask)``: ``x`` ``(T, B, in)``, a ``(T, B)`` mask or ``None``; their sum ``(T, B, out)``."""
        total = self.bias
        for (x, mask), weight, norm in zip(terms, self.weights, self.norms):
            total = total + norm(F.linear(x, norm.transform_weight(weight)), mask)
        return total
