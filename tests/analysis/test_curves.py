"""`rnorm analyze curves`: learning curves read from TensorBoard event files and Lightning CSV logs
that the tests write themselves, named by the runs' configs."""

import csv

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.tensorboard import SummaryWriter

from rnorm.analysis.curves import find_log_dirs, read_curve, run
from rnorm.cli import main


def _config(log_dir, root):
    """The config.yaml that rnorm fit saves beside its logs (only the key the names come from)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"default_root_dir": root}}))


def _tensorboard_run(folder, root, values, start=1000.0, seconds_per_update=2.0):
    """A TensorBoard log as Lightning writes it: version_0/events.out.tfevents.*, wall times chosen.

    ``values`` maps updates to values; Lightning logs the value after k updates at step k - 1.
    """
    log_dir = folder / "lightning_logs" / "version_0"
    _config(log_dir, root)
    writer = SummaryWriter(str(log_dir))
    writer.add_scalar("train/loss_step", 2.3, 49, walltime=start)  # the first value of the run
    for updates, value in values.items():
        writer.add_scalar("val/acc", value, updates - 1, walltime=start + seconds_per_update * (updates - 50))
    writer.close()
    return log_dir


def _csv_run(folder, root, values):
    """A Lightning CSVLogger log: version_0/metrics.csv, blank where a metric was not logged."""
    logger = CSVLogger(str(folder), name="lightning_logs", version=0)
    for updates, value in values.items():
        logger.log_metrics({"train/loss_step": 1.0}, step=updates - 2)
        logger.log_metrics({"val/acc": value}, step=updates - 1)
    logger.save()
    _config(folder / "lightning_logs" / "version_0", root)
    return folder / "lightning_logs" / "version_0"


@pytest.fixture
def two_runs(tmp_path):
    bn = _tensorboard_run(tmp_path / "a", "runs/pmnist-bnlstm", {250: 0.5, 500: 0.75, 1000: 0.875})
    plain = _csv_run(tmp_path / "b", "runs/pmnist-lstm", {250: 0.25, 500: 0.375, 750: 0.5})
    return tmp_path, bn, plain


def test_both_kinds_of_log_become_named_curves_with_a_table(two_runs):
    tmp_path, _, _ = two_runs
    paths = run(tmp_path / "out", [tmp_path / "a", tmp_path / "b"], "val/acc", at_updates=[250, 500, 1000])
    assert [p.name for p in paths] == ["curves_val_acc.csv", "curves_val_acc.png", "curves_val_acc.md"]
    with open(paths[0]) as f:
        rows = [
            (r["run"], int(r["step"]), int(r["updates"]), float(r["value"]), r["wall_time_s"]) for r in csv.DictReader(f)
        ]
    # Values chosen exact in float32 (TensorBoard stores float32); wall times relative to the run's
    # first value of any tag (the loss at step 49, t = 1000 s), then 2 s per update.
    assert rows == [
        ("pmnist-bnlstm", 249, 250, 0.5, "400.0"),
        ("pmnist-bnlstm", 499, 500, 0.75, "900.0"),
        ("pmnist-bnlstm", 999, 1000, 0.875, "1900.0"),
        ("pmnist-lstm", 249, 250, 0.25, ""),
        ("pmnist-lstm", 499, 500, 0.375, ""),
        ("pmnist-lstm", 749, 750, 0.5, ""),
    ]
    table = paths[2].read_text().splitlines()
    assert table[0] == "| run | val/acc after 250 | val/acc after 500 | val/acc after 1000 |"
    assert table[2:] == ["| pmnist-bnlstm | 0.5 | 0.75 | 0.875 |", "| pmnist-lstm | 0.25 | 0.375 | – |"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_event_files_win_over_a_csv_log_in_the_same_folder(tmp_path):
    log_dir = _tensorboard_run(tmp_path, "runs/x", {250: 0.5})
    (log_dir / "metrics.csv").write_text("epoch,step,val/acc\n0,250,0.125\n")
    assert find_log_dirs(tmp_path) == [log_dir]
    curve = read_curve(log_dir, "val/acc")
    assert (curve.updates, curve.values, curve.name) == ([250], [0.5], "x")


def test_names_without_a_config_are_the_folders_and_duplicates_get_their_version(tmp_path):
    for version in ("version_0", "version_1"):
        log_dir = tmp_path / "lightning_logs" / version
        log_dir.mkdir(parents=True)
        (log_dir / "metrics.csv").write_text("epoch,step,val/bpc\n0,250,2.5\n")
        _config(log_dir, "runs/ptb-bnlstm")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.csv").write_text("epoch,step,val/bpc\n0,250,3.0\n")
    paths = run(tmp_path / "out", [tmp_path], "val/bpc", plot=False)
    with open(paths[0]) as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["ptb-bnlstm (version_0)", "ptb-bnlstm (version_1)", "plain"]


def test_a_missing_metric_or_wrong_names_are_clear_errors(two_runs):
    tmp_path, bn, plain = two_runs
    with pytest.raises(ValueError, match=r"Run 'pmnist-bnlstm' .* logged no 'val/bpc'; its scalars are \['train/loss_step', 'val/acc'\]"):
        read_curve(bn, "val/bpc")
    with pytest.raises(ValueError, match=r"Run 'pmnist-lstm' .* logged no 'val/bpc'; its columns are"):
        read_curve(plain, "val/bpc")
    with pytest.raises(ValueError, match=r"Expected one name per log directory, 2 .* but got 1 names"):
        run(tmp_path / "out", [tmp_path / "a", tmp_path / "b"], "val/acc", names=["only"], plot=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Found no TensorBoard event files or metrics.csv"):
        run(tmp_path / "out", [tmp_path / "empty"], "val/acc", plot=False)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        find_log_dirs(tmp_path / "nowhere")


def test_command_line(two_runs, capsys):
    tmp_path, _, _ = two_runs
    out = tmp_path / "out"
    argv = ["analyze", "curves", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "val/acc",
            "--names", "BN-LSTM", "LSTM", "--output_dir", str(out), "--no_plot"]
    assert main(argv) == 0
    assert f"wrote {out / 'curves_val_acc.csv'}" in capsys.readouterr().out
    with open(out / "curves_val_acc.csv") as f:
        assert sorted({r["run"] for r in csv.DictReader(f)}) == ["BN-LSTM", "LSTM"]
    assert sorted(p.name for p in out.iterdir()) == ["curves_val_acc.csv"]
