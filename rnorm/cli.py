"""The ``rnorm`` command line: LightningCLI for training, plus ``rnorm normalizers``.

``rnorm fit|validate|test|predict --config configs/X.yaml``: the model and data module are chosen
by class path in the YAML (``rnorm.tasks.SequenceClassifier``, ``rnorm.data.SequentialMNISTDataModule``,
…), every ``__init__`` argument is an option (``rnorm fit --help``, ``--print_config``). Two
callbacks are always present and configurable under their own keys: ``population_statistics``
(:class:`~rnorm.callbacks.PopulationStatistics`) and ``epoch_seed`` (:class:`~rnorm.callbacks.EpochSeed`).

``rnorm normalizers`` lists every registered normalization strategy, plugins included, and
``rnorm analyze …`` reproduces the papers' analysis figures (:mod:`rnorm.analysis`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import rnorm
from rnorm import norms
from rnorm.callbacks import EpochSeed, PopulationStatistics

HELP = """usage: rnorm {fit,validate,test,predict} [--config CONFIG] [options]
       rnorm normalizers
       rnorm analyze ANALYSIS [options]
       rnorm --version

Commands:
  fit, validate, test, predict   Lightning's commands; see `rnorm fit --help`
  normalizers                    list the registered normalization strategies
  analyze ANALYSIS               the papers' analysis figures; see `rnorm analyze --help`
"""


class RnormCLI(LightningCLI):
    """LightningCLI with rnorm's always-on callbacks and ``--test_after_fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PopulationStatistics, "population_statistics")
        parser.add_lightning_class_args(EpochSeed, "epoch_seed")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: test the best checkpoint (or the final model without one) when fitting ends",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            checkpoint = self.trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def print_normalizers() -> None:
    """Print every registered strategy with its one-line description."""
    entries = norms.available()
    width = max(map(len, entries))
    for name, description in entries.items():
        print(f"{name:<{width}}  {description}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rnorm`` console script and of ``python -m rnorm``."""
    from_python = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["normalizers"]:
        print_normalizers()
        return 0
    if argv[:1] == ["analyze"]:
        from rnorm.analysis.cli import main as analyze

        return analyze(argv[1:])
    if argv[:1] == ["--version"]:
        print(f"rnorm {rnorm.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    # Plugins first: class paths and strategy names in the YAML may refer to them.
    norms.available()
    RnormCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv if from_python else None,  # from the shell, LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
        # Tasks build their optimizers from their own `optimizer`/`lr_scheduler` arguments (after
        # the data-dependent network exists); top-level keys would bypass that.
        auto_configure_optimizers=False,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
