"""PopulationStatistics (exact vs running) and EpochSeed inside a Lightning run."""

import functools

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from rnorm import NormLSTM
from rnorm.callbacks import EpochSeed, PopulationStatistics
from rnorm.tasks import SequenceClassifier


class Sequences(LightningDataModule):
    input_size, num_classes = 3, 2

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 5, 3, generator=generator), torch.randint(0, 2, (40,), generator=generator)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    val_dataloader = train_dataloader


def _fit(tmp_path, callbacks, max_epochs=1):
    torch.manual_seed(0)
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=4, initial_state_noise=0.1))
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_epochs=max_epochs, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, Sequences())
    return model


def test_exact_mode_replaces_running_averages_with_the_average_of_n_batches(tmp_path):
    model = _fit(tmp_path, [PopulationStatistics(mode="exact", num_batches=3)])
    for norm in (model.encoder.cells[0].input_norm, model.encoder.cells[0].recurrent_norm):
        # 5 training batches updated the running averages; the estimate reset and counted 3.
        assert (norm.num_batches_tracked == 3).all()
        assert norm.momentum == 0.1  # restored after the estimate


def test_running_mode_keeps_the_training_averages(tmp_path):
    model = _fit(tmp_path, [PopulationStatistics(mode="running")])
    assert (model.encoder.cells[0].recurrent_norm.num_batches_tracked == 5).all()


def test_num_batches_must_be_positive():
    with pytest.raises(ValueError, match="num_batches >= 1"):
        PopulationStatistics(num_batches=0)


class RecordFirstNoise(Callback):
    def __init__(self) -> None:
        self.draws = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after EpochSeed (registered first), before the model draws any noise
            self.draws[trainer.current_epoch] = torch.get_rng_state().clone()


class ConsumeRandomness(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        torch.rand(123)  # as an extra evaluation or a resumed run's restore would


@pytest.mark.parametrize("reseed", [True, False])
def test_epoch_seed_makes_each_epoch_independent_of_earlier_randomness(tmp_path, reseed):
    first, second = RecordFirstNoise(), RecordFirstNoise()
    seeding = [EpochSeed(seed=5)] if reseed else []
    _fit(tmp_path, [*seeding, first], max_epochs=2)
    _fit(tmp_path, [*seeding, second, ConsumeRandomness()], max_epochs=2)
    # Without EpochSeed the extra draws at the end of epoch 0 shift everything after them.
    assert torch.equal(first.draws[1], second.draws[1]) == reseed
    assert not torch.equal(first.draws[0], first.draws[1])  # every epoch has its own stream
