"""Batch normalization through time: per-timestep (``bn``) and sequencewise (``seqbn``).

``bn`` is the BN-LSTM of Cooijmans et al. (BN eq. 5–8): statistics over the batch, separately
for each time step; population statistics per step ``1..T_max``, and at test time step ``t`` uses
those of ``min(t, T_max)`` (BN §3). ``seqbn`` shares one set of statistics over every step and
batch entry (Laurent et al. 2016; the BN-e* input terms of BN §5.4).

Public defaults (both): ``gamma_init=0.1`` (BN §4), ``eps=1e-5``, biased batch variance (the one
used to normalize, also the one averaged into the population statistics), ``beta`` fixed at 0 on
the input and recurrent sites (the LSTM bias ``b`` shifts, BN §3) and learnable, initialized to
0, on the cell site. Padded entries never enter a statistic.

Under data parallelism (``torch.distributed`` initialized with more than one process) the training
statistics are, by default, those of the global batch: every process's share counts, as with
``torch.nn.SyncBatchNorm`` (:func:`rnorm.functional.distributed.synced_masked_moments`). Every
process must then run the same training-mode forward passes; :func:`set_statistics_sync` turns
this off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnorm.functional.distributed import synced_masked_moments, world_size
from rnorm.functional.normalization import affine, masked_moments, normalize
from rnorm.norms.base import FusedStep, Normalizer
from rnorm.norms.registry import register


class BatchStatisticsNorm(Normalizer):
    """Base of strategies that normalize with batch statistics in training and population statistics
    in evaluation: γ, optional β, and the population statistics in ``(S, F)`` buffers.

    ``S`` is the number of statistic slots: ``T_max`` for ``bn``, 1 for ``seqbn``.
    ``num_batches_tracked[s]`` counts the minibatch estimates averaged into slot ``s``. What other
    code relies on (:func:`~rnorm.norms.estimate_population_statistics`, the callbacks):
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``momentum``,
    :meth:`reset_population_statistics`, ``sync_statistics`` and :attr:`synchronized`.
    """

    batch_statistics = "step"
    running_mean: Tensor  # (S, F) buffers: see _grow
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        site: str,
        num_features: int,
        *,
        gamma_init: float = 0.1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        learn_beta: bool | None = None,
        sync_statistics: bool = True,
    ) -> None:
        super().__init__(site, num_features)
        if eps <= 0:
            raise ValueError(f"Expected eps > 0, but got {eps}.")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"Expected momentum in (0, 1] or None (cumulative average), but got {momentum}.")
        self.eps = float(eps)
        self.momentum = momentum
        self.sync_statistics = bool(sync_statistics)
        self.gamma = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        learn_beta = site == "cell" if learn_beta is None else learn_beta
        self.beta = nn.Parameter(torch.zeros(num_features)) if learn_beta else None
        self.register_buffer("running_mean", torch.zeros(0, num_features))
        self.register_buffer("running_var", torch.zeros(0, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(0, dtype=torch.long))

    @property
    def synchronized(self) -> bool:
        return self.sync_statistics and world_size() > 1

    def _batch_moments(self, x: Tensor, mask: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Training statistics: over every process's batch if synchronized, else this one's."""
        if self.sync_statistics:  # the same as masked_moments unless distributed with > 1 process
            return synced_masked_moments(x, mask, dims)
        return masked_moments(x, mask, dims)

    # -- population statistics ------------------------------------------------------------------
    def _grow(self, num_slots: int) -> None:
        """Add slots (mean 0, variance 1, never updated) up to ``num_slots``."""
        extra = num_slots - self.running_mean.shape[0]
        if extra <= 0:
            return
        mean, var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        self.running_mean = torch.cat([mean, mean.new_zeros(extra, self.num_features)])
        self.running_var = torch.cat([var, var.new_ones(extra, self.num_features)])
        self.num_batches_tracked = torch.cat([tracked, tracked.new_zeros(extra)])

    @torch.no_grad()
    def _update(self, slots: slice | int, mean: Tensor, var: Tensor, count: Tensor) -> None:
        """Fold one minibatch estimate per slot into the population statistics.

        A slot's first estimate is taken as is; later ones by exponential moving average with
        ``momentum``, or, with ``momentum=None``, by cumulative average (the paper's "average of
        the minibatch estimates"). Slots whose estimate came from no sample are left alone.
        """
        seen = count > 0  # (S,)
        tracked = self.num_batches_tracked[slots]
        tracked += seen.long()
        self.num_batches_tracked[slots] = tracked
        if self.momentum is None:
            rate = 1.0 / tracked.clamp(min=1).to(mean.dtype)
        else:  # built in the statistics' dtype: a float32 0.1 would bias a float64 average
            momentum = torch.full_like(tracked, 0, dtype=mean.dtype).fill_(self.momentum)
            rate = torch.where(tracked == 1, 1.0, momentum)
        rate = (rate * seen).unsqueeze(-1)  # (S, 1): 0 where nothing was seen
        self.running_mean[slots] += rate * (mean.detach() - self.running_mean[slots])
        self.running_var[slots] += rate * (var.detach() - self.running_var[slots])

    def reset_population_statistics(self) -> None:
        """Forget every population statistic (``T_max`` returns to 0)."""
        self.running_mean = self.running_mean.new_zeros(0, self.num_features)
        self.running_var = self.running_var.new_zeros(0, self.num_features)
        self.num_batches_tracked = self.num_batches_tracked.new_zeros(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Population statistics change shape as T_max grows: take the checkpoint's shape.
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def output_std(self) -> float:
        return float(self.gamma.detach().abs().mean())

    def _finish(self, x_hat: Tensor) -> Tensor:
        return affine(x_hat, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, momentum={self.momentum}, learn_beta={self.beta is not None}"


@register("bn", description="per-timestep batch normalization (Cooijmans et al., BN eq. 5-8)")
class TimeBatchNorm(BatchStatisticsNorm):
    """Per-timestep batch normalization: separate batch and population statistics per step.

    Args:
        site: ``"input"``, ``"recurrent"`` or ``"cell"``.
        num_features: size of the normalized vectors.
        gamma_init: initial γ (BN §4 recommends 0.1).
        eps: added to the variance.
        momentum: weight of a new minibatch estimate in the running population statistics, or
            ``None`` for a cumulative average (what :func:`estimate_population_statistics` uses).
        learn_beta: learn a shift β; default ``True`` on the cell site only.
        sync_statistics: synchronize batch statistics across processes when torch.distributed is
            initialized; no effect otherwise.

    Example:
        >>> import torch
        >>> norm = TimeBatchNorm("recurrent", 8)
        >>> y = norm.step(torch.randn(4, 8), t=0)
        >>> norm.t_max, tuple(norm.running_mean.shape)
        (1, (1, 8))
    """

    @property
    def t_max(self) -> int:
        """The longest training length seen: the number of steps with population statistics."""
        return self.running_mean.shape[0]

    def start(self, num_steps: int) -> None:
        if self.training:
            self._grow(num_steps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Vectorized over steps: ``x`` ``(T, B, F)``, ``mask`` ``(T, B)``; statistics per row ``t``."""
        num_steps = x.shape[0]
        if self.training:
            self._grow(num_steps)
            mean, var, count = self._batch_moments(x, mask, dims=(1,))  # (T, F), (T, F), (T,)
            self._update(slice(0, num_steps), mean, var, count)
        else:
            mean, var = self._population(torch.arange(num_steps, device=x.device))
        return self._finish(normalize(x, mean.unsqueeze(1), var.unsqueeze(1), self.eps))

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        if self.training:
            self._grow(t + 1)
            mean, var, count = self._batch_moments(x, mask, dims=(0,))  # (F,), (F,), ()
            self._update(t, mean, var, count)
        else:
            mean, var = self._population(t)
        return self._finish(normalize(x, mean, var, self.eps))

    def fused_step(self, num_steps: int) -> FusedStep | None:
        if not self.training:  # population statistics: a fixed affine map per step
            mean, var = self._population(torch.arange(num_steps, device=self.gamma.device))  # (T, F) each
            scale = self.gamma * torch.rsqrt(var + self.eps)
            shift = -mean * scale if self.beta is None else self.beta - mean * scale
            return FusedStep("affine", scale, shift)
        def record(mean: Tensor, var: Tensor, count: Tensor) -> None:
            self._update(slice(0, num_steps), mean, var, count)

        return FusedStep("batch", self.gamma, self.beta, self.eps, record, self.synchronized)  # synchronized: all-reduced per step

    def _population(self, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """Population mean and variance of step(s) ``t``, using ``T_max`` beyond it (BN §3)."""
        if self.t_max == 0:  # never trained: behave as an untrained torch.nn.BatchNorm1d would
            shape = (self.num_features,) if isinstance(t, int) else (t.shape[0], self.num_features)
            return self.running_mean.new_zeros(shape), self.running_var.new_ones(shape)
        index = min(t, self.t_max - 1) if isinstance(t, int) else t.clamp(max=self.t_max - 1)
        return self.running_mean[index], self.running_var[index]


@register("seqbn", description="sequencewise batch normalization: statistics shared over all steps")
class SequenceBatchNorm(BatchStatisticsNorm):
    """Sequencewise batch normalization: one set of statistics over every step and sample.

    Only the input site: its statistics need the whole sequence, which the recurrent and cell
    sites do not have until the recurrence has run. Arguments as :class:`TimeBatchNorm`.
    """

    supported_sites = frozenset({"input"})
    batch_statistics = "sequence"

    def __init__(self, site: str, num_features: int, **kwargs) -> None:
        super().__init__(site, num_features, **kwargs)
        self._grow(1)  # one slot, from the start

    def reset_population_statistics(self) -> None:
        super().reset_population_statistics()
        self._grow(1)

    def step(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        raise RuntimeError(
            "seqbn normalizes a whole sequence at once and cannot run one step at a time "
            "(NormLSTMCell.forward); run the sequence through NormLSTM, or use 'bn' on this site."
        )

    def fused_step(self, num_steps: int) -> FusedStep | None:
        if not self.training:
            scale = self.gamma * torch.rsqrt(self.running_var[:1] + self.eps)  # (1, F)
            shift = -self.running_mean[:1] * scale
            return FusedStep("affine", scale, shift if self.beta is None else shift + self.beta)
        if self.synchronized:  # the input terms before the loop, through forward's synchronized moments
            return None

        def record(mean: Tensor, var: Tensor, count: Tensor) -> None:
            self._update(slice(0, 1), mean, var, count)

        return FusedStep("sequence", self.gamma, self.beta, self.eps, record)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` ``(T, B, F)``, ``mask`` ``(T, B)``; one mean and variance over ``T`` and ``B``."""
        if self.training:
            mean, var, count = self._batch_moments(x, mask, dims=(0, 1))  # (F,), (F,), ()
            self._update(slice(0, 1), mean.unsqueeze(0), var.unsqueeze(0), count.reshape(1))
        else:
            mean, var = self.running_mean[0], self.running_var[0]
        return self._finish(normalize(x, mean, var, self.eps))


def set_statistics_sync(module: nn.Module, enabled: bool) -> int:
    """Turn the cross-process synchronization of batch statistics on or off in all of ``module``.

    Args:
        module: any module; every ``bn`` and ``seqbn`` strategy in it (itself included) is set.
        enabled: synchronize (the default of every strategy) or use each process's own batch.

    Returns:
        How many strategies changed: those already set to ``enabled`` are not counted.

    Example:
        >>> from rnorm.nn import NormLSTM
        >>> lstm = NormLSTM(3, 8, input_norm="seqbn", recurrent_norm="bn", cell_norm="bn")
        >>> set_statistics_sync(lstm, False), set_statistics_sync(lstm, False)
        (3, 0)
    """
    changed = 0
    for child in module.modules():
        if isinstance(child, BatchStatisticsNorm) and child.sync_statistics != bool(enabled):
            child.sync_statistics = bool(enabled)
            changed += 1
    return changed
