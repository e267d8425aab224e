"""The Triton kernels (``impl="triton"``) compute what the reference loop computes.

Where CUDA is available they run compiled on the GPU; elsewhere (CI) they run on CPU tensors in
Triton's interpreter, ``TRITON_INTERPRET=1`` (tests/conftest.py sets it before anything imports
triton), which executes the same ``@triton.jit`` code with numpy (float64 included, ``tl.dot`` too). The interpreter is slow, so the shapes are small (T 5–20, H 16–64,
B 4–32) and the matrix is lean: every step kind on every site at least once, padded and not, with
the backward; population statistics, bidirectional layers, evaluation past T_max, the no-grad path,
the product computed by the kernels (``tl.dot``) and by torch.mm, bf16 products.

Tolerances. In float64 (interpreter only) 1e-9 relative to each tensor's largest magnitude, as in
tests/nn/test_fused.py: the two differ in the order of their floating-point operations (measured
below 1e-12), while a wrong term in a derivative is of the order of the gradient itself. In float32,
1e-3: float32 rounding over 20 steps, measured up to 1.6e-4 for ``ln`` (layer statistics of 128
features, γ's gradient summed over 320 rows; the compiled CPU kernels give 1.0e-4 and the torch-ops
loop 3.4e-5 at the same shape) and 1e-5 for ``bn``, far from the order-1 errors of a wrong term.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rnorm import kernels, norms
from rnorm.kernels import op
from rnorm.kernels import triton as triton_kernels
from rnorm.kernels.triton import plan as triton_plan
from rnorm.nn import NormLSTM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

#: Compiled on the GPU where there is one, else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs the Triton kernels in the interpreter only")
RTOL_64, RTOL_32 = 1e-9, 1e-3


if DEVICE == "cpu" and not triton_kernels.interpreting():
    pytestmark = pytest.mark.skip(reason="TRITON_INTERPRET=1 must be set before triton is first imported (tests/conftest.py sets it)")


class _RootMeanSquare(norms.Normalizer):
    """A test-local strategy of the ``"rms"`` fused kind, its ``step`` written out independently of the kernels."""

    def __init__(self, site: str, num_features: int) -> None:
        super().__init__(site, num_features)
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, num_features))
        self.beta = torch.nn.Parameter(torch.linspace(-0.2, 0.2, num_features))

    def step(self, x, t, mask=None):
        return self.gamma * x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + 1e-3) + self.beta

    def fused_step(self, num_steps: int) -> norms.FusedStep:
        return norms.FusedStep("rms", self.gamma, self.beta, 1e-3)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def _pair(sites, dtype: torch.dtype, **kwargs) -> tuple[NormLSTM, NormLSTM]:
    """The reference (float64, on the CPU) and the Triton model (``dtype``, on DEVICE) with the same weights."""
    options = dict(input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], batch_first=False, **kwargs)
    torch.manual_seed(0)
    reference = NormLSTM(impl="reference", **options).double()
    triton_model = NormLSTM(impl="triton", **options)
    triton_model.load_state_dict(reference.state_dict())
    return reference, triton_model.to(DEVICE, dtype)


def _run(model: NormLSTM, x: torch.Tensor, lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Forward and backward of a loss touching every output, h_n and c_n; everything to compare."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    x = x.detach().to(device, dtype).clone().requires_grad_()
    output, (h_n, c_n) = model(x, lengths)
    weights = torch.linspace(-1, 1, output.numel(), dtype=dtype, device=device).view_as(output)  # no two outputs alike
    ((output * weights).sum() + h_n.square().sum() + 0.3 * c_n.sum()).backward()
    results = {"output": output.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "grad x": x.grad}
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    results.update({f"buffer {name}": b.clone() for name, b in model.named_buffers()})
    return results


def _assert_close(expected: dict, actual: dict, rtol: float) -> None:
    assert expected.keys() == actual.keys()
    errors = {key: _rel_err(actual[key], expected[key]) for key in expected}
    bad = {key: err for key, err in errors.items() if not err <= rtol}
    assert not bad, f"the Triton kernels differ from the reference: {bad}"


def _compare(sites, dtype: torch.dtype, rtol: float, *, steps: int, batch: int, input_size: int = 3, lengths=None, evaluate: bool = False, **kwargs) -> None:
    reference, model = _pair(sites, dtype, input_size=input_size, **kwargs)
    x = torch.randn(steps, batch, input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if evaluate:  # population statistics from a training pass, then evaluation on a longer sequence
        for m in (reference, model):
            with torch.no_grad():
                m(x[: steps - 3].to(next(m.parameters())), None if lengths is None else lengths.clamp(max=steps - 3))
            m.eval()
    _assert_close(_run(reference, x, lengths), _run(model, x, lengths), rtol)


#: (input, recurrent, cell): every fused kind on every site (identity: none/wn/normprop's weight
#: sites; affine: normprop's cell, seqbn's input; batch: bn; layer: ln; rms) and the papers' models.
SITES = [
    ("bn", "bn", "bn"),
    ("ln", "ln", "ln"),
    ((_RootMeanSquare,) * 3),
    ("seqbn", "bn", "bn"),
    ("normprop", "normprop", "normprop"),
    ("wn", "wn", "none"),
    ("ln", "bn", "none"),
    ("none", "ln", "bn"),
    ("bn", "none", (_RootMeanSquare)),
]
IDS = ["bn", "ln", "rms", "seqbn", "normprop", "wn", "ln-bn-none", "none-ln-bn", "bn-none-rms"]


@EXACT
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("sites", SITES, ids=IDS)
def test_training_matches_reference_in_float64(sites, padded):
    """Outputs, states, every gradient and the population statistics, at 1e-9; H = 20 spans two
    programs of 16 units, the second one partly masked."""
    lengths = torch.tensor([7, 3, 7, 5, 2, 6]) if padded else None
    _compare(sites, torch.float64, RTOL_64, steps=7, batch=6, lengths=lengths, hidden_size=20)


@EXACT
@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("ln", "ln", "ln"), ("none", "none", "none")], ids=["bn", "ln", "none"])
def test_products_by_torch_mm_match_reference(sites, monkeypatch):
    """Above INLINE_MAX_HIDDEN the recurrent products are torch.mm's and the kernels their epilogue
    (forward and backward); forced here at H = 24 with padding."""
    monkeypatch.setattr(triton_plan, "INLINE_MAX_HIDDEN", 0)
    _compare(sites, torch.float64, RTOL_64, steps=6, batch=5, lengths=torch.tensor([6, 2, 6, 4, 5]), hidden_size=24)


@EXACT
def test_given_input_terms_match_reference():
    """seqbn on an input wider than H: the input terms arrive computed (the "given" input)."""
    _compare(("seqbn", "bn", "bn"), torch.float64, RTOL_64, steps=6, batch=5, input_size=40, hidden_size=16, lengths=torch.tensor([6, 2, 6, 4, 5]))


@EXACT
@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("seqbn", "bn", "bn"), ("ln", "ln", "ln")], ids=["bn", "seqbn", "ln"])
def test_evaluation_past_t_max_matches_reference(sites):
    """Eval mode: bn's population statistics as per-step affine maps on every site, steps past the
    training T_max using T_max's; bidirectional, padded, with the backward."""
    _compare(sites, torch.float64, RTOL_64, steps=9, batch=4, lengths=torch.tensor([9, 3, 8, 6]), evaluate=True, hidden_size=16, bidirectional=True)


@EXACT
def test_stacked_bidirectional_layers_match_reference():
    """Two layers, both directions (the backward direction reverses the unpadded part), H = 48: three programs."""
    _compare(("bn", "ln", "bn"), torch.float64, RTOL_64, steps=5, batch=4, lengths=torch.tensor([5, 2, 4, 5]), hidden_size=48, num_layers=2, bidirectional=True)


@EXACT
@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("ln", "ln", "ln")], ids=["bn", "ln"])
def test_forward_without_grad_matches_forward_with_grad(sites):
    """The no-grad path (nothing saved, one-step buffers) gives the outputs and statistics of the saving one."""
    _, model = _pair(sites, torch.float64, input_size=3, hidden_size=16)
    twin = NormLSTM(3, 16, input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], impl="triton", batch_first=False).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([8, 4, 8, 6])
    with torch.no_grad():
        out_a, (h_a, c_a) = model(x, lengths)
    out_b, (h_b, c_b) = twin(x.requires_grad_(), lengths)
    for a, b in [(out_a, out_b), (h_a, h_b), (c_a, c_b)]:
        assert _rel_err(a, b.detach()) <= RTOL_64
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert _rel_err(a, b) <= RTOL_64, name


@pytest.mark.parametrize("sites", [("bn", "bn", "bn"), ("ln", "ln", "ln")], ids=["bn", "ln"])
def test_float32_close_to_reference(sites):
    """float32 at T = 20, H = 32, B = 16, padded: within 1e-3 of the float64 reference (see the module docstring)."""
    lengths = torch.tensor([20, 13] * 8)
    _compare(sites, torch.float32, RTOL_32, steps=20, batch=16, lengths=lengths, hidden_size=32)


def test_bf16_products_round_their_operands():
    """Under autocast (bf16) the products' operands are rounded to bf16 and everything else stays
    float32: the output moves away from float32's by about bf16's precision (2⁻⁸ relative per
    operand; measured 1e-2 after 8 steps, float32 alone 9e-6) and stays within 5e-2 of the reference
    (measured 1.6e-2, the input's gradient). The float32 output says the op received float32."""
    reference, model = _pair(("bn", "bn", "bn"), torch.float32, input_size=3, hidden_size=16)
    x = torch.randn(8, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _run(reference, x, None)
    full = _run(model, x, None)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        rounded = _run(model, x, None)
    assert rounded["output"].dtype == torch.float32
    moved = _rel_err(rounded["output"], full["output"])
    assert 1e-4 < moved < 5e-2, moved
    results = [{key: value for key, value in r.items() if not key.startswith("buffer")} for r in (expected, rounded)]
    _assert_close(*results, 5e-2)  # (the model ran twice: its population statistics moved twice)


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists on CUDA only")
def test_tf32_products_follow_torch_setting(monkeypatch):
    """With ``torch.backends.cuda.matmul.allow_tf32`` the products use TF32 (10-bit mantissas: about
    1e-3 relative after 20 steps), within 2e-2 of the reference."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    _compare(("bn", "bn", "bn"), torch.float32, 2e-2, steps=20, batch=16, hidden_size=32)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA; on the CPU the same step launches run uncaptured")
def test_captured_loops_replay_with_each_calls_buffers():
    """The first call of a plan launches its steps, the second captures them, later ones replay the
    graph: each with its own input, lengths and buffers (the table of addresses rewritten), each
    within float32's tolerance of the reference on that input."""
    from rnorm.kernels.triton.graphs import GRAPHS

    GRAPHS.clear()
    reference, model = _pair(("bn", "ln", "bn"), torch.float32, input_size=3, hidden_size=32)
    modes = []
    for call in range(4):
        x = torch.randn(12, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(call))
        lengths = torch.tensor([12, 12 - call, 7, 12, 3 + call, 12, 9, 12])
        _assert_close(_run(reference, x, lengths), _run(model, x, lengths), RTOL_32)
        modes.append(sorted(p.mode for p in GRAPHS.programs()))
    assert modes[0] == ["launched", "launched"]  # forward and backward, first call: warm-up
    assert modes[1:] == [["replayed", "replayed"]] * 3


def test_forcing_triton_where_it_cannot_run_names_the_reason(monkeypatch):
    """``backend="triton"`` (``impl="triton"``): an error saying why, where the kernels cannot run;
    ``auto`` on CUDA picks them where they can, and the torch-ops loop where they cannot."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        op.resolve_backend("triton", cpu, torch.float32, False)
    assert op.resolve_backend("auto", cpu, torch.float32, False) in ("native", "torch")  # never the interpreter
    assert op.resolve_backend("auto", cuda, torch.float32, False) == "triton"
    assert op.resolve_backend("auto", cuda, torch.float64, False) == "torch"
    assert op.resolve_backend("auto", cuda, torch.float32, True) == "torch"  # synchronized statistics
    with pytest.raises(RuntimeError, match="float32 tensors"):
        op.resolve_backend("triton", cuda, torch.float64, False)
    with pytest.raises(RuntimeError, match="synchronized"):
        op.resolve_backend("triton", cuda, torch.float32, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="interpreter runs them on CPU tensors only"):
        op.resolve_backend("triton", cuda, torch.float32, False)
    monkeypatch.setattr(triton_plan, "MAX_BATCH", 3)
    model = NormLSTM(2, 4, impl="triton").to(DEVICE)
    with pytest.raises(RuntimeError, match="at most 3 samples"):
        model(torch.randn(4, 5, 2, device=DEVICE))


def test_loops_are_cached_per_plan_and_launched_on_the_cpu():
    """One program (workspace) per plan, reused by the next call with the same plan; on the CPU its
    steps are launched, never captured."""
    from rnorm.kernels.triton.graphs import GRAPHS

    if DEVICE != "cpu":
        pytest.skip("on CUDA the loops are captured; tests/kernels/test_triton.py runs this on the CPU")
    GRAPHS.clear()
    model = NormLSTM(2, 16, impl="triton")
    with torch.no_grad():
        for steps in (4, 4, 5):
            model(torch.randn(3, steps, 2))
    programs = list(GRAPHS.programs())
    assert [p.calls for p in programs] == [2, 1]  # T = 4 twice, then T = 5
    assert all(p.mode == "launched" and p.graph is None for p in programs)


def test_layer_spec_runs_on_the_triton_kernels():
    """:func:`rnorm.kernels.lstm_layer` with ``backend="triton"`` goes through the Triton loops (no nn module)."""
    from rnorm.kernels.triton import loops

    calls = []
    real = loops.forward

    def counted(args):
        calls.append(args.precision)
        return real(args)

    H = 16
    spec = kernels.LayerSpec(
        recurrent_weight=torch.randn(4 * H, H, device=DEVICE),
        recurrent=kernels.SiteSpec("layer", scale=torch.ones(4 * H, device=DEVICE), eps=1e-5),
        cell=kernels.SiteSpec("identity"),
    )
    try:
        loops.forward = counted
        result = kernels.lstm_layer(spec, torch.randn(3, 2, 4 * H, device=DEVICE), torch.zeros(2, H, device=DEVICE), torch.zeros(2, H, device=DEVICE), backend="triton")
    finally:
        loops.forward = real
    assert calls == ["ieee"] and result.output.shape == (3, 2, H)
