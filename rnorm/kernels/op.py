"""The fused recurrence as PyTorch ops: ``rnorm::lstm_recurrence`` and its backward.

One op, seen by ``torch.compile`` and ``torch.export`` as one node (a fake implementation gives
them its results' shapes), with a registered autograd formula, and one implementation per device:

========  =====================================================================================
device    implementation
========  =====================================================================================
CPU       the compiled kernels (:mod:`rnorm.kernels.native`) for float32/float64 without
          synchronized statistics, else the torch-ops loop (:mod:`rnorm.kernels.torch_loop`);
          the Triton kernels in Triton's interpreter when forced (``backend="triton"``, tests)
CUDA      the Triton kernels (:mod:`rnorm.kernels.triton`) where they run (float32, Triton
          installed, no synchronized statistics), else the torch-ops loop
other     the torch-ops loop
========  =====================================================================================

The ``backend`` argument narrows the choice (:data:`BACKENDS`). The backward has two forms with the
same results: ``rnorm::lstm_recurrence_backward``, and ``rnorm::lstm_recurrence_backward_``, which
may overwrite the saved buffers it has read (the compiled kernels do: first-touching fresh
``(T, B, 4H)`` buffers costs about as much as the arithmetic on CPU). The autograd formula uses
the in-place form in eager mode where the compiled kernels run, and then refuses a second backward
through the same graph; under tracing, and elsewhere, the functional one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from rnorm.kernels import native, torch_loop
from rnorm.kernels import triton as triton_kernels
from rnorm.kernels.buffers import allocate_outputs
from rnorm.kernels.schema import (
    BackwardArgs,
    Gradients,
    RecurrenceArgs,
    RecurrenceOutputs,
    Saved,
    absent,
    from_flat,
    op_schema,
    present,
    to_flat,
)
from rnorm.kernels.validate import check_backward, check_forward

__all__ = ["BACKENDS", "choose_backend", "lstm_recurrence", "resolve_backend"]

#: What ``backend`` may ask for: ``auto`` (the best implementation for the device), ``native`` (the
#: compiled CPU kernels; an error where they cannot run), ``torch`` (the torch-ops loop anywhere) or
#: ``triton`` (the Triton kernels: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``; an error elsewhere).
BACKENDS = ("auto", "native", "torch", "triton")

FORWARD = "rnorm::lstm_recurrence"
BACKWARD = "rnorm::lstm_recurrence_backward"
BACKWARD_INPLACE = "rnorm::lstm_recurrence_backward_"

torch.library.define(FORWARD, op_schema(RecurrenceArgs, RecurrenceOutputs))
torch.library.define(BACKWARD, op_schema(BackwardArgs, Gradients))
torch.library.define(BACKWARD_INPLACE, op_schema(BackwardArgs, Gradients, mutating=True))


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, synchronized: bool) -> str:
    """The implementation that runs: ``"native"``, ``"triton"`` or ``"torch"`` (:func:`choose_backend`
    without its reason).

    Raises:
        ValueError: an unknown ``backend``.
        RuntimeError: ``backend="native"`` or ``"triton"`` where those kernels cannot run (says why).
    """
    return choose_backend(backend, device, dtype, synchronized)[0]


def choose_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    synchronized: bool,
    *,
    batch_size: int | None = None,
    warn: bool = True,
) -> tuple[str, str]:
    """The implementation that runs and why, in words for the log line (no shapes or values).

    ``auto`` on CUDA is the Triton kernels where they run. (Layers that are a plain LSTM after their
    weight transform can be sent to torch's LSTM before the op is reached: that dispatch is
    :func:`rnorm.kernels.choice.choose`, ahead of this one.)

    Args:
        backend, device, dtype, synchronized: what is asked for, and of which tensors.
        batch_size: ``B``, to check it against the Triton kernels' limits (``None``: not checked).
        warn: warn (once per location) where ``auto`` finds the compiled CPU kernels not built.

    Raises:
        ValueError: an unknown ``backend``.
        RuntimeError: ``backend="native"`` or ``"triton"`` where those kernels cannot run (says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown fused recurrence backend {backend!r}. Available: {', '.join(BACKENDS)}.")
    if backend == "torch":
        return "torch", "backend 'torch' was asked for"
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        reason = triton_kernels.unsupported(device, dtype, synchronized)
        if reason is None and batch_size is not None:
            reason = triton_kernels.unsupported_batch(batch_size)
        if reason is None:
            return "triton", "the Triton kernels"
        if backend == "triton":
            raise RuntimeError(f"backend='triton': the Triton kernels cannot run: {reason}. Use backend 'auto' or 'torch'.")
        return "torch", f"the Triton kernels cannot run: {reason}"
    reason = None
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        reason = f"they need float32 or float64 tensors on the CPU, not {dtype} on {device.type}"
    elif synchronized:
        reason = "batch statistics synchronized across processes run with torch operations"
    elif not native.available():
        reason = "they are not built (no C++ compiler at install time?)"
        if backend == "auto" and warn:
            warnings.warn(native.MISSING_MESSAGE, RuntimeWarning, stacklevel=4)
    if reason is None:
        return "native", "the compiled CPU kernels"
    if backend == "native":
        raise RuntimeError(f"backend='native': the compiled CPU kernels cannot run: {reason}. Use backend 'auto' or 'torch'.")
    return "torch", f"the compiled CPU kernels cannot run: {reason}"


def lstm_recurrence(args: RecurrenceArgs) -> RecurrenceOutputs:
    """Run ``rnorm::lstm_recurrence`` on ``args`` (with autograd where they need it)."""
    return from_flat(RecurrenceOutputs, torch.ops.rnorm.lstm_recurrence(*to_flat(args)))


# -- implementations ------------------------------------------------------------------------------


def _chosen(args: RecurrenceArgs | BackwardArgs) -> str:
    """:func:`resolve_backend` for the op's arguments, the batch size checked against the Triton kernels."""
    source = args.source
    return choose_backend(args.backend, source.device, source.dtype, args.synchronized, batch_size=source.shape[1])[0]


def _no_autocast(tensor: Tensor) -> torch.autocast:
    """Autocast off inside an implementation: its buffers are the op's dtype (the op's precision is
    ``args.precision``), also when a backward runs inside an autocast region."""
    return torch.autocast(tensor.device.type, enabled=False)


def _forward(args: RecurrenceArgs, device_backend: str) -> RecurrenceOutputs:
    if device_backend == "native":
        return native.forward(args)
    if device_backend == "triton":
        return triton_kernels.forward(args)
    return torch_loop.forward(args)


@contextlib.contextmanager
def _running(source: Tensor) -> Iterator[None]:
    """Around an implementation: no autograd, no autocast (the op's precision is ``args.precision``,
    also when a backward runs inside an autocast region) and, on the CPU, denormals flushed
    (docs/performance.md)."""
    flushed = native.denormals_flushed() if source.device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), _no_autocast(source), flushed:
        yield


def _torch_only(args: RecurrenceArgs | BackwardArgs) -> str:
    """The choice on devices without their own implementation: the torch-ops loop (the name checked)."""
    resolve_backend(args.backend, args.source.device, args.source.dtype, args.synchronized)
    return "torch"


def _forward_impl(choose: Callable[[RecurrenceArgs], str]) -> Callable[..., tuple[Tensor, ...]]:
    def forward(*flat: object) -> tuple[Tensor, ...]:
        args = from_flat(RecurrenceArgs, flat)
        check_forward(args)
        chosen = choose(args)
        with _running(args.source):
            return tuple(to_flat(_forward(args, chosen)))

    return forward


def _forward_fake(*flat: object) -> tuple[Tensor, ...]:
    outputs, _ = allocate_outputs(from_flat(RecurrenceArgs, flat))
    return tuple(to_flat(outputs))


torch.library.impl(FORWARD, "CompositeExplicitAutograd", _forward_impl(_torch_only))
torch.library.impl(FORWARD, ("cpu", "cuda"), _forward_impl(_chosen))
torch.library.register_fake(FORWARD, _forward_fake)


def _backward_with(args: BackwardArgs, chosen: str, reuse: bool) -> Gradients:
    if chosen == "native":
        return native.backward(args, reuse=reuse)
    if chosen == "triton":
        return triton_kernels.backward(args)  # writes no saved buffer: the in-place form is the functional one
    return torch_loop.backward(args)


def _backward_impl(choose: Callable[[BackwardArgs], str], reuse: bool) -> Callable[..., tuple[Tensor, ...]]:
    def backward(*flat: object) -> tuple[Tensor, ...]:
        args = from_flat(BackwardArgs, flat)
        check_backward(args)
        with _running(args.source):
            return tuple(to_flat(_backward_with(args, choose(args), reuse)))

    return backward


def _backward_fake(*flat: object) -> tuple[Tensor, ...]:
    args = from_flat(BackwardArgs, flat)

    def like(tensor: Tensor | None) -> Tensor:
        return absent(args.source) if tensor is None else tensor.new_empty(tensor.shape)

    def shaped(shape: list[int]) -> Tensor:
        return args.source.new_empty(shape) if shape else absent(args.source)

    return tuple(
        to_flat(
            Gradients(
                source=like(args.source),
                input_weight=like(args.input_weight),
                recurrent_weight=like(args.recurrent_weight),
                shift=shaped(args.shift_shape),
                input_scale=like(args.input_scale),
                recurrent_scale=like(args.recurrent_scale),
                cell_scale=like(args.cell_scale),
                cell_shift=shaped(args.cell_shift_shape),
                h0=like(args.h0),
                c0=like(args.h0),
            )
        )
    )


for _name, _reuse in ((BACKWARD, False), (BACKWARD_INPLACE, True)):
    torch.library.impl(_name, "CompositeExplicitAutograd", _backward_impl(_torch_only, _reuse))
    torch.library.impl(_name, ("cpu", "cuda"), _backward_impl(_chosen, _reuse))  # reuse: only the CPU kernels can
    torch.library.register_fake(_name, _backward_fake)


# -- autograd ---------------------------------------------------------------------------------------

#: The forward's inputs the backward reads, besides the saved buffers and the output.
_KEPT = ("source", "input_weight", "recurrent_weight", "input_scale", "recurrent_scale", "cell_scale", "h0", "mask", "weights", "counts", "hidden_scale")
#: The forward's inputs that have gradients, in the order of :class:`Gradients`.
_DIFFERENTIABLE = ("source", "input_weight", "recurrent_weight", "shift", "input_scale", "recurrent_scale", "cell_scale", "cell_shift", "h0", "c0")


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    args = from_flat(RecurrenceArgs, inputs)
    outputs = from_flat(RecurrenceOutputs, output)
    saved = to_flat(outputs.saved)
    ctx.mark_non_differentiable(*to_flat(outputs.statistics), *saved)
    # Without this, autograd hands the backward a zero-filled gradient for every result that got none:
    # the statistics and saved buffers too, hundreds of MB per call at the pMNIST shape (measured:
    # 130 ms of a 500 ms training step). The backward takes None for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(outputs.output, *saved, *(getattr(args, name) for name in _KEPT))
    ctx.config = {
        "shift_shape": [] if args.shift is None else list(args.shift.shape),
        "cell_shift_shape": [] if args.cell_shift is None else list(args.cell_shift.shape),
        "input_kind": args.input_kind,
        "recurrent_kind": args.recurrent_kind,
        "cell_kind": args.cell_kind,
        "synchronized": args.synchronized,
        "backend": args.backend,
        "precision": args.precision,
    }
    ctx.input_fields = [name for name in RecurrenceArgs.__dataclass_fields__]
    ctx.buffers_consumed = False


def _backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    if ctx.buffers_consumed:
        raise RuntimeError(
            "Backward through NormLSTM's fused recurrence a second time (retain_graph=True): its compiled "
            "CPU backward reuses the saved buffers. Build the model with impl='fused_torch' or "
            "impl='reference' to backpropagate through one graph more than once."
        )
    tensors = ctx.saved_tensors
    output = tensors[0]
    saved_flat = tensors[1 : 1 + len(_SAVED_FIELDS)]
    kept = dict(zip(_KEPT, tensors[1 + len(_SAVED_FIELDS) :]))
    grad_output, grad_h_n, grad_c_n = grads[0], grads[1], grads[2]
    h0 = kept["h0"]
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output.contiguous()
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.contiguous()
    grad_c_n = torch.zeros_like(h0) if grad_c_n is None else grad_c_n.contiguous()
    args = BackwardArgs(
        grad_output=grad_output,
        grad_h_n=grad_h_n,
        grad_c_n=grad_c_n,
        output=output,
        saved=from_flat(Saved, saved_flat),
        **kept,
        **ctx.config,
    )
    source = kept["source"]
    inplace = (
        not _is_traced(source)
        and resolve_backend(args.backend, source.device, source.dtype, args.synchronized) == "native"
    )
    op = torch.ops.rnorm.lstm_recurrence_backward_ if inplace else torch.ops.rnorm.lstm_recurrence_backward
    ctx.buffers_consumed = inplace
    gradients = from_flat(Gradients, op(*to_flat(args)))
    by_name = {name: getattr(gradients, name) for name in _DIFFERENTIABLE}
    needs = dict(zip(ctx.input_fields, ctx.needs_input_grad))
    return tuple(
        by_name[name] if name in by_name and needs[name] and present(by_name[name]) else None for name in ctx.input_fields
    )


_SAVED_FIELDS = tuple(Saved.__dataclass_fields__)


def _is_traced(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a tracing stand-in (``torch.compile``, ``torch.export``) rather than data."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor) or torch.compiler.is_compiling()


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
