"""The matrix products the Triton loops leave to torch (cuBLAS on a GPU): the input terms of every step
before the loop, and the recurrent product of a step where the kernels do not compute it themselves.

Operands come in the products' precision (:mod:`rnorm.kernels.precision`): the tensors' dtype, or
bf16/fp16 with float32 accumulation and a float32 result (torch.mm's ``out_dtype`` on CUDA; on the CPU,
under the interpreter, float32 products of values already rounded to that precision, which are exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnorm.kernels.precision import HALF_DTYPES
from rnorm.kernels.triton.plan import ROUND_CODES

__all__ = ["HALF", "matmul", "to_operand"]

#: The kernels' rounding codes (``plan.round``) and the dtypes they round to.
HALF = {ROUND_CODES[name]: dtype for name, dtype in HALF_DTYPES.items()}

_out_dtype_works: dict[str, bool] = {}  # per device type: whether torch.mm(..., out_dtype=) runs here


def to_operand(tensor: Tensor, round_code: int, operand_dtype: torch.dtype) -> Tensor:
    """``tensor`` as a product operand: rounded to nearest even in bf16/fp16 (``round_code`` 1/2), held in ``operand_dtype``."""
    half = HALF.get(round_code)
    return tensor.to(operand_dtype) if half is None else tensor.to(half).to(operand_dtype)


def _half_product(a: Tensor, b: Tensor, out: Tensor, add: Tensor | None) -> bool:
    """``out = (add +) a @ b`` with half-precision operands and ``out``'s dtype for the result, where torch can; ``False`` if not."""
    device = a.device.type
    if _out_dtype_works.get(device, True):
        try:
            if add is None:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            else:
                torch.addmm(add, a, b, out_dtype=out.dtype, out=out)
            _out_dtype_works[device] = True
            return True
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_works[device] = False
    return False


def matmul(a: Tensor, b: Tensor, out: Tensor, add: Tensor | None = None) -> Tensor:
    """``out = (add +) a @ b``: float32 (or the tensors' dtype) accumulation and result.

    ``a``, ``b`` in the operand dtype; half-precision operands use torch.mm's ``out_dtype`` where
    it runs, else are widened first (the products of values of that precision are exact in float32).
    """
    if a.dtype in HALF.values():
        if _half_product(a, b, out, add):
            return out
        a, b = a.to(out.dtype), b.to(out.dtype)
    return torch.mm(a, b, out=out) if add is None else torch.addmm(add, a, b, out=out)
