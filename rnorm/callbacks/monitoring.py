"""Watching normalization during training: gradient flow over time and population statistics.

Every ``every_n_steps`` optimizer steps :class:`NormMonitor` logs

* ``grad_flow/t_0100``: ``||∂loss/∂h_t||`` for a few steps ``t`` evenly spaced over the sequence,
  the total gradient through time of the hidden state of the encoder's last layer (forward
  direction), norm over the batch and the units, as in BN Fig. 1a. It is read from a zero
  ``hidden_probe`` (see :meth:`rnorm.nn.NormLSTM.forward`) injected into the monitored forward pass:
  the gradient of the encoder's stacked output would hold only the direct part.
* ``popstats/<module>/mean_t0100`` and ``popstats/<module>/var_t0100``: the mean over units of
  the population mean and variance of every ``bn``/``seqbn`` strategy at the same steps (``seqbn``
  has only ``t = 0``), and, where the logger draws histograms (TensorBoard),
  ``popstats/<module>/running_var_last``: the variances of the last step ``T_max - 1`` (BN Fig. 5).

``t`` is 0-based. Scalars go straight to the logger's ``add_scalar``/``add_histogram`` when every
logger has them (TensorBoard), at the step being monitored; otherwise through ``pl_module.log``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rnorm.norms import BatchStatisticsNorm


def evenly_spaced_steps(num_steps: int, count: int) -> list[int]:
    """``count`` distinct steps of ``0 .. num_steps - 1``, evenly spaced, first and last included.

    Example:
        >>> evenly_spaced_steps(100, 5), evenly_spaced_steps(3, 8)
        ([0, 25, 50, 74, 99], [0, 1, 2])
    """
    if num_steps < 1:
        return []
    return torch.linspace(0, num_steps - 1, min(count, num_steps)).round().long().unique().tolist()


def step_gradient_norms(gradient: Tensor, steps: list[int]) -> dict[int, float]:
    """``{t: ||gradient[:, t]||}`` of a batch-first gradient ``(B, T, F)``, norm over ``B`` and ``F``."""
    return {t: float(gradient[:, t].norm()) for t in steps}


class NormMonitor(Callback):
    """Logs gradient flow over time and batch-norm population statistics during training.

    Args:
        every_n_steps: monitor one training step in this many (by ``trainer.global_step``).
        num_steps: time steps sampled, evenly spaced over the sequence (first and last included).
        histograms: also log a histogram of each site's last-step population variance, where the
            logger supports histograms.
    """

    def __init__(self, every_n_steps: int = 50, num_steps: int = 8, histograms: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"Expected every_n_steps >= 1, but got {every_n_steps}.")
        if num_steps < 1:
            raise ValueError(f"Expected num_steps >= 1, but got {num_steps}.")
        self.every_n_steps, self.num_steps, self.histograms = every_n_steps, num_steps, histograms
        self._handle: RemovableHandle | None = None
        self._probe: Tensor | None = None
        self._sequence_length: int | None = None
        self._last_step: int | None = None
        self._warned = False

    # -- capturing the gradient ------------------------------------------------------------------
    def attach(self, encoder: nn.Module) -> None:
        """Capture ``∂loss/∂h_t`` of the encoder's next forward pass (a :class:`~rnorm.nn.NormLSTM`)."""
        self.detach()
        self._probe, self._sequence_length = None, None
        self._handle = encoder.register_forward_pre_hook(self._inject_probe, with_kwargs=True)

    def detach(self) -> Tensor | None:
        """Stop capturing; the gradient ``(B, T, H)`` captured since :meth:`attach`, or ``None``."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._probe is None or self._probe.grad is None:
            return None
        return self._probe.grad.detach().transpose(0, 1)  # the probe is time-major

    def _inject_probe(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._sequence_length is not None or not torch.is_grad_enabled():
            return None  # only the first training forward pass of the monitored step
        x = args[0] if args else kwargs["x"]
        batch_first = getattr(module, "batch_first", True)
        steps, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        self._sequence_length = steps
        self._probe = x.new_zeros(steps, batch, module.hidden_size, requires_grad=True)
        return args, {**kwargs, "hidden_probe": self._probe}

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step:  # accumulation: one batch per step
            return
        encoder = getattr(pl_module, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"NormMonitor needs a module with an `encoder`, but {type(pl_module).__name__} has none.")
        self._last_step = step
        self.attach(encoder)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._handle is None:
            return
        gradient = self.detach()
        length = self._sequence_length
        scalars: dict[str, float] = {}
        if gradient is not None:
            steps = evenly_spaced_steps(gradient.shape[1], self.num_steps)
            scalars.update({f"grad_flow/t_{t:04d}": value for t, value in step_gradient_norms(gradient, steps).items()})
        elif not self._warned:
            self._warned = True
            rank_zero_warn(
                "NormMonitor: no gradient reached the encoder's hidden states (the monitored forward pass ran "
                "without gradients, or the loss does not depend on them), so grad_flow/* is not logged."
            )
        histograms: dict[str, Tensor] = {}
        for name, norm in pl_module.named_modules():
            if not isinstance(norm, BatchStatisticsNorm) or norm.running_mean.shape[0] == 0:
                continue
            t_max = norm.running_mean.shape[0]
            steps = [t for t in evenly_spaced_steps(length or t_max, self.num_steps) if t < t_max] or [t_max - 1]
            for t in steps:
                scalars[f"popstats/{name}/mean_t{t:04d}"] = float(norm.running_mean[t].mean())
                scalars[f"popstats/{name}/var_t{t:04d}"] = float(norm.running_var[t].mean())
            histograms[f"popstats/{name}/running_var_last"] = norm.running_var[-1].detach().cpu()
        self._log(trainer, pl_module, scalars, histograms, self._last_step)
        self._probe = None

    def _log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        scalars: dict[str, float],
        histograms: dict[str, Tensor],
        step: int,
    ) -> None:
        experiments = [getattr(logger, "experiment", None) for logger in trainer.loggers]
        if experiments and all(callable(getattr(e, "add_scalar", None)) for e in experiments):
            for experiment in experiments:
                for tag, value in scalars.items():
                    experiment.add_scalar(tag, value, global_step=step)
        else:
            for tag, value in scalars.items():
                pl_module.log(tag, value, on_step=True, on_epoch=False)
        if self.histograms:
            for experiment in experiments:
                if callable(getattr(experiment, "add_histogram", None)):
                    for tag, values in histograms.items():
                        experiment.add_histogram(tag, values, global_step=step)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.detach()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()
