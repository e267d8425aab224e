"""Mask-aware moments over the batches of every process: batch statistics under data parallelism.

With ``DistributedDataParallel`` each process sees only its share of the batch. ``bn`` and ``seqbn``
would then normalize with the statistics of that share; :func:`synced_masked_moments` computes them
over the global batch instead, as ``torch.nn.SyncBatchNorm`` does for feed-forward networks, but per
statistic slot (per step for ``bn``) and counting only unpadded entries.

Two all-reduces, rather than one of ``(Σ x, Σ x², n)``, whose variance ``Σ x²/n - μ²`` cancels
catastrophically when the mean is large against the spread:

1. ``(Σ x, n)`` over the masked entries of every process gives the global mean ``μ``;
2. ``Σ (x - μ)²`` over the same entries gives the global biased variance.

Both are differentiable: the backward of a summing all-reduce is a summing all-reduce of the
gradients, so every process receives the gradient that its own entries would have received had the
concatenated batch been normalized in one process (provided every process runs backward, as under
DDP). Every process must call :func:`synced_masked_moments` the same number of times, with ``x``
alike in every dimension not reduced over (the same number of steps for ``bn``): a process whose
share has no unpadded entry at some step still takes part, with count 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rnorm.functional.normalization import _numel, _unsqueeze, masked_moments


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of processes in ``group`` (the default group if ``None``); 1 when not distributed.

    Cheap: when ``torch.distributed`` is unavailable or not initialized it touches no process group.

    >>> world_size()  # no process group here
    1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def synced_masked_moments(
    x: Tensor, mask: Tensor | None, dims: tuple[int, ...], group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~rnorm.functional.normalization.masked_moments` over the ``x`` of every process in ``group``.

    Args:
        x: this process's share, e.g. ``(T, B_r, F)`` or ``(B_r, F)``; every dimension not in
            ``dims`` must have the same size on every process.
        mask: boolean, shaped like ``x`` without its last dimension, or ``None`` (all count).
        dims: the dimensions reduced over (never the last, feature, dimension).
        group: the processes to reduce over; ``None`` for the default group.

    Returns:
        ``(mean, var, count)`` shaped as by ``masked_moments`` and equal on every process: the
        mean, the biased variance and the number of unpadded entries of the global batch. Where
        the global ``count`` is 0, ``mean`` and ``var`` are 0. Without ``torch.distributed``, or
        with a single process, this is ``masked_moments(x, mask, dims)``.

    >>> x = torch.randn(5, 4, 3)
    >>> all(torch.equal(a, b) for a, b in zip(synced_masked_moments(x, None, (1,)), masked_moments(x, None, (1,))))
    True
    """
    if world_size(group) == 1:
        return masked_moments(x, mask, dims)
    # Sums are accumulated in at least float32: counts and sums over many processes are exact
    # integers only up to 256 in bfloat16 (2048 in float16).
    dtype = torch.promote_types(x.dtype, torch.float32)
    values = x.to(dtype)
    if mask is None:
        weights = None
        local_sum = values.sum(dim=dims)  # (..., F)
        local_count = local_sum.new_full((*local_sum.shape[:-1], 1), _numel(x, dims))  # (..., 1)
    else:
        weights = mask.to(dtype).unsqueeze(-1)
        local_sum = (values * weights).sum(dim=dims)
        local_count = weights.sum(dim=dims)
    totals = _all_reduce_sum(torch.cat([local_sum, local_count], dim=-1), group)  # (..., F + 1)
    total, count = totals[..., :-1], totals[..., -1:]
    denominator = count.clamp(min=1.0)
    mean = total / denominator
    centered = values - _unsqueeze(mean, dims, x.dim())
    if weights is not None:
        centered = centered * weights  # 0 at padded entries, whatever they hold
    var = _all_reduce_sum(centered.square().sum(dim=dims), group) / denominator
    return mean.to(x.dtype), var.to(x.dtype), count.squeeze(-1).to(x.dtype)


def global_step_counts(counts: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Unpadded samples per step, summed over the processes of ``group``.

    Args:
        counts: ``(T_r,)`` integers, this process's number of unpadded samples at each step; ``T_r``
            may differ between processes (each pads its batch to its own longest sequence).

    Returns:
        ``(T,)`` on ``counts``'s device, ``T`` the largest ``T_r``: the samples of the global batch
        at each step (``counts`` itself when not distributed). Two blocking all-reduces, not
        differentiable; with NCCL, ``counts`` must be on this process's GPU.
    """
    if world_size(group) == 1:
        return counts
    num_steps = torch.tensor([counts.shape[0]], device=counts.device)
    dist.all_reduce(num_steps, op=dist.ReduceOp.MAX, group=group)
    total = counts.new_zeros(int(num_steps))
    total[: counts.shape[0]] = counts
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def _all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return _AllReduceSum.apply(tensor, group)


class _AllReduceSum(torch.autograd.Function):
    """A summing all-reduce whose backward sums the gradients over the processes.

    What ``torch.distributed.nn.functional.all_reduce`` does; PyTorch 2.13 deprecates that one
    (a ``FutureWarning``) in favour of ``torch.distributed._functional_collectives``, a private
    module: ten lines here depend on neither.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        # y_r = Σ_s x_s on every process r, so dL/dx_s = Σ_r dL/dy_r: sum the gradients.
        return _AllReduceSum.apply(grad_output, ctx.group), None
