"""One layer direction through torch's own LSTM where it is a plain LSTM after a weight transform.

``torch._VF.lstm`` is what ``torch.nn.LSTM`` calls: cuDNN on CUDA, oneDNN or ATen's own loop on
the CPU. A :class:`~rnorm.kernels.LayerSpec` reduces to it when nothing normalizes a term between
the products and the gates: every site is the identity or an affine map that is the same at every
step (folded into the weight rows and the bias), the cell site is the identity, and no constant
scales ``h_t``. docs/performance.md ("Dispatch to torch's LSTM") derives the list that
:func:`ineligibility` checks. The folding is ordinary autograd code, so torch's LSTM backward
hands its weight gradients back through it to the strategies' parameters.

Padding: torch's LSTM takes padded sequences packed (sorted by length, the lengths on the host),
which gives what :func:`rnorm.kernels.lstm_layer` promises: 0 at padded steps, and ``h_n``,
``c_n`` at each sequence's last real step. Reading the lengths is a host synchronization, and
tracing (``torch.compile``, ``torch.export``) has no values to read, so under tracing only unpadded
input can take this path (:func:`traced_with_mask`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnorm.kernels.kinds import get_kind
from rnorm.kernels.prepare import sequence_to_affine
from rnorm.kernels.spec import LayerResult, LayerSpec, SiteSpec, SiteStatistics

__all__ = ["ineligibility", "lstm_layer", "traced_with_mask"]


def ineligibility(spec: LayerSpec) -> str | None:
    """Why ``spec`` is not a plain LSTM after a differentiable weight transform; ``None`` when it is.

    The reasons name the site and kind, never shapes or values, so that they can be logged once.
    """
    if spec.synchronized:
        return "batch statistics synchronized across processes are all-reduced inside the loop"
    if spec.input is None:
        return (
            "the input terms arrive computed (an input strategy without a fused form, or seqbn on an input "
            "wider than H), and torch's LSTM multiplies x by W_x itself"
        )
    for site, description in (("input", spec.input), ("recurrent", spec.recurrent)):
        reason = _site_ineligibility(site, description)
        if reason is not None:
            return reason
    if spec.cell.kind != "identity":
        return f"the cell site is of kind {spec.cell.kind!r}, and torch's LSTM applies tanh to c_t itself"
    if spec.hidden_scale is not None:
        return "a constant scales h_t after the output gate (Norm-Prop's 1/sqrt(Var[h_t]))"
    return None


def _site_ineligibility(site: str, description: SiteSpec) -> str | None:
    kind = get_kind(description.kind)
    if kind.normalizing:
        return f"the {site} site is of kind {kind.name!r}: it normalizes with statistics torch's LSTM does not compute"
    if kind.name == "affine" and any(t is not None and t.shape[0] != 1 for t in (description.scale, description.shift)):
        return f"the {site} site is an affine map that changes with the step (per-step population statistics)"
    return None  # identity, an affine map of every step, or (input) sequence statistics: an affine map too


def traced_with_mask(x: Tensor, mask: Tensor | None) -> bool:
    """Whether this call is being traced with padding: packing needs the lengths on the host."""
    # is_compiling first: Dynamo answers it while tracing, and refuses to trace into is_fake.
    return mask is not None and (torch.compiler.is_compiling() or is_fake(x))


def lstm_layer(spec: LayerSpec, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None) -> LayerResult:
    """Run one layer direction through ``torch._VF.lstm``; the arguments and result of
    :func:`rnorm.kernels.lstm_layer`, which calls it with ``spec`` checked against the tensors and,
    under ``torch.autocast``, autocast off (torch's LSTM would otherwise run in float16/bfloat16).

    Args:
        spec: a description :func:`ineligibility` accepts.
        x: ``(T, B, D)``.
        h0, c0: ``(B, H)`` each.
        mask: ``(T, B)`` boolean, ``True`` on real steps (padding at the end), or ``None``.

    Returns:
        ``output`` ``(T, B, H)`` (0 at padded steps), ``h_n``, ``c_n`` ``(B, H)`` at each sequence's
        last real step, and a ``sequence`` input site's statistics.

    Raises:
        ValueError: ``spec`` is not a plain LSTM after its weight transform (the reason), or the
            call is traced with a mask.
    """
    reason = ineligibility(spec)
    if reason is not None:
        raise ValueError(
            f"backend='cudnn': this layer is not a plain LSTM after its weight transform: {reason}. Use backend 'auto'."
        )
    if traced_with_mask(x, mask):
        raise ValueError(
            "backend='cudnn': padded sequences are packed with their lengths read on the host, which tracing "
            "(torch.compile, torch.export) cannot do. Trace without lengths, or use backend 'auto'."
        )
    statistics: dict[str, SiteStatistics] = {}
    inp = spec.input
    if inp.kind == "sequence":  # sequencewise statistics are one affine map of every step
        inp, statistics["input"] = sequence_to_affine(inp, spec.input_weight, x, mask)
    input_weight, input_shift = _fold(inp, spec.input_weight)
    recurrent_weight, recurrent_shift = _fold(spec.recurrent, spec.recurrent_weight)
    shifts = [s for s in (spec.bias, input_shift, recurrent_shift) if s is not None]
    params = [input_weight, recurrent_weight]
    if shifts:  # torch's LSTM adds two biases; ours is their sum, so the second is 0
        params += [sum(shifts[1:], shifts[0]), torch.zeros_like(shifts[0])]
    if x.device.type == "cuda":
        params = _one_buffer(params)
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, *params))
    output, h_n, c_n = _run(x, h0.contiguous(), c0.contiguous(), mask, params, train)
    return LayerResult(output, h_n, c_n, statistics)


def _fold(site: SiteSpec, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(W', s)`` with ``site(W u) = W' u + s``: an affine map ``a ⊙ y + s`` of every step scales the
    rows of ``W`` (``W' = diag(a) W``) and adds its shift; the identity leaves ``W`` alone."""
    if site.kind == "identity":
        return weight, None
    shift = None if site.shift is None else site.shift[0]
    return site.scale[0].unsqueeze(1) * weight, shift


def _one_buffer(params: list[Tensor]) -> list[Tensor]:
    """The weights as views of one contiguous buffer in their order (W_x, W_h, biases), the layout
    cuDNN keeps a one-layer LSTM's weights in (``torch.nn.LSTM.flatten_parameters`` makes it for a
    module), so that cuDNN can use them in place: where torch finds another layout it warns and
    copies them at every call."""
    flat = torch.cat([p.reshape(-1) for p in params])
    return [view.view_as(p) for view, p in zip(flat.split([p.numel() for p in params]), params)]


def _run(
    x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, params: list[Tensor], train: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._VF.lstm`` over ``x`` ``(T, B, D)``, packed when ``mask`` pads some sequence."""
    has_biases = len(params) == 4
    hx = (h0.unsqueeze(0), c0.unsqueeze(0))  # (1, B, H): one layer, one direction
    num_steps = x.shape[0]
    lengths = None if mask is None else mask.sum(0).cpu()  # (B,) on the host: the packing needs it
    if lengths is None or bool((lengths == num_steps).all()):
        output, h_n, c_n = torch._VF.lstm(x, hx, params, has_biases, 1, 0.0, train, False, False)
        return output, h_n[0], c_n[0]
    # A sequence of no real step (possible here, never from NormLSTM) is packed as one step, then
    # given back its initial state and zero outputs.
    packed = pack_padded_sequence(x, lengths.clamp(min=1), enforce_sorted=False)
    order = packed.sorted_indices
    hx = (hx[0].index_select(1, order), hx[1].index_select(1, order))
    data, h_n, c_n = torch._VF.lstm(packed.data, packed.batch_sizes, hx, params, has_biases, 1, 0.0, train, False)
    unsorted = PackedSequence(data, packed.batch_sizes, order, packed.unsorted_indices)
    output, _ = pad_packed_sequence(unsorted, total_length=num_steps)  # (T, B, H), 0 at padded steps
    h_n = h_n[0].index_select(0, packed.unsorted_indices)
    c_n = c_n[0].index_select(0, packed.unsorted_indices)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).to(x.device).unsqueeze(1)  # (B, 1)
        output = output * mask.unsqueeze(2)
        h_n, c_n = torch.where(empty, h0, h_n), torch.where(empty, c0, c_n)
    return output, h_n, c_n
