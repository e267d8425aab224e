"""The math of the strategies, as plain functions on tensors."""

from rnorm.functional.normalization import affine, layer_moments, masked_moments, normalize, row_normalize
from rnorm.functional.normprop import gaussian_expectation, normprop_variances

__all__ = ["affine", "gaussian_expectation", "layer_moments", "masked_moments", "normalize", "normprop_variances", "row_normalize"]
