"""The ``rnorm`` command line as it stands: listing strategies, version, no fake commands."""

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
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert rnorm.__version__ in capsys.readouterr().out


def test_commands_that_do_not_exist_yet_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "x.yaml"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "normalizers" in capsys.readouterr().err


def test_python_dash_m_rnorm():
    result = subprocess.run([sys.executable, "-m", "rnorm", "normalizers"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "normprop" in result.stdout
