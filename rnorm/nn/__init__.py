"""Normalized LSTM cells and layers, and padding utilities."""

from rnorm.functional.masking import lengths_to_mask, mask_to_lengths, reverse_padded
from rnorm.nn.cell import NormLSTMCell
from rnorm.nn.dispatch import RECURRENCES, fused_layer, reference_layer
from rnorm.nn.lstm import NormLSTM
from rnorm.nn.normalized_sum import NormalizedSum
from rnorm.nn.recurrence import lstm_step, reference_recurrence

__all__ = [
    "RECURRENCES",
    "NormLSTM",
    "NormLSTMCell",
    "NormalizedSum",
    "fused_layer",
    "lengths_to_mask",
    "lstm_step",
    "mask_to_lengths",
    "reference_layer",
    "reference_recurrence",
    "reverse_padded",
]
