"""``estimate_population_statistics``: the average of the minibatch estimates (BN §3).

The expected statistics come from :func:`_reference_minibatch_estimates`, a per-step BN-LSTM loop
written from BN eq. 5-8 with plain indexing (``rows = pre[t][mask[t]]``) and
``Tensor.var(unbiased=False)``; it shares no code with ``rnorm`` beyond reading the parameters.
Everything is float64; the loop and the library compute the same quantities with different
summation orders, so ``TOL`` (1e-10) is loose for rounding yet tight for any wrong statistic.
"""

import copy

import pytest
import torch

from rnorm import NormLSTM
from rnorm.norms import BatchStatisticsNorm, TimeBatchNorm, estimate_population_statistics

TOL = dict(rtol=1e-10, atol=1e-10)
D, H = 3, 4


def _model(input_norm: str = "bn", **kwargs) -> NormLSTM:
    torch.manual_seed(0)
    model = NormLSTM(D, H, input_norm=input_norm, recurrent_norm="bn", cell_norm="bn", **kwargs).double()
    with torch.no_grad():  # every parameter non-trivial: h0, c0, bias, gammas, beta_c
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), D, generator=g, dtype=torch.double) * 2 + 1
    lengths = torch.tensor(lengths)
    x[torch.arange(x.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = 0.0
    return x, lengths


def _moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.mean(0), rows.var(0, unbiased=False)


def _reference_minibatch_estimates(cell, x, lengths, sequencewise_input=False):
    """Per-step batch mean and biased variance at each site of one BN-LSTM cell in training.

    Returns ``{site: (means (T, F), variances (T, F))}`` (``input`` ``(1, F)`` if sequencewise).
    """
    (input_norm, recurrent_norm, cell_norm), eps = cell.norms, 1e-5
    w_x, w_h, b = cell.weight_ih.detach(), cell.weight_hh.detach(), cell.bias.detach()
    batch, steps = x.shape[0], x.shape[1]
    mask = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    pre_x = x @ w_x.T  # (B, T, 4H)
    stats = {"input": [], "recurrent": [], "cell": []}
    if sequencewise_input:
        mean, var = _moments(pre_x[mask])
        stats["input"].append((mean, var))
        input_terms = input_norm.gamma.detach() * (pre_x - mean) / torch.sqrt(var + eps)
    else:
        input_terms = torch.empty_like(pre_x)
        for t in range(steps):
            mean, var = _moments(pre_x[:, t][mask[:, t]])
            stats["input"].append((mean, var))
            input_terms[:, t] = input_norm.gamma.detach() * (pre_x[:, t] - mean) / torch.sqrt(var + eps)
    h = cell.h0.detach().expand(batch, H).clone()
    c = cell.c0.detach().expand(batch, H).clone()
    for t in range(steps):
        real = mask[:, t]
        pre_h = h @ w_h.T
        mean, var = _moments(pre_h[real])
        stats["recurrent"].append((mean, var))
        gates = input_terms[:, t] + recurrent_norm.gamma.detach() * (pre_h - mean) / torch.sqrt(var + eps) + b
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        mean, var = _moments(c_new[real])
        stats["cell"].append((mean, var))
        c_hat = cell_norm.gamma.detach() * (c_new - mean) / torch.sqrt(var + eps) + cell_norm.beta.detach()
        h_new = torch.sigmoid(o) * torch.tanh(c_hat)
        h = torch.where(real.unsqueeze(1), h_new, h)
        c = torch.where(real.unsqueeze(1), c_new, c)
    return {site: tuple(torch.stack(s) for s in zip(*pairs)) for site, pairs in stats.items()}


def _average_estimates(per_batch):
    """Per step, the mean over the batches that had that step; and how many had it."""
    out = {}
    for site in per_batch[0]:
        steps = max(est[site][0].shape[0] for est in per_batch)
        means, variances, counts = [], [], []
        for t in range(steps):
            have = [est[site] for est in per_batch if est[site][0].shape[0] > t]
            means.append(torch.stack([m[t] for m, _ in have]).mean(0))
            variances.append(torch.stack([v[t] for _, v in have]).mean(0))
            counts.append(len(have))
        out[site] = torch.stack(means), torch.stack(variances), counts
    return out


# Variable lengths within and across batches: steps 6 and 7 exist only in the second batch, steps
# 4 and 5 in the first two; every step of a batch has >= 2 unpadded samples (bn's requirement).
LENGTHS = [[5, 5, 3, 2], [7, 7, 4], [3, 2, 3, 2, 3], [6, 6, 6, 6]]


@pytest.mark.parametrize("input_norm", ["bn", "seqbn"])
def test_population_statistics_are_the_average_of_the_minibatch_estimates(input_norm):
    model = _model(input_norm)
    model(*_batch([9, 9], seed=99))  # earlier statistics up to T_max = 9: must be forgotten
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS[:3])]
    cell = model.cells[0]
    per_batch = [_reference_minibatch_estimates(cell, x, n, input_norm == "seqbn") for x, n in batches]
    expected = _average_estimates(per_batch)

    used = estimate_population_statistics(model, batches, num_batches=3)

    assert used == 3
    for site, norm in zip(("input", "recurrent", "cell"), cell.norms):
        mean, var, counts = expected[site]
        assert norm.running_mean.shape == mean.shape, site  # T_max = 7 (or 1 slot for seqbn), not 9
        torch.testing.assert_close(norm.running_mean, mean, **TOL, msg=site)
        torch.testing.assert_close(norm.running_var, var, **TOL, msg=site)
        if input_norm == "seqbn" and site == "input":
            assert norm.num_batches_tracked.tolist() == [3]
        else:
            assert norm.num_batches_tracked.tolist() == counts == [3, 3, 3, 2, 2, 1, 1], site


def test_bidirectional_stacked_model_matches_separate_first_estimates():
    # A second, coarser reference for every cell of a 2-layer bidirectional model: each batch run
    # alone through a copy whose statistics were reset (so each slot holds that batch's first,
    # as-is estimate), then averaged per step over the batches that reached it.
    model = _model(num_layers=2, bidirectional=True)
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS[:3])]
    per_batch = []
    for batch in batches:
        alone = copy.deepcopy(model).train()
        for norm in alone.modules():
            if isinstance(norm, BatchStatisticsNorm):
                norm.reset_population_statistics()
        alone(*batch)
        per_batch.append([(n.running_mean.clone(), n.running_var.clone()) for n in _norms(alone)])

    estimate_population_statistics(model.eval(), batches)

    for k, norm in enumerate(_norms(model)):
        assert norm.t_max == 7
        for t in range(7):
            have = [est[k] for est in per_batch if est[k][0].shape[0] > t]
            torch.testing.assert_close(norm.running_mean[t], torch.stack([m[t] for m, _ in have]).mean(0), **TOL)
            torch.testing.assert_close(norm.running_var[t], torch.stack([v[t] for _, v in have]).mean(0), **TOL)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, TimeBatchNorm)]


def test_only_num_batches_of_a_longer_iterable_are_used():
    model, reference = _model(), _model()
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS)]
    calls = []

    def forward(m, batch):
        calls.append(batch)
        return m(*batch)

    assert estimate_population_statistics(model, iter(batches), num_batches=2, forward=forward) == 2
    assert len(calls) == 2
    estimate_population_statistics(reference, batches[:2])
    for a, b in zip(_norms(model), _norms(reference)):
        assert a.t_max == b.t_max == 7
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL)
        torch.testing.assert_close(a.running_var, b.running_var, **TOL)


def test_no_batch_past_num_batches_is_drawn_from_the_iterable():
    # A caller that passes a shared iterator (iter(dataloader)) keeps every batch not used.
    model = _model()
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS)]
    drawn = []

    def generate():
        for batch in batches:
            drawn.append(batch)
            yield batch

    iterator = generate()
    estimate_population_statistics(model, iterator, num_batches=2)
    assert len(drawn) == 2, f"{len(drawn)} batches were drawn from the iterator to use 2"


def test_mapping_batches_are_passed_as_keyword_arguments():
    by_keywords, by_position = _model(), _model()
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS[:2])]
    estimate_population_statistics(by_keywords, [{"x": x, "lengths": n} for x, n in batches])
    estimate_population_statistics(by_position, batches)
    for a, b in zip(_norms(by_keywords), _norms(by_position)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


def test_train_eval_modes_and_momenta_are_restored():
    model = _model()
    model.eval()
    model.cells[0].cell_norm.train()  # a mixed configuration, restored module by module
    for norm in _norms(model):
        norm.momentum = 0.3
    estimate_population_statistics(model, [_batch([4, 4], 0)])
    assert not model.training and not model.cells[0].training
    assert [n.training for n in model.cells[0].norms] == [False, False, True]
    assert [n.momentum for n in _norms(model)] == [0.3, 0.3, 0.3]
    assert model.cells[0].input_norm.t_max == 4  # and it did estimate


def test_modes_and_momenta_are_restored_when_a_batch_fails():
    model = _model().eval()
    with pytest.raises(ValueError, match="feature size"):
        estimate_population_statistics(model, [torch.randn(2, 3, D + 1, dtype=torch.double)])
    assert not any(m.training for m in model.modules())
    assert all(n.momentum == 0.1 for n in _norms(model))


def test_eval_after_estimation_uses_the_estimated_statistics():
    # The point of the estimate: evaluation normalizes step t with the averaged statistics. With
    # one batch of equal lengths the average is that batch's own estimate, so eval on the same
    # batch reproduces the training-mode output exactly.
    model = _model()
    batch = _batch([6, 6, 6], seed=5)
    estimate_population_statistics(model, [batch])
    model.eval()
    eval_out, _ = model(*batch)
    train_out, _ = copy.deepcopy(model).train()(*batch)
    torch.testing.assert_close(eval_out, train_out, **TOL)


@pytest.mark.parametrize("num_batches", [0, -2])
def test_num_batches_below_one_is_rejected(num_batches):
    with pytest.raises(ValueError, match=rf"Expected num_batches >= 1 or None, but got {num_batches}"):
        estimate_population_statistics(_model(), [_batch([3, 3], 0)], num_batches=num_batches)


def test_zero_batches_is_rejected():
    with pytest.raises(ValueError, match="No batches were given"):
        estimate_population_statistics(_model(), [])


def test_zero_batches_leaves_the_existing_statistics_alone():
    # The call failed, so it must not have replaced the statistics the model was trained with.
    model = _model()
    model(*_batch([5, 5, 5], seed=1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="No batches"):
        estimate_population_statistics(model, [])
    after = model.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items()), (
        "an empty iterable wiped the population statistics: T_max is now "
        f"{model.cells[0].input_norm.t_max}"
    )
