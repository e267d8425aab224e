"""Configurations by name: ``rnorm fit --config pmnist/bnlstm`` from anywhere; a file path wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnorm import config_files
from rnorm.cli import main

REPOSITORY_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_yaml_of_the_repository_is_installed_under_its_name():
    names = {path.relative_to(REPOSITORY_CONFIGS).with_suffix("").as_posix() for path in REPOSITORY_CONFIGS.rglob("*.yaml")}
    assert set(config_files.available()) == names
    for name in names:
        assert config_files.find(name).read_bytes() == (REPOSITORY_CONFIGS / f"{name}.yaml").read_bytes()


@pytest.mark.parametrize("spelling", ["pmnist/bnlstm", "pmnist/bnlstm.yaml", "configs/pmnist/bnlstm.yaml", "./configs/pmnist/bnlstm.yaml"])
def test_a_name_may_be_spelled_as_in_the_headers(spelling):
    assert config_files.find(spelling) == config_files.find("pmnist/bnlstm") is not None


@pytest.mark.parametrize("name", ["nosuch", "../setup", "pmnist", "/etc/passwd"])
def test_not_a_configuration(name):
    assert config_files.find(name) is None


def test_a_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("model: {}\n")  # a file called like a configuration
    args = ["fit", "--config", "quickstart", "-c", "pmnist/bnlstm", "--config=mnist/lstm", "--trainer.max_epochs", "1"]
    resolved = config_files.resolve_config_arguments(args)
    assert resolved == [
        "fit", "--config", "quickstart", "-c", str(config_files.find("pmnist/bnlstm")),
        f"--config={config_files.find('mnist/lstm')}", "--trainer.max_epochs", "1",
    ]  # fmt: skip


def test_neither_file_nor_name_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "nosuch.yaml"]) == 1
    err = capsys.readouterr().err
    assert "No configuration file 'nosuch.yaml', and no installed configuration of that name" in err
    assert "rnorm configs" in err and "Traceback" not in err


def test_configs_command_lists_and_prints(capsys):
    assert main(["configs"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert set(listed) == set(config_files.available()) and "quickstart" in listed
    assert listed["pmnist/bnlstm"].startswith("BN-LSTM on permuted sequential MNIST")
    assert main(["configs", "configs/pmnist/bnlstm.yaml"]) == 0
    assert capsys.readouterr().out == (REPOSITORY_CONFIGS / "pmnist" / "bnlstm.yaml").read_text()
    assert main(["configs", "nosuch"]) == 1
    assert "No installed configuration named 'nosuch'. Available names: draw/baseline" in capsys.readouterr().err
