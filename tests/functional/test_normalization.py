"""Mask-aware moments and row normalization against straightforward loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rnorm.functional.normalization import affine, layer_moments, masked_moments, normalize, row_normalize


def _loop_moments(x: torch.Tensor, mask: torch.Tensor | None, dims: tuple[int, ...]):
    """Mean, biased variance and count over ``dims`` by enumerating entries one by one (float64)."""
    kept = [d for d in range(x.dim() - 1) if d not in dims]
    num_features = x.shape[-1]
    out_shape = [x.shape[d] for d in kept]
    mean = torch.zeros((*out_shape, num_features), dtype=torch.float64)
    var = torch.zeros_like(mean)
    count = torch.zeros(tuple(out_shape), dtype=torch.float64)
    for out_index in itertools.product(*(range(n) for n in out_shape)):
        values = []
        for in_index in itertools.product(*(range(x.shape[d]) for d in dims)):
            index = [0] * (x.dim() - 1)
            for d, i in zip(kept, out_index):
                index[d] = i
            for d, i in zip(dims, in_index):
                index[d] = i
            if mask is None or bool(mask[tuple(index)]):
                values.append(x[tuple(index)].double())
        count[out_index] = len(values)
        for f in range(num_features):
            column = [float(v[f]) for v in values]
            if column:
                mu = sum(column) / len(column)
                mean[out_index + (f,)] = mu
                var[out_index + (f,)] = sum((v - mu) ** 2 for v in column) / len(column)
    return mean, var, count


# (x shape, dims, mask shape): the time-major sequence (T, B, F) per step (1,), over everything
# (0, 1), per batch entry over time (0,), and one step (B, F) over the batch (0,).
CASES = [((5, 4, 3), (1,), (5, 4)), ((5, 4, 3), (0, 1), (5, 4)), ((5, 4, 3), (0,), (5, 4)), ((6, 3), (0,), (6,))]


@pytest.mark.parametrize(("shape", "dims", "mask_shape"), CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_masked_moments_against_loop(shape, dims, mask_shape, masked: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64) * 3 + 1
    mask = torch.rand(*mask_shape, generator=generator) < 0.6 if masked else None
    mean, var, count = masked_moments(x, mask, dims)
    expected_mean, expected_var, expected_count = _loop_moments(x, mask, dims)
    assert mean.shape == expected_mean.shape and var.shape == expected_var.shape
    assert count.shape == expected_count.shape  # like mean without its feature dimension
    assert count.dtype == x.dtype
    torch.testing.assert_close(count, expected_count)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


@pytest.mark.parametrize(("shape", "dims", "mask_shape"), CASES)
def test_full_mask_equals_no_mask(shape, dims, mask_shape) -> None:
    x = torch.randn(*shape)
    with_mask = masked_moments(x, torch.ones(mask_shape, dtype=torch.bool), dims)
    without = masked_moments(x, None, dims)
    for a, b in zip(with_mask, without):
        torch.testing.assert_close(a, b)


def test_count_shapes() -> None:
    x = torch.randn(5, 4, 3)
    assert masked_moments(x, None, (1,))[2].shape == (5,)
    assert masked_moments(x, None, (0, 1))[2].shape == ()
    assert masked_moments(x, None, (0,))[2].shape == (4,)
    assert float(masked_moments(x, None, (0, 1))[2]) == 20.0
    mask = torch.ones(5, 4, dtype=torch.bool)
    assert masked_moments(x, mask, (1,))[2].shape == (5,)
    assert masked_moments(x, mask, (0, 1))[2].shape == ()
    assert masked_moments(x, mask, (0,))[2].shape == (4,)


def test_empty_steps_give_finite_zeros() -> None:
    x = torch.randn(4, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False], [False, False, False]])
    mean, var, count = masked_moments(x, mask, (1,))
    torch.testing.assert_close(count, torch.tensor([2.0, 1.0, 0.0, 0.0]))
    assert bool(torch.isfinite(mean).all() and torch.isfinite(var).all())
    assert torch.equal(mean[2:], torch.zeros(2, 2)) and torch.equal(var[2:], torch.zeros(2, 2))
    # A single sample: its own mean, zero variance.
    torch.testing.assert_close(mean[1], x[1, 0])
    torch.testing.assert_close(var[1], torch.zeros(2))
    # Everything masked over (0, 1): zeros as well.
    mean, var, count = masked_moments(x, torch.zeros(4, 3, dtype=torch.bool), (0, 1))
    assert float(count) == 0.0 and torch.equal(mean, torch.zeros(2)) and torch.equal(var, torch.zeros(2))


def test_padding_values_never_enter_a_statistic() -> None:
    x = torch.randn(5, 4, 3)
    mask = torch.rand(5, 4) < 0.5
    garbage = x.clone()
    garbage[~mask] = 1e6
    for dims in [(1,), (0, 1), (0,)]:
        for a, b in zip(masked_moments(x, mask, dims), masked_moments(garbage, mask, dims)):
            torch.testing.assert_close(a, b)


def test_masked_moments_gradient_ignores_padding() -> None:
    x = torch.randn(5, 4, 3, requires_grad=True)
    mask = torch.rand(5, 4) < 0.7
    mean, var, _ = masked_moments(x, mask, (1,))
    (mean.sum() + var.sum()).backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))


def test_variance_is_biased() -> None:
    x = torch.tensor([[1.0], [3.0]])
    _, var, _ = masked_moments(x, None, (0,))
    assert float(var) == 1.0  # mean of squares about the mean, divided by n = 2, not n - 1


# -- row_normalize, layer_moments, normalize, affine -----------------------------------------------


def test_row_normalize_against_loop() -> None:
    weight = torch.randn(7, 5, dtype=torch.float64) * torch.rand(7, 1, dtype=torch.float64) * 10
    out = row_normalize(weight)
    for i in range(weight.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in weight[i]))
        torch.testing.assert_close(out[i], weight[i] / norm)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7, dtype=torch.float64))


def test_row_normalize_eps() -> None:
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = row_normalize(weight, eps=11.0)  # sqrt(25 + 11) = 6
    torch.testing.assert_close(out, torch.tensor([[0.5, 4.0 / 6.0], [0.0, 0.0]]))


def test_layer_moments_against_loop() -> None:
    x = torch.randn(3, 4, 6, dtype=torch.float64) * 2 + 5
    mean, var = layer_moments(x)
    assert mean.shape == (3, 4, 1) and var.shape == (3, 4, 1)
    for i, j in itertools.product(range(3), range(4)):
        values = [float(v) for v in x[i, j]]
        mu = sum(values) / len(values)
        assert float(mean[i, j, 0]) == pytest.approx(mu, rel=1e-12)
        assert float(var[i, j, 0]) == pytest.approx(sum((v - mu) ** 2 for v in values) / len(values), rel=1e-12)


def test_normalize_and_affine() -> None:
    x = torch.randn(4, 3)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    torch.testing.assert_close(normalize(x, mean, var, 1e-5), (x - mean) / torch.sqrt(var + 1e-5))
    gamma, beta = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(affine(x, gamma, beta), gamma * x + beta)
    torch.testing.assert_close(affine(x, gamma, None), gamma * x)
    torch.testing.assert_close(affine(x, None, beta), x + beta)
    assert affine(x, None, None) is x
