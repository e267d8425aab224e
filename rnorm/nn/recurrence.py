"""The reference recurrence: the straightforward per-step loop of the papers' equations.

Readable, calling each strategy's :meth:`~rnorm.norms.Normalizer.step` at every step, and the
implementation every faster path is tested against (the fused op of :mod:`rnorm.kernels`;
:data:`rnorm.nn.dispatch.RECURRENCES` names both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnorm.norms.base import Normalizer


def lstm_step(
    input_term: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh_t: Tensor,
    t: int,
    mask: Tensor | None,
    recurrent_norm: Normalizer,
    cell_norm: Normalizer,
    hidden_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step with normalized recurrent term and cell (BN eq. 6–8, NP eq. 15–17).

    Args:
        input_term: the normalized input term plus bias, ``(B, 4H)``.
        h, c: the previous state, ``(B, H)`` each.
        weight_hh_t: the effective recurrent weight, transposed, ``(H, 4H)``.
        t: the step index (0-based), for step-dependent strategies.
        mask: ``(B,)`` boolean, ``True`` where the sequence has not ended, or ``None``.
        recurrent_norm, cell_norm: the strategies of the recurrent and cell sites.
        hidden_scale: ``cell_norm.hidden_scale``, read once per sequence by the caller; ``None``
            when it is 1.

    Returns:
        The new ``(h, c)``, each ``(B, H)``, not yet masked.
    """
    gates = input_term + recurrent_norm.step(h @ weight_hh_t, t, mask)  # (B, 4H), eq. 6
    i, f, g, o = gates.chunk(4, dim=1)  # torch.nn.LSTM's gate order
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # eq. 7
    h = torch.sigmoid(o) * torch.tanh(cell_norm.step(c, t, mask))  # eq. 8
    if hidden_scale is not None:
        h = h * hidden_scale  # Norm-Prop's 1 / sqrt(Var[h_t]), NP eq. 17
    return h, c


def reference_recurrence(
    input_terms: Tensor,
    weight_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    recurrent_norm: Normalizer,
    cell_norm: Normalizer,
    hidden_probe: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run the recurrence over all steps, one :func:`lstm_step` at a time.

    Args:
        input_terms: normalized input terms plus bias for every step, ``(T, B, 4H)``.
        weight_hh: the effective recurrent weight, ``(4H, H)``.
        h0, c0: initial state, ``(B, H)`` each.
        mask: ``(T, B)`` boolean, ``True`` on real steps, or ``None`` (no padding).
        recurrent_norm, cell_norm: the strategies of the recurrent and cell sites.
        hidden_probe: optional ``(T, B, H)`` tensor added to ``h_t`` as soon as it is computed,
            before anything uses it; with zeros that require grad, its gradient after backward is
            the total ``∂loss/∂h_t`` through time (BN §4's gradient flow), which the stacked
            ``output`` cannot give (its gradient is only the direct part).

    Returns:
        ``(output, (h_n, c_n))``: ``output`` ``(T, B, H)`` is zero at padded positions; padded
        steps leave the state unchanged, so ``h_n``, ``c_n`` ``(B, H)`` are each sequence's state
        at its last real step.
    """
    num_steps = input_terms.shape[0]
    recurrent_norm.start(num_steps)
    cell_norm.start(num_steps)
    weight_hh_t = weight_hh.t()
    hidden_scale = cell_norm.hidden_scale
    h, c = h0, c0
    # Unbind once: indexing input_terms[t] (or hidden_probe[t]) in the loop would give each step's
    # backward a full (T, B, 4H) gradient to write and sum, O(T^2) in all.
    steps = input_terms.unbind(0)
    probes = None if hidden_probe is None else hidden_probe.unbind(0)
    outputs = []
    for t in range(num_steps):
        step_mask = None if mask is None else mask[t]
        h_new, c_new = lstm_step(
            steps[t], h, c, weight_hh_t, t, step_mask, recurrent_norm, cell_norm, hidden_scale
        )
        if probes is not None:
            h_new = h_new + probes[t]
        if step_mask is None:
            h, c = h_new, c_new
            outputs.append(h)
        else:
            keep = step_mask.unsqueeze(1)  # (B, 1)
            h = torch.where(keep, h_new, h)
            c = torch.where(keep, c_new, c)
            outputs.append(h_new * keep)
    return torch.stack(outputs), (h, c)
