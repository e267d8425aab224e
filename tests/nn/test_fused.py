"""The fused recurrence (``impl="fused"``) computes what the reference loop computes.

Every comparison runs two NormLSTMs with the same weights, one ``impl="reference"`` (the per-step
loop of the papers' equations, itself checked against hand-written references in
tests/norms/test_reference.py) and one fused, in float64, and compares outputs, final
states, every parameter's and the input's gradient, the hidden-probe gradient and every buffer
(population statistics). Tolerance: 1e-9 relative to the largest magnitude of each tensor. The two
order their floating-point operations differently (batch means as GEMMs, ``tanh`` as
``2 σ(2a) − 1``, hand-derived backward), which in float64 leaves differences of about 1e-12 of
the values' scale; at bn's ``1/sqrt(eps)`` amplification of near-constant features they grow
by up to about 300×, still far below 1e-9, while any wrong term in a derivative is of the order of
the gradient itself.

Each comparison runs for both ways the fused loop does its per-step work: the compiled CPU kernels
(``impl="fused"``, skipped where the extension is not built) and torch operations
(``impl="fused_torch"``, what runs on CUDA). The kernels' own exp is accurate to a few units in
the last place, far inside the tolerance.

The last part compares ``impl="cudnn"`` (torch's own LSTM, for the strategies that leave a plain LSTM
after their weight transform) with the reference the same way, and checks its refusals.
"""

from __future__ import annotations

import pytest
import torch

from rnorm import kernels, norms
from rnorm.kernels import native, resolve_backend
from rnorm.nn import NormLSTM, dispatch

RTOL = 1e-9

NATIVE = pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels (rnorm.kernels._fused_step) are not built")


@pytest.fixture(params=[pytest.param("fused", marks=NATIVE), "fused_torch"])
def impl(request) -> str:
    """The fused recurrence with its per-step work in the compiled kernels, then in torch ops."""
    return request.param

#: (input, recurrent, cell): every fused kind on every site, and the papers' combinations.
SITES = [
    ("bn", "bn", "bn"),
    ("seqbn", "bn", "bn"),  # BN-e*
    ("ln", "ln", "ln"),
    ("normprop", "normprop", "normprop"),
    ("wn", "wn", "none"),
    ("none", "none", "none"),
    ("ln", "bn", "none"),
    ("none", "ln", "bn"),
    ("bn", "none", "ln"),
]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-300))


def _pair(sites, impl: str = "fused", **kwargs) -> tuple[NormLSTM, NormLSTM]:
    input_norm, recurrent_norm, cell_norm = sites
    options = dict(input_norm=input_norm, recurrent_norm=recurrent_norm, cell_norm=cell_norm, **kwargs)
    torch.manual_seed(0)
    reference = NormLSTM(impl="reference", **options).double()
    fused = NormLSTM(impl=impl, **options).double()
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _run(model: NormLSTM, x: torch.Tensor, lengths, probe: bool):
    """Forward and backward of a loss touching every output; returns everything to compare."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    kwargs = {}
    if probe:
        kwargs["hidden_probe"] = torch.zeros(x.shape[1], x.shape[0], model.hidden_size, dtype=x.dtype, requires_grad=True)
    output, (h_n, c_n) = model(x, lengths, **kwargs)
    weights = torch.linspace(-1, 1, output.numel(), dtype=x.dtype).view_as(output)  # no two outputs alike
    loss = (output * weights).sum() + h_n.square().sum() + 0.3 * c_n.sum()
    loss.backward()
    results = {"output": output.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "grad x": x.grad}
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    results.update({f"buffer {name}": b.clone() for name, b in model.named_buffers()})
    if probe:
        results["grad probe"] = kwargs["hidden_probe"].grad
    return results


def _assert_same(reference: dict, fused: dict) -> None:
    assert reference.keys() == fused.keys()
    errors = {key: _rel_err(fused[key], reference[key]) for key in reference}
    bad = {key: err for key, err in errors.items() if not err <= RTOL}
    assert not bad, f"fused differs from reference: {bad}"


@pytest.mark.parametrize("sites", SITES, ids=["/".join(s) for s in SITES])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_training_matches_reference(sites, padded, bidirectional, impl):
    reference, fused = _pair(sites, impl, input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 7, 5, 2, 6]) if padded else None
    probe = not bidirectional
    _assert_same(_run(reference, x, lengths, probe), _run(fused, x, lengths, probe))


@pytest.mark.parametrize("sites", SITES, ids=["/".join(s) for s in SITES])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_evaluation_matches_reference(sites, padded, impl):
    """Eval mode: population statistics (as affine maps per step), including steps past T_max."""
    reference, fused = _pair(sites, impl, input_size=3, hidden_size=5, bidirectional=True)
    lengths = torch.tensor([5, 3, 5, 4, 2, 5]) if padded else None
    for model in (reference, fused):
        with torch.no_grad():
            model(torch.randn(6, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), lengths)
        model.eval()
    x = torch.randn(6, 8, 3, dtype=torch.float64)  # 8 steps > T_max = 5
    eval_lengths = torch.tensor([8, 3, 7, 5, 2, 6]) if padded else None
    _assert_same(_run(reference, x, eval_lengths, False), _run(fused, x, eval_lengths, False))


@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("seqbn", "bn", "bn"), ("ln", "ln", "ln")], ids=["bn", "seqbn", "ln"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_forward_without_grad_matches_forward_with_grad(sites, padded, impl):
    """The no-grad path (no buffers saved, rows reused) gives the outputs and statistics of the other."""
    _, fused = _pair(sites, impl, input_size=3, hidden_size=5)
    twin = NormLSTM(3, 5, input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], impl=impl).double()
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 9, 6]) if padded else None
    with torch.no_grad():
        out_a, (h_a, c_a) = fused(x, lengths)
    out_b, (h_b, c_b) = twin(x.requires_grad_(), lengths)
    for a, b in [(out_a, out_b), (h_a, h_b), (c_a, c_b)]:
        assert _rel_err(a, b.detach()) <= RTOL
    for (name, a), (_, b) in zip(fused.named_buffers(), twin.named_buffers()):
        assert _rel_err(a, b) <= RTOL, name


def test_float32_close_to_reference(impl):
    """In float32 at a pMNIST-like length the two agree to float32 rounding accumulated over
    200 steps (1e-4 relative: measured about 1e-6, while a wrong term is of order 1)."""
    torch.manual_seed(0)
    reference = NormLSTM(1, 16, impl="reference")
    fused = NormLSTM(1, 16, impl=impl)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(8, 200, 1)
    a, b = _run(reference, x, None, False), _run(fused, x, None, False)
    for key in a:
        assert _rel_err(b[key], a[key]) <= 1e-4, key


def test_strategy_without_fused_form_runs_the_reference(monkeypatch):
    """A strategy that only implements ``step`` (e.g. a plugin) makes the layer use the reference
    loop, which calls its ``step``; the result is the reference's exactly."""

    class Doubling(norms.Normalizer):
        def step(self, x, t, mask=None):
            return 2.0 * x

    calls = []
    real = dispatch.reference_layer
    monkeypatch.setattr(dispatch, "reference_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = NormLSTM(3, 4, input_norm="none", recurrent_norm=Doubling, cell_norm="none", impl="fused")
    reference = NormLSTM(3, 4, input_norm="none", recurrent_norm=Doubling, cell_norm="none", impl="reference")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3)
    output = model(x)[0]
    assert calls == [1]
    assert torch.equal(output, reference(x)[0])


def test_fused_is_the_default_and_reference_selectable():
    assert NormLSTM(2, 3).impl == "fused"
    assert NormLSTM(2, 3, impl="reference").impl == "reference"
    assert set(dispatch.RECURRENCES) == {"fused", "fused_torch", "fused_native", "triton", "cudnn", "reference"}


def test_input_terms_before_the_loop_when_the_covariance_is_dear(impl):
    """seqbn on an input wider than H takes the vectorized input terms (the 'given' path); the
    result is the reference's all the same."""
    reference, fused = _pair(("seqbn", "bn", "bn"), impl, input_size=7, hidden_size=3)
    x = torch.randn(5, 6, 7, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 6, 4, 5])
    _assert_same(_run(reference, x, lengths, True), _run(fused, x, lengths, True))


def test_fused_step_kinds_of_the_builtin_strategies():
    """Which per-step form each built-in strategy gives the fused path, in training and evaluation."""

    def kind(name: str, site: str, training: bool) -> str | None:
        norm = norms.create(name, site=site, num_features=8)
        norm.train(training)
        norm.start(3)
        fused = norm.fused_step(3)
        return None if fused is None else fused.kind

    assert [kind("bn", "recurrent", t) for t in (True, False)] == ["batch", "affine"]
    assert [kind("seqbn", "input", t) for t in (True, False)] == ["sequence", "affine"]
    assert kind("ln", "cell", True) == "layer"
    assert kind("normprop", "cell", True) == "affine"
    assert kind("normprop", "recurrent", True) == "identity"
    assert kind("wn", "input", True) == "identity"
    assert kind("none", "cell", True) == "identity"


@NATIVE
def test_fused_runs_the_compiled_kernels_where_built(monkeypatch):
    """``impl="fused"`` on float CPU tensors goes through the compiled kernels, forward and backward;
    ``fused_torch`` never does."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x = torch.randn(3, 4, 2, requires_grad=True)
    for impl, expected in (("fused", ["forward", "backward"]), ("fused_torch", [])):
        calls.clear()
        output, _ = NormLSTM(2, 3, impl=impl)(x)
        output.sum().backward()
        assert calls == expected, impl


@NATIVE
def test_second_backward_through_the_compiled_kernels_is_refused():
    """The compiled backward writes its gradients over the saved buffers, so a second backward
    through the same graph would read garbage: it raises, naming the implementations that allow it."""
    model = NormLSTM(2, 3)
    output, _ = model(torch.randn(3, 4, 2))
    output.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_torch"):
        output.sum().backward()
    twice = NormLSTM(2, 3, impl="fused_torch")
    out, _ = twice(torch.randn(3, 4, 2))
    out.sum().backward(retain_graph=True)
    out.sum().backward()  # allowed: the torch-ops backward keeps its buffers


def test_backend_option_is_checked():
    """An unknown backend, or ``native`` where the kernels cannot run, is a clear error."""
    x, h = torch.randn(4, 3, 2), torch.zeros(3, 3)
    cell = next(m for m in NormLSTM(2, 3).modules() if m.__class__.__name__ == "NormLSTMCell")
    with pytest.raises(ValueError, match="Available: auto, native, torch"):
        dispatch.fused_layer(cell, x, h, h, None, backend="cuda")
    half = cell.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="compiled CPU kernels cannot run"):
        dispatch.fused_layer(half, x.bfloat16(), h.bfloat16(), h.bfloat16(), None, backend="native")



@NATIVE
@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("none", "none", "none"), ("ln", "ln", "ln")], ids=["bn", "none", "ln"])
def test_large_float32_layer_with_prepacked_products_matches_reference(sites, monkeypatch):
    """At H = 512 in float32 the recurrent products go through oneDNN's prepacked GEMM (where torch
    has it). Tolerance 1e-3 relative: measured 3e-5, float32 rounding of 512-term sums through six
    steps of batch normalization; a wrong product or transpose is off by order 1."""
    used = []
    product = native.RecurrentProduct._product
    monkeypatch.setattr(native.RecurrentProduct, "_product", lambda self, x: used.append(1) or product(self, x))
    torch.manual_seed(0)
    options = dict(input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], batch_first=False)
    reference = NormLSTM(20, 512, impl="reference", **options)
    fused = NormLSTM(20, 512, impl="fused", **options)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(6, 32, 20)
    lengths = torch.tensor([6, 3] * 16)
    expected, actual = _run(reference, x, lengths, False), _run(fused, x, lengths, False)
    for key in expected:
        assert _rel_err(actual[key], expected[key]) <= 1e-3, key
    if native._onednn_enabled():
        assert used, "the prepacked product was not used"


class _RootMeanSquare(norms.Normalizer):
    """A test-local strategy of the ``"rms"`` fused kind: ``γ x / sqrt(mean(x²) + ε) + β`` per row,
    its ``step`` written out here, independently of the kernels and of rnorm_plugins."""

    def __init__(self, site: str, num_features: int) -> None:
        super().__init__(site, num_features)
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, num_features))
        self.beta = torch.nn.Parameter(torch.linspace(-0.2, 0.2, num_features))

    def forward(self, x, mask=None):
        return self.gamma * x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + 1e-3) + self.beta

    def step(self, x, t, mask=None):
        return self.forward(x)

    def fused_step(self, num_steps: int) -> norms.FusedStep:
        return norms.FusedStep("rms", self.gamma, self.beta, 1e-3)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_rms_kind_matches_reference(padded, bidirectional, impl):
    """The ``"rms"`` kind (layer statistics without centering) on every site, including γ and β gradients."""
    reference, fused = _pair((_RootMeanSquare,) * 3, impl, input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 7, 5, 2, 6]) if padded else None
    _assert_same(_run(reference, x, lengths, not bidirectional), _run(fused, x, lengths, not bidirectional))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sites", SITES, ids=["/".join(s) for s in SITES])
def test_cuda_matches_reference(sites):
    """On CUDA, ``fused`` (which then does its per-step work with torch operations) computes what
    the reference loop computes on CUDA, training with padding and in evaluation; float64, 1e-9 as above."""
    reference, fused = _pair(sites, "fused", input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    reference, fused = reference.cuda(), fused.cuda()
    x = torch.randn(6, 7, 3, dtype=torch.float64, device="cuda")
    lengths = torch.tensor([7, 3, 7, 5, 2, 6])
    _assert_same(_run(reference, x, lengths, False), _run(fused, x, lengths, False))
    reference.eval()
    fused.eval()
    _assert_same(_run(reference, x, lengths, False), _run(fused, x, lengths, False))


def test_synchronized_statistics_run_with_torch_operations():
    """Batch statistics all-reduced across processes (``bn`` under DDP) take the torch-ops loop, which
    all-reduces each step's moments (checked against one process in tests/functional/test_distributed.py);
    asking for the compiled kernels there is a clear error."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, True) == "torch"
    assert resolve_backend("torch", cpu, torch.float32, False) == "torch"
    if native.available():
        assert resolve_backend("auto", cpu, torch.float32, False) == "native"
        with pytest.raises(RuntimeError, match="synchronized across processes"):
            resolve_backend("native", cpu, torch.float32, True)


# -- impl="cudnn": torch's own LSTM (rnorm.kernels.cudnn) -------------------------------------------
# The same comparisons with the reference loop, in float64 on the CPU (torch._VF.lstm runs ATen's
# loop there), to the same 1e-9: the paths differ in the order of their float64 operations (weight
# rows folded, one product for all gates), measured at about 1e-15, while a wrong fold or a state
# taken at the wrong step is off by the order of the values.

#: (input, recurrent, cell): every combination of built-in strategies that is a plain LSTM after
#: its weight transform in training (docs/performance.md, "Dispatch to torch's LSTM").
ELIGIBLE = [
    ("none", "none", "none"),
    ("wn", "wn", "none"),
    ("normprop", "normprop", "none"),  # Norm-Prop's row scaling without its cell site
    ("wn", "normprop", "none"),
    ("seqbn", "none", "none"),  # sequencewise statistics: one affine map of every step
    ("seqbn", "wn", "none"),
]


@pytest.mark.parametrize("sites", ELIGIBLE, ids=["/".join(s) for s in ELIGIBLE])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_cudnn_training_matches_reference(sites, padded, bidirectional, monkeypatch):
    calls = []
    real = kernels.cudnn.lstm_layer
    monkeypatch.setattr(kernels.cudnn, "lstm_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    # A bidirectional second layer's input (2H features) is wider than H, where seqbn's input terms
    # are computed before the loop, which torch's LSTM cannot take: one layer there.
    layers = 1 if bidirectional and sites[0] == "seqbn" else 2
    reference, model = _pair(sites, "cudnn", input_size=3, hidden_size=5, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 7, 5, 2, 6]) if padded else None
    _assert_same(_run(reference, x, lengths, False), _run(model, x, lengths, False))
    assert len(calls) == layers * model.num_directions  # every layer direction went through torch's LSTM


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_cudnn_evaluation_with_population_statistics_matches_reference(padded):
    """seqbn in evaluation is one affine map of every step (its population statistics)."""
    reference, model = _pair(("seqbn", "wn", "none"), "cudnn", input_size=3, hidden_size=5, bidirectional=True)
    for m in (reference, model):
        with torch.no_grad():
            m(torch.randn(6, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        m.eval()
    x = torch.randn(6, 8, 3, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 7, 5, 2, 6]) if padded else None
    _assert_same(_run(reference, x, lengths, False), _run(model, x, lengths, False))


def test_hidden_probe_runs_the_reference_loop():
    """The hidden probe (gradient-flow analysis) is a diagnostic, not a change of the model: with
    impl='cudnn' it runs the reference loop, as with impl='fused'."""
    reference, model = _pair(("wn", "wn", "none"), "cudnn", input_size=3, hidden_size=5)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    _assert_same(_run(reference, x, None, True), _run(model, x, None, True))


class _Doubling(norms.Normalizer):
    """A strategy with a ``step`` and no fused form, like a plugin that implements only ``step``."""

    def step(self, x, t, mask=None):
        return 2.0 * x


REFUSED = [
    (("bn", "bn", "bn"), True, "the input site is of kind 'batch'"),
    (("ln", "ln", "ln"), True, "the input site is of kind 'layer'"),
    (("normprop", "normprop", "normprop"), True, "the cell site is of kind 'affine'"),
    (("none", "bn", "none"), False, "the recurrent site is an affine map that changes with the step"),
    (("none", _Doubling, "none"), True, "the recurrent site's strategy _Doubling has no fused form"),
]


@pytest.mark.parametrize("case", REFUSED, ids=["bn", "ln", "normprop cell", "bn in evaluation", "no fused form"])
def test_cudnn_refuses_what_is_not_a_plain_lstm(case):
    sites, training, reason = case
    model = NormLSTM(3, 5, input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], impl="cudnn").train(training)
    with pytest.raises(ValueError, match=r"'cudnn': this layer is not a plain LSTM after its weight transform: " + reason):
        model(torch.randn(4, 6, 3))


def test_cudnn_refuses_input_terms_computed_before_the_loop():
    """seqbn on an input wider than H has its input terms computed first (a (T, B, 4H) tensor), and
    torch's LSTM takes x and W_x."""
    model = NormLSTM(7, 3, input_norm="seqbn", recurrent_norm="none", cell_norm="none", impl="cudnn")
    with pytest.raises(ValueError, match=r"the input terms arrive computed"):
        model(torch.randn(4, 6, 7))
