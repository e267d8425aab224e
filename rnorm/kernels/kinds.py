"""The per-step forms a normalization site can take inside the fused recurrence: one table.

A strategy describes what its :meth:`~rnorm.norms.Normalizer.step` computes over a whole sequence
as one of these kinds (``FusedStep.kind``); every implementation of the recurrence (the compiled
CPU kernels, the torch-ops loop) reads the kind's properties from this table rather than its name.
Adding a kind is a row here plus its arithmetic in each implementation (``code`` is the number the
native kernels know it by).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["STEP_KINDS", "StepKind", "get_kind"]


@dataclass(frozen=True)
class StepKind:
    """One per-step form of a site's transform ``y_t = f_t(u_t)``.

    Attributes:
        name: what ``FusedStep.kind`` calls it.
        code: its number in the native kernels (``rnorm/kernels/csrc/fused_step.cpp``, ``enum Kind``);
            ``None`` for kinds resolved before the time loop.
        statistics: what a normalizing kind's mean and variance run over: ``"batch"`` (the unpadded
            samples of the step, per feature: BN eq. 5), ``"row"`` (the features of each sample),
            ``"sequence"`` (every unpadded step and sample: resolved into ``affine`` before the loop),
            or ``None`` (no statistics).
        center: whether the mean is subtracted (``False``: root-mean-square normalization).
        sites: the sites it may describe.
    """

    name: str
    code: int | None
    statistics: Literal["batch", "row", "sequence"] | None = None
    center: bool = True
    sites: frozenset[str] = frozenset({"input", "recurrent", "cell"})

    @property
    def normalizing(self) -> bool:
        """Whether the loop computes statistics of the term at every step (batch, layer, rms)."""
        return self.statistics in ("batch", "row")

    @property
    def per_row(self) -> bool:
        """Statistics over each row's features (one ``1/std`` per sample) rather than over the batch."""
        return self.statistics == "row"


_KINDS = (
    #: ``y = x``: nothing between the GEMMs (weight-only strategies, or none).
    StepKind("identity", 0),
    #: ``y_t = x_t * scale[t] + shift[t]``, ``scale``/``shift`` ``(S, F)`` with ``S`` 1 or ``T``.
    StepKind("affine", 1),
    #: ``y_t = γ (x_t - mean_b) / sqrt(var_b + eps) + β`` over the step's unpadded samples (BN eq. 5).
    StepKind("batch", 2, statistics="batch"),
    #: the same over the features of each sample (layer normalization).
    StepKind("layer", 3, statistics="row"),
    #: ``y = γ x / sqrt(mean(x²) + eps) + β`` over the features of each sample (no centering).
    StepKind("rms", 4, statistics="row", center=False),
    #: one mean and variance over every unpadded step and sample (input site only).
    StepKind("sequence", None, statistics="sequence", sites=frozenset({"input"})),
)

_BY_NAME = {kind.name: kind for kind in _KINDS}

#: Every step kind by name (read-only).
STEP_KINDS: Mapping[str, StepKind] = MappingProxyType(_BY_NAME)


def get_kind(name: str) -> StepKind:
    """The kind called ``name``; ``ValueError`` listing the known ones otherwise."""
    # The plain dict, not the proxy: torch.compile traces this (FusedStep checks its kind) and does
    # not follow mapping proxies.
    if name not in _BY_NAME:
        raise ValueError(f"Unknown fused step kind {name!r}. Known kinds: {', '.join(_BY_NAME)}.")
    return _BY_NAME[name]
