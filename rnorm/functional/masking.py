"""Padding: lengths, masks, and reversing only the unpadded part of each sequence.

Padding is always at the end of a sequence (after its ``lengths[b]`` real steps). Everything
here is time-major: ``(T, B, ...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_lengths(lengths: Tensor, batch_size: int, num_steps: int) -> Tensor:
    """Validate ``lengths`` ``(B,)`` and return them as an int64 tensor on the CPU.

    Raises:
        ValueError: wrong shape, not integers, or a length outside ``[1, num_steps]``.
    """
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"Expected lengths of shape ({batch_size},), but got {tuple(lengths.shape)}.")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"Expected integer lengths, but got dtype {lengths.dtype}.")
    lengths = lengths.detach().to("cpu", torch.int64)
    bad = ((lengths < 1) | (lengths > num_steps)).nonzero()
    if bad.numel():
        index = int(bad[0])
        raise ValueError(f"Expected lengths in [1, {num_steps}], but got {int(lengths[index])} at index {index}.")
    return lengths


def mask_to_lengths(mask: Tensor) -> Tensor:
    """Lengths ``(B,)`` from a boolean padding mask ``(B, T)`` that is ``True`` on real steps.

    Raises:
        ValueError: not boolean or 2-D, or some row is not a run of ``True`` followed by ``False``
            (padding must be at the end), or a row has no real step.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"Expected a 2-D boolean mask (B, T), but got dtype {mask.dtype} and shape {tuple(mask.shape)}.")
    mask = mask.detach().cpu()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    bad = (prefix != mask).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(
            f"Expected every mask row to be True on its real steps then False on padding, but row "
            f"{int(bad[0])} has a False before a True."
        )
    empty = (lengths == 0).nonzero()
    if empty.numel():
        raise ValueError(f"Expected every sequence to have at least one real step, but mask row {int(empty[0])} is all False.")
    return lengths


def lengths_to_mask(lengths: Tensor, num_steps: int, device: torch.device | None = None) -> Tensor:
    """Time-major mask ``(T, B)``: ``mask[t, b]`` is ``t < lengths[b]``."""
    steps = torch.arange(num_steps, device=device).unsqueeze(1)
    return steps < lengths.to(device).unsqueeze(0)


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence's first ``lengths[b]`` steps and leave its padding in place.

    Used for the backward direction of a bidirectional layer (BN §5.4, BN-e**): its first steps
    see real data, not padding. Applying it twice gives ``x`` back.

    Args:
        x: ``(T, B, ...)``.
        lengths: ``(B,)`` or ``None`` (no padding: a plain flip over time).

    Example:
        >>> x = torch.tensor([[1, 4], [2, 5], [3, 0]])  # (T=3, B=2); sequence 1 has length 2
        >>> reverse_padded(x, torch.tensor([3, 2])).tolist()
        [[3, 5], [2, 4], [1, 0]]
    """
    if lengths is None:
        return x.flip(0)
    num_steps = x.shape[0]
    steps = torch.arange(num_steps, device=x.device).unsqueeze(1)  # (T, 1)
    lengths = lengths.to(x.device).unsqueeze(0)  # (1, B)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (T, B)
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)
