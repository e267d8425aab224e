"""Learning curves of several runs: one logged metric against updates, one line per run.

Reads what ``rnorm fit`` writes: TensorBoard event files (``events.out.tfevents.*``, Lightning's
default logger) and Lightning CSV logs (``metrics.csv`` of ``CSVLogger``). Each log directory
found under the given folders is one run, named by its configuration: the last component of
``trainer.default_root_dir`` in the ``config.yaml`` that ``rnorm fit`` saves beside the logs
(``pmnist-bnlstm`` for ``configs/pmnist/bnlstm.yaml``), else the folder's name. A log directory
with both kinds of log is read from its event files, which also hold the wall time of each value.

**Updates.** Lightning logs a value with ``step`` one less than the number of batches trained
when it is logged: the loss of the 50th training batch at step 49, the validation after 250 updates
at step 249 (to share the step of the last training batch). The curves count ``updates = step + 1``:
the validation after 250 updates is at 250.

Writes ``curves_<metric>.csv`` (``run, step, updates, value, wall_time_s``: seconds since the run's
first logged value, empty for CSV logs), ``curves_<metric>.png`` and, with ``--at_updates``,
``curves_<metric>.md``: a Markdown table of each run's value at those updates.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.utils.atomic import atomic_write_bytes

__all__ = ["Curve", "add_parser", "find_log_dirs", "read_curve", "run", "run_name"]

EVENT_GLOB = "events.out.tfevents.*"
CSV_LOG = "metrics.csv"


@dataclass
class Curve:
    """One run's values of one metric, in logged order.

    Attributes:
        name: the run's name.
        steps: the logged step of each value (Lightning's ``step``: the updates made, minus one).
        values: the metric's values.
        wall_times: seconds since the run's first logged value of any tag, or ``None`` (CSV logs).
    """

    name: str
    steps: list[int]
    values: list[float]
    wall_times: list[float] | None

    @property
    def updates(self) -> list[int]:
        """The updates made when each value was logged: ``step + 1`` (see the module docstring)."""
        return [step + 1 for step in self.steps]

    def value_at(self, updates: int) -> float | None:
        """The value logged after ``updates`` updates (the last one if several), or ``None``."""
        found = [value for u, value in zip(self.updates, self.values) if u == updates]
        return found[-1] if found else None


def find_log_dirs(folder: str | Path) -> list[Path]:
    """The log directories under ``folder`` (itself included): those holding event files or ``metrics.csv``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Expected a folder of training logs, but {folder} is not a folder.")
    files = [*folder.rglob(EVENT_GLOB), *folder.rglob(CSV_LOG)]
    return sorted({path.parent for path in files})


def run_name(log_dir: Path) -> str:
    """The run's name: ``trainer.default_root_dir``'s last component in ``config.yaml``, else the folder's name."""
    config_path = log_dir / "config.yaml"
    if config_path.is_file():
        with open(config_path) as handle:
            config = yaml.safe_load(handle) or {}
        root = (config.get("trainer") or {}).get("default_root_dir")
        if root:
            return Path(str(root)).name
    return log_dir.name


def read_curve(log_dir: Path, metric: str, name: str | None = None) -> Curve:
    """``metric`` as logged in ``log_dir``: from its event files if it has any, else from ``metrics.csv``.

    Raises:
        ValueError: the run never logged ``metric`` (the message lists the metrics it has).
    """
    name = run_name(log_dir) if name is None else name
    if list(log_dir.glob(EVENT_GLOB)):
        return _read_events(log_dir, metric, name)
    return _read_csv_log(log_dir / CSV_LOG, metric, name)


def _read_events(log_dir: Path, metric: str, name: str) -> Curve:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    tags = events.Tags()["scalars"]
    if metric not in tags:
        raise ValueError(f"Run {name!r} ({log_dir}) logged no {metric!r}; its scalars are {sorted(tags)}.")
    start = min(event.wall_time for tag in tags for event in events.Scalars(tag))
    scalars = events.Scalars(metric)
    return Curve(
        name,
        [event.step for event in scalars],
        [event.value for event in scalars],
        [event.wall_time - start for event in scalars],
    )


def _read_csv_log(path: Path, metric: str, name: str) -> Curve:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else []
    if metric not in columns or "step" not in columns:
        raise ValueError(f"Run {name!r} ({path}) logged no {metric!r}; its columns are {sorted(columns)}.")
    steps, values = [], []
    for row in rows:  # CSVLogger writes one row per logging call, blank where a metric was not logged
        if row[metric] not in ("", None):
            steps.append(int(float(row["step"])))
            values.append(float(row[metric]))
    return Curve(name, steps, values, None)


def run(
    output_dir: str | Path,
    runs: Sequence[str | Path],
    metric: str,
    names: Sequence[str] | None = None,
    at_updates: Sequence[int] | None = None,
    plot: bool = True,
) -> list[Path]:
    """Read ``metric`` from every run under ``runs`` and write its curves as CSV, PNG and a table.

    Args:
        output_dir: where the files go (created if missing).
        runs: folders, each holding one or more log directories (a ``default_root_dir`` or a
            ``version_N`` folder).
        metric: the logged name, e.g. ``val/acc``, ``val/bpc``, ``train/loss_step``.
        names: a name per log directory found, in the order found, replacing the configs' names.
        at_updates: numbers of updates to tabulate in ``curves_<metric>.md`` (each run's value there).
        plot: also draw the PNG (needs matplotlib).

    Returns:
        The written paths: the CSV, the PNG if drawn, the table if asked for.
    """
    if plot:
        require_pyplot()  # fail before reading, not after
    log_dirs = [log_dir for folder in runs for log_dir in find_log_dirs(folder)]
    if not log_dirs:
        raise FileNotFoundError(f"Found no TensorBoard event files or {CSV_LOG} under {[str(r) for r in runs]}.")
    if names is not None and len(names) != len(log_dirs):
        found = ", ".join(str(d) for d in log_dirs)
        raise ValueError(f"Expected one name per log directory, {len(log_dirs)} ({found}), but got {len(names)} names.")
    curves = [read_curve(d, metric, None if names is None else names[i]) for i, d in enumerate(log_dirs)]
    _disambiguate(curves, log_dirs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = "curves_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
    rows = [
        (curve.name, step, step + 1, value, "" if curve.wall_times is None else round(curve.wall_times[i], 3))
        for curve in curves
        for i, (step, value) in enumerate(zip(curve.steps, curve.values))
    ]
    paths = [write_csv(output_dir / f"{stem}.csv", ("run", "step", "updates", "value", "wall_time_s"), rows)]
    if plot:
        paths.append(save_figure(_figure(curves, metric), output_dir / f"{stem}.png"))
    if at_updates:
        table = _table(curves, metric, at_updates)
        atomic_write_bytes(output_dir / f"{stem}.md", table.encode())
        paths.append(output_dir / f"{stem}.md")
    return paths


def _disambiguate(curves: list[Curve], log_dirs: list[Path]) -> None:
    """Two runs of one name (two versions of a config) get their folder's name appended."""
    counts = Counter(curve.name for curve in curves)
    for curve, log_dir in zip(curves, log_dirs):
        if counts[curve.name] > 1:
            curve.name = f"{curve.name} ({log_dir.name})"


def _table(curves: list[Curve], metric: str, at_updates: Sequence[int]) -> str:
    def cell(value: float | None) -> str:
        return "–" if value is None or math.isnan(value) else f"{value:.4g}"

    lines = ["| run | " + " | ".join(f"{metric} after {updates}" for updates in at_updates) + " |"]
    lines.append("|---" * (len(at_updates) + 1) + "|")
    for curve in curves:
        lines.append(f"| {curve.name} | " + " | ".join(cell(curve.value_at(u)) for u in at_updates) + " |")
    return "\n".join(lines) + "\n"


def _figure(curves: list[Curve], metric: str) -> Any:
    plt = require_pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for curve in curves:
        axis.plot(curve.updates, curve.values, marker="o" if len(curve.steps) < 30 else None, label=curve.name)
    axis.set_xlabel("updates")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``curves`` subcommand; its ``run`` default takes the namespace, returns the paths."""
    parser = add_analysis_parser(
        subparsers,
        "curves",
        help="one logged metric against updates for several runs (TensorBoard or CSV logs)",
        description=__doc__.split("\n\n")[0],
        run=_run_from_args,
    )
    parser.add_argument("runs", nargs="+", help="folders holding the runs' logs (e.g. each run's default_root_dir)")
    parser.add_argument("--metric", required=True, help="the logged name, e.g. val/acc or val/bpc")
    parser.add_argument("--names", nargs="+", default=None, help="one name per log directory found, in order")
    parser.add_argument(
        "--at_updates", type=int, nargs="+", default=None, help="also write a Markdown table of the values there"
    )
    return parser


def _run_from_args(args: argparse.Namespace) -> list[Path]:
    return run(args.output_dir, args.runs, args.metric, names=args.names, at_updates=args.at_updates, plot=args.plot)
