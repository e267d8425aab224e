"""NormLSTM under torch.compile (one graph, no break) and torch.export: the results of eager mode.

The recurrence is one op (``rnorm::lstm_recurrence``) with a fake implementation and an autograd
formula, so tracing sees one node per layer direction, and what runs is the same op as in eager
mode. Most tests compile with the ``aot_eager`` backend: it runs Dynamo (``fullgraph=True`` fails on
any graph break) and AOTAutograd (the fake implementation, the autograd formula, functionalization)
and skips only Inductor's code generation, which is slow to compile and not ours; one test runs
Inductor. Comparisons are in float64; compiled and eager runs differ only by the order of the
operations around the op (measured 0 with aot_eager), so 1e-9 relative to each tensor's largest
magnitude is far below any real difference.
"""

from __future__ import annotations

import pytest
import torch

from rnorm.nn import NormLSTM

RTOL = 1e-9

#: Every built-in strategy on the sites it supports (the benchmark's convention: BN-e* for seqbn).
STRATEGIES = {
    "bn": ("bn", "bn", "bn"),
    "seqbn": ("seqbn", "bn", "bn"),
    "ln": ("ln", "ln", "ln"),
    "normprop": ("normprop", "normprop", "normprop"),
    "wn": ("wn", "wn", "none"),
    "none": ("none", "none", "none"),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (Dynamo caches per code object, with a recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def _twins(sites, **kwargs) -> tuple[NormLSTM, NormLSTM]:
    torch.manual_seed(0)
    options = dict(input_norm=sites[0], recurrent_norm=sites[1], cell_norm=sites[2], **kwargs)
    eager = NormLSTM(3, 5, **options).double()
    compiled = NormLSTM(3, 5, **options).double()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _train_step(model, x, lengths) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    output, (h_n, c_n) = model(x, lengths)
    weights = torch.linspace(-1, 1, output.numel(), dtype=x.dtype).view_as(output)
    ((output * weights).sum() + h_n.square().sum() + 0.3 * c_n.sum()).backward()
    results = {"output": output.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "grad x": x.grad}
    return results


def _parameters_and_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    results = {f"grad {name}": p.grad for name, p in module.named_parameters() if p.grad is not None}
    results.update({f"buffer {name}": b.clone() for name, b in module.named_buffers()})
    return results


def _assert_same(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    bad = {key: _rel_err(actual[key].double(), expected[key].double()) for key in expected}
    bad = {key: err for key, err in bad.items() if not err <= RTOL}
    assert not bad, f"compiled differs from eager: {bad}"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_compiled_training_and_evaluation_match_eager(name):
    """fullgraph=True (an error on any graph break) in training, forward and backward, then in
    evaluation, with padding and both directions; outputs, gradients and population statistics."""
    eager, model = _twins(STRATEGIES[name], bidirectional=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 7, 5, 2, 7])  # at least 2 samples at every step (batch statistics)
    expected, actual = _train_step(eager, x, lengths), _train_step(compiled, x, lengths)
    expected.update(_parameters_and_buffers(eager))
    actual.update(_parameters_and_buffers(model))
    _assert_same(expected, actual)
    statistics = [b for n, b in model.named_buffers() if n.endswith("running_var")]
    assert all(b.shape[0] > 0 and not torch.equal(b, torch.ones_like(b)) for b in statistics)  # they were estimated
    eager.eval()
    model.eval()
    longer = torch.randn(6, 9, 3, dtype=torch.float64)  # 9 steps > T_max = 7: T_max's statistics reused
    eval_lengths = torch.tensor([9, 3, 8, 5, 2, 6])
    with torch.no_grad():
        expected, actual = eager(longer, eval_lengths), compiled(longer, eval_lengths)
    _assert_same({"output": expected[0], "h_n": expected[1][0]}, {"output": actual[0], "h_n": actual[1][0]})


def test_compiled_with_inductor_matches_eager():
    """The default backend (Inductor generates code for the operations around the op)."""
    eager, model = _twins(STRATEGIES["bn"], bidirectional=True)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 6, 4])
    expected, actual = _train_step(eager, x, lengths), _train_step(compiled, x, lengths)
    expected.update(_parameters_and_buffers(eager))
    actual.update(_parameters_and_buffers(model))
    _assert_same(expected, actual)
    eager.eval()
    model.eval()
    with torch.no_grad():
        _assert_same({"output": eager(x, lengths)[0]}, {"output": compiled(x, lengths)[0]})


def test_compiled_model_raises_no_value_checks_but_keeps_shape_checks():
    """Traced, the checks that read values (finiteness, lengths in [1, T]) are left to eager mode;
    shape checks still raise, at tracing time."""
    _, model = _twins(STRATEGIES["ln"])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    x[0, 0, 0] = float("nan")
    output, _ = compiled(x)  # no host synchronization for a value check
    assert output[0].isnan().any()
    lenient = torch.compile(model, backend="aot_eager")  # without fullgraph Dynamo re-raises it as is
    with pytest.raises(ValueError, match="Expected input feature size 3"):
        lenient(torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x)  # eager mode keeps them


@pytest.mark.parametrize("lengths", [None, torch.tensor([7, 3, 5, 2])], ids=["full", "padded"])
def test_exported_eval_model_gives_eager_outputs(lengths):
    """torch.export of an evaluation-mode BN-LSTM (population statistics, both directions)."""
    torch.manual_seed(0)
    model = NormLSTM(3, 5, num_layers=2, bidirectional=True)
    with torch.no_grad():
        model(torch.randn(4, 6, 3), torch.tensor([6, 4, 6, 3]))  # population statistics for 6 steps
    model.eval()
    x = torch.randn(4, 7, 3)
    inputs = (x,) if lengths is None else (x, lengths)
    with torch.no_grad():
        program = torch.export.export(model, inputs)
        expected = model(*inputs)
        actual = program.module()(*inputs)
    ops = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert ops.count(torch.ops.rnorm.lstm_recurrence.default) == 4  # one node per layer direction
    for a, b in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same op on the same inputs


def test_exported_sequence_classifier_gives_eager_logits():
    """torch.export of SequenceClassifier's forward (a LightningModule) in evaluation mode."""
    import functools

    from rnorm.tasks import SequenceClassifier

    torch.manual_seed(0)
    task = SequenceClassifier(functools.partial(NormLSTM, hidden_size=8), input_size=1, num_classes=10)
    with torch.no_grad():
        task(torch.randn(6, 12, 1))
    task.eval()
    x, lengths = torch.randn(3, 12, 1), torch.tensor([12, 7, 12])
    with torch.no_grad():
        program = torch.export.export(task, (x, lengths))
        torch.testing.assert_close(program.module()(x, lengths), task(x, lengths), rtol=0, atol=0)
