"""Padding: a padded sequence computes what it computes alone, and padding enters no statistic.

Parametrized over the registry itself (``available()``, plugins included); a strategy goes on
every site it supports and ``none`` on the others. Float64 throughout: a padded batch and a
sequence alone go through the same operations on different batch sizes, so results agree to
rounding (~1e-15); ``TOL`` (1e-12) is tight enough to see any leak from a padded entry.
"""

import copy

import pytest
import torch

from rnorm import NormLSTM
from rnorm.nn import lengths_to_mask, mask_to_lengths, reverse_padded
from rnorm.norms import SITES, available, get

TOL = dict(rtol=1e-12, atol=1e-12)
D, H = 3, 4
STRATEGIES = sorted(available())


def _sites(name: str) -> dict[str, str]:
    return {f"{site}_norm": name if site in get(name).supported_sites else "none" for site in SITES}


def _model(name: str, **kwargs) -> NormLSTM:
    torch.manual_seed(0)
    model = NormLSTM(D, H, num_layers=2, bidirectional=True, **_sites(name), **kwargs).double()
    with torch.no_grad():  # non-trivial gammas, betas, biases, initial states
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _train_a_little(model: NormLSTM, steps: int = 7) -> None:
    model.train()
    for seed in range(2):
        g = torch.Generator().manual_seed(100 + seed)
        model(torch.randn(5, steps, D, generator=g, dtype=torch.double) * 1.5 + 0.5)


def _padded(lengths: list[int], steps: int, fill: float = 0.0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), steps, D, generator=g, dtype=torch.double)
    lengths = torch.tensor(lengths)
    pad = torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)
    x[pad] = fill * torch.randn(int(pad.sum()), D, generator=g, dtype=torch.double).abs().add(1)
    return x, lengths


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_padded_sequence_in_eval_equals_that_sequence_alone(name):
    model = _model(name)
    _train_a_little(model)
    model.eval()
    x, lengths = _padded([7, 3, 5, 1, 7], steps=8, fill=50.0)  # T = 8 > every length
    out, (h_n, c_n) = model(x, lengths)
    assert out.shape == (5, 8, 2 * H) and h_n.shape == (4, 5, H)
    for b, n in enumerate(lengths.tolist()):
        alone, (h_alone, c_alone) = model(x[b : b + 1, :n])  # no padding, no lengths
        torch.testing.assert_close(out[b, :n], alone[0], **TOL, msg=f"sample {b}")
        torch.testing.assert_close(h_n[:, b], h_alone[:, 0], **TOL, msg=f"h_n of sample {b}")
        torch.testing.assert_close(c_n[:, b], c_alone[:, 0], **TOL, msg=f"c_n of sample {b}")
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


@pytest.mark.parametrize("name", STRATEGIES)
def test_garbage_padding_changes_no_statistic_and_no_real_output_in_training(name):
    zeros_model = _model(name)
    garbage_model = copy.deepcopy(zeros_model)
    lengths = [6, 6, 4, 4, 2, 2]  # >= 2 real samples at every step (bn in training)
    for seed in range(2):  # twice: the first estimate and a moving-average update
        x_zero, n = _padded(lengths, steps=7, fill=0.0, seed=seed)
        x_garbage, _ = _padded(lengths, steps=7, fill=1e6, seed=seed)
        assert x_garbage.abs().max() > 1e6 and torch.equal(x_zero[:, :2], x_garbage[:, :2])
        out_zero, (h_zero, c_zero) = zeros_model(x_zero, n)
        out_garbage, (h_garbage, c_garbage) = garbage_model(x_garbage, n)
        torch.testing.assert_close(out_garbage, out_zero, **TOL)
        torch.testing.assert_close(h_garbage, h_zero, **TOL)
        torch.testing.assert_close(c_garbage, c_zero, **TOL)
        pad = torch.arange(7).unsqueeze(0) >= n.unsqueeze(1)  # (B, T): step 6 is padding everywhere
        assert torch.equal(out_garbage[pad], torch.zeros_like(out_garbage[pad]))
        assert bool((out_garbage[~pad] != 0).all())  # and only there
    state_zero, state_garbage = zeros_model.state_dict(), garbage_model.state_dict()
    for key in state_zero:
        torch.testing.assert_close(state_garbage[key], state_zero[key], **TOL, msg=key)


def test_padding_past_every_length_does_not_extend_t_max():
    # T_max is the longest training *length*: the 4 all-padding steps at the end are no steps.
    model = _model("bn")
    x, lengths = _padded([5, 5, 3], steps=9, fill=1e3)
    model(x, lengths)
    for cell in model.cells:
        assert [norm.t_max for norm in cell.norms] == [5, 5, 5]
        assert cell.recurrent_norm.num_batches_tracked.tolist() == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("name", ["bn", "seqbn", "ln"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_a_mask_is_the_same_as_its_lengths(name, batch_first):
    by_lengths = _model(name, batch_first=batch_first)
    by_mask = copy.deepcopy(by_lengths)
    x, lengths = _padded([5, 5, 3, 3, 2], steps=6, fill=7.0)
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    if not batch_first:
        x, mask = x.transpose(0, 1), mask.t()  # (T, B, D), (T, B)
    for training in (True, False):
        by_lengths.train(training)
        by_mask.train(training)
        out_l, (h_l, c_l) = by_lengths(x, lengths)
        out_m, (h_m, c_m) = by_mask(x, mask=mask)
        torch.testing.assert_close(out_m, out_l, rtol=0, atol=0)
        torch.testing.assert_close(h_m, h_l, rtol=0, atol=0)
        torch.testing.assert_close(c_m, c_l, rtol=0, atol=0)
    for key, value in by_lengths.state_dict().items():
        torch.testing.assert_close(by_mask.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_full_lengths_equal_no_lengths():
    model = _model("bn")
    other = copy.deepcopy(model)
    x, _ = _padded([6, 6, 6], steps=6)
    out_none, _ = model(x)
    out_full, _ = other(x, torch.tensor([6, 6, 6]))
    torch.testing.assert_close(out_full, out_none, **TOL)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, **TOL, msg=key)


# -- the padding utilities ------------------------------------------------------------------------


def test_lengths_to_mask_is_time_major_and_true_on_real_steps():
    mask = lengths_to_mask(torch.tensor([3, 1, 2]), 4)
    expected = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # (T=4, B=3)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_mask_to_lengths_counts_the_real_steps_of_each_row():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # (B=3, T=4)
    assert mask_to_lengths(mask).tolist() == [3, 1, 4]
    lengths = torch.tensor([2, 5, 1, 3])
    assert torch.equal(mask_to_lengths(lengths_to_mask(lengths, 5).t()), lengths)


def test_mask_to_lengths_rejects_non_prefix_and_non_boolean_masks():
    with pytest.raises(ValueError, match=r"row 1 has a False before a True"):
        mask_to_lengths(torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Expected a 2-D boolean mask \(B, T\), but got dtype torch.int64"):
        mask_to_lengths(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"Expected a 2-D boolean mask \(B, T\), .*shape \(3,\)"):
        mask_to_lengths(torch.tensor([True, True, False]))


def test_mask_to_lengths_rejects_a_row_without_real_steps():
    # Its docstring promises a ValueError for "a row [that] has no real step".
    with pytest.raises(ValueError):
        mask_to_lengths(torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))


def test_reverse_padded_reverses_only_the_real_steps_of_each_sequence():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 2, 3)  # (T, B, ...): extra trailing dimensions are carried along
    lengths = torch.tensor([6, 1, 4, 3])
    expected = x.clone()
    for b, n in enumerate(lengths.tolist()):
        expected[:n, b] = x[:n, b].flip(0)  # by hand; padding stays where it was
    out = reverse_padded(x, lengths)
    assert torch.equal(out, expected)
    assert torch.equal(reverse_padded(out, lengths), x)  # an involution
    assert torch.equal(reverse_padded(x, None), x.flip(0))
    assert torch.equal(reverse_padded(x, torch.full((4,), 6)), x.flip(0))
