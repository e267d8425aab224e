"""Checks of the op's arguments before any implementation reads or writes a buffer.

``rnorm::lstm_recurrence`` and its backward are public ops: besides :func:`rnorm.kernels.lstm_layer`
(whose :class:`~rnorm.kernels.LayerSpec` is checked first), anyone can call
``torch.ops.rnorm.lstm_recurrence`` with tensors of their own. The compiled CPU kernels check the
buffers they receive at their boundary; the Triton kernels read raw addresses from a table and the
torch-ops loop would fail deep inside torch. So every real implementation starts here: each tensor's
shape against the sizes of the call (``T``, ``B``, ``H``, ``G = 4H``, from ``source`` and
``recurrent_weight``) and the sites' kinds, its device against ``source``'s, and the saved buffers'
layout against :func:`~rnorm.kernels.buffers.saved_layout`, the same function that allocates them.
A wrong one raises ``ValueError`` naming the argument, what was expected and what came.

Only shapes, dtypes and devices are read (no values): nothing here synchronizes a GPU, and the fake
implementation that tracing runs needs none of it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from rnorm.kernels.buffers import Dims, kinds_of, saved_layout
from rnorm.kernels.kinds import get_kind
from rnorm.kernels.precision import PRECISIONS
from rnorm.kernels.schema import BackwardArgs, RecurrenceArgs, present

__all__ = ["check_backward", "check_forward"]

Shape = tuple[int, ...]


def _fail(op: str, name: str, expected: str, tensor: Tensor | None) -> ValueError:
    got = "None" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
    return ValueError(f"{op}: expected {name} {expected}, but got {got}.")


def _shape(op: str, name: str, tensor: Tensor | None, shapes: Iterable[Shape], *, optional: bool = False) -> None:
    """``tensor`` has one of ``shapes`` (or is ``None``/absent where ``optional``)."""
    shapes = list(dict.fromkeys(shapes))
    if not present(tensor):
        if optional:
            return
        raise _fail(op, name, "of shape " + " or ".join(map(str, shapes)), tensor)
    assert tensor is not None
    if tuple(tensor.shape) not in shapes:
        raise _fail(op, name, "of shape " + " or ".join(map(str, shapes)), tensor)


def _kinds(op: str, args: RecurrenceArgs | BackwardArgs) -> dict[str, str]:
    kinds = kinds_of(args)
    for site, kind in kinds.items():
        if site == "input" and kind == "given":
            continue
        try:
            step_kind = get_kind(kind)
        except ValueError as error:
            raise ValueError(f"{op}: the {site} site: {error}") from None
        if site not in step_kind.sites:
            raise ValueError(f"{op}: the {site} site cannot be of kind {kind!r}.")
    return kinds


def _site_parameter(op: str, name: str, kind: str, tensor: Tensor | None, steps: int, features: int, *, optional: bool = False) -> None:
    """A site's scale or shift: none for identity (and given input terms), ``(1 or T, F)`` affine,
    ``(F,)`` (γ, β) normalizing."""
    if kind in ("given", "identity"):
        if present(tensor):
            raise _fail(op, name, f"to be absent for kind {kind!r}", tensor)
        return
    shapes = [(1, features), (steps, features)] if get_kind(kind).name == "affine" else [(features,)]
    _shape(op, name, tensor, shapes, optional=optional)


def _like_source(op: str, source: Tensor, named: Iterable[tuple[str, Tensor | None]], *, dtype: bool = True) -> None:
    """Each tensor on ``source``'s device and, where ``dtype``, of its dtype."""
    for name, tensor in named:
        if tensor is None:
            continue
        if dtype and tensor.dtype != source.dtype:
            raise _fail(op, name, f"of source's dtype {source.dtype}", tensor)
        if tensor.device != source.device:
            raise _fail(op, name, f"on source's device {source.device}", tensor)


def _common(op: str, args: RecurrenceArgs | BackwardArgs) -> tuple[Dims, dict[str, str]]:
    """What the forward and backward share: the sizes, kinds, weights, scales, states, mask, weights."""
    source, weight = args.source, args.recurrent_weight
    if source.dim() != 3:
        raise _fail(op, "source", "of shape (T, B, D) or (T, B, 4H)", source)
    if weight.dim() != 2 or weight.shape[0] != 4 * weight.shape[1] or weight.shape[1] == 0:
        raise _fail(op, "recurrent_weight", "of shape (4H, H)", weight)
    steps, batch, hidden = source.shape[0], source.shape[1], weight.shape[1]
    gates = 4 * hidden
    dims = Dims(steps, batch, hidden, steps)
    kinds = _kinds(op, args)
    if kinds["input"] == "given":
        _shape(op, "source (the given input terms)", source, [(steps, batch, gates)])
        if args.input_weight is not None:
            raise _fail(op, "input_weight", "None when the input terms are given", args.input_weight)
    else:
        _shape(op, "input_weight", args.input_weight, [(gates, source.shape[2])])
    for site, scale, features in (("input", args.input_scale, gates), ("recurrent", args.recurrent_scale, gates), ("cell", args.cell_scale, hidden)):
        _site_parameter(op, f"{site}_scale (the {site} site's scale)", kinds[site], scale, steps, features)
    _shape(op, "h0", args.h0, [(batch, hidden)])
    if args.mask is not None:
        _shape(op, "mask", args.mask, [(steps, batch)])
        if args.mask.dtype != torch.bool:
            raise _fail(op, "mask", "boolean", args.mask)
    _shape(op, "weights", args.weights, [(1, batch), (steps, batch)])
    _shape(op, "counts", args.counts, [(steps,)])
    _shape(op, "hidden_scale", args.hidden_scale, [(1,), (hidden,)], optional=True)
    floating = [("input_weight", args.input_weight), ("recurrent_weight", weight), ("input_scale", args.input_scale)]
    floating += [("recurrent_scale", args.recurrent_scale), ("cell_scale", args.cell_scale), ("h0", args.h0)]
    _like_source(op, source, floating)
    other = [("mask", args.mask), ("weights", args.weights), ("counts", args.counts), ("hidden_scale", args.hidden_scale)]
    _like_source(op, source, other, dtype=False)
    return dims, kinds


def check_forward(args: RecurrenceArgs) -> None:
    """``ValueError`` naming the first argument of ``rnorm::lstm_recurrence`` that does not fit the call."""
    op = "rnorm::lstm_recurrence"
    dims, kinds = _common(op, args)
    steps, hidden = dims.steps, dims.hidden
    _shape(op, "shift", args.shift, [(1, dims.gates), (steps, dims.gates)], optional=True)
    _shape(op, "c0", args.c0, [(dims.batch, hidden)])
    _site_parameter(op, "cell_shift", kinds["cell"], args.cell_shift, steps, hidden, optional=True)
    _like_source(op, args.source, [("shift", args.shift), ("c0", args.c0), ("cell_shift", args.cell_shift)])
    if args.precision not in PRECISIONS:
        raise ValueError(f"{op}: expected precision one of {', '.join(PRECISIONS)}, but got {args.precision!r}.")
    if len(args.eps) != 3:
        raise ValueError(f"{op}: expected eps of the input, recurrent and cell sites (3 values), but got {args.eps}.")


def check_backward(args: BackwardArgs) -> None:
    """``ValueError`` naming the first argument of ``rnorm::lstm_recurrence_backward`` (or its in-place
    twin) that does not fit the call; the saved buffers, which the in-place form writes into, are
    checked against the layout the forward allocated (shape, dtype, device, contiguity)."""
    op = "rnorm::lstm_recurrence_backward"
    dims, kinds = _common(op, args)
    shape = (dims.steps, dims.batch, dims.hidden)
    _shape(op, "grad_output", args.grad_output, [shape])
    _shape(op, "grad_h_n", args.grad_h_n, [shape[1:]])
    _shape(op, "grad_c_n", args.grad_c_n, [shape[1:]])
    _shape(op, "output", args.output, [shape])
    layout = saved_layout(dims, kinds, args.mask is not None)
    for name, expected in layout.items():
        tensor = getattr(args.saved, name)
        label = f"the saved buffer {name!r}"
        if expected is None:
            if present(tensor):
                raise _fail(op, label, "to be absent for these kinds and this padding", tensor)
            continue
        _shape(op, label, tensor, [expected])
        _like_source(op, args.source, [(label, tensor)])
        if not tensor.is_contiguous():
            raise _fail(op, label, "contiguous", tensor)
    _like_source(op, args.source, [("grad_output", args.grad_output), ("grad_h_n", args.grad_h_n), ("grad_c_n", args.grad_c_n), ("output", args.output)])

