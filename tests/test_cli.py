"""The ``rnorm`` command line: its own commands and the LightningCLI front door."""

import subprocess
import sys

import pytest

import rnorm
from rnorm import norms
from rnorm.cli import main


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
