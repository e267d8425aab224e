"""The typed description of what the kernels compute: one direction of one layer of a normalized LSTM.

:mod:`rnorm.nn` builds a :class:`LayerSpec` from a cell (its effective weights and each site's
:class:`SiteSpec`); :func:`rnorm.kernels.lstm_layer` runs it. Nothing here knows about modules or
strategies: a site is a step kind (:data:`~rnorm.kernels.STEP_KINDS`) and its tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from rnorm.kernels.kinds import get_kind

__all__ = ["LayerResult", "LayerSpec", "SiteSpec", "SiteStatistics", "mixed_synchronization"]


class FusedStepLike(Protocol):
    """What :func:`mixed_synchronization` reads of a site: a :class:`SiteSpec`, or a strategy's
    ``FusedStep`` before it becomes one."""

    kind: str
    synchronized: bool


@dataclass(frozen=True)
class SiteSpec:
    """One site's per-step transform of its term ``u_t`` (``F`` features: ``4H``, or ``H`` for the cell).

    Attributes:
        kind: a name of :data:`~rnorm.kernels.STEP_KINDS`.
        scale: ``affine``: ``(S, F)`` with ``S`` 1 (every step) or ``T``; normalizing kinds: γ ``(F,)``.
        shift: likewise, or ``None``: ``affine``'s additive ``(S, F)``, a normalizing kind's β ``(F,)``.
        eps: added to the variance (normalizing kinds).
        synchronized: ``batch`` only: statistics of the global batch of every process of the default
            process group (data parallelism). The kernels all-reduce every batch site of a layer or
            none (:func:`mixed_synchronization`).
    """

    kind: str
    scale: Tensor | None = None
    shift: Tensor | None = None
    eps: float = 0.0
    synchronized: bool = False

    def check(self, site: str, features: int) -> None:
        """``ValueError`` naming the site if the description cannot be run."""
        kind = get_kind(self.kind)
        if site not in kind.sites:
            raise ValueError(f"The {site} site cannot be of kind {self.kind!r}: it may be one of {sorted(kind.sites)}.")
        if self.synchronized and kind.name != "batch":
            raise ValueError(f"The {site} site is of kind {self.kind!r}: only 'batch' statistics can be synchronized across processes.")
        if kind.name == "identity":
            if self.scale is not None or self.shift is not None:
                raise ValueError(f"The {site} site is of kind 'identity' but was given a scale or shift.")
            return
        if kind.name == "affine":
            for name, tensor in (("scale", self.scale), ("shift", self.shift)):
                if tensor is None and name == "scale":
                    raise ValueError(f"The {site} site is of kind 'affine' but has no scale.")
                if tensor is not None and (tensor.dim() != 2 or tensor.shape[1] != features):
                    raise ValueError(f"Expected the {site} site's affine {name} of shape (S, {features}), but got {tuple(tensor.shape)}.")
            return
        for name, tensor in (("scale (gamma)", self.scale), ("shift (beta)", self.shift)):
            if tensor is None and name.startswith("scale"):
                raise ValueError(f"The {site} site is of kind {self.kind!r} but has no scale (gamma).")
            if tensor is not None and tuple(tensor.shape) != (features,):
                raise ValueError(f"Expected the {site} site's {name} of shape ({features},), but got {tuple(tensor.shape)}.")
        if not self.eps > 0:
            raise ValueError(f"Expected the {site} site's eps > 0 for kind {self.kind!r}, but got {self.eps}.")


def mixed_synchronization(sites: Iterable[SiteSpec | FusedStepLike | None]) -> bool:
    """Whether some ``batch`` sites among ``sites`` are synchronized across processes and others are
    not, which one layer cannot run: each step's batch means use one set of weights (over the local
    or the global batch) for every site."""
    flags = {site.synchronized for site in sites if site is not None and site.kind == "batch"}
    return len(flags) > 1


@dataclass(frozen=True)
class LayerSpec:
    """One direction of one layer (BN eq. 6–8, NP eq. 15–17), weights already transformed by their strategies.

    Attributes:
        recurrent_weight: the effective ``W_h`` ``(4H, H)``, gates in ``torch.nn.LSTM``'s order (i, f, g, o).
        recurrent: the recurrent site, on ``W_h h_{t-1}``.
        cell: the cell site, on ``c_t`` before the output tanh.
        input_weight: the effective ``W_x`` ``(4H, D)``; ``None`` when the caller computed the input
            terms itself (then ``x`` is ``(T, B, 4H)``, normalized, bias included).
        input: the input site, on ``W_x x_t``; ``None`` exactly when ``input_weight`` is.
        bias: ``b`` ``(4H,)`` or ``None`` (ignored with given input terms, which include it).
        hidden_scale: a constant on ``h_t`` after the output gate (Norm-Prop's ``1/sqrt(Var[h_t])``,
            NP eq. 17), ``(1,)`` or ``(H,)``, no gradient; ``None`` for 1.
    """

    recurrent_weight: Tensor
    recurrent: SiteSpec
    cell: SiteSpec
    input_weight: Tensor | None = None
    input: SiteSpec | None = None
    bias: Tensor | None = None
    hidden_scale: Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.recurrent_weight.shape[1]

    @property
    def synchronized(self) -> bool:
        """Whether some site's batch statistics are all-reduced over processes."""
        return any(site is not None and site.synchronized for site in (self.input, self.recurrent, self.cell))

    def check(self, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None) -> None:
        """``ValueError`` (what was expected, what was given) unless ``x`` ``(T, B, D)``, ``h0`` and
        ``c0`` ``(B, H)`` and ``mask`` ``(T, B)`` fit this layer and every tensor shares ``x``'s
        dtype and device."""
        gates, hidden = self.recurrent_weight.shape
        if gates != 4 * hidden:
            raise ValueError(f"Expected a recurrent weight of shape (4H, H), but got {tuple(self.recurrent_weight.shape)}.")
        if (self.input_weight is None) != (self.input is None):
            raise ValueError("Give both the input weight and the input site, or neither (input terms computed by the caller).")
        if x.dim() != 3:
            raise ValueError(f"Expected x of shape (T, B, D), but got {tuple(x.shape)}.")
        steps, batch = x.shape[0], x.shape[1]
        features = gates if self.input_weight is None else self.input_weight.shape[1]
        if self.input_weight is not None and self.input_weight.shape[0] != gates:
            raise ValueError(f"Expected an input weight of shape ({gates}, D), but got {tuple(self.input_weight.shape)}.")
        if x.shape[2] != features:
            raise ValueError(f"Expected x with {features} features, but got {tuple(x.shape)}.")
        for name, state in (("h0", h0), ("c0", c0)):
            if tuple(state.shape) != (batch, hidden):
                raise ValueError(f"Expected {name} of shape ({batch}, {hidden}), but got {tuple(state.shape)}.")
        if mask is not None and (tuple(mask.shape) != (steps, batch) or mask.dtype.is_floating_point):
            raise ValueError(f"Expected a boolean mask of shape ({steps}, {batch}), but got {mask.dtype} {tuple(mask.shape)}.")
        if mixed_synchronization((self.input, self.recurrent, self.cell)):
            raise ValueError("Batch statistics synchronized across processes on some sites but not others: the kernels all-reduce every batch site of a layer or none.")
        if self.input is not None:
            self.input.check("input", gates)
        self.recurrent.check("recurrent", gates)
        self.cell.check("cell", hidden)
        if self.bias is not None and tuple(self.bias.shape) != (gates,):
            raise ValueError(f"Expected a bias of shape ({gates},), but got {tuple(self.bias.shape)}.")
        if self.hidden_scale is not None and self.hidden_scale.numel() not in (1, hidden):
            raise ValueError(f"Expected a hidden scale of 1 or {hidden} elements, but got {tuple(self.hidden_scale.shape)}.")
        tensors = {"x": x, "h0": h0, "c0": c0, "recurrent weight": self.recurrent_weight, "input weight": self.input_weight, "bias": self.bias}
        for site_name, site in (("input", self.input), ("recurrent", self.recurrent), ("cell", self.cell)):
            if site is not None:
                tensors[f"{site_name} scale"], tensors[f"{site_name} shift"] = site.scale, site.shift
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if tensor.dtype != x.dtype or tensor.device != x.device:
                raise ValueError(
                    f"Expected the {name} as x, {x.dtype} on {x.device}, but got {tensor.dtype} on {tensor.device}: "
                    "move the module or the input with .to()."
                )


@dataclass(frozen=True)
class SiteStatistics:
    """A batch-statistics site's training statistics: per-step ``mean`` and biased ``var`` ``(T, F)``
    and unpadded ``count`` ``(T,)`` (``sequence``: one row, ``(1, F)`` and ``(1,)``)."""

    mean: Tensor
    var: Tensor
    count: Tensor


@dataclass(frozen=True)
class LayerResult:
    """What :func:`rnorm.kernels.lstm_layer` returns: ``output`` ``(T, B, H)`` (0 at padded steps),
    each sequence's last real state ``h_n``, ``c_n`` ``(B, H)``, and the batch sites' statistics by site."""

    output: Tensor
    h_n: Tensor
    c_n: Tensor
    statistics: dict[str, SiteStatistics] = field(default_factory=dict)
