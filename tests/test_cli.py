"""The ``rnorm`` command line: its own commands and the LightningCLI front door."""

import logging
import re
import subprocess
import sys

import pytest
import torch
import yaml

import rnorm
import rnorm.data
from rnorm import norms
from rnorm.cli import is_user_error, main


def test_normalizers_lists_every_registered_strategy_with_its_description(capsys):
    assert main(["normalizers"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert listed == norms.available()
    assert {"none", "bn", "seqbn", "ln", "wn", "normprop"} <= set(listed)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert rnorm.__version__ in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "normalizers" in capsys.readouterr().err


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "x.yaml"])
    assert exit_info.value.code != 0
    assert "train" in capsys.readouterr().err


def test_python_dash_m_rnorm():
    result = subprocess.run([sys.executable, "-m", "rnorm", "normalizers"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "normprop" in result.stdout


# -- fast commands ---------------------------------------------------------------------------------
def test_help_version_and_configs_import_neither_torch_nor_lightning_and_normalizers_no_lightning():
    code = (
        "import sys\nfrom rnorm.cli import main\n"
        "main(['--help']); main(['--version']); main(['configs'])\n"
        "print('after help:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))\n"
        "main(['normalizers'])\n"
        "print('after normalizers:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "after help: []" in result.stdout and "after normalizers: ['torch']" in result.stdout


# -- errors: one message, the traceback on request ---------------------------------------------------
def _raise(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_user_errors_are_rnorms_own_checks():
    from rnorm.data.idx import IDXFormatError

    assert not is_user_error(_raise(ValueError("raised outside rnorm")))  # here, in a test file
    with pytest.raises(IDXFormatError) as inside:
        rnorm.data.read_idx(__file__)
    assert is_user_error(inside.value)
    assert not is_user_error(_raise(RuntimeError("a bug")))


def test_debug_flag_and_variable_show_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "nosuch.yaml"]) == 1
    assert "rnorm: error: No configuration file 'nosuch.yaml'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nosuch.yaml"):
        main(["fit", "--config", "nosuch.yaml", "--debug"])
    monkeypatch.setenv("RNORM_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nosuch.yaml"):
        main(["fit", "--config", "nosuch.yaml"])


# -- discoverability -----------------------------------------------------------------------------
def test_short_class_names_resolve(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    args = ["fit", "--model", "SequenceClassifier", "--model.encoder", "NormLSTM", "--model.encoder.hidden_size", "8",
            "--data", "SequentialMNISTDataModule", "--data.mode", "row", "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "rnorm.tasks.SequenceClassifier"
    assert config["model"]["init_args"]["encoder"]["class_path"] in ("rnorm.NormLSTM", "rnorm.nn.NormLSTM")
    assert config["data"]["class_path"] == "rnorm.data.SequentialMNISTDataModule"


def test_fit_help_lists_rnorms_tasks_and_data_modules(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    listed = " ".join(capsys.readouterr().out.split())  # help text is wrapped at any space
    for name in ("SequenceClassifier", "CharLanguageModel", "AttentiveReader", "DRAW"):
        assert f"rnorm.tasks.{name}" in listed
    for name in ("SequentialMNISTDataModule", "CharLMDataModule", "QADataModule", "BinarizedMNISTDataModule"):
        assert f"rnorm.data.{name}" in listed


# -- checkpoints ---------------------------------------------------------------------------------
def test_a_crafted_checkpoint_runs_no_code_in_rnorm_test(crafted_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    path, marker = crafted_checkpoint
    assert main(["test", "--config", "quickstart", "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"'{path}' is not a valid rnorm/Lightning checkpoint" in err and "weights_only=False" not in err
    assert "Traceback" not in err


def test_a_corrupt_checkpoint_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(b"\x00" * 100)
    assert main(["validate", "--config", "quickstart", "--ckpt_path", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"'{path}' is not a valid rnorm/Lightning checkpoint" in err and "weights_only" not in err


# -- a run, its folder, its output, its predictions ------------------------------------------------
QUICK = [
    "--config", "quickstart", "--model.init_args.encoder.init_args.hidden_size", "8",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--population_statistics.num_batches", "2",
]  # fmt: skip


def test_runs_without_logger_keep_their_config_beside_their_checkpoints(tmp_path, monkeypatch, capsys, caplog, one_thread):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    root = tmp_path / "root"
    common = [*QUICK, "--trainer.logger", "false", "--trainer.default_root_dir", str(root)]
    caplog.set_level(logging.DEBUG)
    assert main(["fit", *common]) == 0
    out = capsys.readouterr().out
    assert main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"]) == 0
    for version, epochs in ((0, 1), (1, 2)):
        folder = root / f"version_{version}"
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == epochs
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == epochs - 1
    # Output: one line per epoch (stdout is not a terminal here); notices and per-epoch messages as logs.
    assert re.search(r"^epoch 1/1  loss [0-9.]+  val/acc [0-9.]+  \(", out, flags=re.MULTILINE), out
    assert "Population statistics" not in out
    assert "GPU available" in caplog.text and "TPU available" not in caplog.text and "💡" not in caplog.text
    assert "Population statistics re-estimated from 2 training batches" in caplog.text  # a debug record

    # Predictions of the first run's model: a file in the predicting run's own folder.
    checkpoint = root / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["predict", *common, "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "2"]) == 0
    written = root / "version_2" / "predictions.pt"
    assert f"Predictions for 100 examples written to {written}" in capsys.readouterr().out
    predictions = torch.load(written, weights_only=True)
    assert predictions["probabilities"].shape == (100, 10) and predictions["index"].tolist() == list(range(100))


def test_a_failed_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    root = tmp_path / "root"
    (root / "lightning_logs" / "version_0").mkdir(parents=True)  # an earlier run's: kept
    args = ["fit", *QUICK, "--trainer.default_root_dir", str(root), "--data.init_args.data_dir", str(tmp_path / "none")]
    assert main(args) == 1
    assert "MNIST files missing" in capsys.readouterr().err
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    assert main([*args[:-4], "--trainer.default_root_dir", str(tmp_path / "new"), *args[-2:]]) == 1
    assert not (tmp_path / "new").exists()
