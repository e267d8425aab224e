"""Population statistics over time of a trained model's batch normalization (BN Fig. 5, App. A).

Per-timestep batch normalization (``bn``) keeps a population mean and variance for every step
``t = 0 .. T_max - 1`` of every normalized unit. Cooijmans et al. (BN §3, Fig. 5) plot them for a
random subset of units: after an initial transient they converge to stationary values, which is
why steps beyond ``T_max`` may reuse the statistics of ``T_max``. This module reads them from a
checkpoint, writes the sampled units' curves to ``population_stats.csv`` and draws them as
``population_stats.png`` (two panels per site: mean over ``t``, variance over ``t``).

Sequencewise batch normalization (``seqbn``) stores one statistic for all steps (``T_max = 1``):
such sites are included, as one point per unit. (A ``bn`` site trained on one-step sequences looks
the same in a state dict.) ``t`` is 0-based everywhere, as in ``TimeBatchNorm.step(x, t)``.

Example:
    ``rnorm analyze population-stats --ckpt_path runs/bn/checkpoints/last.ckpt --units 8``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.utils.checkpoint import load_checkpoint, task_globals

CSV_NAME = "population_stats.csv"
PNG_NAME = "population_stats.png"
CSV_HEADER = ("module", "unit", "t", "mean", "var")


def load_population_statistics(path: str | os.PathLike) -> dict[str, tuple[Tensor, Tensor]]:
    """The per-step population statistics of every batch-norm site in a checkpoint.

    Args:
        path: a Lightning checkpoint (its ``state_dict`` is read) or a file holding a plain state dict.

    Returns:
        ``{module: (running_mean, running_var)}`` in state-dict order, each tensor ``(T_max, F)``;
        ``module`` is the key prefix, e.g. ``encoder.cells.0.recurrent_norm``. Sites whose
        statistics were never updated (``T_max = 0``) are left out.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a checkpoint, or it holds objects other than tensors and
            plain data (it is never unpickled unsafely).
        ValueError: the file holds no state dict, or no per-step population statistics.
    """
    path = Path(path)
    # Tensors and plain data only (a task built in Python also saves its factories: allowed by name).
    checkpoint = load_checkpoint(path, allow=task_globals())
    if not isinstance(checkpoint, Mapping):
        kind = type(checkpoint).__name__
        raise ValueError(f"Expected {str(path)!r} to hold a checkpoint or a state dict, but it holds a {kind}.")
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping):
        kind = type(state_dict).__name__
        raise ValueError(f"Expected the 'state_dict' of {str(path)!r} to be a mapping, but got a {kind}.")
    statistics = {}
    for key, mean in state_dict.items():
        if not (isinstance(key, str) and key.endswith("running_mean") and isinstance(mean, Tensor) and mean.dim() == 2):
            continue  # 1-D running_mean: an ordinary torch.nn.BatchNorm, not statistics over time
        module = key[: -len("running_mean")].rstrip(".")
        var = state_dict.get(key[: -len("running_mean")] + "running_var")
        if not isinstance(var, Tensor) or var.shape != mean.shape:
            shape = tuple(var.shape) if isinstance(var, Tensor) else None
            raise ValueError(
                f"{module!r} has a running_mean of shape {tuple(mean.shape)} but a running_var of shape {shape}."
            )
        if mean.shape[0] > 0:
            statistics[module] = (mean.float(), var.float())
    if not statistics:
        raise ValueError(f"{str(path)!r} has no per-step population statistics: was it trained with bn?")
    return statistics


def sample_units(num_features: int, units: int, generator: torch.Generator) -> list[int]:
    """``units`` distinct unit indices out of ``num_features`` (all of them if fewer), sorted."""
    return sorted(torch.randperm(num_features, generator=generator)[:units].tolist())


def run(
    ckpt_path: str | os.PathLike,
    output_dir: str | os.PathLike = "analysis",
    units: int = 8,
    seed: int = 0,
    plot: bool = True,
    max_sites: int | None = None,
) -> list[Path]:
    """Write the population statistics of ``units`` random units per site as CSV and PNG.

    Args:
        ckpt_path: the checkpoint (or state dict file) to read.
        output_dir: where ``population_stats.csv`` and ``population_stats.png`` go (created).
        units: units sampled per site; the same units for mean and variance.
        seed: seed of the unit sampling (one generator, drawn from site after site).
        plot: also draw the figure (needs matplotlib; the CSV does not).
        max_sites: plot only the first ``max_sites`` sites (the CSV has every site).

    Returns:
        The paths written: the CSV, then the PNG if ``plot``.
    """
    if units < 1:
        raise ValueError(f"Expected units >= 1, but got {units}.")
    if max_sites is not None and max_sites < 1:
        raise ValueError(f"Expected max_sites >= 1 or None, but got {max_sites}.")
    statistics = load_population_statistics(ckpt_path)
    generator = torch.Generator().manual_seed(seed)
    sampled = {module: sample_units(mean.shape[1], units, generator) for module, (mean, _) in statistics.items()}
    rows = [
        (module, unit, t, float(mean[t, unit]), float(var[t, unit]))
        for module, (mean, var) in statistics.items()
        for unit in sampled[module]
        for t in range(mean.shape[0])
    ]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(output_dir / CSV_NAME, CSV_HEADER, rows)]
    if plot:
        sites = list(statistics)[:max_sites]
        written.append(save_figure(_figure(statistics, sampled, sites), output_dir / PNG_NAME))
    return written


def _figure(statistics: dict[str, tuple[Tensor, Tensor]], sampled: dict[str, list[int]], sites: list[str]) -> Any:
    """One row per site: population mean (left) and variance (right) against ``t``, a curve per unit."""
    plt = require_pyplot()
    from matplotlib import ticker
    figure, axes = plt.subplots(len(sites), 2, figsize=(10, 2.6 * len(sites)), squeeze=False)
    for row, module in zip(axes, sites):
        mean, var = statistics[module]
        t_max = mean.shape[0]
        note = "\nT_max = 1 (e.g. seqbn): one statistic for all steps" if t_max == 1 else ""
        for ax, values, label in zip(row, (mean, var), ("mean", "variance")):
            for unit in sampled[module]:
                ax.plot(range(t_max), values[:, unit].numpy(), marker="o" if t_max == 1 else None, linewidth=1)
            ax.set_title(f"{module}: population {label}{note}", fontsize=8)
            ax.set_xlabel("t")
            ax.xaxis.set_major_locator(ticker.FixedLocator([0]) if t_max == 1 else ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``population-stats`` subcommand to an ``argparse`` subparsers object."""
    parser = add_analysis_parser(
        subparsers,
        "population-stats",
        help="plot batch-norm population statistics over time (BN Fig. 5)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        run=_run_from_namespace,
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint (or state dict file) of a model trained with bn")
    parser.add_argument("--units", type=int, default=8, help="units sampled per site (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the unit sampling (default: 0)")
    parser.add_argument("--max_sites", type=int, default=None, help="plot only the first N sites (default: all)")
    return parser


def _run_from_namespace(args: argparse.Namespace) -> list[Path]:
    return run(args.ckpt_path, args.output_dir, args.units, args.seed, plot=args.plot, max_sites=args.max_sites)
