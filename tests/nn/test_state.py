"""State: checkpoints (population statistics, T_max, Norm-Prop variances), initial states,
initializers, dropout between layers and an explicit ``hx``.

Float64 where outputs are compared with a reference computed another way (``TOL`` 1e-12: same
operations, different batching); round trips are compared exactly (``torch.equal``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from rnorm import NormLSTM, NormLSTMCell

TOL = dict(rtol=1e-12, atol=1e-12)
D, H = 3, 4


def _bn_model(**kwargs) -> NormLSTM:
    torch.manual_seed(0)
    return NormLSTM(D, H, num_layers=2, bidirectional=True, **kwargs).double()


def _x(batch: int = 4, steps: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, D, generator=g, dtype=torch.double) + 0.3


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("input_norm", ["bn", "seqbn"])
def test_state_dict_round_trip_keeps_population_statistics_and_t_max(input_norm):
    trained = _bn_model(input_norm=input_norm)
    for seed, steps in enumerate((5, 8, 6)):
        trained(_x(steps=steps, seed=seed))
    trained.eval()
    fresh = _bn_model(input_norm=input_norm).eval()
    assert fresh.cells[0].recurrent_norm.t_max == 0  # empty (0, 4H) buffers: shapes must adapt
    fresh.load_state_dict(trained.state_dict())
    for cell, loaded in zip(trained.cells, fresh.cells):
        assert loaded.recurrent_norm.t_max == cell.recurrent_norm.t_max == 8
        assert loaded.cell_norm.t_max == 8
    _assert_same_state(fresh.state_dict(), trained.state_dict())
    x = _x(steps=11, seed=9)  # beyond T_max too
    out_trained, (h_trained, _) = trained(x, torch.tensor([11, 4, 9, 1]))
    out_fresh, (h_fresh, _) = fresh(x, torch.tensor([11, 4, 9, 1]))
    assert torch.equal(out_fresh, out_trained) and torch.equal(h_fresh, h_trained)


def test_loading_a_shorter_t_max_shrinks_the_buffers():
    short, long = _bn_model(), _bn_model()
    short(_x(steps=3))
    long(_x(steps=9))
    long.load_state_dict(short.state_dict())
    assert long.cells[3].cell_norm.t_max == 3 and long.cells[3].cell_norm.running_var.shape == (3, H)


def test_torch_save_and_load_round_trip(tmp_path):
    trained = _bn_model()
    trained(_x(steps=7))
    trained(_x(steps=7, seed=2))
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    fresh = _bn_model()
    fresh.load_state_dict(torch.load(path))
    _assert_same_state(fresh.state_dict(), trained.state_dict())
    assert fresh.cells[2].input_norm.t_max == 7
    trained.eval(), fresh.eval()
    assert torch.equal(fresh(_x(seed=3))[0], trained(_x(seed=3))[0])


def test_normprop_fixed_variances_survive_a_round_trip(tmp_path):
    def normprop():
        torch.manual_seed(0)
        return NormLSTM(D, H, input_norm="normprop", recurrent_norm="normprop", cell_norm="normprop").double()

    model = normprop()
    cell_norm = model.cells[0].cell_norm
    state = model.state_dict()
    assert "cells.0.cell_norm.cell_var" in state and "cells.0.cell_norm.hidden_var" in state
    # Values a fresh model would not recompute by itself, so the check sees the checkpoint's.
    cell_norm.cell_var.fill_(0.37)
    cell_norm.hidden_var.fill_(0.21)
    torch.save(model.state_dict(), tmp_path / "np.pt")
    fresh = normprop()
    assert float(fresh.cells[0].cell_norm.cell_var) != 0.37
    fresh.load_state_dict(torch.load(tmp_path / "np.pt"))
    assert float(fresh.cells[0].cell_norm.cell_var) == 0.37 and float(fresh.cells[0].cell_norm.hidden_var) == 0.21
    assert torch.equal(fresh(_x())[0], model(_x())[0])


# -- initial state --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["ln", "none"])
def test_learned_initial_state_gets_gradients(norm):
    torch.manual_seed(0)
    model = NormLSTM(D, H, num_layers=2, input_norm=norm, recurrent_norm=norm, cell_norm=norm).double()
    out, (_, c_n) = model(_x())
    (out.square().sum() + c_n.sum()).backward()
    for cell in model.cells:
        assert cell.h0.requires_grad and cell.c0.requires_grad
        assert cell.h0.grad.abs().min() > 0 and cell.c0.grad.abs().min() > 0


def test_bn_learned_c0_gets_gradients():
    # With bn on the recurrent site, h0 (the same for every sample) is removed by the batch mean of
    # W_h h0 at step 1; c0 still reaches the output through the forget gate.
    model = _bn_model()
    out, _ = model(_x())
    out.square().sum().backward()
    assert all(cell.c0.grad.abs().min() > 0 for cell in model.cells)


def test_fixed_initial_state_stays_zero_without_gradients():
    torch.manual_seed(0)
    model = NormLSTM(D, H, input_norm="ln", recurrent_norm="ln", cell_norm="ln", learn_initial_state=False).double()
    cell = model.cells[0]
    assert not cell.h0.requires_grad and not cell.c0.requires_grad
    out, (_, c_n) = model(_x())
    (out.sum() + c_n.sum()).backward()
    assert cell.h0.grad is None and cell.c0.grad is None
    assert torch.equal(cell.h0, torch.zeros(H, dtype=torch.double)) and torch.equal(cell.c0, torch.zeros_like(cell.c0))
    zeros = torch.zeros(1, 4, H, dtype=torch.double)
    torch.testing.assert_close(model(_x(), hx=(zeros, zeros))[0], out, **TOL)


def test_initial_state_noise_is_added_in_training_only():
    torch.manual_seed(0)
    noisy = NormLSTM(D, H, input_norm="ln", recurrent_norm="ln", cell_norm="ln", initial_state_noise=0.5).double()
    quiet = copy.deepcopy(noisy)
    quiet.cells[0].initial_state_noise = 0.0
    x = _x()
    assert not torch.equal(noisy(x)[0], noisy(x)[0])  # training: fresh noise each forward
    assert torch.equal(quiet(x)[0], quiet(x)[0])  # the control: nothing else is random
    noisy.eval(), quiet.eval()
    assert torch.equal(noisy(x)[0], noisy(x)[0])
    torch.testing.assert_close(noisy(x)[0], quiet(x)[0], rtol=0, atol=0)  # eval: no noise at all
    # The noise has the configured standard deviation: 20000 draws, std error ~0.5%, 3% allowed.
    cell = noisy.cells[0].train()
    with torch.no_grad():
        cell.h0.fill_(1.0)
        h0, c0 = cell.initial_state(5000)  # (5000, H)
    assert abs(float((h0 - 1.0).std()) - 0.5) < 0.015 and abs(float(c0.std()) - 0.5) < 0.015
    assert abs(float((h0 - 1.0).mean())) < 0.015


def test_initial_state_noise_on_h0_only_leaves_c0_alone():
    # The authors' code (sequential_mnist.py --noise) adds the noise to h_0 only.
    cell = NormLSTMCell(D, H, "ln", "ln", "ln", initial_state_noise=0.5, initial_state_noise_on="h0").double()
    with torch.no_grad():
        cell.c0.fill_(0.25)
        h0, c0 = cell.initial_state(2000)  # (2000, H) each
    assert torch.equal(c0, torch.full((2000, H), 0.25, dtype=torch.double))
    # 8000 draws: the std's standard error is ~0.8 %, 3 % allowed.
    assert abs(float(h0.std()) - 0.5) < 0.015
    both = NormLSTMCell(D, H, "ln", "ln", "ln", initial_state_noise=0.5).double()
    with torch.no_grad():
        assert float(both.initial_state(2000)[1].std()) > 0.4  # the default still perturbs c_0


def test_initial_state_noise_in_eval_when_asked():
    torch.manual_seed(0)
    model = NormLSTM(D, H, input_norm="ln", recurrent_norm="ln", cell_norm="ln", initial_state_noise=0.5,
                     initial_state_noise_on="h0", initial_state_noise_in_eval=True).double().eval()
    x = _x()
    assert not torch.equal(model(x)[0], model(x)[0])  # a fresh draw at every evaluation
    with torch.no_grad():
        h0, c0 = model.cells[0].initial_state(2000)
    assert abs(float(h0.std()) - 0.5) < 0.015 and not c0.any()  # 8000 draws, as above


def test_bad_initial_state_noise_target():
    with pytest.raises(ValueError, match=r"Expected initial_state_noise_on 'h0_c0' or 'h0', but got 'c0'"):
        NormLSTMCell(D, H, initial_state_noise=0.1, initial_state_noise_on="c0")


# -- initializers ---------------------------------------------------------------------------------


def test_identity_recurrent_init_gives_identity_gate_blocks():
    cell = NormLSTMCell(D, H, recurrent_init="identity")
    assert torch.equal(cell.weight_hh.detach(), torch.eye(H).repeat(4, 1))


@pytest.mark.parametrize(("input_size", "hidden_size"), [(3, 5), (7, 4)])
def test_orthogonal_init_gives_orthogonal_gate_blocks(input_size, hidden_size):
    torch.manual_seed(0)
    cell = NormLSTMCell(input_size, hidden_size)
    for weight in (cell.weight_ih.detach(), cell.weight_hh.detach()):
        for block in weight.split(hidden_size):  # (H, fan_in): orthonormal rows or columns
            gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), rtol=0, atol=1e-5)  # float32
        assert not torch.allclose(weight[:hidden_size], weight[hidden_size : 2 * hidden_size])


def _orthonormal_columns(matrix: torch.Tensor) -> bool:
    # float32 weights: the Gram matrix is exact to a few ulps of 1.
    return torch.allclose(matrix.T @ matrix, torch.eye(matrix.shape[1]), rtol=0, atol=1e-5)


def test_grouped_recurrent_init_identity_candidate_and_one_orthogonal_matrix():
    # The authors' --init id: W_h's candidate block (g) the identity, the other three one
    # orthogonal (3H, H) matrix, not three orthogonal blocks.
    torch.manual_seed(0)
    hidden = 6
    cell = NormLSTMCell(D, hidden, recurrent_init={"g": "identity", "ifo": "orthogonal"})
    i, f, g, o = cell.weight_hh.detach().split(hidden)
    assert torch.equal(g, torch.eye(hidden))
    assert _orthonormal_columns(torch.cat([i, f, o]))
    assert not any(_orthonormal_columns(block) for block in (i, f, o))  # each about 1/sqrt(3) in scale


def test_grouped_input_init_one_orthogonal_matrix_over_all_gates():
    # The authors' W_x for one input: one unit-norm row of length 4H (one orthogonal 1 x 4H matrix),
    # where per-block orthogonal gives each of the four blocks unit norm.
    torch.manual_seed(0)
    joint = NormLSTMCell(1, 5, input_init={"ifgo": "orthogonal"}).weight_ih.detach()  # (20, 1)
    torch.testing.assert_close(joint.norm(), torch.tensor(1.0), rtol=0, atol=1e-6)  # float32 round-off
    per_block = NormLSTMCell(1, 5).weight_ih.detach()
    torch.testing.assert_close(per_block.norm(), torch.tensor(2.0), rtol=0, atol=1e-6)


def test_a_string_init_equals_four_one_gate_groups():
    torch.manual_seed(3)
    plain = NormLSTMCell(D, H, recurrent_init="orthogonal").weight_hh.detach()
    torch.manual_seed(3)
    grouped = NormLSTMCell(D, H, recurrent_init={"i": "orthogonal", "f": "orthogonal", "g": "orthogonal",
                                                 "o": "orthogonal"}).weight_hh.detach()
    assert torch.equal(plain, grouped)


def test_uniform_init_is_bounded_by_one_over_sqrt_h():
    torch.manual_seed(0)
    cell = NormLSTMCell(D, 16, input_init="uniform", recurrent_init="uniform")
    for weight in (cell.weight_ih, cell.weight_hh):
        assert weight.abs().max() <= 0.25 and weight.abs().max() > 0.2


def test_forget_bias_sets_the_forget_gate_block_only():
    cell = NormLSTMCell(D, H, forget_bias=1.5)
    expected = torch.zeros(4 * H)
    expected[H : 2 * H] = 1.5  # gate order i, f, g, o
    assert torch.equal(cell.bias.detach(), expected)
    assert torch.equal(NormLSTMCell(D, H).bias.detach(), torch.zeros(4 * H))


# -- dropout --------------------------------------------------------------------------------------


def test_dropout_acts_between_layers_in_training_only():
    torch.manual_seed(0)
    model = NormLSTM(D, H, num_layers=2, dropout=0.5, input_norm="ln", recurrent_norm="ln", cell_norm="ln").double()
    layers = []
    for cell in model.cells:  # the two layers as separate one-layer models
        single = NormLSTM(cell.input_size, H, input_norm="ln", recurrent_norm="ln", cell_norm="ln").double()
        single.cells[0].load_state_dict(cell.state_dict())
        layers.append(single)
    x = _x()
    torch.manual_seed(7)
    out, _ = model(x)
    torch.manual_seed(7)  # the same dropout mask, by hand, on the first layer's output only
    expected, _ = layers[1](F.dropout(layers[0](x)[0], 0.5, training=True))
    torch.testing.assert_close(out, expected, **TOL)
    assert bool((out != 0).all())  # the last layer's output is not dropped
    model.eval()
    expected_eval, _ = layers[1](layers[0](x)[0])
    torch.testing.assert_close(model(x)[0], expected_eval, **TOL)


def test_dropout_with_one_layer_changes_nothing():
    torch.manual_seed(0)
    model = NormLSTM(D, H, dropout=0.5, input_norm="ln", recurrent_norm="ln", cell_norm="ln").double()
    reference = copy.deepcopy(model)
    reference.dropout = 0.0
    torch.testing.assert_close(model(_x())[0], reference(_x())[0], rtol=0, atol=0)


# -- explicit state -------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_explicit_hx_is_used(bidirectional):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(D, H, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    model = NormLSTM.from_lstm(lstm, input_norm="none", recurrent_norm="none", cell_norm="none")
    layers = 2 * (2 if bidirectional else 1)
    hx = (torch.randn(layers, 4, H, dtype=torch.double), torch.randn(layers, 4, H, dtype=torch.double))
    ref_out, (ref_h, ref_c) = lstm(_x(), hx)
    out, (h_n, c_n) = model(_x(), hx=hx)
    # torch.nn.LSTM: another implementation of the same float64 math; 1e-10 covers its rounding.
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c_n, ref_c, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, model(_x())[0])  # and it differs from the learned (zero) state


def test_explicit_hx_replaces_the_learned_state_with_bn():
    model = _bn_model()
    model(_x())  # population statistics, then evaluation: deterministic
    model.eval()
    with torch.no_grad():
        for cell in model.cells:
            cell.c0.add_(1.0)
    hx = (torch.zeros(4, 4, H, dtype=torch.double), torch.zeros(4, 4, H, dtype=torch.double))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for cell in reference.cells:
            cell.c0.zero_()
    torch.testing.assert_close(model(_x(), hx=hx)[0], reference(_x())[0], **TOL)
