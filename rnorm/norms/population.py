"""Exact population statistics: the average of minibatch estimates over training batches (BN §3).

During training, batch-statistics strategies (``bn``, ``seqbn``) keep running averages. The
Recurrent Batch Normalization paper instead estimates the population statistics "by averaging the
minibatch estimates over the training set"; :func:`estimate_population_statistics` does that.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def estimate_population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Replace the population statistics of every ``bn``/``seqbn`` strategy in ``model``.

    Each strategy forgets its statistics and then, over ``num_batches`` batches (all of
    ``batches`` if ``None``), averages the minibatch estimates of every step with equal weight,
    exactly as its own training-mode forward computes them (dropout and initial-state noise
    included, since those shaped the statistics the model was trained with). Gradients are off,
    and every module's train/eval mode and every strategy's momentum are restored afterwards. If
    a batch fails, or there is none, the previous statistics are kept.

    Args:
        model: any module containing batch-statistics strategies.
        batches: an iterable of training batches.
        num_batches: how many batches to use; ``None`` for all.
        forward: ``forward(model, batch)`` runs one batch; by default ``model(**batch)`` for a
            mapping, ``model(*batch)`` for a tuple or list and ``model(batch)`` otherwise.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``num_batches`` < 1, or ``batches`` yielded nothing.
    """
    from rnorm.norms.batch_norm import BatchStatisticsNorm

    if num_batches is not None and num_batches < 1:
        raise ValueError(f"Expected num_batches >= 1 or None, but got {num_batches}.")
    norms = [m for m in model.modules() if isinstance(m, BatchStatisticsNorm)]
    modes = [(m, m.training) for m in model.modules()]
    saved = [(norm.momentum, norm.running_mean, norm.running_var, norm.num_batches_tracked) for norm in norms]
    run = forward or _default_forward
    used = 0
    # Normal tensors even when called under inference mode (as Lightning runs evaluation hooks):
    # statistics created there would be inference tensors that training could not update in place.
    with torch.inference_mode(False), torch.no_grad():
        try:
            for norm in norms:
                norm.reset_population_statistics()  # new tensors: the saved ones stay intact
                norm.momentum = None  # cumulative average: every minibatch estimate weighs the same
            model.train()
            for batch in itertools.islice(batches, num_batches):  # never draws a batch it won't use
                run(model, batch)
                used += 1
            if used == 0:
                raise ValueError("No batches were given, so no population statistics could be estimated.")
        except BaseException:
            # All or nothing: a failed estimate leaves the previous statistics in place.
            for norm, (_, mean, var, tracked) in zip(norms, saved):
                norm.running_mean, norm.running_var, norm.num_batches_tracked = mean, var, tracked
            raise
        finally:
            for norm, (momentum, *_) in zip(norms, saved):
                norm.momentum = momentum
            for module, training in modes:
                module.training = training
    return used


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
