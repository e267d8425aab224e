"""Loading a checkpoint never runs code from it, and a broken one gets a message naming the file."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from rnorm import NormLSTM
from rnorm.utils.checkpoint import CheckpointError, load_checkpoint, task_globals


def test_a_crafted_pickle_runs_nothing_and_the_error_names_the_file(crafted_checkpoint):
    path, marker = crafted_checkpoint
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "_touch" in message  # what it refused to load
    assert "weights_only=False" not in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_a_corrupt_file_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a valid rnorm/Lightning checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "weights_only" not in str(error.value)


def test_a_truncated_checkpoint_is_not_a_checkpoint(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_checkpoint(tmp_path / "nowhere.ckpt")


def test_tensors_load_and_a_tasks_factories_only_when_allowed(tmp_path):
    path = tmp_path / "python.ckpt"
    saved = {"state_dict": {"w": torch.arange(3.0)}, "hyper_parameters": {
        "encoder": functools.partial(NormLSTM, hidden_size=4), "optimizer": torch.optim.Adam,
    }}  # fmt: skip
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="functools.partial"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, allow=task_globals())
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert loaded["hyper_parameters"]["encoder"].func is NormLSTM
    assert loaded["hyper_parameters"]["optimizer"] is torch.optim.Adam
    assert os.listdir(tmp_path) == ["python.ckpt"]
