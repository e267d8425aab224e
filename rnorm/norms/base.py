"""The interface every normalization strategy implements.

A normalized LSTM layer (BN paper eq. 6–8, NP eq. 15–17) has three **sites** where a strategy
can act:

=============  ====================================  ==========================================
site           what is normalized                    how the layer calls the strategy
=============  ====================================  ==========================================
``input``      the input term ``W_x x_t``, ``4H``    ``transform_weight(W_x)`` once per forward,
               features                              then ``forward(W_x x, mask)`` on all ``T``
                                                     steps at once: ``(T, B, 4H)``
``recurrent``  the recurrent term ``W_h h_{t-1}``,   ``transform_weight(W_h)`` once per forward,
               ``4H`` features                       then ``step(W_h h_{t-1}, t, mask_t)`` at
                                                     every step: ``(B, 4H)``
``cell``       the cell ``c_t`` before the output    ``step(c_t, t, mask_t)`` at every step:
               tanh, ``H`` features                  ``(B, H)``; ``h_t`` is then multiplied by
                                                     ``hidden_scale``
=============  ====================================  ==========================================

Activation-based strategies (``bn``, ``ln``, …) override :meth:`Normalizer.step` (and, where a
vectorized form exists, :meth:`Normalizer.forward`); weight-based strategies (``wn``,
``normprop``) override :meth:`Normalizer.transform_weight`. Every hook has an identity default, so
the layer calls all of them the same way and never asks which kind it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from rnorm.kernels.kinds import get_kind

SITES: tuple[str, ...] = ("input", "recurrent", "cell")


@dataclass(frozen=True)
class FusedStep:
    """What :meth:`Normalizer.step` computes over a whole sequence, in a form the fused
    recurrence (:mod:`rnorm.kernels`) runs without calling the strategy at every step.

    ``kind``, one of :data:`rnorm.kernels.STEP_KINDS` (an unknown one raises ``ValueError``):

    * ``"identity"``: ``y = x``.
    * ``"affine"``: ``y_t = x_t * scale[t] + shift[t]`` with ``scale``, ``shift`` ``(S, F)``, ``S``
      either 1 (the same at every step) or the sequence length; ``shift`` may be ``None``.
    * ``"batch"``: ``y_t = gamma * (x_t - mean_t) / sqrt(var_t + eps) + beta`` with the masked mean
      and biased variance of ``x_t`` over the batch (BN eq. 5); ``record`` is then called once
      after the forward pass with the per-step ``mean``, ``var`` ``(T, F)`` and unpadded ``count``
      ``(T,)``, to update population statistics.
    * ``"layer"``: the same with the mean and variance over the features of each row.
    * ``"rms"``: ``y = gamma * x / sqrt(mean(x²) + eps) + beta`` over the features of each row,
      without centering (root-mean-square normalization).
    * ``"sequence"`` (input site only): the same with one mean and variance over every unpadded
      step and sample; ``record`` gets them as ``(1, F)``, with ``count`` ``(1,)``.

    ``scale``/``gamma`` and ``shift``/``beta`` may require grad: the fused backward returns
    their gradients.

    ``synchronized`` (``"batch"`` only): the statistics are those of the global batch of every
    process in the default process group (data parallelism), as
    :func:`~rnorm.functional.distributed.synced_masked_moments` computes them.
    """

    kind: str
    scale: Tensor | None = None
    shift: Tensor | None = None
    eps: float = 0.0
    record: Callable[[Tensor, Tensor, Tensor], None] | None = None
    synchronized: bool = False

    def __post_init__(self) -> None:
        get_kind(self.kind)


class Normalizer(nn.Module):
    """Base class of normalization strategies; one instance normalizes one site of one layer.

    Args:
        site: ``"input"``, ``"recurrent"`` or ``"cell"``.
        num_features: size of the normalized vectors (``4H`` for input and recurrent, ``H`` for
            the cell).

    Subclasses declare which sites they support in :attr:`supported_sites` and whether they
    normalize with statistics of the current batch in :attr:`batch_statistics`: ``"step"``
    (over the batch at each step: training needs at least two unpadded samples at every step),
    ``"sequence"`` (over all steps and samples: at least two in all) or ``None``.
    """

    supported_sites: ClassVar[frozenset[str]] = frozenset(SITES)
    batch_statistics: ClassVar[str | None] = None

    def __init__(self, site: str, num_features: int) -> None:
        super().__init__()
        if site not in SITES:
            raise ValueError(f"Expected site to be one of {SITES}, but got {site!r}.")
        if site not in self.supported_sites:
            raise ValueError(
                f"{type(self).__name__} cannot normalize the {site!r} site; it supports "
                f"{sorted(self.supported_sites)}. Use 'none' there instead."
            )
        if int(num_features) < 1:
            raise ValueError(f"Expected num_features >= 1, but got {num_features}.")
        self.site = site
        self.num_features = int(num_features)

    # -- weight-based strategies ----------------------------------------------------------------
    def transform_weight(self, weight: Tensor) -> Tensor:
        """The effective weight of this site from its raw weight, ``(4H, fan_in)``.

        Called once per forward pass, before the recurrence, so that the re-parametrization is
        never rebuilt inside the time loop.
        """
        return weight

    # -- activation-based strategies ------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize a whole sequence of this site's vectors at once.

        Args:
            x: ``(T, B, F)``, step ``t`` of every sequence in row ``t``.
            mask: ``(T, B)`` boolean, ``True`` at unpadded positions, or ``None`` (no padding).

        Returns:
            ``(T, B, F)``. Values at padded positions are unspecified; the layer discards them.

        The default applies :meth:`step` to each time step; strategies with a vectorized form
        override it.
        """
        self.start(x.shape[0])
        # unbind, not x[t]: indexing would make each step's backward write a full (T, B, F) gradient
        rows = x.unbind(0)
        steps = [self.step(rows[t], t, None if mask is None else mask[t]) for t in range(x.shape[0])]
        return torch.stack(steps)

    def start(self, num_steps: int) -> None:
        """Called once before a sequence of ``num_steps`` steps is passed through :meth:`step`."""

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        """Normalize this site's vectors at time step ``t`` (0-based).

        Args:
            x: ``(B, F)``.
            t: the step index within the sequence; step-dependent strategies use it.
            mask: ``(B,)`` boolean, ``True`` for sequences not yet ended, or ``None``.

        Returns:
            ``(B, F)``; rows where ``mask`` is ``False`` are unspecified.
        """
        return x

    def fused_step(self, num_steps: int) -> FusedStep | None:
        """The form of :meth:`step` over ``num_steps`` steps for the fused recurrence, or ``None``
        when it has none (the layer then runs the reference loop, which calls :meth:`step`).

        Called after :meth:`start`, once per forward pass. The default describes strategies that
        leave :meth:`step` alone (the identity); strategies that override :meth:`step` override
        this too to run on the fused path.
        """
        return FusedStep("identity") if type(self).step is Normalizer.step else None

    @property
    def hidden_scale(self) -> Tensor | None:
        """A constant that multiplies ``h_t`` (cell site only; Norm-Prop's ``1/sqrt(Var[h_t])``),
        a tensor of 1 or ``H`` elements without gradient; ``None`` (the default) for 1."""
        return None

    @property
    def synchronized(self) -> bool:
        """Whether this strategy's batch statistics are, right now, those of the global batch of every
        process (data parallelism with more than one process); ``False`` for strategies without batch
        statistics."""
        return False

    # -- wiring ---------------------------------------------------------------------------------
    def output_std(self) -> float | None:
        """Standard deviation of this site's output at initialization, for unit-variance input.

        ``None`` when it depends on the data (``none``). Norm-Prop's cell-site strategy reads it
        from the input and recurrent sites to estimate ``Var[c_t]`` (NP eq. 8–12).
        """
        return None

    def attach(self, sites: Mapping[str, Normalizer]) -> None:
        """Called once after all three sites of a layer direction are built, with all of them."""

    def extra_repr(self) -> str:
        return f"site={self.site!r}, num_features={self.num_features}"
