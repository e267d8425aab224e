"""Progress output: a bar that keeps the metric in 80 columns, one line per epoch into a file."""

from __future__ import annotations

import functools
import re

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM
from rnorm.callbacks import CompactProgressBar, EpochLines
from rnorm.callbacks.progress import BAR_FORMAT
from rnorm.tasks import SequenceClassifier


class Toy(LightningDataModule):
    input_size, num_classes = 2, 3

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(24, 4, 2, generator=generator), torch.randint(0, 3, (24,), generator=generator))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    val_dataloader = train_dataloader


def _fit(tmp_path, progress, epochs=2):
    torch.manual_seed(0)
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=4, input_norm="ln", recurrent_norm="ln", cell_norm="ln"))
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_model_summary=False, max_epochs=epochs, accelerator="cpu",
        callbacks=[progress, ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, Toy())
    return trainer, model


def _bar_width(metrics: dict, bar_format: str | None = None) -> tuple[str, int]:
    """The line tqdm draws at batch 500 of 1200 of epoch 3 in 80 columns, and its bar's width."""
    postfix = ", ".join(f"{name}={Tqdm.format_num(value)}" for name, value in metrics.items())
    line = Tqdm.format_meter(500, 1200, 250.0, ncols=80, prefix="Epoch 3", postfix=postfix, bar_format=bar_format)
    bar = re.search(r"\|(.*)\|", line).group(1)
    return line, len(bar)


def test_the_compact_bar_keeps_the_monitored_metric_and_a_bar_in_80_columns(tmp_path):
    bar = CompactProgressBar()
    trainer, model = _fit(tmp_path, bar)
    shown = bar.get_metrics(trainer, model)
    assert list(shown) == ["loss", "val/acc"]
    assert bar.init_train_tqdm().bar_format == BAR_FORMAT
    line, width = _bar_width(shown, BAR_FORMAT)
    assert len(line) <= 80 and "val/acc=" in line and width >= 10, line
    # Lightning's own bar, for the same run: the bar collapses (the issue's `|█|`).
    default = TQDMProgressBar().get_metrics(trainer, model)
    assert _bar_width(default)[1] <= 3


def test_lines_write_one_line_per_epoch(tmp_path, capsys):
    _fit(tmp_path, EpochLines(), epochs=3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"epoch {epoch}/3  loss [0-9.]+  val/acc [0-9.]+  \([0-9.]+ s\)", line), line
