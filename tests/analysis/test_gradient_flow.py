"""BN Fig. 1a's gradient flow: the numbers against independent computations, the presets' regimes,
the warnings for non-finite norms, and the written files."""

import argparse
import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnorm.analysis.gradient_flow import (
    _build,
    _classifier,
    _warn_non_finite,
    add_parser,
    gradient_flow,
    measurement_batch,
    run,
    settings_for,
)
from rnorm.data import read_idx
from rnorm.data.mnist import SAMPLE_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _reference_rnn_gradients(model, classifier, x, y, placement, stats_grad):
    """BN Fig. 1a's RNN written out: per-step batch mean and biased variance, then autograd.grad.

    ``sum``: ``tanh(BN(h W_h^T + x W_x^T))`` (the authors' code); ``separate``: one BN per term.
    """

    def bn(z, gamma):
        mean, var = z.mean(0), z.var(0, unbiased=False)
        if stats_grad == "detached":
            mean, var = mean.detach(), var.detach()
        return gamma * (z - mean) / torch.sqrt(var + 1e-5)

    h = x.new_zeros(x.shape[0], model.hidden_size)
    states = []
    for t in range(x.shape[1]):
        recurrent, inputs = h @ model.weight_hh.T, x[:, t] @ model.weight_ih.T
        if placement == "sum":
            h = torch.tanh(bn(recurrent + inputs, model.gammas["sum"]))
        else:
            h = torch.tanh(bn(recurrent, model.gammas["recurrent"]) + bn(inputs, model.gammas["input"]))
        states.append(h)
    loss = F.cross_entropy(classifier(states[-1]), y)  # the batch mean
    return torch.stack(torch.autograd.grad(loss, states))  # (T, B, H)


# -- the paper's figure -----------------------------------------------------------------------------


def test_paper_batch_is_the_first_100_training_images_in_the_authors_order():
    import numpy as np

    settings = settings_for("paper-fig1a")
    inputs, targets = measurement_batch(settings)
    images = read_idx(SAMPLE_DIR / "train-images-idx3-ubyte.gz", ndim=3)[:100].reshape(100, 784)
    np.random.seed(1)  # sequential_mnist.py: np.random.seed(args.seed), then its first draw
    order = torch.from_numpy(np.random.randint(0, 784, size=(784,)))
    # Scaled in float32, as the data module (and the authors' Fuel, floatX float32) does, then widened.
    expected = (images.float() / 255).double()[:, order].unsqueeze(2)  # (B, T, 1)
    assert inputs.dtype == torch.float64
    torch.testing.assert_close(inputs, expected, rtol=0, atol=0)
    assert torch.equal(targets, read_idx(SAMPLE_DIR / "train-labels-idx1-ubyte.gz", ndim=1)[:100].long())


def test_paper_preset_small_gamma_stays_level_large_gamma_vanishes():
    settings = settings_for("paper-fig1a", gammas=[0.1, 1.0])
    inputs, targets = measurement_batch(settings)
    norms = gradient_flow("rnn", inputs, targets, settings, seed=0)
    assert norms.shape == (2, 784)
    for row, gamma in zip(norms, settings.gammas):
        torch.manual_seed(0)  # what gradient_flow draws: the model, then the classifier
        model = _build("rnn", gamma, 1, settings).double()
        assert torch.equal(model.weight_hh, torch.eye(100, dtype=torch.double))
        classifier = _classifier(settings, 10).double()
        grads = _reference_rnn_gradients(model, classifier, inputs, targets, "sum", "through")
        expected = grads.norm(dim=2).mean(dim=1)  # each example's norm, averaged over the batch
        # float64 on both sides, the same operations in another order: round-off compounds over
        # 784 steps to ~1e-13 relative; 1e-9 leaves room without hiding a real difference.
        torch.testing.assert_close(row, expected, rtol=1e-9, atol=0)
    small, large = norms
    # Measured: gamma 0.1 stays within a factor 4 from t = 50 to 700 (6.8e-4 to 2.7e-3) and is
    # 0.07 times its last value at t = 100; gamma 1.0 falls from 1e-2 at t = 784 to 8e-98 at t = 100.
    # The bounds leave a wide margin on both sides and still separate "level" from "vanished".
    middle = small[49:700]
    assert middle.max() / middle.min() < 10  # level
    assert large[99] / large[-1] < 1e-50  # vanished going back in time
    assert (large[99:] > 0).all()  # float64: no underflow to exactly 0


# -- the rnorm preset: a mixing W_h --------------------------------------------------------------------


@pytest.fixture(scope="module")
def permuted_batch():
    """32 permuted-MNIST digits of the embedded sample, first 150 steps, float64."""
    settings = settings_for("rnorm", order="permutation", batch_size=32)
    inputs, targets = measurement_batch(settings)
    return inputs[:, :150], targets


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_rnorm_preset_large_gamma_gradient_grows_back_in_time_small_gamma_stays_level(kind, permuted_batch):
    # Measured (seeds 0-2, t = 10 over t = 150): gamma 0.1 gives 0.05-1.4 (RNN), 0.8-1.0 (LSTM);
    # gamma 1.0 gives 8e2-7e3 (RNN), 2e5-7e5 (LSTM): with an orthogonal (mixing) W_h the gradient
    # explodes going back in time at large gamma (see docs/analysis.md).
    inputs, targets = permuted_batch
    settings = settings_for("rnorm", hidden_size=32, gammas=[0.1, 1.0])
    norms = gradient_flow(kind, inputs, targets, settings, seed=0)
    assert norms.shape == (2, 150)
    assert torch.isfinite(norms).all()
    early_over_last = norms[:, 9] / norms[:, -1]
    assert 1e-2 < early_over_last[0] < 1e2  # small gamma: nearly level
    assert early_over_last[1] > 1e2 * early_over_last[0]  # large gamma: orders of magnitude larger early


@pytest.mark.parametrize(("placement", "stats_grad"), [("separate", "through"), ("sum", "through"), ("sum", "detached")])
@pytest.mark.parametrize("recurrent_init", ["identity", "orthogonal"])
def test_rnn_gradients_match_a_loop_written_out(placement, stats_grad, recurrent_init):
    torch.manual_seed(5)
    x, y = torch.randn(6, 9, 2, dtype=torch.double), torch.randint(0, 10, (6,))
    settings = settings_for("rnorm", hidden_size=5, gammas=[0.3, 1.0], bn_placement=placement, stats_grad=stats_grad,
                            recurrent_init=recurrent_init, models=["rnn"])
    norms = gradient_flow("rnn", x, y, settings, seed=3)
    for row, gamma in zip(norms, [0.3, 1.0]):
        torch.manual_seed(3)
        model = _build("rnn", gamma, 2, settings).double()
        classifier = nn.Linear(5, 10).double()
        expected = _reference_rnn_gradients(model, classifier, x, y, placement, stats_grad).flatten(1).norm(dim=1)
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=0)  # float64, 9 steps: round-off only


def test_detached_statistics_change_the_gradient():
    torch.manual_seed(5)
    x, y = torch.randn(6, 9, 2, dtype=torch.double), torch.randint(0, 10, (6,))
    through, detached = (
        gradient_flow("rnn", x, y, settings_for("paper-fig1a", hidden_size=5, gammas=[1.0], stats_grad=s), seed=3)
        for s in ("through", "detached")
    )
    assert not torch.allclose(through, detached, rtol=1e-3)


def test_lstm_gradients_match_the_layers_hidden_probe():
    torch.manual_seed(5)
    x, y = torch.rand(6, 9, 1, dtype=torch.double), torch.randint(0, 10, (6,))
    settings = settings_for("rnorm", hidden_size=4, gammas=[0.5])
    norms = gradient_flow("lstm", x, y, settings, seed=3)
    torch.manual_seed(3)
    model = _build("lstm", 0.5, 1, settings).double()
    classifier = nn.Linear(4, 10).double()
    probe = torch.zeros(9, 6, 4, dtype=torch.double, requires_grad=True)  # (T, B, H)
    output, _ = model(x, hidden_probe=probe)
    (grad,) = torch.autograd.grad(F.cross_entropy(classifier(output[:, -1]), y), probe)
    torch.testing.assert_close(norms[0], grad.flatten(1).norm(dim=1), rtol=1e-10, atol=0)


def test_settings_reject_what_the_lstm_cannot_do_and_unknown_values():
    with pytest.raises(ValueError, match=r"bn_placement 'sum' and stats_grad 'detached' apply to the rnn model only"):
        settings_for("paper-fig1a", models=["rnn", "lstm"])
    with pytest.raises(ValueError, match=r"Expected order in \('scanline', 'permutation', 'authors'\), but got 'random'"):
        settings_for("rnorm", order="random")
    with pytest.raises(ValueError, match=r"Unknown preset 'fig1a'; expected one of \['paper-fig1a', 'rnorm'\]"):
        settings_for("fig1a")


# -- non-finite norms -----------------------------------------------------------------------------


def test_non_finite_and_zero_norms_are_named_in_a_warning():
    row = torch.tensor([float("inf"), float("inf"), float("nan"), 1.0, 0.0, 0.0, 2.0, 0.0])
    settings = settings_for("rnorm", gammas=[0.5])
    with pytest.warns(UserWarning, match=r"(?s)rnn, gamma = 0.5: overflowed to inf/nan at t = 1-3\n.*underflowed to 0 at t = 5-6, 8"):
        _warn_non_finite({"rnn": row.unsqueeze(0)}, settings)


def test_float32_underflow_warns_instead_of_writing_zeros_silently(tmp_path):
    # gamma = 1.0 on the paper's setup falls to 1e-98 by t = 100 (float64): below float32's range.
    with pytest.warns(UserWarning, match=r"\(float32\)") as caught:
        run(tmp_path, gammas=[1.0], dtype="float32", plot=False)
    message = str(caught[0].message)
    assert "rnn, gamma = 1: underflowed to 0 at t = 1-" in message and "float64 (--dtype float64)" in message
    with open(tmp_path / "gradient_flow.csv") as f:
        values = [float(r["grad_norm"]) for r in csv.DictReader(f)]
    assert values[0] == 0.0 and values[-1] > 0


# -- files and command line --------------------------------------------------------------------------


def test_run_writes_csv_and_png(tmp_path):
    paths = run(tmp_path, preset="rnorm", gammas=[0.1, 1.0], hidden_size=8, batch_size=8, steps=20, order="permutation")
    assert [p.name for p in paths] == ["gradient_flow.csv", "gradient_flow.png"]
    with open(tmp_path / "gradient_flow.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "gamma", "t", "grad_norm"]
    assert len(rows) == 2 * 20 * 2
    assert {r["model"] for r in rows} == {"rnn", "lstm"}
    assert sorted({int(r["t"]) for r in rows}) == list(range(1, 21))
    png = (tmp_path / "gradient_flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024


def test_cli_options_override_the_preset_and_no_plot_writes_no_png(tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="analysis"))
    args = parser.parse_args(
        ["gradient-flow", "--output_dir", str(tmp_path), "--gammas", "0.1", "0.7", "--hidden_size", "6",
         "--batch_size", "4", "--steps", "5", "--no_plot", "--models", "rnn", "lstm", "--bn_placement", "separate",
         "--recurrent_init", "orthogonal", "--norm", "frobenius", "--order", "scanline"]
    )
    paths = args.run(args)
    assert [p.name for p in paths] == ["gradient_flow.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradient_flow.csv"]
    with open(tmp_path / "gradient_flow.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5 * 2 and {r["model"] for r in rows} == {"rnn", "lstm"}
