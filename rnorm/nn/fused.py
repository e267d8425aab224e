"""The fused recurrence: one direction of one layer as one autograd Function with a hand-derived backward.

The reference (:func:`rnorm.nn.recurrence.reference_layer`) lets autograd record every small
operation of every step, and computes the input terms of all steps as ``(T, B, 4H)`` tensors
before the loop. At the pMNIST shape (784 steps, ``B = 64``, ``4H = 400``) both cost more than the
arithmetic: thousands of tiny autograd nodes, and a dozen passes over 80 MB tensors for the input
site's batch normalization and its backward. Here:

* the forward pass runs without autograd and writes what the backward pass needs into
  preallocated ``(T, …)`` buffers;
* the input term ``W_x x_t`` is computed and normalized inside the loop, one step at a time, while
  it is in cache;
* the backward pass walks back through time with the derivatives of BN eq. 5–8 / NP eq. 15–17
  written out, and leaves what does not depend on the backward recurrence to a few large
  operations before and after its loop (gate derivatives, the weights' gradients, γ and β).

Each strategy describes its per-step transform with :meth:`~rnorm.norms.Normalizer.fused_step`
(identity, a per-step affine map, batch, layer or RMS statistics). An input-site strategy without
one (``seqbn`` synchronized across processes) has its input terms computed before the loop as in
the reference; a recurrent- or cell-site strategy without one (a plugin that only implements
``step``) makes the layer run the reference, so the fused path never computes something else.
Batch statistics synchronized across processes (``bn`` under DDP) are all-reduced at each step, in
the torch-ops loop.

Two rewrites keep the operations per step few without changing the function:

* **Sigmoids for tanh.** ``tanh(a) = 2 σ(2a) − 1``, and on CPU torch's ``tanh`` costs about five
  times its ``sigmoid``. The ``g`` block's pre-activation is doubled, outside the loop, in the
  weights or scales that produce it, so one sigmoid over the ``(B, 4H)`` gates gives every gate
  after a fix-up of the ``g`` block; the cell site's scale and shift are doubled for the output tanh.
* **Batch means as products.** The masked mean over the batch is ``w_t @ x`` with
  ``w_t = mask_t / count_t``: one small GEMM instead of a masked multiply, a sum and a division.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnorm.functional.distributed import global_step_counts
from rnorm.nn import native
from rnorm.nn.recurrence import hidden_scale_of, reference_layer
from rnorm.norms.base import FusedStep

if TYPE_CHECKING:
    from rnorm.nn.cell import NormLSTMCell

__all__ = ["KERNELS", "fused_layer"]

_NORMALIZING = ("batch", "layer", "rms")
_PER_ROW = ("layer", "rms")  # statistics over the features of each row

#: How the per-step work between the GEMMs is done: ``auto`` (the compiled CPU kernels of
#: :mod:`rnorm.nn.native` where they are built and the tensors are float32/float64 on the CPU,
#: else torch operations), ``native`` (the compiled kernels, an error where they cannot run) or
#: ``torch`` (torch operations; what runs on CUDA).
KERNELS = ("auto", "native", "torch")


@dataclass
class _Plan:
    """What the Function needs besides its tensor inputs (which autograd tracks)."""

    input_kind: str  # "given" (input terms computed before the loop) or a FusedStep kind
    rec_kind: str
    cell_kind: str
    eps: tuple[float, float, float]  # input, recurrent, cell
    mask: Tensor | None  # (T, B, 1) in the compute dtype, 1.0 on real steps
    keep: Tensor | None  # the same, boolean
    weights: Tensor  # (T, 1, B) or (1, 1, B): each step's batch mean is weights[t] @ x
    counts: Tensor  # (T,) unpadded samples per step
    hidden_scale: Tensor | None  # Norm-Prop's constant 1 / sqrt(Var[h]); no gradient
    synchronized: bool = False  # batch statistics all-reduced over the processes at each step
    native: ModuleType | None = None  # the compiled kernels, if they run the loops
    statistics: dict = field(default_factory=dict)  # forward fills site -> (mean, var), (T, F) each


def fused_layer(
    cell: NormLSTMCell,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    hidden_probe: Tensor | None = None,
    *,
    kernels: str = "auto",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One direction of one layer, fused: the arguments and results of
    :func:`~rnorm.nn.recurrence.reference_layer` (``x`` ``(T, B, D)``, ``h0``, ``c0`` ``(B, H)``,
    ``mask`` ``(T, B)`` or ``None``; returns ``output`` ``(T, B, H)`` and ``(h_n, c_n)``);
    ``kernels`` is one of :data:`KERNELS`."""
    if kernels not in KERNELS:
        raise ValueError(f"Unknown kernels {kernels!r} for the fused recurrence. Available: {', '.join(KERNELS)}.")
    num_steps, batch_size, _ = x.shape
    hidden, gates = cell.hidden_size, 4 * cell.hidden_size
    norms = (cell.input_norm, cell.recurrent_norm, cell.cell_norm)
    for norm in norms:
        norm.start(num_steps)
    inp, rec, cel = (norm.fused_step(num_steps) for norm in norms)
    if rec is None or cel is None:
        return reference_layer(cell, x, h0, c0, mask, hidden_probe)
    batch_sites = [step for step in (inp, rec, cel) if step is not None and step.kind == "batch"]
    synchronized = any(step.synchronized for step in batch_sites)
    if synchronized and not all(step.synchronized for step in batch_sites):
        return reference_layer(cell, x, h0, c0, mask, hidden_probe)  # one set of step weights per layer
    sequence_statistics = None  # seqbn's (mean, var, count, record), from x's covariance
    if inp is not None and inp.kind == "sequence":
        if x.shape[2] <= hidden:  # the covariance is cheap (D² per sample): an affine map in the loop
            inp, sequence_statistics = _sequence_statistics(inp, cell, x, mask)
        else:  # the input terms before the loop, as in the reference
            inp = None

    # z-space: the g block's pre-activation doubled (one sigmoid then gives tanh(a) = 2 σ(2a) − 1),
    # applied with autograd to whatever produces it, so that gradients map back by themselves.
    double_g = x.new_ones(gates)
    double_g[2 * hidden : 3 * hidden] = 2.0
    rec_weight = cell.recurrent_norm.transform_weight(cell.weight_hh)  # (4H, H)
    rec_weight, rec_scale = _to_z_space(rec, rec_weight, double_g)
    rec_shift = [rec.shift] if rec.shift is not None else []
    if inp is None:  # input terms over the whole sequence, before the loop (they include the bias)
        input_kind, in_weight, in_scale, shift = "given", None, None, None
        terms = cell.input_terms(x, mask)  # (T, B, 4H)
        for part in rec_shift:
            terms = terms + (part.unsqueeze(1) if part.dim() == 2 else part)
        source = terms * double_g
        input_eps = 0.0
    else:
        input_kind, input_eps, source = inp.kind, inp.eps, x
        in_weight = cell.input_norm.transform_weight(cell.weight_ih)  # (4H, D)
        in_weight, in_scale = _to_z_space(inp, in_weight, double_g)
        parts = [p for p in (cell.bias, inp.shift, *rec_shift) if p is not None]
        shift = None
        if parts:  # every additive term of the gates, in one (S, 4H) tensor
            shift = sum(p if p.dim() == 2 else p.unsqueeze(0) for p in parts) * double_g

    dtype = x.dtype
    if mask is None:
        weights = x.new_full((1, 1, batch_size), 1.0 / batch_size)
        counts = torch.full((num_steps,), batch_size, device=x.device)
        step_mask = keep = None
    else:
        counts = mask.sum(1)  # (T,)
        weights = (mask.to(dtype) / counts.clamp(min=1).to(dtype).unsqueeze(1)).unsqueeze(1)  # (T, 1, B)
        keep = mask.unsqueeze(2)  # (T, B, 1)
        step_mask = keep.to(dtype)
    if synchronized:  # weights over the global batch: w @ u is this process's share of the global mean
        counts = global_step_counts(counts)
        present = x.new_ones(num_steps, batch_size) if mask is None else mask.to(dtype)
        weights = (present / counts.clamp(min=1).to(dtype).unsqueeze(1)).unsqueeze(1)
    scale = hidden_scale_of(cell.cell_norm)
    plan = _Plan(
        input_kind,
        rec.kind,
        cel.kind,
        (input_eps, rec.eps, cel.eps),
        step_mask,
        keep,
        weights,
        counts,
        None if scale is None else scale.detach().to(dtype),
        synchronized=synchronized,
    )
    # The output tanh as 2 σ(2ĉ) − 1 as well: the cell site's scale and shift doubled.
    cell_scale = None if cel.scale is None else cel.scale * 2.0
    cell_shift = None if cel.shift is None else cel.shift * 2.0
    tensors = (source, in_weight, rec_weight, shift, in_scale, rec_scale, cell_scale, cell_shift, h0, c0, hidden_probe)
    plan.native = _native_kernels(kernels, synchronized, *tensors, plan.hidden_scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        output, h_n, c_n = _FusedLSTM.apply(plan, *tensors)
    else:
        with torch.no_grad():
            output, h_n, c_n, _ = _forward(plan, *tensors, save=False)
    if sequence_statistics is not None:
        mean, var, count, record = sequence_statistics
        record(mean, var, count)
    fused_sites = {"input": inp, "rec": rec, "cell": cel}
    for site, (mean, var) in plan.statistics.items():  # batch kinds only; they all record
        fused_sites[site].record(mean, var, counts)
    return output, (h_n, c_n)


def _native_kernels(kernels: str, synchronized: bool, *tensors: Tensor | None) -> ModuleType | None:
    """The compiled kernels if ``kernels`` asks for them and they can run on ``tensors``."""
    if kernels == "torch":
        return None
    compiled = native.load()
    if compiled is not None and native.supports(*tensors) and not synchronized:
        return compiled
    if kernels == "native":
        if compiled is None:
            reason = "they are not built (no C++ compiler at install time?)"
        elif synchronized:
            reason = "batch statistics synchronized across processes run with torch operations"
        else:
            reason = "they need float32 or float64 tensors on the CPU"
        raise RuntimeError(f"kernels='native': the compiled CPU kernels cannot run: {reason}. Use kernels='auto' or 'torch'.")
    return None


def _sequence_statistics(fused: FusedStep, cell: NormLSTMCell, x: Tensor, mask: Tensor | None) -> tuple[FusedStep, tuple]:
    """Sequencewise batch normalization of ``u = W_x x`` as an affine map, without ``u``.

    The mean and biased variance of ``u`` over every unpadded step and sample are ``W_x μ`` and
    ``diag(W_x Σ W_x^T)``, with ``μ``, ``Σ`` the mean and covariance of ``x`` ``(T, B, D)``: a
    ``(D, D)`` problem instead of passes over ``(T, B, 4H)``. Computed with autograd, so their
    gradients reach ``x`` and ``W_x``.

    Returns the affine form and ``(mean (1, 4H), var (1, 4H), count (1,), record)`` for the
    population statistics.
    """
    weight = cell.input_norm.transform_weight(cell.weight_ih)  # (4H, D)
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
    scale = fused.scale * torch.rsqrt(var + fused.eps)
    shift = -mean * scale if fused.shift is None else fused.shift - mean * scale
    record = (mean.detach().unsqueeze(0), var.detach().unsqueeze(0), count.detach().round().long().reshape(1), fused.record)
    return FusedStep("affine", scale.unsqueeze(0), shift.unsqueeze(0)), record


def _to_z_space(fused: FusedStep, weight: Tensor, double_g: Tensor) -> tuple[Tensor, Tensor | None]:
    """The site's weight and scale with the g block doubled: in the weight for the identity, else
    in the scale (a normalization would undo a scaled weight)."""
    if fused.kind == "identity":
        return weight * double_g.unsqueeze(1), None
    return weight, fused.scale * double_g


class _FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, *tensors):  # noqa: ANN001
        output, h_n, c_n, saved = _forward(plan, *tensors, save=True)
        source, in_weight, rec_weight, shift, in_scale, rec_scale, cell_scale = tensors[:7]
        ctx.plan = plan
        ctx.has_probe = tensors[-1] is not None
        ctx.shift_shape = None if shift is None else shift.shape
        ctx.save_for_backward(source, in_weight, rec_weight, in_scale, rec_scale, cell_scale, *saved)
        return output, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n):  # noqa: ANN001
        if ctx.plan.native is not None:  # the compiled backward overwrites the saved buffers
            if getattr(ctx, "buffers_consumed", False):
                raise RuntimeError(
                    "Backward through NormLSTM's fused recurrence a second time (retain_graph=True): its compiled "
                    "CPU backward reuses the saved buffers. Build the model with impl='fused_torch' or "
                    "impl='reference' to backpropagate through one graph more than once."
                )
            ctx.buffers_consumed = True
        grads = _backward(ctx.plan, ctx.saved_tensors, grad_output, grad_h_n, grad_c_n, ctx.has_probe, ctx.shift_shape)
        return (None, *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[1:])))


class _Site:
    """One normalization site in the forward loop: its kind, ε and scale, and per-step buffers: the
    raw term (affine sites, for their scale's gradient), the normalized term and 1/std (batch,
    layer), the batch mean and variance (batch, for the population statistics)."""

    def __init__(self, kind: str, eps: float, scale: Tensor | None, new, steps: int, num_steps: int, batch: int, features: int, synchronized: bool = False) -> None:  # noqa: ANN001
        self.kind, self.eps, self.scale, self.synchronized = kind, eps, scale, synchronized
        self.raw = new(steps, batch, features) if kind == "affine" else None
        self.norm = new(steps, batch, features) if kind in _NORMALIZING else None
        self.rstd = None
        if kind in _PER_ROW:
            self.rstd = new(steps, batch, 1)
        elif kind == "batch":
            self.rstd = new(steps, 1, features)
        self.mean = new(num_steps, 1, features) if kind == "batch" else None
        self.var = new(num_steps, 1, features) if kind == "batch" else None
        self.layer_weights = _layer_weights(new(0), features) if kind in _PER_ROW else None

    def raw_out(self, s: int) -> Tensor:
        """Where to write step ``s``'s raw term (normalized in place for batch and layer)."""
        return self.raw[s] if self.raw is not None else self.norm[s]

    def term(self, u: Tensor, s: int, t: int, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, scale)`` with the site's output ``v * scale`` (plus its shift) for the raw term ``u``."""
        if self.kind == "affine":
            return u, _row(self.scale, t)
        mean = None if self.mean is None else self.mean[t]
        var = None if self.var is None else self.var[t]
        weights = w if self.kind == "batch" else self.layer_weights
        normalized = _normalize(self.kind, u, self.norm[s], self.rstd[s], mean, var, weights, self.eps, self.synchronized)
        return normalized, self.scale

    def batch_term(self, s: int, t: int) -> tuple:
        """Step ``s``'s raw term, already in ``norm[s]``, as a term of :func:`_batch_normalize`."""
        return (self.norm[s], self.norm[s], self.mean[t], self.var[t], self.rstd[s], self.eps)


def _normalize(kind: str, u: Tensor, out: Tensor, rstd_out: Tensor, mean_out, var_out, w: Tensor, eps: float, synchronized: bool = False) -> Tensor:  # noqa: ANN001
    """``out = (u - mean) / sqrt(var + eps)`` (``rms``: ``u / sqrt(mean(u²) + eps)``): batch statistics ``w @ u`` (``w`` ``(1, B)``, the
    step's mask over its count; see :func:`_batch_normalize`) or layer statistics ``u @ w`` (``w``
    ``(F, 1)`` of ``1/F``); means as GEMMs, which are several times faster than ``mean`` over an
    axis of a small tensor on CPU."""
    if kind == "batch":
        _batch_normalize([(u, out, mean_out, var_out, rstd_out, eps)], w, synchronized)
        return out
    if kind == "rms":  # no centering: rstd = 1 / sqrt(mean(u²) + eps)
        out.copy_(u)
    else:
        torch.sub(u, torch.mm(u, w), out=out)  # w: (F, 1) of 1/F
    rstd = torch.add(torch.mm(out * out, w), eps, out=rstd_out).rsqrt_()
    return out.mul_(rstd)


def _batch_normalize(terms: list[tuple], w: Tensor, synchronized: bool) -> None:
    """Batch normalization of one or more terms of a step, each ``(u, out, mean_out, var_out,
    rstd_out, eps)``: ``out = (u - mean) / sqrt(var + eps)`` with the biased moments (as the
    population statistics want them) written to ``mean_out``, ``var_out`` ``(1, F)``.

    ``synchronized``: ``w`` weighs by the global count and the moments are all-reduced, the
    means first and then the variances of deviations from them (as
    :func:`~rnorm.functional.distributed.synced_masked_moments` does), one message for all the terms'
    means and one for their variances."""
    means = [torch.mm(w, u, out=mean_out) for u, _, mean_out, _, _, _ in terms]
    _all_reduce_rows(means, synchronized)
    for u, out, mean_out, _, _, _ in terms:
        torch.sub(u, mean_out, out=out)
    variances = [torch.mm(w, out * out, out=var_out) for _, out, _, var_out, _, _ in terms]
    _all_reduce_rows(variances, synchronized)
    for _, out, _, var_out, rstd_out, eps in terms:
        out.mul_(torch.add(var_out, eps, out=rstd_out).rsqrt_())


def _all_reduce_rows(rows: list[Tensor], synchronized: bool) -> list[Tensor]:
    """Sums each ``(1, F)`` row over the processes, in place and in one message; nothing unless ``synchronized``."""
    if synchronized:
        if len(rows) == 1:
            dist.all_reduce(rows[0])
        else:
            packed = torch.cat(rows)
            dist.all_reduce(packed)
            for row, total in zip(rows, packed):
                row.copy_(total)
    return rows


def _layer_weights(like: Tensor, features: int) -> Tensor:
    """``(F, 1)`` of ``1/F``: ``u @ it`` is the mean over the features of each row of ``u``."""
    return like.new_full((features, 1), 1.0 / features)


def _row(tensor: Tensor | None, t: int) -> Tensor | None:
    """Row ``t`` of a per-step ``(T, F)`` tensor, or its only row if it is the same at every step."""
    if tensor is None or tensor.dim() == 1:
        return tensor
    return tensor[t] if tensor.shape[0] > 1 else tensor[0]


def _forward(plan, source, in_weight, rec_weight, shift, in_scale, rec_scale, cell_scale, cell_shift, h0, c0, probe, save):  # noqa: ANN001, C901, PLR0912, PLR0915
    """The time loop without autograd.

    Returns ``(output (T, B, H), h_n, c_n, saved)``; ``saved`` lists the buffers the backward
    pass reads (empty unless ``save``).
    """
    num_steps, batch_size = source.shape[:2]
    hidden = rec_weight.shape[1]
    gates = 4 * hidden
    new = source.new_empty
    input_kind, rec_kind, cell_kind = plan.input_kind, plan.rec_kind, plan.cell_kind
    input_eps, rec_eps, cell_eps = plan.eps
    mask, keep, weights = plan.mask, plan.keep, plan.weights
    per_step_weights = weights.shape[0] > 1
    hidden_scale = plan.hidden_scale
    rec_weight_t = rec_weight.t()  # (H, 4H): h @ W^T as a transposed GEMM, without a copy
    in_weight_t = None if in_weight is None else in_weight.t()  # (D, 4H)

    steps = num_steps if save else 1  # buffers per step when saving, one reused row otherwise
    sync = plan.synchronized
    paired = sync and input_kind == rec_kind == "batch"  # BN-LSTM under DDP: 2 all-reduces per step, not 4
    in_site = _Site(input_kind, input_eps, in_scale, new, steps, num_steps, batch_size, gates, sync)
    rec_site = _Site(rec_kind, rec_eps, rec_scale, new, steps, num_steps, batch_size, gates, sync)
    cell_site = _Site(cell_kind, cell_eps, cell_scale, new, steps, num_steps, batch_size, hidden, sync)
    sites = (in_site, rec_site, cell_site)
    if plan.native is not None:
        return _forward_native(plan, source, in_weight_t, rec_weight_t, shift, sites, cell_shift, h0, c0, probe, save)

    states_h = new(num_steps + 1, batch_size, hidden) if save else None
    states_c = new(num_steps + 1, batch_size, hidden) if save else None
    activations = new(steps, batch_size, gates)  # σ(i), σ(f), tanh(g), σ(o)
    tanh_cell = new(steps, batch_size, hidden)
    separate = mask is not None or not save  # else outputs and cells are the saved states
    output = new(num_steps, batch_size, hidden) if separate else None
    cell_new = new(2 if not save else steps, batch_size, hidden) if separate else None
    gate_buffer = new(batch_size, gates)
    cell_out = new(batch_size, hidden)  # 2ĉ

    h, c = h0, c0
    if save:
        states_h[0] = h0
        states_c[0] = c0
        h, c = states_h[0], states_c[0]
    g_block = slice(2 * hidden, 3 * hidden)
    for t in range(num_steps):
        s = t if save else 0
        w = weights[t] if per_step_weights else weights[0]  # (1, B)
        z = gate_buffer
        # -- input term plus every shift (BN eq. 6, NP eq. 15), in z-space ------------------------
        if input_kind == "given":
            base = source[t]
        else:
            shift_t = _row(shift, t)
            if input_kind == "identity":
                if shift_t is None:
                    torch.mm(source[t], in_weight_t, out=z)
                else:
                    torch.addmm(shift_t, source[t], in_weight_t, out=z)
            else:
                if paired:  # both terms normalized together: their all-reduces shared
                    torch.mm(source[t], in_weight_t, out=in_site.norm[s])
                    torch.mm(h, rec_weight_t, out=rec_site.norm[s])
                    _batch_normalize([in_site.batch_term(s, t), rec_site.batch_term(s, t)], w, synchronized=True)
                    v, scale = in_site.norm[s], in_site.scale
                else:
                    v, scale = in_site.term(torch.mm(source[t], in_weight_t, out=in_site.raw_out(s)), s, t, w)
                if shift_t is None:
                    torch.mul(v, scale, out=z)
                else:
                    torch.addcmul(shift_t, v, scale, out=z)
            base = z
        # -- plus the recurrent term --------------------------------------------------------------
        if rec_kind == "identity":
            if base is z:
                z.addmm_(h, rec_weight_t)
            else:
                torch.addmm(base, h, rec_weight_t, out=z)
        else:
            if paired:
                v, scale = rec_site.norm[s], rec_site.scale
            else:
                v, scale = rec_site.term(torch.mm(h, rec_weight_t, out=rec_site.raw_out(s)), s, t, w)
            if base is z:
                z.addcmul_(v, scale)
            else:
                torch.addcmul(base, v, scale, out=z)
        act = torch.sigmoid(z, out=activations[s])
        act[:, g_block].mul_(2.0).sub_(1.0)  # tanh of the (undoubled) g pre-activation
        i, f, g, o = act[:, :hidden], act[:, hidden : 2 * hidden], act[:, g_block], act[:, 3 * hidden :]
        # -- cell (eq. 7) ----------------------------------------------------------------------------
        if not separate:
            c_new = states_c[t + 1]
        else:
            c_new = cell_new[s] if save else cell_new[t % 2]  # two rows: c of the last step stays intact
        torch.mul(f, c, out=c_new).addcmul_(i, g)
        # -- normalized cell and output (eq. 8; NP eq. 17) ----------------------------------------
        if cell_kind == "identity":
            c_hat = torch.mul(c_new, 2.0, out=cell_out)
        else:
            v, scale = cell_site.term(c_new, s, t, w)  # affine: its scale's gradient reads c_new, saved anyway
            cshift = _row(cell_shift, t)
            c_hat = torch.mul(v, scale, out=cell_out) if cshift is None else torch.addcmul(cshift, v, scale, out=cell_out)
        tc = torch.sigmoid(c_hat, out=tanh_cell[s]).mul_(2.0).sub_(1.0)  # tanh(ĉ)
        h_new = output[t] if separate else states_h[t + 1]
        torch.mul(o, tc, out=h_new)
        if hidden_scale is not None:
            h_new.mul_(hidden_scale)
        if probe is not None:
            h_new.add_(probe[t])
        # -- padding: ended sequences keep their state, and output 0 ------------------------------
        if mask is not None:
            kept = keep[t]  # (B, 1)
            h = torch.where(kept, h_new, h, out=states_h[t + 1]) if save else torch.where(kept, h_new, h)
            c = torch.where(kept, c_new, c, out=states_c[t + 1]) if save else torch.where(kept, c_new, c)
            h_new.mul_(mask[t])
        else:
            h, c = h_new, c_new

    _keep_statistics(plan, sites)
    if not save:
        return output, h, c if mask is not None else c.clone(), []  # unmasked, c is a reused buffer
    return _results(output, states_h, states_c, activations, tanh_cell, cell_new, sites)


def _keep_statistics(plan: _Plan, sites: tuple[_Site, _Site, _Site]) -> None:
    """Hands the batch sites' per-step mean and variance ``(T, F)`` to the plan, for the population statistics."""
    for site, buf in zip(("input", "rec", "cell"), sites):
        if buf.mean is not None:
            plan.statistics[site] = (buf.mean.squeeze(1), buf.var.squeeze(1))


def _results(output, states_h, states_c, activations, tanh_cell, cell_new, sites):  # noqa: ANN001, ANN202
    """``(output, h_n, c_n, saved)`` of a saving forward pass; ``None`` for ``output``/``cell_new``
    means they are the saved states."""
    in_site, rec_site, cell_site = sites
    num_steps = states_h.shape[0] - 1
    output = states_h[1:] if output is None else output
    h_n, c_n = states_h[num_steps].clone(), states_c[num_steps].clone()
    cell_new = states_c[1:] if cell_new is None else cell_new
    saved = [states_h, states_c, activations, tanh_cell, cell_new]
    saved += [in_site.raw, in_site.norm, in_site.rstd, rec_site.raw, rec_site.norm, rec_site.rstd, cell_site.norm, cell_site.rstd]
    return output, h_n, c_n, saved


def _forward_native(plan, source, in_weight_t, rec_weight_t, shift, sites, cell_shift, h0, c0, probe, save):  # noqa: ANN001, ANN202
    """:func:`_forward` with the per-step work in the compiled kernels (:mod:`rnorm.nn.native`).

    Without ``save`` the states alternate between two rows instead of one per step."""
    num_steps, batch_size = source.shape[:2]
    hidden = rec_weight_t.shape[0]
    new = source.new_empty
    steps = num_steps if save else 1
    masked = plan.mask is not None
    states_h = new(num_steps + 1 if save else 2, batch_size, hidden)
    states_c = new(num_steps + 1 if save else 2, batch_size, hidden)
    states_h[0] = h0
    states_c[0] = c0
    buffers = {
        "z": new(batch_size, 4 * hidden),
        "act": new(steps, batch_size, 4 * hidden),
        "tanh_cell": new(steps, batch_size, hidden),
        "cell_new": new(steps, batch_size, hidden) if masked else None,  # None: c_t is the next state
        "states_h": states_h,
        "states_c": states_c,
        "output": new(num_steps, batch_size, hidden) if masked or not save else None,  # None: the states
        "mask": plan.mask.reshape(num_steps, batch_size) if masked else None,
        "weights": plan.weights.reshape(plan.weights.shape[0], batch_size),
    }
    native.forward_loop(
        plan.native,
        plan,
        source.contiguous(),
        in_weight_t,
        rec_weight_t,
        shift,
        sites,
        cell_shift,
        buffers,
        None if probe is None else probe.contiguous(),
        save,
    )
    _keep_statistics(plan, sites)
    if not save:
        last = num_steps & 1
        return buffers["output"], states_h[last].clone(), states_c[last].clone(), []
    return _results(buffers["output"], states_h, states_c, buffers["act"], buffers["tanh_cell"], buffers["cell_new"], sites)


def _normalization_backward(kind: str, dy: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor, w: Tensor, sums, step_mask, out=None, synchronized=False):  # noqa: ANN001
    """``∂loss/∂u`` of ``y = γ x̂ (+ β)``, ``x̂`` normalized by batch or layer statistics (``w`` as
    in :func:`_normalize`); ``dy``, ``xhat`` ``(B, F)``; written into ``out`` if given. Batch: see
    :func:`_batch_means` for ``sums`` and ``synchronized``."""
    if kind == "batch":
        ((mean_dy, mean_dy_xhat),) = _batch_means([(dy, xhat, sums)], w, synchronized)
        return _batch_derivative(dy, xhat, rstd, gamma, mean_dy, mean_dy_xhat, step_mask, out)
    dxhat = dy * gamma
    mean_dxhat_xhat = torch.mm(dxhat * xhat, w)  # (B, 1)
    centered = dxhat if kind == "rms" else dxhat - torch.mm(dxhat, w)  # rms: no mean was subtracted
    return torch.mul(centered.addcmul_(xhat, mean_dxhat_xhat, value=-1.0), rstd, out=out)


def _batch_means(items: list[tuple], w: Tensor, synchronized: bool) -> list[tuple[Tensor, Tensor]]:
    """``(mean_b(dy), mean_b(dy x̂))`` ``(1, F)`` of each ``(dy, xhat, sums)``, written into ``sums``
    (γ's and β's gradients). ``synchronized``: ``sums`` keep this process's shares, and the means
    returned are their sums over the processes, all items in one message."""
    local = []
    for dy, xhat, sums in items:
        local += [torch.mm(w, dy, out=sums[0]), torch.mm(w, dy * xhat, out=sums[1])]
    if synchronized:
        local = _all_reduce_rows([row.clone() for row in local], synchronized)
    return list(zip(local[0::2], local[1::2]))


def _batch_derivative(dy, xhat, rstd, gamma, mean_dy, mean_dy_xhat, step_mask, out=None):  # noqa: ANN001, ANN202
    """``∂loss/∂u`` of batch normalization from the batch means of ``dy`` and ``dy x̂`` ``(1, F)``."""
    du = torch.mul((dy - mean_dy).addcmul_(xhat, mean_dy_xhat, value=-1.0), gamma * rstd, out=out)
    return du if step_mask is None else du.mul_(step_mask)  # padded rows entered no statistic


def _scale_grad(kind: str, grad: Tensor, raw: Tensor | None, norm: Tensor | None, sums, samples: Tensor, scale: Tensor | None, accumulated: Tensor | None = None):  # noqa: ANN001
    """The gradient of a site's scale (affine: ``(S, F)``; batch, layer, rms: γ ``(F,)``).

    ``accumulated``: what the compiled kernels summed during the loop (affine: ``Σ_b ∂y u`` per
    step ``(T, F)``; layer, rms: ``Σ ∂y x̂`` ``(F,)``), in place of the sum over the saved buffers,
    which they overwrote."""
    if kind == "affine":
        rows = (grad * raw).sum(1) if accumulated is None else accumulated  # (T, F)
        return rows.sum(0, keepdim=True) if scale.shape[0] == 1 else rows
    if kind == "batch":
        return (sums[1] * samples).sum((0, 1))
    if kind in _PER_ROW:
        return (grad * norm).sum((0, 1)) if accumulated is None else accumulated
    return None


def _shift_grad(kind: str, grad: Tensor, sums, samples: Tensor, scale: Tensor | None) -> Tensor | None:
    """The gradient of a site's shift (affine: ``(S, F)``; batch, layer, rms: β ``(F,)``)."""
    if kind == "affine":
        rows = grad.sum(1)  # (T, F)
        return rows.sum(0, keepdim=True) if scale.shape[0] == 1 else rows
    if kind == "batch":
        return (sums[0] * samples).sum((0, 1))
    if kind in _PER_ROW:
        return grad.sum((0, 1))
    return None


def _backward(plan, saved, grad_output, grad_h_n, grad_c_n, has_probe, shift_shape):  # noqa: ANN001, C901, PLR0912, PLR0915
    """Back through time: the gradients of every tensor input of :class:`_FusedLSTM`, in order."""
    source, in_weight, rec_weight, in_scale, rec_scale, cell_scale = saved[:6]
    states_h, states_c, act, tanh_cell, cell_new = saved[6:11]
    in_raw, in_norm, in_rstd, rec_raw, rec_norm, rec_rstd, cell_norm, cell_rstd = saved[11:]
    num_steps, batch_size, gates = act.shape
    hidden = gates // 4
    input_kind, rec_kind, cell_kind = plan.input_kind, plan.rec_kind, plan.cell_kind
    mask, weights, counts = plan.mask, plan.weights, plan.counts
    per_step_weights = weights.shape[0] > 1
    new = act.new_empty

    # Scalars on ∂loss/∂ĉ: the cell site works on 2ĉ (see _forward), and Norm-Prop scales h.
    hidden_scale = plan.hidden_scale
    chat_factor = 1.0 if cell_kind == "identity" else 0.5
    if hidden_scale is not None:
        chat_factor = hidden_scale * chat_factor
    scale_chat = hidden_scale is not None or chat_factor != 1.0

    # The compiled kernels write gradients over forward buffers that are dead once their step is
    # done (σ(gates) -> ∂z, x̂ -> ∂u): on CPU, first-touching fresh (T, B, 4H) buffers costs about
    # as much as the arithmetic. The Function then refuses a second backward (see _FusedLSTM).
    reuse = plan.native is not None
    grad_z = act if reuse else new(num_steps, batch_size, gates)  # the gradient of the z-space gates
    if rec_kind == "identity":
        grad_r = grad_z  # of W_h h
    elif reuse:
        grad_r = rec_norm if rec_kind in _NORMALIZING else rec_raw
    else:
        grad_r = new(num_steps, batch_size, gates)
    grad_u = None
    if input_kind in _NORMALIZING:
        grad_u = in_norm if reuse else new(num_steps, batch_size, gates)
    elif reuse and input_kind == "affine":
        grad_u = in_raw
    accumulated = {}  # site -> what the kernels sum for its scale's gradient (see _scale_grad)
    if reuse:
        for site, kind, features in (("input", input_kind, gates), ("recurrent", rec_kind, gates), ("cell", cell_kind, hidden)):
            if kind in _PER_ROW:
                accumulated[site] = act.new_zeros(features)
            elif kind == "affine" and site != "cell":  # the cell's scale gradient reads c_t, not overwritten
                accumulated[site] = new(num_steps, features)
    grad_chat = new(num_steps, batch_size, hidden) if cell_kind != "identity" else None
    grad_probe = new(num_steps, batch_size, hidden) if has_probe else None

    def sums_of(kind: str, features: int):  # noqa: ANN202
        return (new(num_steps, 1, features), new(num_steps, 1, features)) if kind == "batch" else None

    in_sums, rec_sums, cell_sums = sums_of(input_kind, gates), sums_of(rec_kind, gates), sums_of(cell_kind, hidden)

    def at(sums, t: int):  # noqa: ANN001, ANN202
        return None if sums is None else (sums[0][t], sums[1][t])

    paired = plan.synchronized and input_kind == rec_kind == "batch"  # as in _forward

    if plan.native is not None:
        dh, dc = grad_h_n.contiguous().clone(), grad_c_n.contiguous().clone()
        native.backward_loop(
            plan.native,
            plan,
            rec_weight,
            saved={
                "grad_output": grad_output.contiguous(),
                "mask": None if mask is None else mask.reshape(num_steps, batch_size),
                "act": act,
                "tanh_cell": tanh_cell,
                "states_c": states_c,
                "input_raw": in_raw,
                "recurrent_raw": rec_raw,
                "input_norm": in_norm,
                "input_rstd": in_rstd,
                "recurrent_norm": rec_norm,
                "recurrent_rstd": rec_rstd,
                "cell_norm": cell_norm,
                "cell_rstd": cell_rstd,
            },
            grads={
                "grad_z": grad_z,
                "grad_r": grad_r,
                "grad_chat": grad_chat,
                "grad_probe": grad_probe,
                "input_sums": in_sums,
                "recurrent_sums": rec_sums,
                "cell_sums": cell_sums,
                "input_grad": grad_u,
                "recurrent_grad": None if rec_kind == "identity" else grad_r,
                "scale_sums": accumulated,
            },
            scales={"input": in_scale, "recurrent": rec_scale, "cell": cell_scale},
            chat_factor=1.0 if cell_kind == "identity" else 0.5,
            scale_chat=scale_chat,
            dh=dh,
            dc=dc,
        )
    else:
        g_block = slice(2 * hidden, 3 * hidden)
        deriv = new(batch_size, gates)  # per step: ∂z-gate/∂(its output) times what that output multiplies
        layer_gates, layer_hidden = _layer_weights(act, gates), _layer_weights(act, hidden)
        dh, dc = grad_h_n, grad_c_n
        for t in range(num_steps - 1, -1, -1):
            w = weights[t] if per_step_weights else weights[0]
            step_mask = None if mask is None else mask[t]
            if step_mask is not None:
                dh_new = torch.add(grad_output[t], dh).mul_(step_mask)  # padded outputs are constant zeros
                carry_h = torch.addcmul(dh, dh, step_mask, value=-1.0)  # ended sequences pass their state on
                dc_new = dc * step_mask
                carry_c = dc - dc_new
            else:
                dh_new = grad_output[t] + dh
                dc_new, carry_h, carry_c = dc, None, None
            if grad_probe is not None:
                grad_probe[t] = dh_new
            a, tc = act[t], tanh_cell[t]
            i, f, g, o = a[:, :hidden], a[:, hidden : 2 * hidden], a[:, g_block], a[:, 3 * hidden :]
            # -- through h = o tanh(ĉ) and the cell site ----------------------------------------------
            cell_coef = torch.addcmul(o, o * tc, tc, value=-1.0)  # o (1 - tanh²(ĉ))
            d_chat = torch.mul(dh_new, cell_coef, out=None if grad_chat is None else grad_chat[t])
            if scale_chat:
                d_chat.mul_(chat_factor)
            if cell_kind == "identity":
                d_cell = d_chat
            elif cell_kind == "affine":
                d_cell = d_chat * _row(cell_scale, t)
            else:
                d_cell = _normalization_backward(
                    cell_kind, d_chat, cell_norm[t], cell_rstd[t], cell_scale, w if cell_kind == "batch" else layer_hidden, at(cell_sums, t), step_mask,
                    synchronized=plan.synchronized,
                )
            dc_total = dc_new + d_cell
            # -- through the gates (z-space: the g block's ∂tanh(z/2)/∂z = (1 - g²)/2) ------------------
            torch.addcmul(a, a, a, value=-1.0, out=deriv)  # σ'(z) = σ (1 - σ) for i, f, o
            torch.mul(g, g, out=deriv[:, g_block]).sub_(1.0).mul_(-0.5)
            deriv[:, :hidden].mul_(g)
            deriv[:, hidden : 2 * hidden].mul_(states_c[t])
            deriv[:, g_block].mul_(i)
            deriv[:, 3 * hidden :].mul_(tc)
            dz = grad_z[t]
            torch.mul(dc_total.unsqueeze(1), deriv[:, : 3 * hidden].view(batch_size, 3, hidden), out=dz[:, : 3 * hidden].view(batch_size, 3, hidden))
            dh_out = dh_new if hidden_scale is None else dh_new * hidden_scale
            torch.mul(dh_out, deriv[:, 3 * hidden :], out=dz[:, 3 * hidden :])
            dc = torch.mul(dc_total, f) if carry_c is None else torch.addcmul(carry_c, dc_total, f)
            # -- through the input site (its weight's gradient comes after the loop) ------------------
            if paired:  # both sites' means in one all-reduce; the recurrent GEMM below reads grad_r[t]
                in_means, rec_means = _batch_means([(dz, in_norm[t], at(in_sums, t)), (dz, rec_norm[t], at(rec_sums, t))], w, True)
                _batch_derivative(dz, in_norm[t], in_rstd[t], in_scale, *in_means, step_mask, grad_u[t])
                _batch_derivative(dz, rec_norm[t], rec_rstd[t], rec_scale, *rec_means, step_mask, grad_r[t])
            elif grad_u is not None:
                _normalization_backward(
                    input_kind, dz, in_norm[t], in_rstd[t], in_scale, w if input_kind == "batch" else layer_gates, at(in_sums, t), step_mask, grad_u[t],
                    plan.synchronized,
                )
            # -- through the recurrent site and W_h ---------------------------------------------------
            if paired:
                dr = grad_r[t]
            elif rec_kind == "identity":
                dr = dz
            elif rec_kind == "affine":
                dr = torch.mul(dz, _row(rec_scale, t), out=grad_r[t])
            else:
                dr = _normalization_backward(
                    rec_kind, dz, rec_norm[t], rec_rstd[t], rec_scale, w if rec_kind == "batch" else layer_gates, at(rec_sums, t), step_mask, grad_r[t],
                    plan.synchronized,
                )
            dh = torch.mm(dr, rec_weight) if carry_h is None else torch.addmm(carry_h, dr, rec_weight)

    samples = counts.to(act.dtype).view(-1, 1, 1)  # (T, 1, 1): batch sums are means times counts
    grad_rec_weight = grad_r.reshape(-1, gates).t() @ states_h[:-1].reshape(-1, hidden)  # (4H, H)
    grad_rec_scale = _scale_grad(rec_kind, grad_z, rec_raw, rec_norm, rec_sums, samples, rec_scale, accumulated.get("recurrent"))

    grad_source = grad_in_weight = grad_shift = grad_in_scale = None
    if input_kind == "given":
        grad_source = grad_z
    else:
        if input_kind == "identity":
            grad_u = grad_z
        elif input_kind == "affine" and not reuse:
            grad_u = grad_z * (in_scale.unsqueeze(1) if in_scale.shape[0] > 1 else in_scale)
        flat = grad_u.reshape(-1, gates)
        grad_in_weight = flat.t() @ source.reshape(-1, source.shape[2])  # (4H, D)
        grad_source = grad_u @ in_weight  # (T, B, D)
        grad_in_scale = _scale_grad(input_kind, grad_z, in_raw, in_norm, in_sums, samples, in_scale, accumulated.get("input"))
        if shift_shape is not None:
            grad_shift = grad_z.sum(1)  # (T, 4H)
            if shift_shape[0] == 1:
                grad_shift = grad_shift.sum(0, keepdim=True)

    grad_cell_scale = _scale_grad(cell_kind, grad_chat, cell_new, cell_norm, cell_sums, samples, cell_scale, accumulated.get("cell"))
    grad_cell_shift = _shift_grad(cell_kind, grad_chat, cell_sums, samples, cell_scale)
    return (
        grad_source,
        grad_in_weight,
        grad_rec_weight,
        grad_shift,
        grad_in_scale,
        grad_rec_scale,
        grad_cell_scale,
        grad_cell_shift,
        dh,
        dc,
        grad_probe,
    )
