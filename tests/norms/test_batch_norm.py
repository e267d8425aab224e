"""Batch normalization through time (``bn``) and sequencewise (``seqbn``), BN §3 and §5.4.

Every expected statistic is recomputed here from the raw tensor with plain indexing
(``x[t][mask[t]]``) and ``Tensor.mean``/``Tensor.var(unbiased=False)``, never through
``rnorm.functional``. Everything runs in float64: the library and the reference compute the same
sums in a different order, so they agree to ~1e-15 relative; ``TOL`` (1e-12) is far above that and
far below any real discrepancy (a wrong step, the unbiased variance, a padded entry in a statistic).
"""

import pytest
import torch

from rnorm.norms import SequenceBatchNorm, TimeBatchNorm, create

TOL = dict(rtol=1e-12, atol=1e-12)
F = 3
# gamma is created in float32 and converted by .double(): float32(0.1) = 0.10000000149..., so the
# expected values use this exact number, not 0.1 (a 1.5e-8 relative difference otherwise).
G = float(torch.tensor(0.1, dtype=torch.float32))


def _steps_with_different_moments(num_steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """``(T, B, F)`` where step ``t`` has mean ~``10 t`` and standard deviation ~``t + 1``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_steps, batch, F, generator=g, dtype=torch.double)
    t = torch.arange(num_steps, dtype=torch.double).view(-1, 1, 1)
    return 10.0 * t + (t + 1.0) * x


def _moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over the rows of ``(N, F)``."""
    return rows.mean(0), rows.var(0, unbiased=False)


def _bn(site: str = "recurrent", **kwargs) -> TimeBatchNorm:
    return TimeBatchNorm(site, F, **kwargs).double()


# -- per-step statistics --------------------------------------------------------------------------


def test_first_update_stores_each_steps_batch_mean_and_biased_variance():
    x = _steps_with_different_moments(4, 6)
    norm = _bn()
    y = norm(x)
    assert norm.t_max == 4 and tuple(norm.running_mean.shape) == (4, F)
    for t in range(4):
        mean, var = _moments(x[t])
        torch.testing.assert_close(norm.running_mean[t], mean, **TOL)
        # With B = 6 the unbiased variance is 6/5 of this: the test tells them apart.
        torch.testing.assert_close(norm.running_var[t], var, **TOL)
        # The output of step t is normalized with step t's own batch statistics (BN eq. 5).
        torch.testing.assert_close(y[t], G * (x[t] - mean) / torch.sqrt(var + 1e-5), **TOL)
    # The steps really differ (means ~0, 10, 20, 30): one shared statistic could not match them all.
    assert (norm.running_mean[1:, 0] - norm.running_mean[:-1, 0]).abs().min() > 5
    assert norm.num_batches_tracked.tolist() == [1, 1, 1, 1]


def test_later_updates_are_an_exponential_moving_average_with_momentum():
    first, second = _steps_with_different_moments(3, 5, seed=1), _steps_with_different_moments(3, 5, seed=2)
    norm = _bn(momentum=0.25)
    norm(first)
    norm(second)
    for t in range(3):
        (m1, v1), (m2, v2) = _moments(first[t]), _moments(second[t])
        torch.testing.assert_close(norm.running_mean[t], 0.75 * m1 + 0.25 * m2, **TOL)
        torch.testing.assert_close(norm.running_var[t], 0.75 * v1 + 0.25 * v2, **TOL)
    assert norm.num_batches_tracked.tolist() == [2, 2, 2]


def test_momentum_none_is_the_cumulative_average_of_the_minibatch_estimates():
    batches = [_steps_with_different_moments(2, 4, seed=s) for s in range(3)]
    norm = _bn(momentum=None)
    for x in batches:
        norm(x)
    for t in range(2):
        means, variances = zip(*(_moments(x[t]) for x in batches))
        torch.testing.assert_close(norm.running_mean[t], torch.stack(means).mean(0), **TOL)
        torch.testing.assert_close(norm.running_var[t], torch.stack(variances).mean(0), **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_step_by_step_equals_the_vectorized_forward(training):
    x = _steps_with_different_moments(5, 4, seed=3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    vectorized, stepped = _bn(), _bn()
    for norm in (vectorized, stepped):  # identical, non-trivial population statistics first
        norm.train()
        norm(_steps_with_different_moments(5, 4, seed=4))
        norm.train(training)
    y_vec = vectorized(x, mask)
    stepped.start(5)
    y_step = torch.stack([stepped.step(x[t], t, mask[t]) for t in range(5)])
    torch.testing.assert_close(y_step[mask], y_vec[mask], **TOL)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(stepped, name), getattr(vectorized, name), **TOL)
    assert torch.equal(stepped.num_batches_tracked, vectorized.num_batches_tracked)


# -- T_max ----------------------------------------------------------------------------------------


def test_t_max_is_the_longest_training_length_and_never_shrinks():
    norm = _bn(momentum=0.5)
    short, longer, shortest = (_steps_with_different_moments(n, 4, seed=n) for n in (3, 5, 2))
    norm(short)
    assert norm.t_max == 3
    norm(longer)
    assert norm.t_max == 5
    after_longer = norm.running_mean.clone(), norm.running_var.clone()
    for t in (3, 4):  # new steps: the first estimate as is
        mean, var = _moments(longer[t])
        torch.testing.assert_close(norm.running_mean[t], mean, **TOL)
        torch.testing.assert_close(norm.running_var[t], var, **TOL)
    norm(shortest)
    assert norm.t_max == 5 and tuple(norm.running_var.shape) == (5, F)
    # Steps 2..4 were not in the short batch: untouched.
    torch.testing.assert_close(norm.running_mean[2:], after_longer[0][2:], rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var[2:], after_longer[1][2:], rtol=0, atol=0)
    assert norm.num_batches_tracked.tolist() == [3, 3, 2, 1, 1]


def test_eval_beyond_t_max_uses_the_statistics_of_step_t_max():
    norm = _bn()
    norm(_steps_with_different_moments(3, 6, seed=5))  # T_max = 3
    norm.eval()
    x = _steps_with_different_moments(7, 2, seed=6)
    y = norm(x)
    assert norm.t_max == 3  # evaluation never grows the statistics
    for t in range(7):
        s = min(t, 2)  # 0-based index of step min(t + 1, T_max)
        expected = G * (x[t] - norm.running_mean[s]) / torch.sqrt(norm.running_var[s] + 1e-5)
        torch.testing.assert_close(y[t], expected, **TOL)
        torch.testing.assert_close(norm.step(x[t], t), expected, **TOL)
    far = G * (x[0] - norm.running_mean[2]) / torch.sqrt(norm.running_var[2] + 1e-5)
    torch.testing.assert_close(norm.step(x[0], 1000), far, **TOL)


@pytest.mark.parametrize("norm_class", [TimeBatchNorm, SequenceBatchNorm])
def test_untrained_eval_behaves_as_mean_zero_variance_one(norm_class):
    norm = norm_class("input", F).double().eval()
    x = _steps_with_different_moments(4, 3, seed=7)
    torch.testing.assert_close(norm(x), G * x / (1.0 + 1e-5) ** 0.5, **TOL)
    if norm_class is TimeBatchNorm:
        assert norm.t_max == 0
        torch.testing.assert_close(norm.step(x[2], 2), G * x[2] / (1.0 + 1e-5) ** 0.5, **TOL)


# -- padding --------------------------------------------------------------------------------------


def test_masked_statistics_equal_those_of_the_unpadded_entries_alone():
    x = _steps_with_different_moments(4, 5, seed=8)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool
    )  # any pattern: the norm itself does not require prefixes
    x[~mask] = 1e6  # garbage in the padding
    norm = _bn()
    y = norm(x, mask)
    for t in range(4):
        mean, var = _moments(x[t][mask[t]])
        torch.testing.assert_close(norm.running_mean[t], mean, **TOL)
        torch.testing.assert_close(norm.running_var[t], var, **TOL)
        real = x[t][mask[t]]
        torch.testing.assert_close(y[t][mask[t]], G * (real - mean) / torch.sqrt(var + 1e-5), **TOL)


def test_a_step_without_unpadded_entries_is_not_updated():
    norm = _bn(momentum=0.5)
    x = _steps_with_different_moments(3, 4, seed=9)
    empty_last = torch.ones(3, 4, dtype=torch.bool)
    empty_last[2] = False
    norm(x, empty_last)
    # Step 3 exists (T_max counts it) but saw no sample: the neutral mean 0, variance 1, no count.
    assert norm.t_max == 3 and norm.num_batches_tracked.tolist() == [1, 1, 0]
    torch.testing.assert_close(norm.running_mean[2], torch.zeros(F, dtype=torch.double), rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var[2], torch.ones(F, dtype=torch.double), rtol=0, atol=0)
    # Its first real estimate is then taken as is, not averaged with the placeholder.
    later = _steps_with_different_moments(3, 4, seed=10)
    norm(later)
    mean, var = _moments(later[2])
    torch.testing.assert_close(norm.running_mean[2], mean, **TOL)
    torch.testing.assert_close(norm.running_var[2], var, **TOL)
    before = norm.running_mean.clone(), norm.running_var.clone()
    norm(_steps_with_different_moments(3, 4, seed=11), empty_last)
    torch.testing.assert_close(norm.running_mean[2], before[0][2], rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var[2], before[1][2], rtol=0, atol=0)
    assert norm.num_batches_tracked.tolist() == [3, 3, 1]
    # Through step(): a step whose mask is all False is not updated either.
    stepped = _bn()
    stepped.step(x[0], 0, torch.zeros(4, dtype=torch.bool))
    assert stepped.t_max == 1 and stepped.num_batches_tracked.tolist() == [0]
    torch.testing.assert_close(stepped.running_var[0], torch.ones(F, dtype=torch.double), rtol=0, atol=0)


# -- seqbn ----------------------------------------------------------------------------------------


def test_seqbn_shares_one_statistic_over_all_unpadded_steps_and_samples():
    x = _steps_with_different_moments(4, 3, seed=12)
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    x[~mask] = -1e6
    norm = SequenceBatchNorm("input", F).double()
    y = norm(x, mask)
    mean, var = _moments(x[mask])  # (N, F) of the 9 real entries
    assert tuple(norm.running_mean.shape) == (1, F)
    torch.testing.assert_close(norm.running_mean[0], mean, **TOL)
    torch.testing.assert_close(norm.running_var[0], var, **TOL)
    torch.testing.assert_close(y[mask], G * (x[mask] - mean) / torch.sqrt(var + 1e-5), **TOL)
    norm.eval()  # the same single statistic at every step, however long the sequence
    z = _steps_with_different_moments(9, 2, seed=13)
    torch.testing.assert_close(norm(z), G * (z - mean) / torch.sqrt(var + 1e-5), **TOL)


@pytest.mark.parametrize("site", ["recurrent", "cell"])
def test_seqbn_only_accepts_the_input_site(site):
    message = rf"SequenceBatchNorm cannot normalize the '{site}' site; it supports \['input'\]"
    with pytest.raises(ValueError, match=message):
        SequenceBatchNorm(site, F)
    with pytest.raises(ValueError, match="supports"):
        create("seqbn", site=site, num_features=F)


def test_seqbn_cannot_be_stepped():
    norm = SequenceBatchNorm("input", F)
    with pytest.raises(RuntimeError, match="seqbn normalizes a whole sequence at once"):
        norm.step(torch.randn(2, F), 0)


# -- parameters and defaults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm_class", "site"),
    [(TimeBatchNorm, "input"), (TimeBatchNorm, "recurrent"), (TimeBatchNorm, "cell"), (SequenceBatchNorm, "input")],
)
def test_gamma_beta_and_eps_defaults(norm_class, site):
    norm = norm_class(site, 5)
    torch.testing.assert_close(norm.gamma.detach(), torch.full((5,), 0.1), rtol=0, atol=0)  # BN §4
    assert norm.gamma.requires_grad
    if site == "cell":  # beta_c is learned (BN eq. 8), initialized to 0
        assert norm.beta is not None and norm.beta.requires_grad
        torch.testing.assert_close(norm.beta.detach(), torch.zeros(5), rtol=0, atol=0)
        assert any(p is norm.beta for p in norm.parameters())
    else:  # beta_x = beta_h = 0: the LSTM bias b shifts (BN §3)
        assert norm.beta is None
        assert not any("beta" in name for name, _ in norm.named_parameters())
    assert norm.eps == 1e-5


def test_eps_default_is_added_to_the_variance():
    # A variance of 1e-6 is comparable to eps = 1e-5: without eps, or with another eps, the
    # output would be ~3.3x larger.
    x = torch.tensor([[[-1e-3], [1e-3]]], dtype=torch.double)  # (T=1, B=2, F=1), var 1e-6
    y = TimeBatchNorm("input", 1).double()(x)
    torch.testing.assert_close(y, G * x / (1e-6 + 1e-5) ** 0.5, **TOL)


def test_gradients_flow_through_the_batch_statistics():
    # BN differentiates through the batch mean: the sum over the batch of the normalized output is
    # constant, so its gradient with respect to the input is zero (1e-12: float64 rounding).
    x = _steps_with_different_moments(2, 5, seed=14).requires_grad_()
    _bn()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_momentum_out_of_range_is_rejected(momentum):
    with pytest.raises(ValueError, match=rf"Expected momentum in \(0, 1\] or None .*but got {momentum}"):
        TimeBatchNorm("input", F, momentum=momentum)


def test_eps_must_be_positive():
    with pytest.raises(ValueError, match=r"Expected eps > 0, but got 0"):
        TimeBatchNorm("input", F, eps=0.0)


def test_reset_forgets_the_population_statistics():
    norm = _bn()
    norm(_steps_with_different_moments(3, 4))
    norm.reset_population_statistics()
    assert norm.t_max == 0 and norm.num_batches_tracked.numel() == 0
    seq = SequenceBatchNorm("input", F)
    seq(torch.randn(3, 4, F) + 5)
    seq.reset_population_statistics()
    assert seq.running_mean.tolist() == [[0.0] * F] and seq.running_var.tolist() == [[1.0] * F]
    assert seq.num_batches_tracked.tolist() == [0]
