"""The precision of the recurrence's matrix products, and how the op receives inputs under autocast.

``RecurrenceArgs.precision`` names the operand precision of the products inside the time loop:

* ``"ieee"``: the tensors' own dtype;
* ``"tf32"``: float32 tensors on CUDA with ``torch.backends.cuda.matmul.allow_tf32`` set (torch's
  default is off; cuDNN's LSTM instead follows ``torch.backends.cudnn.allow_tf32``, on by default);
* ``"bf16"`` / ``"fp16"``: under ``torch.autocast`` of that dtype.

Under autocast the op still receives and returns float32 tensors (:func:`rnorm.kernels.lstm_layer`
casts half-precision inputs up and runs the preparation with autocast off): states, statistics and
every accumulation are float32, and only the products' operands (``h_{t-1}``, ``W_h``, ``x_t``,
``W_x``, and in the backward ``∂L/∂u^h_t``) are rounded to the autocast dtype. The Triton
implementation honours it; the torch-ops loop and the compiled CPU kernels compute their products
in the tensors' dtype (torch.mm follows torch's own TF32 setting).
"""

from __future__ import annotations

import torch

__all__ = ["HALF_DTYPES", "PRECISIONS", "autocast_dtype", "products_precision"]

#: The half precisions by name.
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("ieee", "tf32", *HALF_DTYPES)

_NAMES = {dtype: name for name, dtype in HALF_DTYPES.items()}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of an enabled ``torch.autocast`` for ``device_type``, else ``None``."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def products_precision(device: torch.device, dtype: torch.dtype) -> str:
    """The products' precision (one of :data:`PRECISIONS`) for float tensors of ``dtype`` on ``device``, now."""
    half = autocast_dtype(device.type)
    if dtype == torch.float32 and half in _NAMES:
        return _NAMES[half]
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
