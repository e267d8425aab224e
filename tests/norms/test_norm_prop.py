"""The ``normprop`` strategy (Laurent et al., NP eq. 15–17) on each site and wired into a cell."""

from __future__ import annotations

import pytest
import torch

from rnorm import NormLSTM, NormLSTMCell
from rnorm.functional.normprop import normprop_variances
from rnorm.norms import NormProp, create, get


def _cell(input_gamma=None, recurrent_gamma=None, cell_kwargs=None, input_norm="normprop", recurrent_norm="normprop"):
    def kwargs(gamma):
        return None if gamma is None else {"gamma_init": gamma}

    return NormLSTMCell(
        3,
        8,
        input_norm=input_norm,
        recurrent_norm=recurrent_norm,
        cell_norm="normprop",
        input_norm_kwargs=kwargs(input_gamma),
        recurrent_norm_kwargs=kwargs(recurrent_gamma),
        cell_norm_kwargs=cell_kwargs,
    )


def _variances(norm: NormProp) -> tuple[float, float]:
    return float(norm.cell_var), float(norm.hidden_var)


def test_registered_under_normprop() -> None:
    assert get("normprop") is NormProp
    assert get("NormProp") is NormProp  # names are case-insensitive


# -- defaults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "num_features", "gamma"), [("input", 32, 2.0), ("recurrent", 32, 2.0), ("cell", 8, 1.0)]
)
def test_default_gammas(site: str, num_features: int, gamma: float) -> None:
    # NP §5.1: gamma_x = gamma_h = 2, gamma_c = 1; one learnable gamma per weight row / unit.
    norm = create("normprop", site=site, num_features=num_features)
    assert isinstance(norm.gamma, torch.nn.Parameter)
    assert torch.equal(norm.gamma.detach(), torch.full((num_features,), gamma))


def test_standalone_cell_site_assumes_paper_gammas() -> None:
    # Without siblings (never attached), Var[c] and Var[h] are those of gamma_x = gamma_h = 2.
    norm = NormProp("cell", 8)
    assert _variances(norm) == pytest.approx(normprop_variances(2.0, 2.0, 1.0), rel=1e-6)


def test_cell_in_a_paper_cell() -> None:
    cell = NormLSTMCell(3, 8, input_norm="normprop", recurrent_norm="normprop", cell_norm="normprop")
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(2.0, 2.0, 1.0), rel=1e-6)


# -- the cell reads gamma_x and gamma_h from its siblings ----------------------------------------


def test_cell_reads_gammas_from_siblings_draw() -> None:
    # DRAW's setting (NP §5.2): every gamma 0.5.
    cell = _cell(0.5, 0.5, {"gamma_init": 0.5})
    # The buffers are float32, so equal to the float64 estimate to float32 rounding.
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(0.5, 0.5, 0.5), rel=1e-6)
    assert _variances(cell.cell_norm) != pytest.approx(normprop_variances(2.0, 2.0, 0.5), rel=1e-3)


def test_cell_reads_each_sibling_separately() -> None:
    cell = _cell(0.5, 3.0)
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(0.5, 3.0, 1.0), rel=1e-6)


@pytest.mark.parametrize(
    ("input_norm", "input_kwargs", "expected_gamma_x"),
    [("wn", {"gamma_init": 0.7}, 0.7), ("bn", None, 0.1), ("ln", None, 1.0), ("none", None, 2.0)],
)
def test_cell_reads_other_strategies_output_std(input_norm, input_kwargs, expected_gamma_x) -> None:
    # wn, bn and ln report gamma as their output std; none has none, so the paper's 2 is assumed.
    cell = NormLSTMCell(
        3, 8, input_norm=input_norm, input_norm_kwargs=input_kwargs, recurrent_norm="normprop", cell_norm="normprop"
    )
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(expected_gamma_x, 2.0, 1.0), rel=1e-6)


def test_explicit_gamma_x_and_gamma_h_override_siblings() -> None:
    cell = _cell(0.5, 0.5, {"gamma_x": 1.5, "gamma_h": 0.7})
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(1.5, 0.7, 1.0), rel=1e-6)
    # Either one alone: the other still comes from its sibling.
    cell = _cell(0.5, 0.5, {"gamma_x": 1.5})
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(1.5, 0.5, 1.0), rel=1e-6)
    cell = _cell(0.5, 0.5, {"gamma_h": 0.7})
    assert _variances(cell.cell_norm) == pytest.approx(normprop_variances(0.5, 0.7, 1.0), rel=1e-6)


def test_every_layer_and_direction_is_wired() -> None:
    lstm = NormLSTM(
        3,
        8,
        num_layers=2,
        bidirectional=True,
        input_norm="normprop",
        recurrent_norm="normprop",
        cell_norm="normprop",
        input_norm_kwargs={"gamma_init": 0.5},
        recurrent_norm_kwargs={"gamma_init": 1.5},
    )
    expected = normprop_variances(0.5, 1.5, 1.0)
    for cell in lstm.cells:
        assert _variances(cell.cell_norm) == pytest.approx(expected, rel=1e-6)


# -- the variances are fixed buffers ------------------------------------------------------------


def test_variances_are_buffers_saved_and_loaded() -> None:
    cell = _cell(0.5, 0.5, {"gamma_init": 0.5})
    buffers = dict(cell.named_buffers())
    parameters = dict(cell.named_parameters())
    for name in ("cell_norm.cell_var", "cell_norm.hidden_var"):
        assert name in buffers and name not in parameters
        assert name in cell.state_dict()
    # A cell built with other gammas takes the checkpoint's variances.
    other = _cell()
    assert _variances(other.cell_norm) != pytest.approx(_variances(cell.cell_norm))
    other.load_state_dict(cell.state_dict())
    assert _variances(other.cell_norm) == _variances(cell.cell_norm)


def test_variances_fixed_during_training() -> None:
    torch.manual_seed(0)
    cell = _cell()
    before = _variances(cell.cell_norm)
    gammas_before = [norm.gamma.detach().clone() for norm in cell.norms]
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
    x = torch.randn(5, 4, 3)
    for _ in range(3):
        state = None
        for t in range(x.shape[0]):
            state = cell(x[t], state, t=t)
        optimizer.zero_grad()
        state[0].square().sum().backward()
        optimizer.step()
    # Every gamma (gamma_x, gamma_h, gamma_c) learned something; the variances did not move.
    for norm, gamma in zip(cell.norms, gammas_before):
        assert not torch.equal(norm.gamma.detach(), gamma)
    assert _variances(cell.cell_norm) == before
    assert cell.cell_norm.cell_var.grad is None and not cell.cell_norm.cell_var.requires_grad


# -- the forward computation ---------------------------------------------------------------------


@pytest.mark.parametrize("site", ["input", "recurrent"])
def test_transformed_weight_rows_have_norm_gamma(site: str) -> None:
    torch.manual_seed(0)
    norm = NormProp(site, 12)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(12))  # negative entries included
    weight = torch.randn(12, 5) * torch.rand(12, 1) * 10  # rows of unrelated scales
    transformed = norm.transform_weight(weight)
    torch.testing.assert_close(transformed.norm(dim=1), norm.gamma.detach().abs())
    # Each row keeps its direction (up to the sign of gamma): NP eq. 15.
    cosine = torch.nn.functional.cosine_similarity(transformed, weight, dim=1)
    torch.testing.assert_close(cosine, torch.sign(norm.gamma.detach()))
    # The activations themselves pass through unchanged.
    x = torch.randn(2, 3, 12)
    assert torch.equal(norm(x), x) and torch.equal(norm.step(x[0], 0), x[0])


def test_transformed_weight_rejects_wrong_rows() -> None:
    with pytest.raises(ValueError, match="Expected a weight with 12 rows"):
        NormProp("input", 12).transform_weight(torch.randn(8, 5))


def test_cell_site_scales_cell_and_hidden_state() -> None:
    # NP eq. 17: tanh(gamma_c c / sqrt(Var[c])) inside, 1 / sqrt(Var[h]) outside.
    cell = _cell(0.5, 0.5, {"gamma_init": 0.5})
    norm = cell.cell_norm
    c = torch.randn(4, 8)
    var_c, var_h = _variances(norm)
    torch.testing.assert_close(norm.step(c, 3), 0.5 * c / var_c**0.5)
    torch.testing.assert_close(norm(c.unsqueeze(0)), 0.5 * c.unsqueeze(0) / var_c**0.5)
    torch.testing.assert_close(torch.as_tensor(norm.hidden_scale), torch.tensor(var_h**-0.5))
    weight = torch.randn(8, 8)
    assert norm.transform_weight(weight) is weight


def test_cell_step_against_equations() -> None:
    # One NormLSTMCell step against NP eq. 15-17 written out.
    torch.manual_seed(0)
    cell = _cell(0.5, 1.5, {"gamma_init": 0.8})
    with torch.no_grad():
        cell.bias.normal_()
    x, h, c = torch.randn(4, 3), torch.randn(4, 8), torch.randn(4, 8)
    h_new, c_new = cell(x, (h, c))

    def scaled(weight, gamma):
        return gamma * weight / weight.norm(dim=1, keepdim=True)

    with torch.no_grad():
        gates = x @ scaled(cell.weight_ih, 0.5).t() + h @ scaled(cell.weight_hh, 1.5).t() + cell.bias  # eq. 15
        i, f, g, o = gates.chunk(4, dim=1)
        expected_c = torch.sigmoid(i) * torch.tanh(g) + torch.sigmoid(f) * c  # eq. 16
        var_c, var_h = normprop_variances(0.5, 1.5, 0.8)
        expected_h = torch.sigmoid(o) * torch.tanh(0.8 * expected_c / var_c**0.5) / var_h**0.5  # eq. 17
    torch.testing.assert_close(c_new, expected_c)
    torch.testing.assert_close(h_new, expected_h)


def test_repr_shows_variances() -> None:
    text = repr(NormProp("cell", 4))
    assert "site='cell'" in text and "cell_var=" in text and "hidden_var=" in text


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["input", "recurrent"])
@pytest.mark.parametrize("option", ["gamma_x", "gamma_h"])
def test_gamma_x_and_gamma_h_only_on_the_cell(site: str, option: str) -> None:
    with pytest.raises(ValueError, match="gamma_x and gamma_h are options of the cell site"):
        NormProp(site, 8, **{option: 1.0})


@pytest.mark.parametrize("gamma_init", [0.0, -1.0])
def test_cell_gamma_init_must_be_positive(gamma_init: float) -> None:
    with pytest.raises(ValueError, match=rf"Expected gamma_init > 0 on the cell site, but got {gamma_init}"):
        NormProp("cell", 8, gamma_init=gamma_init)


def test_bad_explicit_gammas_rejected() -> None:
    with pytest.raises(ValueError, match="Expected gamma_x to be finite and >= 0"):
        NormProp("cell", 8, gamma_x=-1.0)
    with pytest.raises(ValueError, match="gamma_x or gamma_h > 0"):
        NormProp("cell", 8, gamma_x=0.0, gamma_h=0.0)
    with pytest.raises(ValueError, match="Expected num_points >= 3"):
        NormProp("cell", 8, quadrature_points=2)
