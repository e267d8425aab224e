"""Which implementation runs one layer direction, and the one log line that says so.

:func:`choose` picks between torch's own LSTM (``"cudnn"``, :mod:`rnorm.kernels.cudnn`) and the
op's implementations (:func:`rnorm.kernels.op.choose_backend`); :func:`log_path` reports the
choice on the ``rnorm.kernels`` logger at INFO, once per distinct path and reason. Enable it with
``logging.getLogger("rnorm.kernels").setLevel(logging.INFO)`` (and a handler, e.g.
``logging.basicConfig``). docs/performance.md tabulates the choices.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rnorm.kernels import cudnn
from rnorm.kernels.op import BACKENDS, choose_backend
from rnorm.kernels.spec import LayerSpec

__all__ = ["LAYER_BACKENDS", "Path", "choose", "log_path"]

#: What :func:`rnorm.kernels.lstm_layer`'s ``backend`` may ask for: the op's :data:`BACKENDS`, or
#: ``cudnn``, torch's own LSTM (a different computation of the same function, not an
#: implementation of the op; an error where the layer is not a plain LSTM after its weight transform).
LAYER_BACKENDS = (*BACKENDS, "cudnn")

#: On the CPU, torch's LSTM (oneDNN) is measured faster than the compiled kernels in float32 without
#: padding from this hidden size on at 2 threads (1.1-2.1x), and takes 0.79-1.05 of their time at
#: 1 thread; at pMNIST's H = 100 the kernels are as fast at 2 threads and 10-40 % faster at 1:
#: docs/performance.md, "Torch's LSTM against the compiled kernels on the CPU".
CPU_MIN_HIDDEN = 256

_LOG = logging.getLogger("rnorm.kernels")


@dataclass(frozen=True)
class Path:
    """What runs a layer direction: ``name`` (``"cudnn"`` or an op backend) and why, in words."""

    name: str
    reason: str


def choose(spec: LayerSpec, x: Tensor, mask: Tensor | None, backend: str) -> Path:
    """The path for ``spec`` on ``x`` ``(T, B, D)`` with ``mask`` ``(T, B)`` or ``None``.

    ``auto`` takes torch's LSTM where the layer is a plain LSTM after its weight transform and that
    is measured faster (docs/performance.md, "Which path runs where"): on CUDA (cuDNN); on the CPU
    in float32 without padding from :data:`CPU_MIN_HIDDEN` hidden units (oneDNN), and wherever the
    op would run its torch-ops loop (the compiled kernels not built, or a dtype they do not take).
    Never while tracing with padding (packing reads the lengths on the host). While tracing, the
    op's implementation is left to the op (it resolves it when it runs): the path is then
    ``Path("op", "traced")``, which nothing logs.

    Raises:
        ValueError: an unknown ``backend``.
        RuntimeError: ``backend="native"`` or ``"triton"`` where those kernels cannot run.
    """
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"Unknown fused recurrence backend {backend!r}. Available: {', '.join(LAYER_BACKENDS)}.")
    if backend == "cudnn":
        return Path("cudnn", "backend 'cudnn' was asked for")
    why_not = None
    if backend == "auto":
        faster, why = _torch_lstm(spec, x, mask)
        if faster:
            return Path("cudnn", f"a plain LSTM after its weight transform, {why}")
        why_not = why
    if torch.compiler.is_compiling():
        return Path("op", "traced")
    # warn=False: the op itself warns where the compiled kernels are missing, when it runs.
    name, reason = choose_backend(backend, x.device, x.dtype, spec.synchronized, batch_size=x.shape[1], warn=False)
    return Path(name, reason if why_not is None else f"{reason}; not torch's LSTM: {why_not}")


def _torch_lstm(spec: LayerSpec, x: Tensor, mask: Tensor | None) -> tuple[bool, str]:
    """Whether torch's LSTM is the faster way to run ``spec`` here, and why (or why not)."""
    reason = cudnn.ineligibility(spec)
    if reason is not None:
        return False, reason
    if cudnn.traced_with_mask(x, mask):
        return False, "traced with padding (packing reads the lengths on the host)"
    if x.device.type == "cuda":
        return True, "on CUDA (cuDNN)"
    if x.device.type != "cpu":
        return False, f"not measured on {x.device.type}"
    name, op_reason = choose_backend("auto", x.device, x.dtype, spec.synchronized, warn=False)
    if name == "torch":
        return True, f"on the CPU where {op_reason}"
    if x.dtype == torch.float32 and mask is None and spec.hidden_size >= CPU_MIN_HIDDEN:
        return True, f"float32 without padding at H >= {CPU_MIN_HIDDEN} (oneDNN)"
    where = f"float32 without padding at H >= {CPU_MIN_HIDDEN}"
    return False, f"the compiled CPU kernels are as fast or faster but in {where}"


def log_path(path: Path) -> None:
    """Log ``path`` once (INFO, ``rnorm.kernels``); nothing while tracing, where logging would break the graph."""
    if not torch.compiler.is_compiling():
        _log_once(path.name, path.reason)


# The one piece of state: which lines were logged, in functools' cache. It is bounded (reasons
# name kinds, dtypes and devices, never shapes or values: a few dozen lines at most), changes no
# computation, and _log_once.cache_clear() forgets it.
@functools.cache
def _log_once(name: str, reason: str) -> None:
    _LOG.info("rnorm: LSTM layer directions run %r: %s.", name, reason)
