"""What the Triton kernels of one call specialize on: block sizes, modes and flags, from the op's arguments.

A :class:`ForwardPlan` or :class:`BackwardPlan` is frozen and hashable: it is the key under which
:mod:`rnorm.kernels.triton.graphs` keeps a loop's workspace and captured CUDA graph, and the kernels
compile once per plan (their ``constexpr`` arguments come from it). Nothing here imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnorm.kernels.kinds import get_kind
from rnorm.kernels.precision import HALF_DTYPES
from rnorm.kernels.schema import BackwardArgs, RecurrenceArgs

__all__ = ["INLINE_MAX_HIDDEN", "MAX_BATCH", "ROUND_CODES", "BackwardPlan", "ForwardPlan", "columns_per_program", "site_code", "unsupported_shape"]

#: The step kernels compute the recurrent product themselves (``tl.dot``, each program its block of
#: units) up to this many hidden units; above it, or for a batch over 128, torch.mm (cuBLAS) computes
#: it and the kernel is its epilogue. Our choice, to be tuned on a GPU (docs/performance.md).
INLINE_MAX_HIDDEN = 256
#: A step's whole batch sits in one program (per-column batch statistics in registers).
MAX_BATCH = 2048
#: Elements of one ``(BB, columns)`` tile of a whole-batch program when it does not compute a product.
_TILE = 2048

#: The kernels' ``ROUND`` code of each half precision (0: no rounding).
ROUND_CODES = {"bf16": 1, "fp16": 2}


def pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``>= 1``)."""
    return 1 << max(0, (n - 1).bit_length())


def site_code(kind: str) -> int:
    """A site's code in the kernels: 0 identity (and given input), 1 affine, 2 batch, 3 row statistics."""
    if kind == "given":
        return 0
    step_kind = get_kind(kind)
    if step_kind.name in ("identity", "affine"):
        return 0 if step_kind.name == "identity" else 1
    return 2 if step_kind.statistics == "batch" else 3


def columns_per_program(block_batch: int, features: int) -> int:
    """Columns (hidden units or features) one whole-batch program owns, ``block_batch`` rows each."""
    return max(1, min(64, pow2(features), _TILE // block_batch))


def unsupported_shape(batch: int) -> str | None:
    """Why the kernels cannot run a batch of ``batch`` samples, or ``None``."""
    if batch > MAX_BATCH:
        return f"they hold a step's whole batch in one program, at most {MAX_BATCH} samples (got {batch})"
    return None


def _per_step(tensor: torch.Tensor | None) -> bool:
    """Whether a ``(S, F)`` scale or shift has a row per step (else one row, or γ/β ``(F,)``, for every step)."""
    return tensor is not None and tensor.dim() == 2 and tensor.shape[0] > 1


@dataclass(frozen=True)
class _Common:
    """What both loops share: sizes, dtypes, precision, block sizes, the sites."""

    steps: int
    batch: int
    hidden: int
    dtype: torch.dtype  #: the tensors', statistics' and accumulators' dtype
    operand_dtype: torch.dtype  #: the recurrent product's operands (bf16/fp16 on a GPU under autocast)
    round: int  #: 0 none, 1 bf16, 2 fp16: how the kernels round the product's operands
    dot_precision: str  #: ``tl.dot``'s ``input_precision``: ``"ieee"`` or ``"tf32"``
    interpret: bool  #: the kernels run under ``TRITON_INTERPRET=1``
    inline: bool  #: the step kernel computes the recurrent product (``tl.dot``), else torch.mm does
    block_batch: int  #: ``BB``
    block_hidden: int  #: ``BH``
    block_k: int  #: ``BK``, the product's reduction chunk
    num_warps: int
    masked: bool
    weights_per_step: bool
    hidden_scale: int  #: 0 none, 1 one value, 2 one per unit
    input_code: int  #: its :func:`site_code`
    input_center: bool  #: its row statistics subtract the mean (layer, not RMS)
    rec: int  #: the recurrent site's :func:`site_code`
    rec_scale_per_step: bool
    rec_center: bool
    cell: int
    cell_scale_per_step: bool
    cell_center: bool

    @property
    def grid(self) -> tuple[int]:
        return ((self.hidden + self.block_hidden - 1) // self.block_hidden,)


def _center(kind: str) -> bool:
    return kind == "given" or get_kind(kind).center


def _common(args: RecurrenceArgs | BackwardArgs, dtype: torch.dtype, steps: int, batch: int, hidden: int, *, inline_allowed: bool, interpret: bool) -> dict:
    """The fields of :class:`_Common` for ``args``, in ``dtype``, with ``steps`` × ``batch`` × ``hidden``."""
    half = HALF_DTYPES.get(args.precision)
    block_batch = max(16, pow2(batch))
    inline = inline_allowed and hidden <= INLINE_MAX_HIDDEN and block_batch <= 128
    block_hidden = 16 if inline else columns_per_program(block_batch, hidden)
    hidden_scale = args.hidden_scale
    return dict(
        steps=steps,
        batch=batch,
        hidden=hidden,
        dtype=dtype,
        operand_dtype=dtype if half is None else (torch.float32 if interpret else half),
        round=ROUND_CODES.get(args.precision, 0),
        dot_precision="tf32" if args.precision == "tf32" else "ieee",
        interpret=interpret,
        inline=inline,
        block_batch=block_batch,
        block_hidden=block_hidden,
        block_k=32,
        num_warps=4 if block_batch * block_hidden <= 1024 else 8,
        masked=args.mask is not None,
        weights_per_step=args.weights.shape[0] > 1,
        hidden_scale=0 if hidden_scale is None else (1 if hidden_scale.numel() == 1 else 2),
        input_code=site_code(args.input_kind),
        input_center=_center(args.input_kind),
        rec=site_code(args.recurrent_kind),
        rec_scale_per_step=_per_step(args.recurrent_scale),
        rec_center=_center(args.recurrent_kind),
        cell=site_code(args.cell_kind),
        cell_scale_per_step=_per_step(args.cell_scale),
        cell_center=_center(args.cell_kind),
    )


@dataclass(frozen=True)
class ForwardPlan(_Common):
    """The forward loop of one call (see :func:`rnorm.kernels.triton.kernels.forward_step`)."""

    save: bool = False
    eps: tuple[float, float, float] = (0.0, 0.0, 0.0)  #: ε of the input, recurrent and cell sites
    input_mode: int = 0  #: 0 complete terms before the loop, 1 the site's ``v_t`` times its scale plus the shift
    input_scale_per_step: bool = False
    has_shift: bool = False
    shift_per_step: bool = False
    has_cell_shift: bool = False
    cell_shift_per_step: bool = False

    @classmethod
    def of(cls, args: RecurrenceArgs, *, interpret: bool) -> ForwardPlan:
        steps, batch = args.source.shape[0], args.source.shape[1]
        input_mode = 0 if site_code(args.input_kind) == 0 else 1
        common = _common(
            args,
            args.source.dtype,
            steps,
            batch,
            args.recurrent_weight.shape[1],
            # row statistics of the recurrent term need the whole product before the step kernel
            inline_allowed=site_code(args.recurrent_kind) != 3,
            interpret=interpret,
        )
        return cls(
            **common,
            save=args.save,
            eps=tuple(float(e) for e in args.eps),
            input_mode=input_mode,
            input_scale_per_step=_per_step(args.input_scale),
            has_shift=args.shift is not None and input_mode == 1,
            shift_per_step=_per_step(args.shift),
            has_cell_shift=args.cell_shift is not None,
            cell_shift_per_step=_per_step(args.cell_shift),
        )


@dataclass(frozen=True)
class BackwardPlan(_Common):
    """The backward loop of one call (see :func:`rnorm.kernels.triton.kernels.backward_step`)."""

    @classmethod
    def of(cls, args: BackwardArgs, *, interpret: bool) -> BackwardPlan:
        steps, batch, gates = args.saved.act.shape
        return cls(**_common(args, args.saved.act.dtype, steps, batch, gates // 4, inline_allowed=True, interpret=interpret))
