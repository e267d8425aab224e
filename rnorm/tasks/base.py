"""What every rnorm task shares: the encoder built from the data's sizes, optimization, logging."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from rnorm.nn import NormLSTM, NormLSTMCell

#: Builds the recurrent encoder from its input size. In YAML a class path with init_args, e.g.
#: ``{class_path: rnorm.nn.NormLSTM, init_args: {hidden_size: 100, input_norm: bn}}``.
EncoderFactory = Callable[[int], NormLSTM]

#: What a task's ``encoder`` is: a :class:`~rnorm.nn.NormLSTM` layer over whole sequences, or a
#: :class:`~rnorm.nn.NormLSTMCell` stepped by the task itself (DRAW).
EncoderT = TypeVar("EncoderT", NormLSTM, NormLSTMCell)


def orthogonal_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear head with an orthogonal weight and zero bias (the papers initialize every weight
    matrix orthogonally: BN §5.1–5.3, NP §5.1)."""
    head = nn.Linear(in_features, out_features)
    nn.init.orthogonal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class RecurrentTask(LightningModule, ABC, Generic[EncoderT]):
    """Base of the task modules: a recurrent encoder (``RecurrentTask[NormLSTM]``, or
    ``RecurrentTask[NormLSTMCell]`` for a task that steps a cell itself) plus a task head.

    Sizes that depend on the data (input size, classes, vocabulary) may be left ``None``: they are
    then read from the data module in :meth:`setup` and recorded in the hyperparameters, so that
    checkpoints rebuild the same network. A subclass implements :meth:`build` and
    :meth:`population_forward` (abstract: a subclass without them cannot be instantiated).

    Args:
        encoder: builds the encoder from its input size.
        optimizer: builds the optimizer from the parameters.
        lr_scheduler: optional; builds a scheduler from the optimizer.
        lr_scheduler_interval: step the scheduler every optimizer ``step`` or every ``epoch``.
    """

    #: Data-dependent sizes: hyperparameter name -> attribute of the data module.
    data_sizes: tuple[str, ...] = ()

    def __init__(
        self,
        encoder: Callable[[int], EncoderT],
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        self.encoder_factory: Callable[[int], EncoderT] = encoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.encoder: EncoderT | None = None

    # -- building --------------------------------------------------------------------------------
    def _build_if_sized(self) -> None:
        if self.encoder is None and all(self.hparams.get(name) is not None for name in self.data_sizes):
            self.build()

    @abstractmethod
    def build(self) -> None:
        """Create the encoder and head once every size in :attr:`data_sizes` is known."""

    def setup(self, stage: str) -> None:
        if self.encoder is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in self.data_sizes:
            if self.hparams.get(name) is None:
                if datamodule is None or not hasattr(datamodule, name):
                    raise ValueError(
                        f"{type(self).__name__} needs {name!r}: pass it, or use a data module that has a "
                        f"{name!r} attribute."
                    )
                self.hparams[name] = int(getattr(datamodule, name))
        self.build()

    # Checked once a checkpoint has been restored (after setup): a data module's sizes may come
    # from the checkpoint too (a vocabulary), and the model's from its hyperparameters.
    def on_fit_start(self) -> None:
        self._check_sizes_match_data()

    def on_validation_start(self) -> None:
        self._check_sizes_match_data()

    def on_test_start(self) -> None:
        self._check_sizes_match_data()

    def on_predict_start(self) -> None:
        self._check_sizes_match_data()

    def _check_sizes_match_data(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in self.data_sizes:
            data_value = getattr(datamodule, name, None)
            if data_value is not None and int(data_value) != self.hparams[name]:
                raise ValueError(f"The model has {name}={self.hparams[name]}, but the data module has {name}={data_value}.")

    def _build_encoder(self, input_size: int) -> NormLSTM:
        encoder = self.encoder_factory(input_size)
        if not isinstance(encoder, NormLSTM):
            raise TypeError(f"Expected the encoder factory to build a NormLSTM, but it built {type(encoder).__name__}.")
        return encoder

    # -- optimization ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen without it.
        grads = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm(), on_step=True, on_epoch=False)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    # -- population statistics -------------------------------------------------------------------
    @abstractmethod
    def population_forward(self, batch: Any) -> None:
        """Run the encoder on a training batch as in training (used to re-estimate BN statistics)."""

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(inputs, targets)`` or ``(inputs, targets, lengths)`` → all three (lengths may be None)."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("Expected a batch (inputs, targets) or (inputs, targets, lengths).")
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
