"""The op's arguments are checked before any implementation touches a buffer (rnorm/kernels/validate.py).

``torch.ops.rnorm.lstm_recurrence`` and its backward are public: a caller may hand them tensors that
do not fit the call. Each implementation must then refuse with a ``ValueError`` naming the argument —
the Triton kernels read raw addresses from a table and would otherwise read and write out of bounds,
the torch-ops loop would fail deep inside torch — and, for the backward that overwrites saved
buffers, before writing any.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rnorm import kernels
from rnorm.kernels import native
from rnorm.kernels.prepare import prepare
from rnorm.kernels.schema import BackwardArgs, RecurrenceArgs, RecurrenceOutputs, from_flat, to_flat

H, D, T, B = 3, 2, 5, 4
G = 4 * H
MASK = torch.tensor([[True] * B] * 3 + [[True, True, False, True]] * 2)  # (T, B)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels are not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_available(), reason="triton is not installed")),
]


def _p(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _args(backend: str, masked: bool = True) -> RecurrenceArgs:
    """BN-LSTM-like call: batch statistics on the input and recurrent sites, layer statistics on the cell."""
    spec = kernels.LayerSpec(
        recurrent_weight=_p(G, H),
        recurrent=kernels.SiteSpec("batch", scale=_p(G), eps=1e-3),
        cell=kernels.SiteSpec("layer", scale=_p(H), shift=_p(H), eps=1e-3),
        input_weight=_p(G, D),
        input=kernels.SiteSpec("batch", scale=_p(G), eps=1e-3),
        bias=_p(G),
        hidden_scale=torch.full((H,), 0.7, dtype=torch.float64),
    )
    args, _ = prepare(spec, _p(T, B, D), _p(B, H), _p(B, H), MASK if masked else None, backend)
    return args


def _forward(args: RecurrenceArgs) -> RecurrenceOutputs:
    with torch.no_grad():
        return from_flat(RecurrenceOutputs, torch.ops.rnorm.lstm_recurrence(*to_flat(args)))


# (argument, a tensor of the wrong shape): each one the op must refuse, naming it.
BAD_FORWARD = [
    ("shift", lambda a: _p(T + 1, G)),
    ("recurrent_scale", lambda a: _p(G + 1)),
    ("cell_scale", lambda a: _p(1, H)),
    ("cell_shift", lambda a: _p(H - 1)),
    ("h0", lambda a: _p(B - 1, H)),
    ("c0", lambda a: _p(B, H + 1)),
    ("mask", lambda a: torch.ones(T - 1, B, dtype=torch.bool)),
    ("weights", lambda a: a.weights[:, :-1]),
    ("counts", lambda a: a.counts[:-1]),
    ("hidden_scale", lambda a: _p(H + 1)),
    ("input_weight", lambda a: _p(G, D + 1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "bad"), BAD_FORWARD, ids=[name for name, _ in BAD_FORWARD])
def test_the_forward_refuses_an_argument_that_does_not_fit_the_call(backend, name, bad):
    args = _args(backend)
    with pytest.raises(ValueError, match=rf"rnorm::lstm_recurrence: expected {name}\b"):
        _forward(dataclasses.replace(args, **{name: bad(args)}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_forward_refuses_a_weight_of_another_dtype_and_a_float_mask(backend):
    args = _args(backend)
    with pytest.raises(ValueError, match="expected recurrent_weight of source's dtype torch.float64, but got torch.float32"):
        _forward(dataclasses.replace(args, recurrent_weight=args.recurrent_weight.float()))
    with pytest.raises(ValueError, match="expected mask boolean"):
        _forward(dataclasses.replace(args, mask=args.mask.double()))
    with pytest.raises(ValueError, match="expected precision one of ieee, tf32, bf16, fp16, but got 'fp8'"):
        _forward(dataclasses.replace(args, precision="fp8"))


def _backward_args(args: RecurrenceArgs, outputs: RecurrenceOutputs) -> BackwardArgs:
    return BackwardArgs(
        grad_output=torch.ones_like(outputs.output),
        grad_h_n=torch.zeros_like(outputs.h_n),
        grad_c_n=torch.zeros_like(outputs.c_n),
        output=outputs.output,
        saved=outputs.saved,
        source=args.source,
        input_weight=args.input_weight,
        recurrent_weight=args.recurrent_weight,
        input_scale=args.input_scale,
        recurrent_scale=args.recurrent_scale,
        cell_scale=args.cell_scale,
        h0=args.h0,
        mask=args.mask,
        weights=args.weights,
        counts=args.counts,
        hidden_scale=args.hidden_scale,
        shift_shape=[] if args.shift is None else list(args.shift.shape),
        cell_shift_shape=[] if args.cell_shift is None else list(args.cell_shift.shape),
        input_kind=args.input_kind,
        recurrent_kind=args.recurrent_kind,
        cell_kind=args.cell_kind,
        synchronized=args.synchronized,
        backend=args.backend,
        precision=args.precision,
    )


@pytest.mark.parametrize("op_name", ["lstm_recurrence_backward", "lstm_recurrence_backward_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backward_refuses_an_undersized_saved_buffer_before_writing_any(backend, op_name):
    """One saved step instead of T for σ(gates), which every backward reads at every step and the
    in-place one overwrites: before the check, the Triton kernels would address T steps of it."""
    args = dataclasses.replace(_args(backend), save=True)
    outputs = _forward(args)
    backward = _backward_args(args, outputs)
    op = getattr(torch.ops.rnorm, op_name)
    assert len(op(*to_flat(backward))) > 0  # the buffers as the forward allocated them pass

    outputs = _forward(args)
    before = {name: tensor.clone() for name, tensor in vars(outputs.saved).items()}
    short = dataclasses.replace(outputs.saved, act=outputs.saved.act[:1].clone())
    with pytest.raises(ValueError, match=r"expected the saved buffer 'act' of shape \(5, 4, 12\), but got torch.float64 \(1, 4, 12\)"):
        op(*to_flat(dataclasses.replace(_backward_args(args, outputs), saved=short)))
    for name, tensor in vars(outputs.saved).items():
        assert torch.equal(tensor, before[name]), name  # nothing was written


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_backward_refuses_a_saved_buffer_the_kinds_do_not_have_and_a_strided_one(backend):
    args = dataclasses.replace(_args(backend, masked=False), save=True)
    outputs = _forward(args)
    backward = _backward_args(args, outputs)
    # Without padding the carried states are the outputs: a separate states_h belongs to another call.
    extra = dataclasses.replace(outputs.saved, states_h=_p(T + 1, B, H))
    with pytest.raises(ValueError, match="expected the saved buffer 'states_h' to be absent"):
        torch.ops.rnorm.lstm_recurrence_backward(*to_flat(dataclasses.replace(backward, saved=extra)))
    strided = dataclasses.replace(outputs.saved, tanh_cell=_p(T, H, B).transpose(1, 2))
    with pytest.raises(ValueError, match="expected the saved buffer 'tanh_cell' contiguous"):
        torch.ops.rnorm.lstm_recurrence_backward(*to_flat(dataclasses.replace(backward, saved=strided)))
    with pytest.raises(ValueError, match=r"expected grad_output of shape \(5, 4, 3\)"):
        torch.ops.rnorm.lstm_recurrence_backward(*to_flat(dataclasses.replace(backward, grad_output=_p(T, B, H + 1))))
