"""The short last training batch: never handed to a batch-statistics model unless asked for."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Trainer

from rnorm import NormLSTM
from rnorm.data import BinarizedMNISTDataModule, CharLMDataModule, SequentialMNISTDataModule
from rnorm.data.batching import TrainingBatchSampler, last_batch_policy
from rnorm.tasks import SequenceClassifier


@pytest.mark.parametrize(
    ("count", "batch_size", "drop_last", "merge_last", "sizes"),
    [
        (7, 3, False, False, [3, 3, 1]),
        (7, 3, True, False, [3, 3]),
        (7, 3, False, True, [3, 4]),
        (6, 3, False, True, [3, 3]),  # nothing short: nothing merged
        (2, 3, False, True, [2]),  # the only batch is short: nothing to merge it into
        (2, 3, True, False, []),
        (0, 3, False, True, []),
    ],
)
def test_batches_keep_every_example_in_order_unless_dropped(count, batch_size, drop_last, merge_last, sizes):
    sampler = TrainingBatchSampler(range(count), batch_size, drop_last=drop_last, merge_last=merge_last)
    batches = list(sampler)
    assert [len(batch) for batch in batches] == sizes
    assert len(sampler) == len(sizes)
    assert sum(batches, []) == list(range(sum(sizes)))


def test_drop_and_merge_exclude_each_other():
    with pytest.raises(ValueError, match="at most one of drop_last and merge_last"):
        TrainingBatchSampler(range(4), 3, drop_last=True, merge_last=True)


def _attached(data, **encoder):
    """``data`` attached to a trainer of a classifier with the given encoder options, as during ``fit``."""
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=4, **encoder), input_size=28, num_classes=10)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    data.trainer = trainer
    return data


def test_auto_merges_for_batch_statistics_and_keeps_otherwise():
    assert last_batch_policy("auto", None) == "keep"  # outside a trainer
    bn = _attached(SequentialMNISTDataModule(mode="row"), input_norm="bn", recurrent_norm="bn", cell_norm="bn")
    seqbn = _attached(SequentialMNISTDataModule(mode="row"), input_norm="seqbn", recurrent_norm="none", cell_norm="none")
    ln = _attached(SequentialMNISTDataModule(mode="row"), input_norm="ln", recurrent_norm="ln", cell_norm="ln")
    assert last_batch_policy("auto", bn.trainer) == last_batch_policy("auto", seqbn.trainer) == "merge"
    assert last_batch_policy("auto", ln.trainer) == "keep"
    assert last_batch_policy("drop", bn.trainer) == "drop" and last_batch_policy("keep", bn.trainer) == "keep"


def test_the_issue_case_5001_images_in_batches_of_50_ends_with_no_single_image():
    # rnorm fit --config configs/quickstart.yaml --data.init_args.val_size 999: 5,001 training images.
    data = _attached(SequentialMNISTDataModule(mode="row", val_size=999, batch_size=50), recurrent_norm="bn")
    data.setup("fit")
    loader = data.train_dataloader()
    sizes = [len(y) for _, y in loader]
    assert sizes == [50] * 99 + [51] and len(loader) == 100
    data.last_batch = "keep"
    assert [len(y) for _, y in data.train_dataloader()][-1] == 1


@pytest.mark.parametrize("make", [
    lambda: BinarizedMNISTDataModule(source="mnist", val_size=5995, batch_size=2),
    lambda: SequentialMNISTDataModule(mode="row", val_size=5995, batch_size=2),
])  # fmt: skip
def test_every_module_with_the_option_merges(make):
    data = _attached(make(), cell_norm="bn")
    data.setup("fit")
    first = lambda batch: batch[0] if isinstance(batch, (list, tuple)) else batch  # noqa: E731 - images, or (x, y)
    assert [len(first(batch)) for batch in data.train_dataloader()] == [2, 3]


def test_char_lm_merges(tmp_path):
    (tmp_path / "book.txt").write_text("abcdefgh" * 6)  # 48 characters: 47 predictions, 9 windows of 5
    data = CharLMDataModule("text", data_dir=str(tmp_path), files=["book.txt"], split=(1.0, 0.0, 0.0), seq_length=5,
                            batch_size=4)  # fmt: skip
    _attached(data, input_norm="bn")
    assert [len(batch[0]) for batch in data.train_dataloader()] == [4, 5]


def test_fit_with_bn_on_a_last_batch_of_one(tmp_path):
    """Fails before the fix: 5 training images in batches of 4 leave one image, which bn refuses."""
    torch.manual_seed(0)
    data = SequentialMNISTDataModule(mode="row", val_size=5995, batch_size=4)
    model = SequenceClassifier(functools.partial(NormLSTM, hidden_size=4))  # bn on every site by default
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, data)
    assert trainer.state.finished and trainer.global_step == 1  # one merged batch of 5


def test_unknown_value_is_refused():
    with pytest.raises(ValueError, match=r"Expected last_batch to be one of \('auto', 'keep', 'merge', 'drop'\)"):
        SequentialMNISTDataModule(last_batch="sometimes")
