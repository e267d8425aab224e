"""rnorm: normalized recurrent networks (Recurrent Batch Normalization, Recurrent Norm-Prop)."""

from rnorm.nn import NormLSTM, NormLSTMCell

__version__ = "0.1.0"

__all__ = ["NormLSTM", "NormLSTMCell", "__version__"]
