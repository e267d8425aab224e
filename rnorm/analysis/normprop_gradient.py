"""The norm of ∂h_t/∂h_{t-1} of one Norm-Prop LSTM step over γ_x and γ_h (NP §4.2, Fig. 1).

Laurent et al. plot "the norm of the gradients for one time step in an LSTM with respect to γ_x and
γ_h (simulation)" for γ_c = 0.1 and 1, without defining the simulation or the norm. Here:

* **the LSTM**: a :class:`~rnorm.nn.NormLSTMCell` with ``input_size = hidden_size = H`` and
  ``normprop`` on all three sites, built with ``gamma_init`` = γ_x, γ_h, γ_c on the input,
  recurrent and cell sites, so its fixed ``Var[c_t]``, ``Var[h_t]`` (NP eq. 8–14) are estimated for
  those γ; bias 0 (the paper's assumption), orthogonal weight blocks with unit-norm rows. The
  weights are drawn from ``seed`` and are the same at every grid point.
* **the inputs** (NP §4.2's assumptions): ``x_t, h_{t-1} ~ N(0, I)`` independent and
  ``c_{t-1} ~ N(0, Var[c_t] I)``. They are drawn once from ``seed`` as standard normals (``c``
  then scaled), so every grid point sees the same samples (common random numbers: the surface is
  smooth, not noisy).
* **the norm**: the root-mean-square singular value of the Jacobian ``J = ∂h_t/∂h_{t-1}``,
  ``||J||_F / sqrt(H)``, computed exactly per sample (reverse-mode ``torch.func.jacrev`` in float64)
  and averaged over the samples. It is the gain of a random gradient direction:
  ``E_u ||Jᵀu||² = ||J||_F² / H`` for ``u`` uniform on the unit sphere, and it does not grow with H.

The default grid is γ_x, γ_h ∈ {0.2, 0.4, …, 3.0} (15 values each, including 1 and the paper's
initialization 2), γ_c ∈ {0.1, 1.0} as in the paper's two panels: 450 cells at about 0.07 s each (2 CPU
threads, H = 64, 32 samples), so half a minute (``--gammas`` takes a finer grid).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.nn.cell import NormLSTMCell

DEFAULT_GAMMAS: tuple[float, ...] = tuple(round(0.2 * k, 1) for k in range(1, 16))  # 0.2, 0.4, …, 3.0
DEFAULT_GAMMA_C: tuple[float, ...] = (0.1, 1.0)
DEFAULT_HIDDEN_SIZE = 64
DEFAULT_SAMPLES = 32
CSV_NAME = "normprop_gradient.csv"
PNG_NAME = "normprop_gradient.png"


def build_cell(gamma_x: float, gamma_h: float, gamma_c: float, hidden_size: int, seed: int) -> NormLSTMCell:
    """A float64 Norm-Prop cell (eval mode) with the given γ; its weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        cell = NormLSTMCell(
            hidden_size,
            hidden_size,
            input_norm="normprop",
            recurrent_norm="normprop",
            cell_norm="normprop",
            input_norm_kwargs={"gamma_init": gamma_x},
            recurrent_norm_kwargs={"gamma_init": gamma_h},
            cell_norm_kwargs={"gamma_init": gamma_c},
            learn_initial_state=False,
        )
    return cell.double().eval().requires_grad_(False)


def simulated_inputs(hidden_size: int, samples: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, h_{t-1}, z_c)``, each ``(samples, H)`` float64 standard normal; ``c_{t-1} = z_c sqrt(Var[c])``."""
    generator = torch.Generator().manual_seed(seed)
    x, h, z_c = torch.randn(3, samples, hidden_size, generator=generator, dtype=torch.float64)
    return x, h, z_c


def step_jacobians(cell: NormLSTMCell, x: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """The exact per-sample Jacobians ``∂h_t/∂h_{t-1}`` of one step: ``(B, H_out, H_in)``.

    The samples do not interact (no batch statistics in ``normprop``), so the Jacobian of the batch
    sum ``Σ_b h_t[b]`` with respect to ``h`` holds every sample's Jacobian: ``(H_out, B, H_in)``.
    """

    def summed_step(h_prev: Tensor) -> Tensor:
        h_new, _ = cell(x, (h_prev, c))  # (B, H)
        return h_new.sum(0)  # (H,)

    return torch.func.jacrev(summed_step)(h).permute(1, 0, 2)  # (B, H, H)


def rms_singular_value(jacobians: Tensor) -> Tensor:
    """``||J||_F / sqrt(H_in)`` per Jacobian of ``(..., H_out, H_in)``: the RMS singular value of square J."""
    return jacobians.square().sum((-2, -1)).div(jacobians.shape[-1]).sqrt()


def normprop_gradient_grid(
    gamma_values: Sequence[float] = DEFAULT_GAMMAS,
    gamma_c_values: Sequence[float] = DEFAULT_GAMMA_C,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> Tensor:
    """Mean RMS singular value of ``∂h_t/∂h_{t-1}`` over ``samples`` draws, at every grid point.

    Args:
        gamma_values: the values of both γ_x and γ_h (each > 0).
        gamma_c_values: the values of γ_c (each > 0).
        hidden_size: ``H``.
        samples: draws of ``(x_t, h_{t-1}, c_{t-1})`` averaged over.
        seed: seeds the weights and the draws.

    Returns:
        float64 ``(len(gamma_c_values), len(gamma_values), len(gamma_values))``, indexed
        ``[γ_c, γ_x, γ_h]``.
    """
    if hidden_size < 1 or samples < 1:
        raise ValueError(f"Expected hidden_size and samples >= 1, but got {hidden_size} and {samples}.")
    gammas, gammas_c = [float(g) for g in gamma_values], [float(g) for g in gamma_c_values]
    if not gammas or not gammas_c or not all(math.isfinite(g) and g > 0 for g in gammas + gammas_c):
        raise ValueError(f"Expected non-empty lists of finite gammas > 0, but got {gammas} and {gammas_c}.")
    x, h, z_c = simulated_inputs(hidden_size, samples, seed)
    norms = torch.empty(len(gammas_c), len(gammas), len(gammas), dtype=torch.float64)
    for k, gamma_c in enumerate(gammas_c):
        for i, gamma_x in enumerate(gammas):
            for j, gamma_h in enumerate(gammas):
                cell = build_cell(gamma_x, gamma_h, gamma_c, hidden_size, seed)
                c = z_c * cell.cell_norm.cell_var.sqrt()  # c_{t-1} ~ N(0, Var[c_t])
                norms[k, i, j] = rms_singular_value(step_jacobians(cell, x, h, c)).mean()
    return norms


def run(
    output_dir: str | os.PathLike,
    gamma_values: Sequence[float] | None = None,
    gamma_c_values: Sequence[float] | None = None,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    plot: bool = True,
) -> list[Path]:
    """Write ``normprop_gradient.csv`` (gamma_c, gamma_x, gamma_h, jacobian_norm) and, with ``plot``,
    ``normprop_gradient.png`` (one heat map of γ_x vs γ_h per γ_c).

    Args:
        output_dir: folder to write to (created if missing).
        gamma_values: γ_x and γ_h grid (default 0.2, 0.4, …, 3.0).
        gamma_c_values: γ_c values (default 0.1 and 1.0, the paper's panels).
        hidden_size, samples, seed: as in :func:`normprop_gradient_grid`.
        plot: draw the figure (needs matplotlib); ``False`` writes only the CSV.

    Returns:
        The paths written.
    """
    gammas = list(DEFAULT_GAMMAS if gamma_values is None else gamma_values)
    gammas_c = list(DEFAULT_GAMMA_C if gamma_c_values is None else gamma_c_values)
    if plot:
        plt = require_pyplot()  # fail before the computation, not after
    norms = normprop_gradient_grid(gammas, gammas_c, hidden_size, samples, seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = (
        (gamma_c, gamma_x, gamma_h, float(norms[k, i, j]))
        for k, gamma_c in enumerate(gammas_c)
        for i, gamma_x in enumerate(gammas)
        for j, gamma_h in enumerate(gammas)
    )
    paths = [write_csv(output_dir / CSV_NAME, ("gamma_c", "gamma_x", "gamma_h", "jacobian_norm"), rows)]
    if plot:
        figure, axes = plt.subplots(
            1, len(gammas_c), figsize=(5.4 * len(gammas_c), 4), squeeze=False, layout="constrained"
        )
        # One cell per grid value, labelled with the value: the grid need not be evenly spaced.
        ticks = list(range(0, len(gammas), max(1, len(gammas) // 8)))
        labels = [f"{gammas[i]:g}" for i in ticks]
        for k, (ax, gamma_c) in enumerate(zip(axes[0], gammas_c)):
            # rows of the image are γ_x (vertical axis), columns γ_h (horizontal axis)
            image = ax.imshow(norms[k].numpy(), origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(ticks, labels)
            ax.set_yticks(ticks, labels)
            figure.colorbar(image, ax=ax, label=r"$\|\partial h_t / \partial h_{t-1}\|_F / \sqrt{H}$")
            ax.set_xlabel(r"$\gamma_h$")
            ax.set_ylabel(r"$\gamma_x$")
            ax.set_title(rf"$\gamma_c = {gamma_c:g}$")
        figure.suptitle(f"Norm-Prop LSTM, one step (H = {hidden_size}, {samples} samples; NP Fig. 1)")
        paths.append(save_figure(figure, output_dir / PNG_NAME))
    return paths


def _run_from_args(args: argparse.Namespace) -> list[Path]:
    return run(
        args.output_dir,
        gamma_values=args.gammas,
        gamma_c_values=args.gamma_c,
        hidden_size=args.hidden_size,
        samples=args.samples,
        seed=args.seed,
        plot=args.plot,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``normprop-gradient`` subcommand to ``subparsers``."""
    parser = add_analysis_parser(
        subparsers,
        "normprop-gradient",
        help="norm of dh_t/dh_{t-1} of a Norm-Prop LSTM step over gamma_x, gamma_h (NP Fig. 1)",
        description=__doc__.splitlines()[0],
        run=_run_from_args,
    )
    parser.add_argument(
        "--hidden_size", type=int, default=DEFAULT_HIDDEN_SIZE, help=f"H (default {DEFAULT_HIDDEN_SIZE})"
    )
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help=f"draws averaged over (default {DEFAULT_SAMPLES})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the draws (default 0)")
    parser.add_argument(
        "--gammas", type=float, nargs="+", default=None, help="gamma_x and gamma_h grid (default 0.2, 0.4, ..., 3.0)"
    )
    parser.add_argument("--gamma_c", type=float, nargs="+", default=None, help="gamma_c values (default 0.1 1.0)")
    return parser
