"""torch's own LSTM for layer directions that are a plain LSTM after a weight transform (rnorm.kernels.cudnn).

Each eligible description runs through ``lstm_layer(backend="cudnn")`` (``torch._VF.lstm``: ATen's
loop on the CPU in float64) and through a per-step loop written out below from the description's
meaning (the site maps of rnorm/kernels/spec.py, BN eq. 6–8 with padding), in float64. Outputs,
final states, the statistics of a ``sequence`` input site and the gradient of every tensor of the
description are compared to 1e-9 relative to each tensor's largest magnitude: the two differ only
in the order of their floating-point operations (folded weight rows, one product for all gates),
measured at about 1e-15, while a wrong fold or a state taken at the wrong step is off by the
order of the values themselves.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rnorm import kernels
from rnorm.kernels import cudnn
from rnorm.nn import NormLSTM

T, B, D, H = 6, 5, 3, 4
RTOL = 1e-9
EPS = 1e-3
#: (T, B) end-padded masks: lengths 6, 2, 6, 4, 1; and with a sequence of no real step.
PADDED = torch.arange(T).unsqueeze(1) < torch.tensor([6, 2, 6, 4, 1])
EMPTY = torch.arange(T).unsqueeze(1) < torch.tensor([6, 0, 3, 6, 2])
MASKS = {"full": None, "padded": PADDED, "empty sequence": EMPTY}


def _p(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def _site(kind: str, features: int, shift: bool = True) -> kernels.SiteSpec:
    if kind == "identity":
        return kernels.SiteSpec("identity")
    if kind == "affine":  # the same map at every step (S = 1)
        return kernels.SiteSpec("affine", scale=_p(1, features), shift=_p(1, features) if shift else None)
    return kernels.SiteSpec("sequence", scale=_p(features), shift=_p(features) if shift else None, eps=EPS)


def _spec(input_kind: str, recurrent_kind: str, bias: bool = True, shift: bool = True) -> kernels.LayerSpec:
    return kernels.LayerSpec(
        recurrent_weight=_p(4 * H, H),
        recurrent=_site(recurrent_kind, 4 * H, shift),
        cell=kernels.SiteSpec("identity"),
        input_weight=_p(4 * H, D),
        input=_site(input_kind, 4 * H, shift),
        bias=_p(4 * H) if bias else None,
    )


def _apply(site: kernels.SiteSpec, u: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The site's map of ``u`` ``(..., F)`` as spec.py defines it (``keep`` ``(T, B)`` for sequence statistics)."""
    if site.kind == "identity":
        return u
    if site.kind == "affine":
        return u * site.scale[0] + (0 if site.shift is None else site.shift[0])
    weights = torch.ones(u.shape[:2], dtype=u.dtype, device=u.device) if keep is None else keep.to(u.dtype)  # (T, B)
    mean = (u * weights.unsqueeze(2)).sum((0, 1)) / weights.sum()
    var = ((u - mean) ** 2 * weights.unsqueeze(2)).sum((0, 1)) / weights.sum()
    return site.scale * (u - mean) / torch.sqrt(var + site.eps) + (0 if site.shift is None else site.shift)


def _reference(spec: kernels.LayerSpec, x, h0, c0, mask):
    """The LSTM step by step: gates = input site(W_x x_t) + b + recurrent site(W_h h_{t-1}) (BN eq. 6),
    c_t, h_t (eq. 7–8); padded steps keep the state and output 0."""
    inputs = _apply(spec.input, x @ spec.input_weight.t(), mask)  # (T, B, 4H)
    h, c, outputs = h0, c0, []
    for t in range(x.shape[0]):
        gates = inputs[t] + _apply(spec.recurrent, h @ spec.recurrent_weight.t(), None)
        if spec.bias is not None:
            gates = gates + spec.bias
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        keep = torch.ones(x.shape[1], 1, dtype=torch.bool, device=x.device) if mask is None else mask[t].unsqueeze(1)
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        outputs.append(h_new * keep)
    return torch.stack(outputs), h, c


def _leaves(spec: kernels.LayerSpec, x, h0, c0) -> dict[str, torch.Tensor]:
    tensors = {"x": x, "h0": h0, "c0": c0, "W_x": spec.input_weight, "W_h": spec.recurrent_weight, "bias": spec.bias}
    for name in ("input", "recurrent"):
        site = getattr(spec, name)
        tensors[f"{name} scale"], tensors[f"{name} shift"] = site.scale, site.shift
    return {name: t for name, t in tensors.items() if t is not None}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def _results(outputs, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    output, h_n, c_n = outputs
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)  # no two outputs alike
    loss = (output * weights).sum() + h_n.square().sum() + 0.3 * c_n.sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"output": output, "h_n": h_n, "c_n": c_n}
    results.update({f"grad {name}": g for name, g in zip(leaves, grads)})
    return {name: t.detach() for name, t in results.items()}


SPECS = [("identity", "identity"), ("affine", "affine"), ("sequence", "identity"), ("sequence", "affine")]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kinds", SPECS, ids=["/".join(k) for k in SPECS])
def test_plain_lstm_after_weight_transform_matches_the_step_by_step_loop(kinds, mask_name):
    torch.manual_seed(0)
    spec, mask = _spec(*kinds), MASKS[mask_name]
    x, h0, c0 = _p(T, B, D), _p(B, H), _p(B, H)
    leaves = _leaves(spec, x, h0, c0)
    result = kernels.lstm_layer(spec, x, h0, c0, mask, backend="cudnn")
    actual = _results((result.output, result.h_n, result.c_n), leaves)
    expected = _results(_reference(spec, x, h0, c0, mask), leaves)
    errors = {name: _rel_err(actual[name], expected[name]) for name in expected}
    assert not {name: e for name, e in errors.items() if not e <= RTOL}, errors
    if kinds[0] == "sequence":  # the statistics for the population estimates: masked mean and biased variance of W_x x
        u = (x @ spec.input_weight.t()).detach()
        keep = torch.ones(T, B, dtype=torch.bool) if mask is None else mask
        rows = u[keep]  # (unpadded steps, 4H)
        statistics = result.statistics["input"]
        assert _rel_err(statistics.mean[0], rows.mean(0)) <= RTOL
        assert _rel_err(statistics.var[0], rows.var(0, unbiased=False)) <= RTOL
        assert statistics.count.tolist() == [int(keep.sum())]


def test_without_bias_or_shifts_and_without_gradients():
    """No additive term at all (torch's LSTM without biases), and a forward under no_grad
    (torch's inference mode of the LSTM, which saves nothing) gives the same outputs."""
    torch.manual_seed(1)
    spec = _spec("affine", "identity", bias=False, shift=False)
    x, h0, c0 = _p(T, B, D), _p(B, H), _p(B, H)
    with torch.no_grad():
        result = kernels.lstm_layer(spec, x, h0, c0, PADDED, backend="cudnn")
        expected = _reference(spec, x, h0, c0, PADDED)
    for actual, wanted in zip((result.output, result.h_n, result.c_n), expected):
        assert _rel_err(actual, wanted) <= RTOL


def _moved(value, device: str, dtype: torch.dtype):
    """A tensor, site or description's tensors on ``device`` in ``dtype``, leaves that require grad."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, dtype).requires_grad_(value.requires_grad)
    if isinstance(value, kernels.SiteSpec):
        scale, shift = _moved(value.scale, device, dtype), _moved(value.shift, device, dtype)
        return kernels.SiteSpec(value.kind, scale, shift, value.eps, value.synchronized)
    if isinstance(value, kernels.LayerSpec):
        return kernels.LayerSpec(**{name: _moved(getattr(value, name), device, dtype) for name in value.__dataclass_fields__})
    return value


def test_autocast_leaves_the_tensors_precision():
    """Under autocast torch's LSTM would run in bfloat16; this path runs in the tensors' dtype, as the op does."""
    torch.manual_seed(4)
    spec = _moved(_spec("identity", "affine"), "cpu", torch.float32)
    x, h0, c0 = (torch.randn(*shape) for shape in ((T, B, D), (B, H), (B, H)))
    plain = kernels.lstm_layer(spec, x, h0, c0, PADDED, backend="cudnn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = kernels.lstm_layer(spec, x, h0, c0, PADDED, backend="cudnn")
    assert autocast.output.dtype == torch.float32 and torch.equal(autocast.output, plain.output)


def _replace(spec: kernels.LayerSpec, **changes) -> kernels.LayerSpec:
    fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    return kernels.LayerSpec(**{**fields, **changes})


def _refusals() -> list[tuple[str, kernels.LayerSpec, str]]:
    torch.manual_seed(2)
    plain = _spec("identity", "identity")
    gamma = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    return [
        ("batch recurrent", _replace(plain, recurrent=kernels.SiteSpec("batch", gamma(4 * H), eps=EPS)), r"the recurrent site is of kind 'batch'"),
        ("layer input", _replace(plain, input=kernels.SiteSpec("layer", gamma(4 * H), eps=EPS)), r"the input site is of kind 'layer'"),
        ("rms cell", _replace(plain, cell=kernels.SiteSpec("rms", gamma(H), eps=EPS)), r"the cell site is of kind 'rms'"),
        ("affine cell", _replace(plain, cell=kernels.SiteSpec("affine", gamma(H).unsqueeze(0))), r"the cell site is of kind 'affine'"),
        ("per-step affine", _replace(plain, recurrent=kernels.SiteSpec("affine", torch.ones(T, 4 * H, dtype=torch.float64))), r"recurrent site is an affine map that changes with the step"),
        ("hidden scale", _replace(plain, hidden_scale=torch.full((1,), 0.5, dtype=torch.float64)), r"scales h_t"),
        ("given input terms", _replace(plain, input_weight=None, input=None, bias=None), r"input terms arrive computed"),
        ("synchronized", _replace(plain, recurrent=kernels.SiteSpec("batch", gamma(4 * H), eps=EPS, synchronized=True)), r"synchronized across processes"),
    ]


@pytest.mark.parametrize("case", _refusals(), ids=lambda case: case[0])
def test_anything_but_a_plain_lstm_is_refused_with_the_reason(case):
    _, spec, reason = case
    features = 4 * H if spec.input is None else D
    x, h = torch.randn(T, B, features, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    assert cudnn.ineligibility(spec) is not None
    with pytest.raises(ValueError, match=r"backend='cudnn': this layer is not a plain LSTM after its weight transform: .*" + reason):
        kernels.lstm_layer(spec, x, h, h, backend="cudnn")


def test_padding_under_tracing_is_refused():
    """Packing reads the lengths on the host, which a traced call does not have."""
    spec = _spec("identity", "identity")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, h = torch.empty(T, B, D, dtype=torch.float64), torch.empty(B, H, dtype=torch.float64)
        mask = torch.ones(T, B, dtype=torch.bool)
        assert cudnn.traced_with_mask(x, mask) and not cudnn.traced_with_mask(x, None)
        with pytest.raises(ValueError, match=r"lengths read on the host, which tracing .* cannot do"):
            cudnn.lstm_layer(spec, x, h, h, mask)


def test_compiles_in_one_graph_without_padding():
    """torch.compile(fullgraph=True) traces torch's LSTM as one aten.lstm node: the same results as
    eager mode, gradients included (measured equal; 1e-12 allows a reordered sum around it). With
    padding it stops at tracing time, naming the reason (lengths on the host)."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    options = dict(input_norm="wn", recurrent_norm="wn", cell_norm="none", impl="cudnn", bidirectional=True)
    eager, model = NormLSTM(D, H, **options).double(), NormLSTM(D, H, **options).double()
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, T, D, dtype=torch.float64)
    for m in (eager, compiled):
        output, (h_n, c_n) = m(x)
        (output.square().sum() + h_n.sum() + c_n.sum()).backward()
    assert _rel_err(compiled(x)[0].detach(), eager(x)[0].detach()) <= 1e-12
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert _rel_err(b.grad, a.grad) <= 1e-12, name
    with pytest.raises(Exception, match="lengths read on the host"):
        compiled(x, torch.tensor([T, 2, T, 3, T]))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cuda_runs_cudnn_on_one_weight_buffer(dtype, recwarn):
    """On CUDA (cuDNN): the same results as the loop on the device, and the weights are laid out as
    cuDNN keeps them, so it neither copies them nor warns ("not part of single contiguous chunk").
    float32 tolerance 1e-4: cuDNN may use TF32 products (torch.backends.cudnn.allow_tf32, default
    on), about 1e-3 relative per product, which these few steps average down."""
    torch.manual_seed(3)
    spec = _moved(_spec("sequence", "affine"), "cuda", dtype)
    x, h0, c0 = (torch.randn(*s, dtype=dtype, device="cuda", requires_grad=True) for s in ((T, B, D), (B, H), (B, H)))
    leaves = _leaves(spec, x, h0, c0)
    mask = PADDED.cuda()
    result = kernels.lstm_layer(spec, x, h0, c0, mask, backend="cudnn")
    actual = _results((result.output, result.h_n, result.c_n), leaves)
    expected = _results(_reference(spec, x, h0, c0, mask), leaves)
    tolerance = RTOL if dtype == torch.float64 else 1e-4
    errors = {name: _rel_err(actual[name], expected[name]) for name in expected}
    assert not {name: e for name, e in errors.items() if not e <= tolerance}, errors
    assert not [w for w in recwarn if "contiguous chunk" in str(w.message)]


