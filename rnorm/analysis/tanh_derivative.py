"""The expected derivative of tanh under Gaussian input, and its interquartile range (BN §4, Fig. 1b).

For ``x ~ N(0, σ²)`` the derivative ``tanh'(x) = 1 - tanh²(x)`` lies in ``(0, 1]``; the larger σ, the
more often ``x`` falls in the saturated regime and the smaller the derivative — Cooijmans et al.'s
argument for initializing batch normalization's γ to 0.1 rather than 1.

The paper plots an empirical (sampled) estimate; here every number is exact:

* the mean ``E[tanh'(σ z)]`` by :func:`rnorm.functional.normprop.gaussian_expectation` (exact to
  float64 rounding, see that module);
* the quartiles in closed form: ``tanh'`` is even and decreasing in ``|x|``, so the ``q``-quantile of
  ``tanh'(σ z)`` is ``tanh'(σ Q_{|z|}(1 - q))``, with the quantile of the half-normal
  ``Q_{|z|}(p) = Φ⁻¹((1 + p) / 2)``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.functional.normprop import gaussian_expectation

DEFAULT_NUM_SIGMAS = 21  # σ = 0, 0.05, …, 1, the range of BN Fig. 1b
CSV_NAME = "tanh_derivative.csv"
PNG_NAME = "tanh_derivative.png"


def tanh_derivative(x: Tensor) -> Tensor:
    """``tanh'(x) = 1 - tanh²(x)``."""
    return 1.0 - torch.tanh(x).square()


def tanh_derivative_stats(sigmas: Sequence[float] | Tensor) -> dict[str, Tensor]:
    """Mean and quartiles of ``tanh'(x)`` for ``x ~ N(0, σ²)``, for each σ.

    Args:
        sigmas: standard deviations, each finite and ``>= 0`` (σ = 0 is the point mass at 0).

    Returns:
        ``{"sigma", "mean", "q25", "q75"}``, float64 tensors of shape ``(len(sigmas),)``.

    Example:
        >>> stats = tanh_derivative_stats([0.0, 1.0])
        >>> [round(float(v), 4) for v in stats["mean"]]
        [1.0, 0.6057]
    """
    sigma = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError(f"Expected finite sigmas >= 0, but got {sigma.tolist()}.")
    mean = torch.tensor([gaussian_expectation(tanh_derivative, float(s)) for s in sigma], dtype=torch.float64)

    def quantile(q: float) -> Tensor:
        # tanh' decreases in |x|: its q-quantile sits at the (1 - q)-quantile of |x| = σ |z|.
        abs_z = torch.special.ndtri(torch.tensor((2.0 - q) / 2.0, dtype=torch.float64))
        return tanh_derivative(sigma * abs_z)

    return {"sigma": sigma, "mean": mean, "q25": quantile(0.25), "q75": quantile(0.75)}


def run(output_dir: str | os.PathLike, sigmas: Sequence[float] | None = None, plot: bool = True) -> list[Path]:
    """Write ``tanh_derivative.csv`` (sigma, mean, q25, q75) and, with ``plot``, ``tanh_derivative.png``.

    Args:
        output_dir: folder to write to (created if missing).
        sigmas: the σ grid (default: 21 points from 0 to 1).
        plot: draw the figure (needs matplotlib); ``False`` writes only the CSV.

    Returns:
        The paths written.
    """
    if sigmas is None:
        sigmas = torch.linspace(0.0, 1.0, DEFAULT_NUM_SIGMAS, dtype=torch.float64).tolist()
    stats = tanh_derivative_stats(sigmas)
    if plot:
        plt = require_pyplot()  # fail before writing anything
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = ("sigma", "mean", "q25", "q75")
    rows = zip(*(stats[name].tolist() for name in columns))
    paths = [write_csv(output_dir / CSV_NAME, columns, rows)]
    if plot:
        figure, axes = plt.subplots(figsize=(5, 3.5))
        sigma = stats["sigma"].numpy()
        axes.fill_between(sigma, stats["q25"].numpy(), stats["q75"].numpy(), alpha=0.3, label="interquartile range")
        axes.plot(sigma, stats["mean"].numpy(), label=r"$E[\tanh'(x)]$")
        axes.set_xlabel(r"input standard deviation $\sigma$")
        axes.set_ylabel(r"$\tanh'(x)$, $x \sim N(0, \sigma^2)$")
        axes.set_ylim(0.0, 1.05)
        axes.legend(loc="lower left")
        axes.set_title("Derivative of tanh under Gaussian input (BN Fig. 1b)")
        paths.append(save_figure(figure, output_dir / PNG_NAME))
    return paths


def _run_from_args(args: argparse.Namespace) -> list[Path]:
    return run(args.output_dir, sigmas=args.sigmas, plot=args.plot)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``tanh-derivative`` subcommand to ``subparsers``."""
    parser = add_analysis_parser(
        subparsers,
        "tanh-derivative",
        help="E[tanh'(x)] and its interquartile range for x ~ N(0, sigma^2) (BN Fig. 1b)",
        description=__doc__.splitlines()[0],
        run=_run_from_args,
    )
    parser.add_argument(
        "--sigmas", type=float, nargs="+", default=None, help="sigma grid (default: 21 points from 0 to 1)"
    )
    return parser
