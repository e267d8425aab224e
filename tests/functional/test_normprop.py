"""Norm-Prop's analytic variances (NP eq. 8–14) against closed forms, a Monte-Carlo simulation of
the cell under the paper's own assumptions, and an end-to-end run of a Norm-Prop NormLSTM."""

from __future__ import annotations

import math

import pytest
import torch

from rnorm import NormLSTM
from rnorm.functional.normprop import DEFAULT_QUADRATURE_POINTS, gaussian_expectation, normprop_variances

# (gamma_x, gamma_h, gamma_c): the paper's PTB setting (NP §5.1), its DRAW setting, and one with
# gamma_h > gamma_x and a saturating output tanh (gamma_c = 2).
SETTINGS = [(2.0, 2.0, 1.0), (0.5, 0.5, 0.5), (1.0, 3.0, 2.0)]
SETTING_IDS = ["paper-2-2-1", "draw-0.5-0.5-0.5", "1-3-2"]


def _simpson_expectation(fn, std: float, step: float = 0.002, half_width: float = 12.0) -> float:
    """``E[fn(std * z)]``, ``z ~ N(0, 1)``, by composite Simpson's rule on a fine grid (float64).

    An independent reference for the library's trapezoidal rule: a different method, whose error
    is algebraic, about ``2 L step^4 max|f^(4)| / 180`` on ``[-L, L]``; for ``tanh^2(s z)`` times the
    density with ``s <= 10`` that is below 1e-9, and cutting the line at ``|z| = 12`` drops ``~1e-32``.
    """
    intervals = round(2 * half_width / step)
    intervals += intervals % 2  # Simpson needs an even number of intervals
    z = torch.linspace(-half_width, half_width, intervals + 1, dtype=torch.float64)
    coefficients = torch.ones_like(z)
    coefficients[1:-1:2] = 4
    coefficients[2:-1:2] = 2
    h = 2 * half_width / intervals
    density = torch.exp(-z.square() / 2) / math.sqrt(2 * math.pi)
    return float((coefficients * density * fn(std * z)).sum() * h / 3)


def _reference_variances(gamma_x: float, gamma_h: float, gamma_c: float) -> tuple[float, float]:
    """NP eq. 8 and 14, written out again with the Simpson reference."""
    pre_std = math.hypot(gamma_x, gamma_h)
    gate_second_moment = _simpson_expectation(lambda z: torch.sigmoid(z).square(), pre_std)
    var_g = _simpson_expectation(lambda z: torch.tanh(z).square(), pre_std)  # E[tanh] = 0
    var_out = _simpson_expectation(lambda z: torch.tanh(z).square(), gamma_c)
    return var_g * gate_second_moment / (1 - gate_second_moment), var_out * gate_second_moment


# -- gaussian_expectation against closed forms ---------------------------------------------------


@pytest.mark.parametrize("std", [0.1, 1.0, 3.0, 10.0])
def test_gaussian_expectation_moments(std: float) -> None:
    assert gaussian_expectation(lambda z: z**2, std) == pytest.approx(std**2, rel=1e-13)
    assert gaussian_expectation(lambda z: z**4, std) == pytest.approx(3 * std**4, rel=1e-13)
    assert gaussian_expectation(lambda z: z**3, std) == pytest.approx(0.0, abs=1e-12 * std**3)


@pytest.mark.parametrize("std", [0.1, 1.0, 3.0, 10.0])
def test_gaussian_expectation_weights_sum_to_one_and_symmetry(std: float) -> None:
    assert gaussian_expectation(torch.ones_like, std) == pytest.approx(1.0, abs=1e-14)
    # sigmoid(x) - 1/2 is odd, so E[sigmoid(std z)] = 1/2 for every std.
    assert gaussian_expectation(torch.sigmoid, std) == pytest.approx(0.5, abs=1e-14)


@pytest.mark.parametrize(("a", "std"), [(0.5, 1.0), (1.0, 1.0), (3.0, 1.0), (1.0, 3.0), (2.0, 0.5)])
def test_gaussian_expectation_moment_generating_function(a: float, std: float) -> None:
    # E[exp(a std z)] = exp(a^2 std^2 / 2); exp is entire, so the trapezoidal rule is exact to
    # rounding while the integrand's mass (centred at z = a * std <= 3) lies well inside |z| < 12.
    expected = math.exp(a**2 * std**2 / 2)
    assert gaussian_expectation(lambda z: torch.exp(a * z), std) == pytest.approx(expected, rel=1e-12)


def test_default_rule_is_converged() -> None:
    # Four times as many points changes nothing above float64 rounding, up to std 10 (the
    # module docstring's claim): the trapezoidal rule converges exponentially for these integrands.
    for std in (0.5, 1.0, 2 * math.sqrt(2), 5.0, 10.0):
        for fn in (lambda z: torch.tanh(z).square(), lambda z: torch.sigmoid(z).square()):
            coarse = gaussian_expectation(fn, std)
            fine = gaussian_expectation(fn, std, num_points=4 * DEFAULT_QUADRATURE_POINTS - 3)
            assert coarse == pytest.approx(fine, abs=1e-14, rel=0)


# -- accuracy against an independent integration --------------------------------------------------

# Standard deviations up to 10 for the gates, sqrt(gamma_x^2 + gamma_h^2), and for the output tanh,
# gamma_c. The documented accuracy is float64 rounding; the bound 1e-8 is the Simpson reference's own
# error (see _simpson_expectation), so this checks the library's rule to that level.
CLAIM_CASES = [
    (0.5, 0.0, 1.0),
    (0.5, 0.5, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 1.0, 1.0),
    (2.0, 2.0, 1.0),
    (3.0, 4.0, 1.0),
    (0.0, 7.0, 1.0),
    (6.0, 8.0, 1.0),
    (0.5, 0.0, 2.0),
    (0.5, 0.0, 10.0),
]


@pytest.mark.parametrize(("gamma_x", "gamma_h", "gamma_c"), CLAIM_CASES)
def test_variances_match_an_independent_integration(gamma_x: float, gamma_h: float, gamma_c: float) -> None:
    default = normprop_variances(gamma_x, gamma_h, gamma_c)
    reference = _reference_variances(gamma_x, gamma_h, gamma_c)
    assert default[0] == pytest.approx(reference[0], abs=1e-8, rel=0)
    assert default[1] == pytest.approx(reference[1], abs=1e-8, rel=0)


def test_paper_values() -> None:
    # NP §5.1 (gamma_x = gamma_h = 2, gamma_c = 1) and DRAW (all 0.5), from the Simpson
    # reference: Var[c] = 0.448052, Var[h] = 0.149830 and Var[c] = 0.104004, Var[h] = 0.047782
    # (printed to 6 decimals, hence the 1e-6 tolerance).
    var_c, var_h = normprop_variances(2.0, 2.0, 1.0)
    assert var_c == pytest.approx(0.448052, abs=1e-6)
    assert var_h == pytest.approx(0.149830, abs=1e-6)
    var_c, var_h = normprop_variances(0.5, 0.5, 0.5)
    assert var_c == pytest.approx(0.104004, abs=1e-6)
    assert var_h == pytest.approx(0.047782, abs=1e-6)


def test_only_the_pre_activation_std_matters() -> None:
    # Gates see gamma_x z_x + gamma_h z_h ~ N(0, gamma_x^2 + gamma_h^2) (NP eq. 9-12).
    assert normprop_variances(3.0, 4.0, 1.0) == pytest.approx(normprop_variances(5.0, 0.0, 1.0), abs=1e-15)
    assert normprop_variances(3.0, 4.0, 1.0) == pytest.approx(normprop_variances(4.0, 3.0, 1.0), abs=1e-15)


# -- Monte-Carlo simulation of the cell under the paper's assumptions ------------------------------

NUM_CHAINS = 2**17
NUM_STEPS = 16


def _simulate(gamma_x: float, gamma_h: float, gamma_c: float, seed: int) -> dict[str, torch.Tensor]:
    """Run ``NUM_CHAINS`` independent cells for ``NUM_STEPS`` steps with fresh, independent gate
    pre-activations ``N(0, gamma_x^2 + gamma_h^2)`` at every step (NP eq. 9-12), ``c_0 = 0``.

    Returns ``c`` at steps 1, 2 and ``NUM_STEPS`` and an output-gate pre-activation ``o`` for the
    last step (the only one whose ``h`` is looked at).
    """
    generator = torch.Generator().manual_seed(seed)
    pre_std = math.hypot(gamma_x, gamma_h)
    c = torch.zeros(NUM_CHAINS, dtype=torch.float64)
    early = []
    for t in range(NUM_STEPS):
        z = pre_std * torch.randn(3, NUM_CHAINS, generator=generator, dtype=torch.float64)  # i, f, g
        gates = torch.sigmoid(z[:2])
        c = gates[0] * torch.tanh(z[2]) + gates[1] * c  # NP eq. 16
        if t < 2:
            early.append(c)
    o = pre_std * torch.randn(NUM_CHAINS, generator=generator, dtype=torch.float64)
    return {"c": c, "c1": early[0], "c2": early[1], "o": o}


def _second_moment(x: torch.Tensor) -> tuple[float, float]:
    """``E[x^2]`` (the variance: every simulated quantity has mean 0 by symmetry) and its
    standard error ``std(x^2) / sqrt(N)`` over the independent chains."""
    squares = x.square()
    return float(squares.mean()), float(squares.std()) / math.sqrt(squares.numel())


@pytest.fixture(scope="module")
def simulations() -> dict[tuple[float, float, float], dict[str, torch.Tensor]]:
    return {setting: _simulate(*setting, seed=index) for index, setting in enumerate(SETTINGS)}


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_monte_carlo_cell_variance_eq8(simulations, setting) -> None:
    gamma_x, gamma_h, gamma_c = setting
    sample = simulations[setting]
    var_c, _ = normprop_variances(gamma_x, gamma_h, gamma_c)
    # Under the paper's assumptions (independent i, f, g, c_{t-1}) eq. 8 is exact, and the
    # variance after t steps is var_c (1 - m^t), m = E[sigmoid^2] (a geometric series).
    m = gaussian_expectation(lambda z: torch.sigmoid(z).square(), math.hypot(gamma_x, gamma_h))
    # m <= 0.39 here, so after NUM_STEPS the transient m^t is < 1e-6 of var_c, thousands of times
    # below the standard error: the last step samples the stationary distribution.
    assert m**NUM_STEPS < 1e-6
    for name, steps in (("c1", 1), ("c2", 2), ("c", NUM_STEPS)):
        estimate, standard_error = _second_moment(sample[name])
        # 2^17 chains: relative standard error 0.37-0.42%; 5 standard errors is a false-alarm
        # rate of ~6e-7 per check. Measured over seeds 0-2, 10-12, 20-22: at most 1.6 standard
        # errors. The default rule's own error (1.6e-4 absolute, 0.035% relative, at (2, 2, 1))
        # is far below this.
        expected = var_c * (1 - m**steps)
        assert abs(estimate - expected) < 5 * standard_error, (name, estimate, expected, standard_error)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_monte_carlo_hidden_variance_eq14(simulations, setting) -> None:
    gamma_x, gamma_h, gamma_c = setting
    sample = simulations[setting]
    var_c, var_h = normprop_variances(gamma_x, gamma_h, gamma_c)
    squashed = torch.tanh(gamma_c * sample["c"] / math.sqrt(var_c))  # NP eq. 13
    h = torch.sigmoid(sample["o"]) * squashed
    estimate, standard_error = _second_moment(h)

    # 1. The product rule of eq. 14 (o independent of c) is exact: Var[h] = E[sigmoid(o)^2] *
    # E[tanh^2(gamma_c c / sqrt(Var[c]))]. Compared on the same chains, the difference has mean 0
    # and a standard error we can compute; 5 of them (measured over 9 seeds: at most 1.6).
    m = gaussian_expectation(lambda z: torch.sigmoid(z).square(), math.hypot(gamma_x, gamma_h))
    difference = h.square() - m * squashed.square()
    difference_error = float(difference.std()) / math.sqrt(difference.numel())
    assert abs(float(difference.mean())) < 5 * difference_error

    # 2. Eq. 14 also takes c / sqrt(Var[c]) as N(0, 1); it is not Gaussian (a sum of bounded
    # terms, kurtosis 2.8-3.3 here), which moves Var[h] by a few percent. Measured Var[h] /
    # var_h - 1 at 2^17 chains over 9 seeds: (2, 2, 1): -1.6 to -2.0%, (0.5, 0.5, 0.5): +1.4 to
    # +2.0%, (1, 3, 2): -4.3 to -5.0%; relative standard error 0.35-0.41%. Allowed: 6% for the
    # Gaussian approximation + 5 standard errors. Taking E[sigmoid(o)]^2 for E[sigmoid(o)^2] in
    # eq. 14 would be off by 10% to 56% here, and ignoring gamma_c (DRAW, and (1, 3, 2)) by 56%
    # and 61%: both are caught (checked by mutating rnorm).
    normalized = estimate / var_h  # Var[h / sqrt(var_h)], NP eq. 17: should be ~1
    assert abs(normalized - 1) < 0.06 + 5 * standard_error / var_h, (estimate, var_h)


# -- end to end: a Norm-Prop NormLSTM keeps its hidden state at unit variance -------------------


def test_normprop_lstm_propagates_unit_variance() -> None:
    torch.manual_seed(0)
    steps, batch, features = 50, 256, 64
    x = torch.randn(steps, batch, features)
    variances = {}
    for kind in ("normprop", "none"):
        lstm = NormLSTM(features, 64, input_norm=kind, recurrent_norm=kind, cell_norm=kind, batch_first=False)
        with torch.no_grad():
            output, _ = lstm(x)  # (T, B, H)
        variances[kind] = output.var(dim=(1, 2), unbiased=False)  # (T,): over batch and units
    # Measured over seeds 0-4: Norm-Prop's variance is 0.64-0.67 at t = 0 (h_0 = 0: only the input
    # term), 0.94-0.97 at t = 2, and between 0.998 and 1.101 at every t >= 20 (seed 0: 0.998 to
    # 1.040); the per-seed means over t >= 20 are 1.025-1.070, a few percent high because the
    # paper's independence assumptions are only approximate (c is not Gaussian, and h is
    # correlated across units through W_h). A plain LSTM with the same orthogonal weights settles
    # at 0.037-0.041.
    later = variances["normprop"][20:]
    assert bool(((later > 0.85) & (later < 1.15)).all()), later
    assert bool((variances["none"][20:] < 0.1).all()), variances["none"][20:]


# -- input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma_x", "gamma_h", "gamma_c"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_normprop_variances_rejects_bad_gammas(name: str, bad: float) -> None:
    gammas = {"gamma_x": 1.0, "gamma_h": 1.0, "gamma_c": 1.0, name: bad}
    with pytest.raises(ValueError, match=rf"Expected {name} to be finite and >= 0, but got {bad}"):
        normprop_variances(**gammas)


def test_normprop_variances_rejects_zero_input() -> None:
    with pytest.raises(ValueError, match="gamma_x or gamma_h > 0"):
        normprop_variances(0.0, 0.0, 1.0)
    # One of the two terms is enough.
    assert all(math.isfinite(v) and v > 0 for v in normprop_variances(0.0, 1.0, 1.0))


@pytest.mark.parametrize("num_points", [2, 1, 0, -3])
def test_num_points_below_three_rejected(num_points: int) -> None:
    with pytest.raises(ValueError, match=rf"Expected num_points >= 3, but got {num_points}"):
        gaussian_expectation(torch.sin, 1.0, num_points=num_points)
    with pytest.raises(ValueError, match=rf"Expected num_points >= 3, but got {num_points}"):
        normprop_variances(1.0, 1.0, 1.0, num_points=num_points)


def test_default_number_of_points() -> None:
    assert DEFAULT_QUADRATURE_POINTS == 3073
