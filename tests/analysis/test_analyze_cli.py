"""`rnorm analyze`: its subcommands, output files, and the message when matplotlib is missing."""

import csv
import sys

import pytest

from rnorm.analysis.output import MATPLOTLIB_MISSING, require_pyplot
from rnorm.cli import main


def test_analyze_lists_the_four_analyses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("gradient-flow", "tanh-derivative", "population-stats", "normprop-gradient"):
        assert name in out


def test_analyze_writes_the_numbers_and_says_where(tmp_path, capsys):
    assert main(["analyze", "tanh-derivative", "--output_dir", str(tmp_path), "--sigmas", "0", "0.5", "1", "--no_plot"]) == 0
    path = tmp_path / "tanh_derivative.csv"
    assert f"wrote {path}" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert [float(row["sigma"]) for row in rows] == [0.0, 0.5, 1.0]
    assert float(rows[0]["mean"]) == 1.0  # tanh'(0) = 1 exactly
    assert not list(tmp_path.glob("*.png"))


def test_missing_matplotlib_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"pip install rnorm\[plots\]") as error:
        require_pyplot()
    assert str(error.value) == MATPLOTLIB_MISSING


@pytest.mark.parametrize("analysis", [["tanh-derivative"], ["normprop-gradient", "--gammas", "1", "--gamma_c", "1"]])
def test_without_matplotlib_the_command_ends_with_one_message_naming_both_ways_out(analysis, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["analyze", *analysis, "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "pip install rnorm[plots]" in err and "--no_plot" in err and err.startswith("rnorm: error: ")


def test_options_are_spelled_with_underscores_and_dashes_still_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "population-stats", "--help"])
    usage = capsys.readouterr().out
    assert "--ckpt_path" in usage and "--output_dir" in usage and "--no_plot" in usage and "--max_sites" in usage
    assert "--output-dir" not in usage
    for spelling in (["--output_dir", str(tmp_path / "a"), "--no_plot"], ["--output-dir", str(tmp_path / "b"), "--no-plot"],
                     [f"--output-dir={tmp_path / 'c'}", "--no-plot"]):  # fmt: skip
        assert main(["analyze", "tanh-derivative", "--sigmas", "0", *spelling]) == 0
    assert [sorted(p.name for p in (tmp_path / d).iterdir()) for d in "abc"] == [["tanh_derivative.csv"]] * 3


def test_analyze_without_a_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze"])
    assert exit_info.value.code == 2
