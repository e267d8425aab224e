"""Checkpoints: a resumed run reaches what an uninterrupted one does; `rnorm test` in a fresh process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rnorm.lightning_cli import RnormCLI

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_train_batches": 6,
        "limit_val_batches": 3,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": 1.0,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "save_top_k": -1, "filename": "{epoch}"},
            }
        ],
    },
    "model": {
        "class_path": "rnorm.tasks.SequenceClassifier",
        "init_args": {
            "encoder": {
                "class_path": "rnorm.nn.NormLSTM",
                # bn everywhere with initial-state noise and dropout: every source of randomness
                # a resumed run must reproduce.
                "init_args": {"hidden_size": 12, "num_layers": 2, "dropout": 0.2, "initial_state_noise": 0.1},
            },
            "optimizer": {"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.003, "momentum": 0.9}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.99}},
        },
    },
    "data": {
        "class_path": "rnorm.data.SequentialMNISTDataModule",
        "init_args": {"mode": "row", "permute": True, "permutation_seed": 1, "batch_size": 16, "val_size": 100},
    },
    "population_statistics": {"mode": "exact", "num_batches": 2},
}


def _run(tmp_path: Path, name: str, *args: str, **overrides) -> RnormCLI:
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"]["default_root_dir"] = str(tmp_path / name)
    config["trainer"].update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    from rnorm import norms

    norms.available()
    return RnormCLI(
        args=[*args[:1], "--config", str(path), *args[1:]],
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )


def test_resumed_run_reaches_the_same_model_as_an_uninterrupted_one(tmp_path):
    straight = _run(tmp_path, "straight", "fit", max_epochs=3)
    _run(tmp_path, "first", "fit", max_epochs=1)
    checkpoint = tmp_path / "first" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _run(tmp_path, "resumed", "fit", "--ckpt_path", str(checkpoint), max_epochs=3)

    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        # Same operations on the same data in the same order on one CPU: bitwise equal.
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    for metric in ("val/loss", "val/acc"):
        assert float(resumed.trainer.callback_metrics[metric]) == float(straight.trainer.callback_metrics[metric])


def test_test_in_a_fresh_process_uses_everything_the_checkpoint_carries(tmp_path):
    fitted = _run(tmp_path, "fit", "fit", max_epochs=1)
    checkpoint = tmp_path / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    in_process = fitted.trainer.test(fitted.model, datamodule=fitted.datamodule, ckpt_path=str(checkpoint), verbose=False)[0]

    # A fresh process, and a config that asks for another permutation: the checkpoint's wins.
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["data"]["init_args"]["permutation_seed"] = 7
    config["trainer"]["default_root_dir"] = str(tmp_path / "test")
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "rnorm", "test", "--config", str(path), "--ckpt_path", str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "permutation" in output  # the warning that the checkpoint's permutation is used
    accuracy = float(re.search(r"test/acc\s+([0-9.]+)", output).group(1))
    assert accuracy == pytest.approx(in_process["test/acc"], abs=1e-6)
