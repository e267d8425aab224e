"""From a :class:`~rnorm.kernels.LayerSpec` to the op's arguments, with autograd.

Everything here is ordinary differentiable torch code that runs once per layer call, before the time
loop: the z-space doubling of the ``g`` block (``docs/fused_backward.md`` eq. 1–3), one tensor for
every additive term of the gates, sequencewise statistics as an affine map, and the per-step
weights of the batch means. The op's gradients then reach the layer's parameters through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnorm.functional.distributed import global_step_counts
from rnorm.kernels.precision import products_precision
from rnorm.kernels.schema import RecurrenceArgs
from rnorm.kernels.spec import LayerSpec, SiteSpec, SiteStatistics

__all__ = ["prepare", "sequence_to_affine"]


def prepare(
    spec: LayerSpec, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, backend: str, precision: str | None = None
) -> tuple[RecurrenceArgs, dict[str, SiteStatistics]]:
    """The arguments of ``rnorm::lstm_recurrence`` for ``spec`` on ``x`` ``(T, B, D)``, and the
    statistics computed here (a ``sequence`` input site's, for its population statistics).
    ``precision``: the products' (:mod:`rnorm.kernels.precision`); ``None``: resolved for ``x`` now."""
    num_steps, batch_size = x.shape[0], x.shape[1]
    hidden = spec.hidden_size
    gates = 4 * hidden
    statistics: dict[str, SiteStatistics] = {}
    inp = spec.input
    if inp is not None and inp.kind == "sequence":
        inp, statistics["input"] = sequence_to_affine(inp, spec.input_weight, x, mask)
    rec, cel = spec.recurrent, spec.cell

    # z-space: the g block's pre-activation doubled (one sigmoid then gives tanh(a) = 2 σ(2a) − 1),
    # applied with autograd to whatever produces it, so that gradients map back by themselves.
    double_g = x.new_ones(gates)
    double_g[2 * hidden : 3 * hidden] = 2.0
    rec_weight, rec_scale = _to_z_space(rec, spec.recurrent_weight, double_g)
    rec_shift = [rec.shift] if rec.shift is not None else []
    if inp is None:  # input terms given (they include the bias)
        source = x
        for part in rec_shift:
            source = source + (part.unsqueeze(1) if part.dim() == 2 else part)
        source = source * double_g
        input_kind, in_weight, in_scale, shift, input_eps = "given", None, None, None, 0.0
    else:
        source, input_kind, input_eps = x, inp.kind, inp.eps
        in_weight, in_scale = _to_z_space(inp, spec.input_weight, double_g)
        parts = [p for p in (spec.bias, inp.shift, *rec_shift) if p is not None]
        shift = None
        if parts:  # every additive term of the gates, in one (S, 4H) tensor
            shift = sum(p if p.dim() == 2 else p.unsqueeze(0) for p in parts) * double_g

    dtype = x.dtype
    counts = torch.full((num_steps,), batch_size, device=x.device) if mask is None else mask.sum(1)  # (T,)
    if spec.synchronized:  # weights over the global batch: w @ u is this process's share of the global mean
        counts = global_step_counts(counts)
    if mask is None and not spec.synchronized:  # every step the same: one row
        weights = x.new_full((1, batch_size), 1.0 / batch_size)
    else:
        share = x.new_ones(num_steps, batch_size) if mask is None else mask.to(dtype)
        weights = share / counts.clamp(min=1).to(dtype).unsqueeze(1)  # (T, B)
    # The output tanh as 2 σ(2ĉ) − 1 as well: the cell site's scale and shift doubled.
    cell_scale = None if cel.scale is None else cel.scale * 2.0
    cell_shift = None if cel.shift is None else cel.shift * 2.0
    hidden_scale = None if spec.hidden_scale is None else spec.hidden_scale.detach().to(dtype).reshape(-1)
    tensors = (source, in_weight, rec_weight, shift, in_scale, rec_scale, cell_scale, cell_shift, h0, c0)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = RecurrenceArgs(
        source=source,
        input_weight=in_weight,
        recurrent_weight=rec_weight,
        shift=shift,
        input_scale=in_scale,
        recurrent_scale=rec_scale,
        cell_scale=cell_scale,
        cell_shift=cell_shift,
        h0=h0,
        c0=c0,
        mask=mask,
        weights=weights,
        counts=counts,
        hidden_scale=hidden_scale,
        input_kind=input_kind,
        recurrent_kind=rec.kind,
        cell_kind=cel.kind,
        eps=[float(input_eps), float(rec.eps), float(cel.eps)],
        synchronized=spec.synchronized,
        save=save,
        backend=backend,
        precision=products_precision(x.device, dtype) if precision is None else precision,
    )
    return args, statistics


def _to_z_space(site: SiteSpec, weight: Tensor, double_g: Tensor) -> tuple[Tensor, Tensor | None]:
    """The site's weight and scale with the g block doubled: in the weight for the identity, else
    in the scale (a normalization would undo a scaled weight)."""
    if site.kind == "identity":
        return weight * double_g.unsqueeze(1), None
    return weight, site.scale * double_g


def sequence_to_affine(site: SiteSpec, weight: Tensor, x: Tensor, mask: Tensor | None) -> tuple[SiteSpec, SiteStatistics]:
    """Sequencewise batch normalization of ``u = W_x x`` as an affine map, without ``u``.

    The mean and biased variance of ``u`` over every unpadded step and sample are ``W_x μ`` and
    ``diag(W_x Σ W_x^T)``, with ``μ``, ``Σ`` the mean and covariance of ``x`` ``(T, B, D)``: a
    ``(D, D)`` problem instead of passes over ``(T, B, 4H)``. Computed with autograd, so their
    gradients reach ``x`` and ``W_x``.

    Returns the affine site and the statistics ``(1, 4H)``, ``(1, 4H)``, count ``(1,)``.
    """
    flat = x.reshape(-1, x.shape[2])  # (T B, D)
    if mask is None:
        count = flat.new_tensor(float(flat.shape[0]))
        mean_x = flat.mean(0)  # (D,)
        centered = flat - mean_x
    else:
        keep = mask.reshape(-1, 1).to(x.dtype)
        count = keep.sum()
        mean_x = (flat * keep).sum(0) / count
        centered = (flat - mean_x) * keep  # padded rows out of the covariance
    covariance = centered.t() @ centered / count  # (D, D)
    mean = weight @ mean_x  # (4H,)
    var = ((weight @ covariance) * weight).sum(1)  # (4H,)
    scale = site.scale * torch.rsqrt(var + site.eps)
    shift = -mean * scale if site.shift is None else site.shift - mean * scale
    statistics = SiteStatistics(mean.detach().unsqueeze(0), var.detach().unsqueeze(0), count.detach().round().long().reshape(1))
    return SiteSpec("affine", scale.unsqueeze(0), shift.unsqueeze(0)), statistics
