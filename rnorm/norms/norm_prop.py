"""The Norm-Prop LSTM (Laurent et al., NP eq. 15–17).

* input and recurrent sites: ``γ_x W_x / ||W_x,row||`` and ``γ_h W_h / ||W_h,row||`` (eq. 15), with a
  learnable γ per row, initialized to the paper's ``γ_x = γ_h = 2``;
* cell site: ``γ_c c_t / sqrt(Var[c_t])`` before the output tanh and ``h_t / sqrt(Var[h_t])`` after the
  output gate (eq. 17), a learnable ``γ_c`` per unit initialized to 1. ``Var[c_t]`` and ``Var[h_t]``
  are estimated once, when the layer is built, from eq. 8–14 (see
  :func:`rnorm.functional.normprop.normprop_variances`) and then kept fixed, as buffers saved with
  the model.

The variance estimate needs the standard deviations of the two terms entering the gates. The cell
site reads them from its layer's input and recurrent strategies (``output_std()``: γ for
``normprop``, ``wn``, ``bn``, ``ln``); pass ``gamma_x``/``gamma_h`` to override, or where a site has
no defined scale (``none``), in which case the paper's 2.0 is assumed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from rnorm.functional.normprop import DEFAULT_QUADRATURE_POINTS, normprop_variances
from rnorm.norms.base import FusedStep, Normalizer
from rnorm.norms.registry import register
from rnorm.norms.weight_norm import RowScaledWeight

PAPER_GAMMA_XH = 2.0
PAPER_GAMMA_C = 1.0


@register("normprop", description="normalization propagation (Laurent et al., NP eq. 15-17)")
class NormProp(RowScaledWeight):
    """Norm-Prop on one site of an LSTM.

    Args:
        site: ``"input"``, ``"recurrent"`` or ``"cell"``.
        num_features: ``4H`` for input and recurrent, ``H`` for the cell.
        gamma_init: initial γ (default ``γ_x = γ_h = 2`` on input and recurrent, ``γ_c = 1`` on the cell).
        gamma_x: cell site only: the input term's scale for the variance estimate (default: from
            the input site, else 2).
        gamma_h: cell site only: likewise for the recurrent term.
        quadrature_points: points of the trapezoidal rule for the variance estimate.
    """

    supported_sites = frozenset({"input", "recurrent", "cell"})

    def __init__(
        self,
        site: str,
        num_features: int,
        *,
        gamma_init: float | None = None,
        gamma_x: float | None = None,
        gamma_h: float | None = None,
        quadrature_points: int = DEFAULT_QUADRATURE_POINTS,
    ) -> None:
        gamma_init = (PAPER_GAMMA_C if site == "cell" else PAPER_GAMMA_XH) if gamma_init is None else float(gamma_init)
        if site != "cell" and (gamma_x is not None or gamma_h is not None):
            raise ValueError("gamma_x and gamma_h are options of the cell site; set gamma_init on this site.")
        if site == "cell" and not gamma_init > 0:
            raise ValueError(f"Expected gamma_init > 0 on the cell site, but got {gamma_init}.")
        super().__init__(site, num_features, gamma_init=gamma_init)
        self.gamma_init = gamma_init
        self.gamma_x, self.gamma_h = gamma_x, gamma_h
        self.quadrature_points = quadrature_points
        if site == "cell":
            self.register_buffer("cell_var", torch.tensor(float("nan")))
            self.register_buffer("hidden_var", torch.tensor(float("nan")))
            self.attach({})  # the paper's scales until a layer attaches its input and recurrent sites

    def attach(self, sites: Mapping[str, Normalizer]) -> None:
        """Cell site: estimate ``Var[c_t]`` and ``Var[h_t]`` (NP eq. 8–14) from the scales of the
        input and recurrent terms: ``gamma_x``/``gamma_h`` if given, else the sites' ``output_std()``,
        else the paper's 2."""
        if self.site != "cell":
            return

        def scale(override: float | None, site: str) -> float:
            std = sites[site].output_std() if override is None and site in sites else override
            return PAPER_GAMMA_XH if std is None else float(std)

        var_c, var_h = normprop_variances(
            scale(self.gamma_x, "input"), scale(self.gamma_h, "recurrent"), self.gamma_init, self.quadrature_points
        )
        self.cell_var.fill_(var_c)
        self.hidden_var.fill_(var_h)

    def transform_weight(self, weight: Tensor) -> Tensor:
        return weight if self.site == "cell" else super().transform_weight(weight)

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        if self.site != "cell":
            return x
        return x * (self.gamma * torch.rsqrt(self.cell_var))  # γ_c c_t / sqrt(Var[c_t]), eq. 17

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.step(x, 0, None)

    def fused_step(self, num_steps: int) -> FusedStep:
        if self.site != "cell":
            return FusedStep("identity")
        return FusedStep("affine", (self.gamma * torch.rsqrt(self.cell_var)).unsqueeze(0))  # (1, H), eq. 17

    @property
    def hidden_scale(self) -> Tensor | None:
        return torch.rsqrt(self.hidden_var).detach() if self.site == "cell" else None  # 1 / sqrt(Var[h_t])

    def extra_repr(self) -> str:
        extra = f", cell_var={float(self.cell_var):.5f}, hidden_var={float(self.hidden_var):.5f}" if self.site == "cell" else ""
        return super().extra_repr() + extra
