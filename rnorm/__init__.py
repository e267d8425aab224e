"""rnorm: normalized recurrent networks (Recurrent Batch Normalization, Recurrent Norm-Prop).

``NormLSTM`` and ``NormLSTMCell`` are imported on first use, so that ``import rnorm.metrics`` or the
command line's help do not load the recurrence and its compiled kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

#: The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = ["NormLSTM", "NormLSTMCell", "__version__"]

if TYPE_CHECKING:
    from rnorm.nn import NormLSTM, NormLSTMCell


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), so that `rnorm --help`, `rnorm --version` and `rnorm configs`
    # start without importing torch.
    if name in ("NormLSTM", "NormLSTMCell"):
        from rnorm import nn

        return getattr(nn, name)
    raise AttributeError(f"module 'rnorm' has no attribute {name!r}")
