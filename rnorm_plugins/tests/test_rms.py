"""Tests of the example plugin: RMSNorm's math, its discovery through the entry point, and a NormLSTM using it.

The numeric tests run in float64 against formulas written out here, independently of
``rnorm_plugins.rms`` and of ``rnorm.functional``.
"""

from __future__ import annotations

import doctest
import importlib.metadata
import importlib.util

import pytest
import torch
from rnorm_plugins.rms import RMSNorm

import rnorm
import rnorm_plugins
from rnorm import norms
from rnorm.norms import NORMALIZERS, Normalizer

# Both sides compute the same function in float64 with a different order of operations (sum / F
# and sqrt-then-divide here, mean and rsqrt in the module), so they agree to a few ulps
# (~1e-16 relative) per operation. 1e-12 leaves room for that through a T-step recurrence but is
# far below any modelling error: misplacing eps (e.g. outside the sqrt) or centering x changes the
# result by ~1e-6 relative or more.
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def reference_rms(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Zhang & Sennrich eq. 4 over the last axis: gamma * x / sqrt(sum(x^2) / F + eps) + beta."""
    mean_square = (x * x).sum(dim=-1, keepdim=True) / x.shape[-1]
    y = gamma * (x / torch.sqrt(mean_square + eps))
    return y if beta is None else y + beta


def randomize_(norm: RMSNorm, generator: torch.Generator) -> None:
    """Give γ (and β) distinct random values so that a mix-up of parameters or sites shows."""
    with torch.no_grad():
        norm.gamma.copy_(0.5 + torch.rand(norm.gamma.shape, generator=generator, dtype=norm.gamma.dtype))
        if norm.beta is not None:
            norm.beta.copy_(0.3 * torch.randn(norm.beta.shape, generator=generator, dtype=norm.beta.dtype))


# -- the module on its own -----------------------------------------------------------------------
@pytest.mark.parametrize("site", ["input", "recurrent", "cell"])
@pytest.mark.parametrize("learn_beta", [False, True])
def test_forward_and_step_match_reference(site: str, learn_beta: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(site, 6, gamma_init=0.7, eps=1e-3, learn_beta=learn_beta).double()
    randomize_(norm, gen)
    x = 3.0 * torch.randn(4, 5, 6, generator=gen, dtype=torch.float64) + 1.5  # (T, B, F), non-zero mean
    expected = reference_rms(x, norm.gamma, norm.beta, 1e-3)
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    torch.testing.assert_close(norm(x, torch.ones(4, 5, dtype=torch.bool)), expected, **TIGHT)
    for t in range(x.shape[0]):
        torch.testing.assert_close(norm.step(x[t], t), expected[t], **TIGHT)  # (B, F)


def test_gradients_match_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm("recurrent", 8, learn_beta=True).double()
    randomize_(norm, gen)
    x = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((norm(x) * weights).sum(), (x, norm.gamma, norm.beta))
    reference = reference_rms(x, norm.gamma, norm.beta, norm.eps)
    expected = torch.autograd.grad((reference * weights).sum(), (x, norm.gamma, norm.beta))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TIGHT)
    assert torch.autograd.gradcheck(lambda v: norm.step(v, 0), (x[0].detach().requires_grad_(),))


def test_defaults_and_parameters() -> None:
    norm = RMSNorm("cell", 5)
    assert norm.eps == 1e-5 and norm.beta is None
    assert [name for name, _ in norm.named_parameters()] == ["gamma"]
    torch.testing.assert_close(norm.gamma.detach(), torch.ones(5))
    assert RMSNorm.supported_sites == frozenset({"input", "recurrent", "cell"})
    assert RMSNorm.batch_statistics is None
    assert norm.hidden_scale is None and norm.output_std() == 1.0  # None: no scale on h_t
    with_beta = RMSNorm("input", 4, gamma_init=0.1, learn_beta=True)
    torch.testing.assert_close(with_beta.gamma.detach(), torch.full((4,), 0.1))
    torch.testing.assert_close(with_beta.beta.detach(), torch.zeros(4))
    assert "learn_beta=True" in repr(with_beta)


def test_no_centering() -> None:
    # A constant vector keeps its sign and is scaled to RMS 1 (layer norm would map it to 0).
    y = RMSNorm("cell", 4, eps=1e-12).step(torch.full((1, 4), 2.5, dtype=torch.float64), t=0)
    torch.testing.assert_close(y, torch.ones(1, 4, dtype=torch.float64))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_rejects_non_positive_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps > 0"):
        RMSNorm("cell", 4, eps=eps)


def test_docstring_example_runs() -> None:
    # rnorm_plugins/rnorm_plugins is outside pytest's testpaths, so its doctest is run here.
    result = doctest.testmod(rnorm_plugins.rms, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# -- discovery through the entry point -------------------------------------------------------------
def test_entry_point_is_declared() -> None:
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="rnorm.normalizers") if ep.name == "rms"]
    assert entry_point.value == "rnorm_plugins.rms:RMSNorm"
    assert entry_point.dist is not None and entry_point.dist.name == "rnorm-plugins"


def test_listed_and_resolved_by_name() -> None:
    first_line = RMSNorm.__doc__.strip().splitlines()[0]
    assert norms.available()["rms"] == first_line
    assert norms.get("rms") is RMSNorm and norms.get("RMS") is RMSNorm
    assert isinstance(norms.create("rms", site="cell", num_features=3), RMSNorm)
    assert rnorm_plugins.RMSNorm is RMSNorm


def test_module_registers_nothing_at_import() -> None:
    # Run the module's code once more, as a fresh module: a self-registering decorator would raise
    # (the name is taken) or, with override=True, replace the registered class.
    before = dict(NORMALIZERS.entries)
    spec = importlib.util.spec_from_file_location("_rms_plugin_copy", rnorm_plugins.rms.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert dict(NORMALIZERS.entries) == before
    assert issubclass(module.RMSNorm, Normalizer) and module.RMSNorm is not RMSNorm


# -- in a NormLSTM ---------------------------------------------------------------------------------
def test_recurrent_site_in_train_and_eval() -> None:
    torch.manual_seed(0)
    lstm = rnorm.NormLSTM(3, 8, recurrent_norm="rms")
    assert all(isinstance(cell.recurrent_norm, RMSNorm) for cell in lstm.cells)
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 5, 6, 4])
    out, (h_n, c_n) = lstm.train()(x, lengths=lengths)
    assert out.shape == (4, 6, 8) and h_n.shape == c_n.shape == (1, 4, 8)
    out.sum().backward()
    assert lstm.cells[0].recurrent_norm.gamma.grad is not None
    assert torch.isfinite(lstm.cells[0].recurrent_norm.gamma.grad).all()
    with torch.no_grad():
        first, _ = lstm.eval()(x, lengths=lengths)
        second, _ = lstm(x, lengths=lengths)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert first[3, 4:].abs().sum() == 0  # padding stays zero


def reference_lstm(x, lengths, weight_ih, weight_hh, bias, h0, c0, site_params, eps):
    """A per-sequence, per-step LSTM with RMS normalization on its three sites (BN eq. 6-8).

    Args:
        x: ``(B, T, D)``; lengths: ``(B,)``; weight_ih ``(4H, D)``, weight_hh ``(4H, H)``,
        bias ``(4H,)``, h0 and c0 ``(H,)``; site_params: ``{site: (gamma, beta)}``.

    Returns:
        ``output`` ``(B, T, H)`` zero past each length, and ``h_n``, ``c_n`` ``(B, H)``.
    """
    batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]
    output = torch.zeros(batch, steps, hidden, dtype=x.dtype)
    h_n, c_n = [], []
    for b in range(batch):  # one sequence at a time: no batching, no masks
        h, c = h0, c0
        for t in range(int(lengths[b])):
            pre = reference_rms(weight_ih @ x[b, t], *site_params["input"], eps) + bias
            pre = pre + reference_rms(weight_hh @ h, *site_params["recurrent"], eps)
            i, f, g, o = (pre[k * hidden : (k + 1) * hidden] for k in range(4))
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(reference_rms(c, *site_params["cell"], eps))
            output[b, t] = h
        h_n.append(h)
        c_n.append(c)
    return output, torch.stack(h_n), torch.stack(c_n)


@pytest.mark.parametrize("impl", ["fused", "fused_torch", "reference"])
def test_norm_lstm_with_rms_on_every_site_matches_reference_loop(impl: str) -> None:
    """Every implementation of the layer: ``fused`` runs RMSNorm through its ``"rms"`` fused step
    (in rnorm's compiled kernels where they are built), ``reference`` through ``step``."""
    gen = torch.Generator().manual_seed(2)
    lstm = rnorm.NormLSTM(
        3,
        5,
        input_norm="rms",
        recurrent_norm="rms",
        cell_norm="rms",
        input_norm_kwargs={"learn_beta": True, "eps": 1e-3},
        recurrent_norm_kwargs={"eps": 1e-3},
        cell_norm_kwargs={"learn_beta": True, "eps": 1e-3},
        forget_bias=1.0,
        impl=impl,
    ).double()
    cell = lstm.cells[0]
    for norm in cell.norms:
        randomize_(norm, gen)
    with torch.no_grad():
        cell.bias.copy_(torch.randn(20, generator=gen, dtype=torch.float64))
        cell.h0.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        cell.c0.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 7, 3, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 1])
    out, (h_n, c_n) = lstm(x, lengths=lengths)
    params = {site: (norm.gamma, norm.beta) for site, norm in zip(("input", "recurrent", "cell"), cell.norms)}
    want_out, want_h, want_c = reference_lstm(
        x, lengths, cell.weight_ih, cell.weight_hh, cell.bias, cell.h0, cell.c0, params, eps=1e-3
    )
    torch.testing.assert_close(out, want_out, **TIGHT)
    torch.testing.assert_close(h_n[0], want_h, **TIGHT)
    torch.testing.assert_close(c_n[0], want_c, **TIGHT)
    # Gradients of every parameter, the three sites' γ and β included, agree as well.
    parameters = [p for p in lstm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), parameters)
    want_grads = torch.autograd.grad(want_out.sum() + want_h.sum() + want_c.sum(), parameters)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, **TIGHT)
