"""``rnorm fit|validate|test|predict``: Lightning's ``LightningCLI`` with rnorm's additions.

The model and the data module are chosen by class path in the YAML, or by their short names
(``--model SequenceClassifier``): rnorm's tasks and data modules are imported here, so that
``rnorm fit --help`` lists them. Every ``__init__`` argument is an option (``rnorm fit --help``,
``--print_config``). What rnorm adds to Lightning's CLI:

* callbacks present in every run, each configurable under its own key: ``population_statistics``
  (:class:`~rnorm.callbacks.PopulationStatistics`), ``epoch_seed``
  (:class:`~rnorm.callbacks.EpochSeed`) and ``predictions``
  (:class:`~rnorm.callbacks.PredictionWriter`: ``rnorm predict`` writes a file);
* ``test_after_fit`` and ``progress`` (a compact bar on a terminal, a line per epoch otherwise);
* checks before anything is built: the normalizer names of the configuration, and that a
  ``--ckpt_path`` is a checkpoint that loads safely;
* run folders: without a logger, each run gets its own ``version_N/`` (its ``config.yaml`` beside
  its checkpoints), and a run that fails before its first step leaves no folder behind.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import rnorm.data
import rnorm.tasks  # noqa: F401 - imported so that short class names resolve and --help lists them
from rnorm import norms
from rnorm.callbacks import (
    CompactProgressBar,
    EpochLines,
    EpochSeed,
    PopulationStatistics,
    PredictionWriter,
    RemoveFailedRunDirectory,
)
from rnorm.config_files import resolve_config_arguments
from rnorm.utils.checkpoint import load_checkpoint

__all__ = ["RnormCLI", "run"]

#: Lightning's console notices that say nothing about the run (advertisements, absent hardware).
QUIET_NOTICES = re.compile(r"💡 Tip:|TPU available: False")
#: Warnings Lightning triggers inside its own code, with nothing for the user to change.
QUIET_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)
#: Configuration keys that name a normalization strategy (NormLSTM, NormLSTMCell, AttentiveReader).
NORMALIZER_KEY = re.compile(r"^(input|recurrent|cell|attention)_norm$")


class RnormCLI(LightningCLI):
    """LightningCLI with rnorm's always-present callbacks, checks and run folders (see the module)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PopulationStatistics, "population_statistics")
        parser.add_lightning_class_args(EpochSeed, "epoch_seed")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: test the best checkpoint (or the final model without one) when fitting ends",
        )
        parser.add_argument(
            "--progress",
            type=Literal["auto", "bar", "lines"],
            default="auto",
            help="progress output: a compact bar (bar), one line per epoch (lines), or auto: the bar when "
            "stdout is a terminal, lines otherwise. --trainer.enable_progress_bar false turns both off",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        check_normalizer_names(config)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path, mmap=True)  # a CheckpointError now, not torch's advice later

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        settings = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.pop("callbacks", None) or settings.get("callbacks") or [])
        progress = self._progress_callback(settings, callbacks)
        if progress is not None:
            callbacks.append(progress)
        root = Path(settings.get("default_root_dir") or ".")
        if settings.get("logger") is False and "default_root_dir" not in kwargs:
            kwargs["default_root_dir"] = str(next_version_dir(root))  # each run's config beside its checkpoints
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        trainer.callbacks.append(RemoveFailedRunDirectory(trainer.log_dir or trainer.default_root_dir))
        return trainer

    def _progress_callback(self, settings: Mapping[str, Any], callbacks: list[Any]) -> ProgressBar | None:
        if settings.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in callbacks):
            return None
        choice = self._get(self.config, "progress", default="auto")
        if choice == "auto":
            choice = "bar" if sys.stdout.isatty() else "lines"
        return CompactProgressBar() if choice == "bar" else EpochLines()

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit"):
            checkpoint = self.trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def check_normalizer_names(config: Any, path: str = "") -> None:
    """Raise ``ValueError`` naming the key if a configuration names an unregistered normalizer.

    Looks at every ``input_norm``, ``recurrent_norm``, ``cell_norm`` and ``attention_norm`` whose
    value is a string, at any depth, before anything is built.
    """
    items = vars(config).items() if isinstance(config, Namespace) else config.items() if isinstance(config, Mapping) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, str) and NORMALIZER_KEY.match(str(key)):
            try:
                norms.get(value)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        elif isinstance(value, (Namespace, Mapping)):
            check_normalizer_names(value, where)


def next_version_dir(root: Path) -> Path:
    """``root/version_N`` with ``N`` one more than the largest existing (0 if none)."""
    numbers = [int(p.name[len("version_") :]) for p in root.glob("version_*") if p.name[len("version_") :].isdigit()]
    return root / f"version_{max(numbers, default=-1) + 1}"


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence :data:`QUIET_NOTICES` and :data:`QUIET_WARNINGS` while the CLI runs (Lightning logs its
    notices through the standard ``logging`` module, which lets a filter drop them)."""

    def keep(record: logging.LogRecord) -> bool:
        return not QUIET_NOTICES.search(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(keep)


def run(args: list[str], from_python: bool) -> int:
    """Run ``rnorm SUBCOMMAND args…`` (``args`` start with the subcommand); returns the exit status."""
    if args[:1] and args[0] in LightningCLI.subcommands():
        args = resolve_config_arguments(args)  # else the parser reports the unknown command first
    if not from_python:
        # LightningCLI warns when given `args` besides a command line in sys.argv: give it the
        # command line with configuration names resolved.
        sys.argv[1:] = args
    norms.available()  # plugins first: class paths and strategy names in the YAML may refer to them
    with quiet_third_party():
        RnormCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args if from_python else None,
            save_config_kwargs={"overwrite": True},
            # Tasks build their optimizers from their own `optimizer`/`lr_scheduler` arguments (after
            # the data-dependent network exists); top-level keys would bypass that.
            auto_configure_optimizers=False,
        )
    return 0
