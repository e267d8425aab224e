"""The numbers behind BN Fig. 1b (tanh-derivative) and NP Fig. 1 (normprop-gradient), and their files."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from rnorm.analysis import normprop_gradient, tanh_derivative
from rnorm.analysis.normprop_gradient import build_cell, normprop_gradient_grid, simulated_inputs, step_jacobians
from rnorm.analysis.tanh_derivative import tanh_derivative_stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MC_SAMPLES = 400_000
Z_TOL = 5.0  # tolerances are 5 standard errors: a false failure has probability < 1e-6 per check


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(required=True)
    tanh_derivative.add_parser(commands)
    normprop_gradient.add_parser(commands)
    return parser.parse_args(list(argv))


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # a drawn figure, not an empty canvas
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.05  # something is drawn on it


def _read_csv(path) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="") as file:
        header, *rows = csv.reader(file)
    return header, [[float(value) for value in row] for row in rows]


# ---- tanh-derivative (BN Fig. 1b) -----------------------------------------------------------


def test_tanh_derivative_is_one_at_zero_and_one_minus_sigma_squared_near_zero() -> None:
    sigmas = [0.0, 0.01, 0.03, 0.1]
    mean = tanh_derivative_stats(sigmas)["mean"]
    assert mean[0].item() == 1.0  # the point mass at 0: exactly, not to a tolerance
    for sigma, value in zip(sigmas[1:], mean[1:].tolist()):
        # sech²(x) = 1 - x² + 2/3 x⁴ - 17/45 x⁶ + …, E z⁴ = 3, E z⁶ = 15: E = 1 - σ² + 2σ⁴ - 5.67σ⁶ + …
        assert abs(value - (1 - sigma**2 + 2 * sigma**4)) <= 6 * sigma**6
        assert abs(value - (1 - sigma**2)) <= 2.1 * sigma**4


def test_tanh_derivative_strictly_decreasing_in_sigma() -> None:
    mean = tanh_derivative_stats(torch.linspace(0, 1, 21))["mean"]
    assert bool((mean.diff() < 0).all())
    assert mean[-1].item() == pytest.approx(0.6057055, abs=1e-6)  # "much smaller than 1" at σ = 1


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_tanh_derivative_mean_matches_monte_carlo(sigma: float) -> None:
    generator = torch.Generator().manual_seed(1234)
    samples = tanh_derivative.tanh_derivative(sigma * torch.randn(MC_SAMPLES, generator=generator, dtype=torch.float64))
    standard_error = samples.std().item() / math.sqrt(MC_SAMPLES)
    exact = tanh_derivative_stats([sigma])["mean"].item()
    assert abs(samples.mean().item() - exact) <= Z_TOL * standard_error


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0])
def test_tanh_derivative_quartiles_match_monte_carlo(sigma: float) -> None:
    stats = tanh_derivative_stats([sigma])
    q25, mean, q75 = stats["q25"].item(), stats["mean"].item(), stats["q75"].item()
    assert q25 < mean < q75  # the mean sits inside the interquartile range on this grid
    generator = torch.Generator().manual_seed(99)
    samples = tanh_derivative.tanh_derivative(sigma * torch.randn(MC_SAMPLES, generator=generator, dtype=torch.float64))
    # The exact quartiles must cut the sample at fractions 1/4 and 3/4, within 5 binomial standard
    # errors sqrt(q (1 - q) / N) ≈ 0.0034 (a sign error or a swapped quantile misses by ≥ 0.25).
    for q, quartile in ((0.25, q25), (0.75, q75)):
        fraction_below = (samples <= quartile).double().mean().item()
        assert abs(fraction_below - q) <= Z_TOL * math.sqrt(q * (1 - q) / MC_SAMPLES)
    # And the empirical quartiles themselves, within 1% of the IQR.
    empirical = torch.quantile(samples[:100_000], torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    assert empirical == pytest.approx([q25, q75], abs=0.01 * (q75 - q25))


def test_tanh_derivative_files(tmp_path) -> None:
    args = _parse("tanh-derivative", "--output_dir", str(tmp_path / "out"))
    paths = args.run(args)
    assert [path.name for path in paths] == ["tanh_derivative.csv", "tanh_derivative.png"]
    header, rows = _read_csv(paths[0])
    assert header == ["sigma", "mean", "q25", "q75"]
    assert len(rows) == 21 and rows[0] == [0.0, 1.0, 1.0, 1.0] and rows[-1][0] == 1.0
    _assert_png(paths[1])


def test_tanh_derivative_no_plot_needs_no_matplotlib(tmp_path, monkeypatch) -> None:
    def missing():
        raise ImportError("matplotlib missing")

    monkeypatch.setattr(tanh_derivative, "require_pyplot", missing)
    args = _parse("tanh-derivative", "--output_dir", str(tmp_path), "--sigmas", "0", "0.5", "--no_plot")
    paths = args.run(args)
    assert [path.name for path in paths] == ["tanh_derivative.csv"]
    assert not list(tmp_path.glob("*.png"))
    assert len(_read_csv(paths[0])[1]) == 2
    with pytest.raises(ImportError):
        tanh_derivative.run(tmp_path, sigmas=[0.5], plot=True)


# ---- normprop-gradient (NP Fig. 1) ----------------------------------------------------------


def _finite_difference_jacobian(cell, x, h, c, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of one float64 step, sample 0: ``(H_out, H_in)``."""
    hidden = h.shape[1]
    jacobian = torch.empty(hidden, hidden, dtype=torch.float64)
    with torch.no_grad():
        for j in range(hidden):
            step = torch.zeros_like(h)
            step[0, j] = eps
            plus, _ = cell(x, (h + step, c))
            minus, _ = cell(x, (h - step, c))
            jacobian[:, j] = (plus - minus)[0] / (2 * eps)  # column j: ∂h_t / ∂h_{t-1, j}
    return jacobian


def test_jacobian_norm_matches_finite_differences() -> None:
    hidden, seed, gamma_c = 6, 5, 0.4
    gammas = [0.7, 1.3]
    grid = normprop_gradient_grid(gammas, [gamma_c], hidden, samples=1, seed=seed)
    assert grid.shape == (1, 2, 2)
    x, h, z_c = simulated_inputs(hidden, samples=1, seed=seed)
    for i, j in ((0, 1), (1, 0), (1, 1)):
        cell = build_cell(gammas[i], gammas[j], gamma_c, hidden, seed=seed)
        assert torch.allclose(cell.cell_norm.gamma.detach(), torch.tensor(gamma_c, dtype=torch.float64))
        c = z_c * cell.cell_norm.cell_var.sqrt()  # c_{t-1} ~ N(0, Var[c]) for these γ
        finite_difference = _finite_difference_jacobian(cell, x, h, c)
        torch.testing.assert_close(step_jacobians(cell, x, h, c)[0], finite_difference, rtol=1e-6, atol=1e-8)
        expected = torch.linalg.matrix_norm(finite_difference).item() / math.sqrt(hidden)  # ||J||_F / sqrt(H)
        assert grid[0, i, j].item() == pytest.approx(expected, rel=1e-6)


def test_gradient_norm_grows_with_gamma_h_for_small_gammas() -> None:
    # Measured (H = 64, 32 samples, seed 0, γ_x, γ_h ∈ {0.1, …, 3.0}, γ_c ∈ {0.1, 1}): the norm grows
    # with γ_h at every γ_x on that whole grid, by at least 0.015 per 0.1 step. Checked here on the
    # small-γ region γ ∈ [0.1, 1] of a smaller cell, where the growth is widest (≥ 0.026 per 0.1).
    gammas = [0.1, 0.5, 1.0]
    norms = normprop_gradient_grid(gammas, [0.1, 1.0], hidden_size=16, samples=4, seed=0)
    assert norms.shape == (2, 3, 3)
    assert bool(torch.isfinite(norms).all()) and bool((norms > 0).all())
    assert bool((norms.diff(dim=2) > 0).all())  # along γ_h, at every γ_x and γ_c
    # and the paper's reading: γ_x > γ_h vanishes more than γ_h > γ_x
    assert bool((norms[:, 2, 0] < norms[:, 0, 2]).all())


def test_normprop_gradient_files(tmp_path) -> None:
    args = _parse(
        "normprop-gradient", "--output_dir", str(tmp_path), "--hidden_size", "8", "--samples", "2",
        "--gammas", "0.5", "2",
    )  # fmt: skip
    paths = args.run(args)
    assert [path.name for path in paths] == ["normprop_gradient.csv", "normprop_gradient.png"]
    header, rows = _read_csv(paths[0])
    assert header == ["gamma_c", "gamma_x", "gamma_h", "jacobian_norm"]
    assert len(rows) == 2 * 2 * 2
    assert sorted({row[0] for row in rows}) == [0.1, 1.0]
    assert all(row[3] > 0 for row in rows)
    _assert_png(paths[1])


def test_normprop_gradient_no_plot_writes_no_png(tmp_path, monkeypatch) -> None:
    def missing():
        raise ImportError("matplotlib missing")

    monkeypatch.setattr(normprop_gradient, "require_pyplot", missing)
    args = _parse(
        "normprop-gradient", "--output_dir", str(tmp_path), "--hidden_size", "4", "--samples", "1",
        "--gammas", "1", "--gamma_c", "1", "--no_plot",
    )  # fmt: skip
    paths = args.run(args)
    assert [path.name for path in paths] == ["normprop_gradient.csv"]
    assert not list(tmp_path.glob("*.png"))
    assert len(_read_csv(paths[0])[1]) == 1
