"""Mask-aware moments and the normalizing transforms the strategies are built from."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_moments(x: Tensor, mask: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, counting only entries where ``mask`` holds.

    Args:
        x: any shape, e.g. ``(T, B, F)`` or ``(B, F)``.
        mask: boolean, shaped like ``x`` without its last dimension (``(T, B)`` or ``(B,)``), or
            ``None`` when every entry counts.
        dims: the dimensions reduced over (never the last, feature, dimension).

    Returns:
        ``(mean, var, count)``: ``mean`` and ``var`` shaped like ``x`` with ``dims`` removed;
        ``count`` the number of entries each statistic was taken over, shaped like ``mean``
        without its feature dimension. Where ``count`` is 0, ``mean`` is 0 and ``var`` is 0.
    """
    if mask is None:
        mean = x.mean(dim=dims)
        # A manual mean of squares: Tensor.var is several times slower on CPU (see issue 4).
        var = (x - _unsqueeze(mean, dims, x.dim())).square().mean(dim=dims)
        count = torch.full(mean.shape[:-1], _numel(x, dims), dtype=x.dtype, device=x.device)
        return mean, var, count
    weights = mask.to(x.dtype).unsqueeze(-1)
    count = weights.sum(dim=dims)
    denominator = count.clamp(min=1.0)
    mean = (x * weights).sum(dim=dims) / denominator
    centered = (x - _unsqueeze(mean, dims, x.dim())) * weights
    var = centered.square().sum(dim=dims) / denominator
    return mean, var, count.squeeze(-1)


def normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps)``, ``mean`` and ``var`` broadcast against ``x`` (BN eq. 5)."""
    return (x - mean) * torch.rsqrt(var + eps)


def affine(x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    """``gamma * x + beta``, each optional, broadcast over the last dimension."""
    if gamma is not None:
        x = x * gamma
    if beta is not None:
        x = x + beta
    return x


def layer_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the last (feature) dimension, kept for broadcasting."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    return mean, var


def row_normalize(weight: Tensor, eps: float = 0.0) -> Tensor:
    """Each row of ``weight`` ``(out, in)`` divided by its L2 norm (NP eq. 5 and 15)."""
    return weight * torch.rsqrt(weight.square().sum(dim=1, keepdim=True) + eps)


def _unsqueeze(stat: Tensor, dims: tuple[int, ...], ndim: int) -> Tensor:
    for d in sorted(d % ndim for d in dims):
        stat = stat.unsqueeze(d)
    return stat


def _numel(x: Tensor, dims: tuple[int, ...]) -> float:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return float(n)
