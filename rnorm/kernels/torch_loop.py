"""The fused recurrence's time loops in torch operations: what runs where the compiled kernels do not
(CUDA until a GPU implementation lands, other dtypes, batch statistics synchronized across processes).

The forward runs without autograd and writes what the backward reads into the named buffers of
:mod:`rnorm.kernels.schema`; the backward walks back through time with the derivatives of
``docs/fused_backward.md`` written out (the equation numbers below are that document's) and leaves the
weights', scales' and shifts' gradients to :mod:`rnorm.kernels.backward`.

Two rewrites keep the operations per step few:

* **Sigmoids for tanh** (z-space, eq. 1–3): one sigmoid over the ``(B, 4H)`` gates gives every gate.
* **Batch means as products.** The masked mean over the batch is ``w_t @ x`` with
  ``w_t = mask_t / count_t``: one small GEMM instead of a masked multiply, a sum and a division;
  layer statistics are ``x @ (1/F)`` likewise.

With synchronized batch statistics each step's moments are all-reduced over the default process
group (the means first, then the variances of deviations from them, as
:func:`~rnorm.functional.distributed.synced_masked_moments` does); when both the input and recurrent
sites are batch-normalized they share their messages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rnorm.kernels.backward import GradBuffers, allocate_grad_buffers, finish
from rnorm.kernels.buffers import SITES, Dims, SiteBuffers, allocate_outputs, site_buffers
from rnorm.kernels.kinds import get_kind
from rnorm.kernels.schema import BackwardArgs, Gradients, RecurrenceArgs, RecurrenceOutputs

__all__ = ["backward", "forward"]


# -- per-site arithmetic -------------------------------------------------------------------------


def _row(tensor: Tensor | None, t: int) -> Tensor | None:
    """Row ``t`` of a per-step ``(T, F)`` tensor, or its only row if it is the same at every step."""
    if tensor is None or tensor.dim() == 1:
        return tensor
    return tensor[t] if tensor.shape[0] > 1 else tensor[0]


def _layer_weights(like: Tensor, features: int) -> Tensor:
    """``(F, 1)`` of ``1/F``: ``u @ it`` is the mean over the features of each row of ``u``."""
    return like.new_full((features, 1), 1.0 / features)


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


def _batch_normalize(terms: list[tuple], w: Tensor, synchronized: bool) -> None:
    """Batch normalization (eq. 9) of one or more terms of a step, each ``(u, out, mean_out, var_out,
    rstd_out, eps)``: ``out = (u - mean) / sqrt(var + eps)`` with the biased moments written to
    ``mean_out``, ``var_out`` ``(1, F)``; synchronized, one message for all the means and one for the variances."""
    means = [torch.mm(w, u, out=mean_out) for u, _, mean_out, _, _, _ in terms]
    _all_reduce_rows(means, synchronized)
    for u, out, mean_out, _, _, _ in terms:
        torch.sub(u, mean_out, out=out)
    variances = [torch.mm(w, out * out, out=var_out) for _, out, _, var_out, _, _ in terms]
    _all_reduce_rows(variances, synchronized)
    for _, out, _, var_out, rstd_out, eps in terms:
        out.mul_(torch.add(var_out, eps, out=rstd_out).rsqrt_())


def _row_normalize(center: bool, u: Tensor, out: Tensor, rstd_out: Tensor, w: Tensor, eps: float) -> Tensor:
    """Layer (``center``) or RMS normalization of each row of ``u`` ``(B, F)`` (eq. 10), ``w`` ``(F, 1)`` of ``1/F``."""
    if center:
        torch.sub(u, torch.mm(u, w), out=out)
    else:
        out.copy_(u)
    rstd = torch.add(torch.mm(out * out, w), eps, out=rstd_out).rsqrt_()
    return out.mul_(rstd)


class _Site:
    """A site in the forward loop: its buffers and the weights its statistics need."""

    def __init__(self, buffers: SiteBuffers, features: int, synchronized: bool) -> None:
        self.buffers = buffers
        self.kind = None if buffers.kind == "given" else get_kind(buffers.kind)
        self.synchronized = synchronized
        # Row kinds have x̂ buffers (and no batch mean): their dtype and device.
        self.layer_weights = _layer_weights(buffers.norm, features) if self.kind is not None and self.kind.per_row else None

    def raw_out(self, s: int) -> Tensor:
        """Where to write step ``s``'s raw term (normalized in place for normalizing kinds)."""
        return self.buffers.u[s]

    def term(self, u: Tensor, s: int, t: int, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, scale)``: the site's output is ``v * scale`` (plus its shift) for the raw term ``u``."""
        b = self.buffers
        if self.kind.name == "affine":
            return u, _row(b.scale, t)
        if self.kind.per_row:
            return _row_normalize(self.kind.center, u, b.norm[s], b.rstd[s], self.layer_weights, b.eps), b.scale
        _batch_normalize([self.batch_term(s, t, u)], w, self.synchronized)
        return b.norm[s], b.scale

    def batch_term(self, s: int, t: int, u: Tensor | None = None) -> tuple:
        """Step ``s``'s term as one of :func:`_batch_normalize`'s (its raw term already in ``norm[s]`` if ``u`` is None)."""
        b = self.buffers
        return (b.norm[s] if u is None else u, b.norm[s], b.mean[t], b.var[t], b.rstd[s], b.eps)


# -- forward -------------------------------------------------------------------------------------


class _Gates:
    """The gates' z-space pre-activation of a step (eq. 4): the input term plus every shift plus the
    recurrent term, each site normalized as its kind says, written into a ``(B, 4H)`` buffer."""

    def __init__(self, args: RecurrenceArgs, in_site: _Site, rec_site: _Site, buffer: Tensor) -> None:
        self.in_site, self.rec_site, self.z = in_site, rec_site, buffer
        self.source, self.shift = args.source, args.shift
        self.in_weight_t = None if args.input_weight is None else args.input_weight.t()  # (D, 4H)
        self.rec_weight_t = args.recurrent_weight.t()  # (H, 4H): h @ W^T as a transposed GEMM, without a copy
        self.input_kind, self.rec_kind = in_site.buffers.kind, rec_site.buffers.kind
        # BN-LSTM under DDP: both terms normalized together, 2 all-reduces per step instead of 4
        self.paired = args.synchronized and self.input_kind == self.rec_kind == "batch"

    def __call__(self, t: int, s: int, h: Tensor, w: Tensor) -> Tensor:
        z, in_site, rec_site = self.z, self.in_site, self.rec_site
        if self.paired:
            torch.mm(self.source[t], self.in_weight_t, out=in_site.buffers.norm[s])
            torch.mm(h, self.rec_weight_t, out=rec_site.buffers.norm[s])
            _batch_normalize([in_site.batch_term(s, t), rec_site.batch_term(s, t)], w, synchronized=True)
        base = self._input_term(t, s, w)
        if self.rec_kind == "identity":
            if base is z:
                return z.addmm_(h, self.rec_weight_t)
            return torch.addmm(base, h, self.rec_weight_t, out=z)
        if self.paired:
            v, scale = rec_site.buffers.norm[s], rec_site.buffers.scale
        else:
            v, scale = rec_site.term(torch.mm(h, self.rec_weight_t, out=rec_site.raw_out(s)), s, t, w)
        if base is z:
            return z.addcmul_(v, scale)
        return torch.addcmul(base, v, scale, out=z)

    def _input_term(self, t: int, s: int, w: Tensor) -> Tensor:
        """The input term plus every shift: ``z`` written, or the given terms' row ``t``."""
        z, source = self.z, self.source
        if self.input_kind == "given":
            return source[t]
        shift_t = _row(self.shift, t)
        if self.input_kind == "identity":
            if shift_t is None:
                return torch.mm(source[t], self.in_weight_t, out=z)
            return torch.addmm(shift_t, source[t], self.in_weight_t, out=z)
        if self.paired:  # normalized with the recurrent term
            v, scale = self.in_site.buffers.norm[s], self.in_site.buffers.scale
        else:
            v, scale = self.in_site.term(torch.mm(source[t], self.in_weight_t, out=self.in_site.raw_out(s)), s, t, w)
        if shift_t is None:
            return torch.mul(v, scale, out=z)
        return torch.addcmul(shift_t, v, scale, out=z)


def forward(args: RecurrenceArgs) -> RecurrenceOutputs:
    """The time loop without autograd (eq. 4–11 in z-space); the results of ``rnorm::lstm_recurrence``."""
    outputs, states_h = allocate_outputs(args)
    dims = Dims.of(args)
    hidden, save, masked = dims.hidden, args.save, args.mask is not None
    new = args.source.new_empty
    keep = None if not masked else args.mask.unsqueeze(2)  # (T, B, 1)
    weights = args.weights.unsqueeze(1)  # (T or 1, 1, B)
    in_site, rec_site, cell_site = (
        _Site(site_buffers(args, outputs, site, scratch=not save), dims.features(site), args.synchronized) for site in SITES
    )
    gates = _Gates(args, in_site, rec_site, new(dims.batch, dims.gates))
    saved = outputs.saved
    activations = saved.act if save else new(1, dims.batch, dims.gates)  # σ(i), σ(f), tanh(g), σ(o)
    tanh_cell = saved.tanh_cell if save else new(1, dims.batch, hidden)
    separate = masked or not save  # else outputs and cells are the saved states
    cell_new = None if not separate else saved.cell_new if save else new(2, dims.batch, hidden)
    cell_out = new(dims.batch, hidden)  # 2ĉ
    states_c = saved.states_c if save else None
    h, c = args.h0, args.c0
    if save:
        states_h[0], states_c[0] = h, c
        h, c = states_h[0], states_c[0]
    g_block = slice(2 * hidden, 3 * hidden)
    for t in range(dims.steps):
        s = t if save else 0
        w = weights[t] if weights.shape[0] > 1 else weights[0]  # (1, B)
        act = torch.sigmoid(gates(t, s, h, w), out=activations[s])  # eq. 5
        act[:, g_block].mul_(2.0).sub_(1.0)  # tanh of the (undoubled) g pre-activation
        # -- cell (eq. 6) ---------------------------------------------------------------------------
        if not separate:
            c_new = states_c[t + 1]
        else:
            c_new = cell_new[s] if save else cell_new[t % 2]  # two rows: c of the last step stays intact
        torch.mul(act[:, hidden : 2 * hidden], c, out=c_new).addcmul_(act[:, :hidden], act[:, g_block])
        # -- normalized cell and output (eq. 7–8) ---------------------------------------------
        tc = torch.sigmoid(_doubled_cell(cell_site, c_new, args.cell_shift, s, t, w, cell_out), out=tanh_cell[s])
        tc.mul_(2.0).sub_(1.0)  # tanh(ĉ)
        h_new = outputs.output[t] if separate else states_h[t + 1]
        torch.mul(act[:, 3 * hidden :], tc, out=h_new)
        if args.hidden_scale is not None:
            h_new.mul_(args.hidden_scale)
        # -- padding: ended sequences keep their state, and output 0 (eq. 11) ---------------------
        if masked:
            kept = keep[t]  # (B, 1)
            h = torch.where(kept, h_new, h, out=states_h[t + 1]) if save else torch.where(kept, h_new, h)
            c = torch.where(kept, c_new, c, out=states_c[t + 1]) if save else torch.where(kept, c_new, c)
            h_new.mul_(kept)
        else:
            h, c = h_new, c_new
    outputs.h_n.copy_(h)
    outputs.c_n.copy_(c)
    return outputs


def _doubled_cell(site: _Site, c_new: Tensor, cell_shift: Tensor | None, s: int, t: int, w: Tensor, out: Tensor) -> Tensor:
    """``2ĉ_t`` (eq. 7) into ``out``: the cell site's output with its scale and shift doubled (eq. 3)."""
    if site.buffers.kind == "identity":
        return torch.mul(c_new, 2.0, out=out)
    v, scale = site.term(c_new, s, t, w)  # affine: its scale's gradient reads c_new, saved anyway
    shift = _row(cell_shift, t)
    return torch.mul(v, scale, out=out) if shift is None else torch.addcmul(shift, v, scale, out=out)


# -- backward ------------------------------------------------------------------------------------


def _normalization_backward(site: _BackSite, dy: Tensor, t: int, w: Tensor, step_mask: Tensor | None, out: Tensor) -> Tensor:
    """``∂loss/∂u`` of ``y = γ x̂ (+ β)`` at step ``t`` (eq. 13 batch, eq. 14 row kinds), written into ``out``."""
    xhat, rstd = site.norm[t], site.rstd[t]
    if site.kind.statistics == "batch":
        ((mean_dy, mean_dy_xhat),) = _batch_means([(dy, xhat, site.sums_at(t))], w, site.synchronized)
        return _batch_derivative(dy, xhat, rstd, site.scale, mean_dy, mean_dy_xhat, step_mask, out)
    dxhat = dy * site.scale
    mean_dxhat_xhat = torch.mm(dxhat * xhat, site.layer_weights)  # (B, 1)
    centered = dxhat - torch.mm(dxhat, site.layer_weights) if site.kind.center else dxhat  # rms: no mean was subtracted
    return torch.mul(centered.addcmul_(xhat, mean_dxhat_xhat, value=-1.0), rstd, out=out)


def _batch_means(items: list[tuple], w: Tensor, synchronized: bool) -> list[tuple[Tensor, Tensor]]:
    """``(mean_b(dy), mean_b(dy x̂))`` ``(1, F)`` of each ``(dy, xhat, sums)``, written into ``sums``
    (γ's and β's gradients). ``synchronized``: ``sums`` keep this process's shares, and the means
    returned are their sums over the processes, all items in one message."""
    local = []
    for dy, xhat, sums in items:
        local += [torch.mm(w, dy, out=sums[0]), torch.mm(w, dy * xhat, out=sums[1])]
    if synchronized:  # one message; a copy, since sums keep this process's shares
        packed = torch.cat(local)
        dist.all_reduce(packed)
        local = list(packed.split(1))
    return list(zip(local[0::2], local[1::2]))


def _batch_derivative(dy, xhat, rstd, gamma, mean_dy, mean_dy_xhat, step_mask, out):
    """``∂loss/∂u`` of batch normalization from the batch means of ``dy`` and ``dy x̂`` ``(1, F)`` (eq. 13)."""
    du = torch.mul((dy - mean_dy).addcmul_(xhat, mean_dy_xhat, value=-1.0), gamma * rstd, out=out)
    return du if step_mask is None else du.mul_(step_mask)  # padded rows entered no statistic


class _BackSite:
    """A site in the backward loop: its saved x̂ and ``1/std``, scale, and where γ's sums go."""

    def __init__(self, kind: str, norm: Tensor, rstd: Tensor, scale: Tensor | None, sums, features: int, like: Tensor, synchronized: bool) -> None:
        self.kind = None if kind == "given" else get_kind(kind)
        self.norm, self.rstd, self.scale, self.sums, self.synchronized = norm, rstd, scale, sums, synchronized
        self.layer_weights = _layer_weights(like, features) if self.kind is not None and self.kind.per_row else None

    def sums_at(self, t: int):
        return None if self.sums is None else (self.sums[0][t], self.sums[1][t])


def backward(args: BackwardArgs) -> Gradients:
    """Back through time with torch operations (eq. 11–16): the gradients of ``rnorm::lstm_recurrence``'s inputs."""
    saved = args.saved
    act, tanh_cell, states_c = saved.act, saved.tanh_cell, saved.states_c
    num_steps, batch_size, gates = act.shape
    hidden = gates // 4
    buffers: GradBuffers = allocate_grad_buffers(args, in_loop=False)
    mask = None if args.mask is None else args.mask.to(act.dtype).unsqueeze(2)  # (T, B, 1)
    weights = args.weights.unsqueeze(1)  # (T or 1, 1, B)
    per_step_weights = weights.shape[0] > 1
    sync = args.synchronized
    in_site = _BackSite(args.input_kind, saved.input_norm, saved.input_rstd, args.input_scale, buffers.input_sums, gates, act, sync)
    rec_site = _BackSite(args.recurrent_kind, saved.recurrent_norm, saved.recurrent_rstd, args.recurrent_scale, buffers.recurrent_sums, gates, act, sync)
    cell_site = _BackSite(args.cell_kind, saved.cell_norm, saved.cell_rstd, args.cell_scale, buffers.cell_sums, hidden, act, sync)
    input_kind, rec_kind, cell_kind = args.input_kind, args.recurrent_kind, args.cell_kind
    paired = sync and input_kind == rec_kind == "batch"  # as in forward
    hidden_scale = args.hidden_scale
    # The scalar on ∂loss/∂ĉ: ½ for a cell site, which works on 2ĉ (eq. 3), times Norm-Prop's scale on h.
    chat_factor = 1.0 if cell_kind == "identity" else 0.5
    if hidden_scale is not None:
        chat_factor = hidden_scale * chat_factor
    scale_chat = hidden_scale is not None or chat_factor != 1.0
    # Scratch for a normalizing cell site's derivative: each step's result is added into a new tensor.
    cell_scratch = act.new_empty(batch_size, hidden) if get_kind(cell_kind).normalizing else None
    grad_z, grad_r, grad_u, grad_chat = buffers.grad_z, buffers.grad_r, buffers.grad_u, buffers.grad_chat
    rec_weight = args.recurrent_weight

    g_block = slice(2 * hidden, 3 * hidden)
    deriv = act.new_empty(batch_size, gates)  # per step: ∂z-gate/∂(its output) times what that output multiplies
    dh, dc = args.grad_h_n, args.grad_c_n
    for t in range(num_steps - 1, -1, -1):
        w = weights[t] if per_step_weights else weights[0]
        step_mask = None if mask is None else mask[t]
        if step_mask is not None:
            dh_new = torch.add(args.grad_output[t], dh).mul_(step_mask)  # padded outputs are constant zeros
            carry_h = torch.addcmul(dh, dh, step_mask, value=-1.0)  # ended sequences pass their state on (eq. 11)
            dc_new = dc * step_mask
            carry_c = dc - dc_new
        else:
            dh_new = args.grad_output[t] + dh
            dc_new, carry_h, carry_c = dc, None, None
        a, tc = act[t], tanh_cell[t]
        i, f, g, o = a[:, :hidden], a[:, hidden : 2 * hidden], a[:, g_block], a[:, 3 * hidden :]
        # -- through h = o tanh(ĉ) and the cell site (eq. 12) --------------------------------------
        cell_coef = torch.addcmul(o, o * tc, tc, value=-1.0)  # o (1 - tanh²(ĉ))
        d_chat = torch.mul(dh_new, cell_coef, out=None if grad_chat is None else grad_chat[t])
        if scale_chat:
            d_chat.mul_(chat_factor)
        if cell_kind == "identity":
            d_cell = d_chat
        elif cell_kind == "affine":
            d_cell = d_chat * _row(args.cell_scale, t)
        else:
            d_cell = _normalization_backward(cell_site, d_chat, t, w, step_mask, cell_scratch)
        dc_total = dc_new + d_cell
        # -- through the gates (z-space: the g block's ∂tanh(z/2)/∂z = (1 - g²)/2; eq. 15) -------------
        torch.addcmul(a, a, a, value=-1.0, out=deriv)  # σ'(z) = σ (1 - σ) for i, f, o
        torch.mul(g, g, out=deriv[:, g_block]).sub_(1.0).mul_(-0.5)
        deriv[:, :hidden].mul_(g)
        deriv[:, hidden : 2 * hidden].mul_(states_c[t])
        deriv[:, g_block].mul_(i)
        deriv[:, 3 * hidden :].mul_(tc)
        if hidden_scale is not None:  # h = κ o tanh(ĉ): κ on the output gate's derivative too
            deriv[:, 3 * hidden :].mul_(hidden_scale)
        dz = grad_z[t]
        torch.mul(dc_total.unsqueeze(1), deriv[:, : 3 * hidden].view(batch_size, 3, hidden), out=dz[:, : 3 * hidden].view(batch_size, 3, hidden))
        torch.mul(dh_new, deriv[:, 3 * hidden :], out=dz[:, 3 * hidden :])
        dc = torch.mul(dc_total, f) if carry_c is None else torch.addcmul(carry_c, dc_total, f)
        # -- through the input site (its weight's gradient comes after the loop) -------------------
        if paired:  # both sites' means in one all-reduce; the recurrent GEMM below reads grad_r[t]
            in_means, rec_means = _batch_means(
                [(dz, in_site.norm[t], in_site.sums_at(t)), (dz, rec_site.norm[t], rec_site.sums_at(t))], w, True
            )
            _batch_derivative(dz, in_site.norm[t], in_site.rstd[t], in_site.scale, *in_means, step_mask, grad_u[t])
            _batch_derivative(dz, rec_site.norm[t], rec_site.rstd[t], rec_site.scale, *rec_means, step_mask, grad_r[t])
        elif in_site.kind is not None and in_site.kind.normalizing:
            _normalization_backward(in_site, dz, t, w, step_mask, grad_u[t])
        # -- through the recurrent site and W_h (eq. 16) --------------------------------------------
        if paired:
            dr = grad_r[t]
        elif rec_kind == "identity":
            dr = dz
        elif rec_kind == "affine":
            dr = torch.mul(dz, _row(args.recurrent_scale, t), out=grad_r[t])
        else:
            dr = _normalization_backward(rec_site, dz, t, w, step_mask, grad_r[t])
        dh = torch.mm(dr, rec_weight) if carry_h is None else torch.addmm(carry_h, dr, rec_weight)
    return finish(args, buffers, dh, dc)
