"""What every backward implementation shares: its per-step gradient buffers, and the large
operations after the time loop (the weights', scales' and shifts' gradients; ``docs/fused_backward.md`` §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from rnorm.kernels.kinds import get_kind
from rnorm.kernels.schema import BackwardArgs, Gradients, absent, present

__all__ = ["GradBuffers", "allocate_grad_buffers", "finish"]


@dataclass
class GradBuffers:
    """The backward loop's per-step results ``(T, B, F)`` and sums.

    ``grad_z``: of the z-space gates; ``grad_r``: of the recurrent term ``W_h h_{t-1}`` (``grad_z``
    itself for an identity site); ``grad_u``: of the input term ``W_x x_t`` (normalizing and, with
    reuse, affine input sites); ``grad_chat``: of the cell site's output (``None`` for an identity
    cell); ``*_sums``: a batch site's ``(Σ_b w dy, Σ_b w dy x̂)`` per step ``(T, 1, F)`` each (γ's and
    β's gradients, and the batch means of eq. 13); ``accumulated``: what an implementation summed in
    its loop for a scale's gradient (row kinds: ``Σ dy x̂`` ``(F,)``; affine input and recurrent
    sites: ``Σ_b dy u`` per step ``(T, F)``) where it overwrote the buffers that sum would read.
    """

    grad_z: Tensor
    grad_r: Tensor
    grad_u: Tensor | None
    grad_chat: Tensor | None
    input_sums: tuple[Tensor, Tensor] | None
    recurrent_sums: tuple[Tensor, Tensor] | None
    cell_sums: tuple[Tensor, Tensor] | None
    accumulated: dict[str, Tensor] = field(default_factory=dict)


def allocate_grad_buffers(args: BackwardArgs, *, in_loop: bool, reuse: bool = False) -> GradBuffers:
    """Gradient buffers for ``args``.

    Args:
        args: the backward's arguments.
        in_loop: the implementation computes an affine input site's ``grad_u`` and the sums behind
            the row kinds' and affine sites' scale gradients inside its loop (the compiled kernels do;
            the torch-ops loop leaves them to :func:`finish`).
        reuse: the gradients overwrite the saved buffers that are dead once their step is done
            (σ(gates) → ``grad_z``, x̂ or ``u`` → ``grad_u`` / ``grad_r``): on CPU, first-touching
            fresh ``(T, B, 4H)`` buffers costs about as much as the arithmetic (the in-place backward).
    """
    saved = args.saved
    act = saved.act
    num_steps, batch_size, gates = act.shape
    hidden = gates // 4
    new = act.new_empty
    input_kind = None if args.input_kind == "given" else get_kind(args.input_kind)
    rec_kind, cell_kind = get_kind(args.recurrent_kind), get_kind(args.cell_kind)

    # grad_z is returned as the given input terms' gradient: never a saved buffer then.
    grad_z = act if reuse and input_kind is not None else new(num_steps, batch_size, gates)
    if rec_kind.name == "identity":
        grad_r = grad_z
    elif reuse:
        grad_r = saved.recurrent_norm if rec_kind.normalizing else saved.recurrent_raw
    else:
        grad_r = new(num_steps, batch_size, gates)
    grad_u = None
    if input_kind is not None and input_kind.normalizing:
        grad_u = saved.input_norm if reuse else new(num_steps, batch_size, gates)
    elif in_loop and input_kind is not None and input_kind.name == "affine":
        grad_u = saved.input_raw if reuse else new(num_steps, batch_size, gates)
    accumulated = {}
    if in_loop:
        for site, kind, features in (("input", input_kind, gates), ("recurrent", rec_kind, gates), ("cell", cell_kind, hidden)):
            if kind is not None and kind.per_row:
                accumulated[site] = act.new_zeros(features)
            elif kind is not None and kind.name == "affine" and site != "cell":  # the cell's reads c_t, not overwritten
                accumulated[site] = new(num_steps, features)

    def sums(kind, features: int):
        return (new(num_steps, 1, features), new(num_steps, 1, features)) if kind is not None and kind.statistics == "batch" else None

    return GradBuffers(
        grad_z=grad_z,
        grad_r=grad_r,
        grad_u=grad_u,
        grad_chat=new(num_steps, batch_size, hidden) if cell_kind.name != "identity" else None,
        input_sums=sums(input_kind, gates),
        recurrent_sums=sums(rec_kind, gates),
        cell_sums=sums(cell_kind, hidden),
        accumulated=accumulated,
    )


def finish(args: BackwardArgs, buffers: GradBuffers, dh: Tensor, dc: Tensor) -> Gradients:
    """After the loop: ``dh``, ``dc`` are the gradients of ``h0``, ``c0``; the weights', scales' and
    shifts' gradients are large operations over every step at once (eq. 17–20)."""
    saved = args.saved
    cell_new = saved.cell_new if present(saved.cell_new) else saved.states_c[1:]  # c_t before padding carries
    grad_z, grad_r, grad_chat = buffers.grad_z, buffers.grad_r, buffers.grad_chat
    num_steps, _, gates = grad_z.shape
    samples = args.counts.to(grad_z.dtype).view(-1, 1, 1)  # (T, 1, 1): batch sums are means times counts
    accumulated = buffers.accumulated

    def none() -> Tensor:  # a new one each time: an op's results must not alias each other
        return absent(grad_z)

    grad_rec_weight = _recurrent_weight_grad(args, grad_r)
    grad_rec_scale = _scale_grad(
        args.recurrent_kind, grad_z, saved.recurrent_raw, saved.recurrent_norm, buffers.recurrent_sums, samples, args.recurrent_scale, accumulated.get("recurrent")
    )
    grad_in_weight, grad_shift, grad_in_scale = none(), none(), none()
    if args.input_kind == "given":
        grad_source = grad_z
    else:
        grad_u = buffers.grad_u
        if args.input_kind == "identity":
            grad_u = grad_z
        elif args.input_kind == "affine" and grad_u is None:
            scale = args.input_scale
            grad_u = grad_z * (scale.unsqueeze(1) if scale.shape[0] > 1 else scale)
        flat = grad_u.reshape(-1, gates)
        grad_in_weight = flat.t() @ args.source.reshape(-1, args.source.shape[2])  # (4H, D)
        grad_source = grad_u @ args.input_weight  # (T, B, D)
        grad_in_scale = _scale_grad(
            args.input_kind, grad_z, saved.input_raw, saved.input_norm, buffers.input_sums, samples, args.input_scale, accumulated.get("input")
        )
        if args.shift_shape:
            grad_shift = grad_z.sum(1)  # (T, 4H)
            if args.shift_shape[0] == 1:
                grad_shift = grad_shift.sum(0, keepdim=True)
    grad_cell_scale = _scale_grad(args.cell_kind, grad_chat, cell_new, saved.cell_norm, buffers.cell_sums, samples, args.cell_scale, accumulated.get("cell"))
    grad_cell_shift = _shift_grad(args.cell_kind, grad_chat, buffers.cell_sums, samples, args.cell_shift_shape)
    return Gradients(
        source=grad_source,
        input_weight=grad_in_weight,
        recurrent_weight=grad_rec_weight,
        shift=grad_shift,
        input_scale=none() if grad_in_scale is None else grad_in_scale,
        recurrent_scale=none() if grad_rec_scale is None else grad_rec_scale,
        cell_scale=none() if grad_cell_scale is None else grad_cell_scale,
        cell_shift=none() if grad_cell_shift is None else grad_cell_shift,
        h0=dh,
        c0=dc,
    )


def _recurrent_weight_grad(args: BackwardArgs, grad_r: Tensor) -> Tensor:
    """``Σ_t grad_r[t]^T h_{t-1}`` ``(4H, H)`` (eq. 17): from the carried states, or, without padding,
    from ``h0`` and the outputs (``h_t = output[t]``), which then are the states."""
    gates, hidden = grad_r.shape[2], args.h0.shape[1]
    if present(args.saved.states_h):
        return grad_r.reshape(-1, gates).t() @ args.saved.states_h[:-1].reshape(-1, hidden)
    grad = grad_r[0].t() @ args.h0
    if grad_r.shape[0] > 1:
        grad.addmm_(grad_r[1:].reshape(-1, gates).t(), args.output[:-1].reshape(-1, hidden))
    return grad


def _scale_grad(kind: str, grad: Tensor, raw: Tensor, norm: Tensor, sums, samples: Tensor, scale: Tensor | None, accumulated: Tensor | None) -> Tensor | None:
    """The gradient of a site's scale (affine: ``(S, F)``; batch and row kinds: γ ``(F,)``) (eq. 18–19).

    ``accumulated``: what an implementation summed during its loop (see :class:`GradBuffers`), in
    place of the sum over saved buffers it overwrote."""
    step_kind = get_kind(kind) if kind != "given" else None
    if step_kind is None or step_kind.name == "identity":
        return None
    if step_kind.name == "affine":
        rows = (grad * raw).sum(1) if accumulated is None else accumulated  # (T, F)
        return rows.sum(0, keepdim=True) if scale.shape[0] == 1 else rows
    if step_kind.statistics == "batch":
        return (sums[1] * samples).sum((0, 1))
    return (grad * norm).sum((0, 1)) if accumulated is None else accumulated


def _shift_grad(kind: str, grad: Tensor | None, sums, samples: Tensor, shape: list[int]) -> Tensor | None:
    """The gradient of the cell site's shift of ``shape`` (affine: ``(S, H)``; batch and row kinds: β ``(H,)``) (eq. 20)."""
    step_kind = get_kind(kind)
    if not shape or step_kind.name == "identity":
        return None
    if step_kind.name == "affine":
        total = grad.sum(1)  # (T, H)
        return total.sum(0, keepdim=True) if shape[0] == 1 else total
    if step_kind.statistics == "batch":
        return (sums[0] * samples).sum((0, 1))
    return grad.sum((0, 1))
