"""benchmarks/rnn_speed.py: the JSON it writes and its errors, on tiny shapes."""

import contextlib
import importlib.util
import json
import math
from pathlib import Path

import pytest

from rnorm import norms
from rnorm.kernels import native

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rnn_speed.py"
TINY = ["--steps-scale", "0.02", "--batch-scale", "0.125", "--repeats", "2", "--warmup", "1", "--shapes", "ptb"]


def _load_script(path: Path):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rnn_speed():
    return _load_script(SCRIPT)


def test_writes_a_row_per_norm_and_mode_with_consistent_ratios(rnn_speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert rnn_speed.main([*TINY, "--norms", "none,bn,wn,seqbn", "--modes", "train,infer", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"platform", "cpu", "torch", "threads", "device", "device_name"} <= set(report["machine"])
    assert report["date"] and report["machine"]["device"] == "cpu"
    rows = {(r["norm"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(n, m) for n in ("none", "bn", "wn", "seqbn") for m in ("train", "infer")}
    assert len(report["results"]) == len(rows)
    for row in report["results"]:
        assert (row["shape"], row["T"], row["B"], row["D"], row["H"]) == ("ptb", 2, 8, 50, 1000)
        for key in ("normlstm_ms", "lstm_ms", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0
        assert row["ratio"] == pytest.approx(row["normlstm_ms"] / row["lstm_ms"])
        assert row["peak_mb"] is None  # CPU: no per-call peak statistic
    assert rows["none", "train"]["sites"] == "none/none/none"
    assert rows["bn", "train"]["sites"] == "bn/bn/bn"
    assert rows["wn", "train"]["sites"] == "wn/wn/none"
    assert rows["seqbn", "train"]["sites"] == "seqbn/bn/bn"  # BN-e*
    assert "ratio" in capsys.readouterr().out


def test_all_means_every_registered_strategy(rnn_speed):
    args = rnn_speed.parse_args(["--norms", "all"])
    assert args.norms == list(norms.available())


@pytest.mark.parametrize(
    ("argv", "listed"),
    [(["--norms", "none,nosuchnorm"], ", ".join(norms.available())), (["--shapes", "imagenet"], "pmnist, ptb, text8")],
)
def test_unknown_names_exit_listing_the_known_ones(rnn_speed, capsys, argv, listed):
    with pytest.raises(SystemExit) as exit_info:
        rnn_speed.main([*TINY, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown" in err and listed in err


def test_last_step_loss_and_the_configs_initialization(rnn_speed, tmp_path):
    """The sequential-MNIST workload: loss on the last output only, weights initialized as the
    configs do (nn.LSTM gets the same ones), inputs in [0, 1]; recorded in every row."""
    out = tmp_path / "speed.json"
    argv = [*TINY, "--norms", "none", "--modes", "train", "--loss", "last", "--init", "config", "--input", "uniform", "--json", str(out)]
    assert rnn_speed.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert (row["norm"], row["shape"], row["mode"], row["loss"], row["init"], row["input"]) == ("none", "ptb", "train", "last", "config", "uniform")
    assert report["settings"]["loss"] == "last" and math.isfinite(row["ratio"])
    init = rnn_speed.config_init()
    assert init and set(init) <= set(rnn_speed.INIT_KEYS)


def test_several_implementations_interleaved_and_another_hidden_size(rnn_speed, tmp_path):
    """``--impl fused,cudnn``: one row per implementation, against the same nn.LSTM timings, every
    timed call kept; ``--hidden`` replaces the shape's H."""
    out = tmp_path / "speed.json"
    argv = [*TINY, "--norms", "none", "--modes", "train", "--impl", "fused,cudnn", "--hidden", "16", "--json", str(out)]
    assert rnn_speed.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["impl"] for row in rows] == ["fused", "cudnn"]
    assert all(row["H"] == 16 and len(row["normlstm_all_ms"]) == 2 for row in rows)
    assert rows[0]["lstm_all_ms"] == rows[1]["lstm_all_ms"]


def test_unknown_impl_exits_listing_the_known_ones(rnn_speed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rnn_speed.main([*TINY, "--impl", "fused,cuda"])
    assert exit_info.value.code == 2
    assert "unknown impl ['cuda']; known: cudnn, fused, fused_native, fused_torch, reference, triton" in capsys.readouterr().err


DENORMALS = Path(__file__).resolve().parents[1] / "benchmarks" / "denormals.py"


@pytest.fixture(scope="module")
def denormals():
    return _load_script(DENORMALS)


def test_denormals_times_each_variant_and_disables_only_the_kernels_flushing(denormals, tmp_path, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        yield

    monkeypatch.setattr(native, "denormals_flushed", counting)
    out = tmp_path / "denormals.json"
    argv = ["--steps", "4", "--batch", "3", "--hidden", "8", "--repeats", "2", "--warmup", "0", "--norms", "bn"]
    assert denormals.main([*argv, "--json", str(out)]) == 0
    times = json.loads(out.read_text())["layers_ms"]["bn"]
    assert set(times) == {"normlstm_kernels_flush", "normlstm_no_flush", "lstm_last", "lstm_sum", "lstm_last_process_flush"}
    assert all(value > 0 for value in times.values())
    # Only the shipped variant's two calls go through the op's flushing, once forward and once
    # backward each (the disabled variant and nn.LSTM never do), and the patch is undone after.
    assert len(entered) == 4
    assert native.denormals_flushed is counting


@pytest.mark.parametrize("argv", [["--fit-steps", "40,10"], ["--fit-steps", "10"], ["--repeats", "0"], ["--norms", "nope"]])
def test_denormals_refuses_bad_options(denormals, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        denormals.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
