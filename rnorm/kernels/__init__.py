"""The fused LSTM recurrence: one direction of one layer, as one PyTorch op with per-device implementations.

This package sits below :mod:`rnorm.nn` and never imports it: :mod:`rnorm.nn` describes a layer
direction with a :class:`LayerSpec` (its effective weights and each site's :class:`SiteSpec`, a step
kind of :data:`STEP_KINDS` with its tensors) and calls :func:`lstm_layer`.

>>> import torch
>>> from rnorm import kernels
>>> H, D = 3, 2
>>> spec = kernels.LayerSpec(
...     recurrent_weight=torch.randn(4 * H, H),
...     recurrent=kernels.SiteSpec("batch", scale=torch.full((4 * H,), 0.1), eps=1e-5),
...     cell=kernels.SiteSpec("identity"),
...     input_weight=torch.randn(4 * H, D),
...     input=kernels.SiteSpec("identity"),
... )
>>> result = kernels.lstm_layer(spec, torch.randn(5, 4, D), torch.zeros(4, H), torch.zeros(4, H))
>>> tuple(result.output.shape), tuple(result.statistics["recurrent"].mean.shape)
((5, 4, 3), (5, 12))
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnorm.kernels import cudnn, native
from rnorm.kernels.choice import LAYER_BACKENDS, Path, choose, log_path
from rnorm.kernels.kinds import STEP_KINDS, StepKind, get_kind
from rnorm.kernels.op import BACKENDS, lstm_recurrence, resolve_backend
from rnorm.kernels.precision import autocast_dtype, products_precision
from rnorm.kernels.prepare import prepare
from rnorm.kernels.schema import present
from rnorm.kernels.spec import LayerResult, LayerSpec, SiteSpec, SiteStatistics, mixed_synchronization

__all__ = [
    "BACKENDS",
    "LAYER_BACKENDS",
    "STEP_KINDS",
    "LayerResult",
    "LayerSpec",
    "Path",
    "SiteSpec",
    "SiteStatistics",
    "StepKind",
    "cudnn",
    "get_kind",
    "log_path",
    "lstm_layer",
    "mixed_synchronization",
    "native",
    "resolve_backend",
]


def lstm_layer(
    spec: LayerSpec, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None = None, *, backend: str = "auto"
) -> LayerResult:
    """Run one direction of one layer over all steps (BN eq. 6–8, NP eq. 15–17).

    Args:
        spec: the layer direction.
        x: ``(T, B, D)``; ``(T, B, 4H)`` input terms when ``spec.input`` is ``None``.
        h0, c0: ``(B, H)`` each.
        mask: ``(T, B)`` boolean, ``True`` on real steps (padding at the end of each sequence), or
            ``None``. Padded steps leave the state unchanged and output 0.
        backend: one of :data:`LAYER_BACKENDS`: ``auto`` (torch's LSTM where the layer is a plain
            LSTM after its weight transform and that is faster, else the op's best implementation),
            ``cudnn`` (torch's LSTM, :mod:`rnorm.kernels.cudnn`), or an op implementation
            (``native``, ``torch``, ``triton``). The choice is logged once
            (:func:`rnorm.kernels.choice.log_path`).

    Returns:
        ``output`` ``(T, B, H)``, ``h_n``, ``c_n`` ``(B, H)`` at each sequence's last real step, and the
        training statistics of each ``batch`` or ``sequence`` site (for population statistics).

    Under ``torch.autocast`` the op runs in the weights' dtype (``x``, ``h0``, ``c0`` cast to it, the
    preparation with autocast off) and its products' operands take the autocast dtype
    (:mod:`rnorm.kernels.precision`): float32 states, statistics and sums, a float32 output. Torch's
    LSTM runs wholly in the weights' dtype there (cuDNN's float32 products are TF32 where
    ``torch.backends.cudnn.allow_tf32``, the default).

    Raises:
        ValueError: a description or tensor that does not fit (what was expected, what was given),
            an unknown ``backend``, or ``cudnn`` where the layer is not a plain LSTM after its weight
            transform (the reason).
        RuntimeError: ``native`` or ``triton`` where those kernels cannot run (the reason).
    """
    precision = None
    if autocast_dtype(x.device.type) is not None:
        dtype = spec.recurrent_weight.dtype
        precision = products_precision(x.device, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _layer(spec, x.to(dtype), h0.to(dtype), c0.to(dtype), mask, backend, precision)
    return _layer(spec, x, h0, c0, mask, backend, precision)


def _layer(spec: LayerSpec, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, backend: str, precision: str | None) -> LayerResult:
    spec.check(x, h0, c0, mask)
    path = choose(spec, x, mask, backend)
    log_path(path)
    if path.name == "cudnn":
        return cudnn.lstm_layer(spec, x, h0, c0, mask)
    args, statistics = prepare(spec, x, h0, c0, mask, backend, precision)
    outputs = lstm_recurrence(args)
    for site in ("input", "recurrent", "cell"):
        mean = getattr(outputs.statistics, f"{site}_mean")
        if present(mean):
            var = getattr(outputs.statistics, f"{site}_var")
            statistics[site] = SiteStatistics(mean.squeeze(1), var.squeeze(1), args.counts)
    return LayerResult(outputs.output, outputs.h_n, outputs.c_n, statistics)
