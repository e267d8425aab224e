"""The fused recurrence in Triton kernels: the op's implementation on CUDA (``backend="triton"``).

One time step per launch, forward and backward, filling exactly the buffers of
:mod:`rnorm.kernels.schema`; the whole T-step loop captured in a CUDA graph and replayed
(:mod:`~rnorm.kernels.triton.graphs`). On CPU tensors the same kernels run under Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before their first use: that is how the tests check them.

What they run (anything else falls back to the torch-ops loop, or is an error where forced):

* every step kind on every site (identity, affine per step or shared, batch statistics with padding,
  layer, RMS), given input terms, Norm-Prop's scale on ``h_t``, padding;
* float32 tensors on CUDA, with products in float32, TF32 (``torch.backends.cuda.matmul.allow_tf32``)
  or, under ``torch.autocast``, bf16/fp16 operands with float32 accumulation
  (:mod:`rnorm.kernels.precision`); float32 and float64 under the interpreter;
* batch statistics of this process only (synchronized DDP statistics run the torch-ops loop);
* batches of up to :data:`~rnorm.kernels.triton.plan.MAX_BATCH` samples.

This module imports neither ``triton`` nor :mod:`rnorm.nn`: the kernels load on first use, so the
rest of rnorm works without Triton installed.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from rnorm.kernels.schema import BackwardArgs, Gradients, RecurrenceArgs, RecurrenceOutputs

__all__ = ["available", "backward", "forward", "interpreting", "unsupported"]


def available() -> bool:
    """Whether ``triton`` is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set: the kernels then run on CPU tensors, in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # any failure to import means the kernels cannot run
        return f"importing triton failed ({type(error).__name__}: {error})"
    return None


def unsupported(device: torch.device, dtype: torch.dtype, synchronized: bool) -> str | None:
    """Why the Triton kernels cannot run tensors of ``dtype`` on ``device``, or ``None`` if they can."""
    if synchronized:
        return "batch statistics synchronized across processes run with torch operations"
    if not available():
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if not interpreting():
            return "on CPU tensors they run only in Triton's interpreter (set TRITON_INTERPRET=1 before their first use)"
        if dtype not in (torch.float32, torch.float64):
            return f"the interpreter runs them on float32 and float64 tensors, not {dtype}"
    elif device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set: the interpreter runs them on CPU tensors only"
        if dtype != torch.float32:
            return f"on CUDA they run float32 tensors (bf16/fp16 products under torch.autocast), not {dtype}"
    else:
        return f"they run on CUDA (or on the CPU in the interpreter), not on {device.type}"
    return _import_error()


def unsupported_batch(batch: int) -> str | None:
    """Why the kernels cannot run a batch of ``batch`` samples, or ``None``."""
    from rnorm.kernels.triton.plan import unsupported_shape

    return unsupported_shape(batch)


def forward(args: RecurrenceArgs) -> RecurrenceOutputs:
    """``rnorm::lstm_recurrence`` in the Triton kernels (:func:`rnorm.kernels.triton.loops.forward`)."""
    from rnorm.kernels.triton import loops

    return loops.forward(args)


def backward(args: BackwardArgs) -> Gradients:
    """``rnorm::lstm_recurrence_backward`` in the Triton kernels (:func:`rnorm.kernels.triton.loops.backward`)."""
    from rnorm.kernels.triton import loops

    return loops.backward(args)
