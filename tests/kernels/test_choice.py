"""Which path runs a layer direction (rnorm.kernels.choice), and the one log line that says so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rnorm import kernels
from rnorm.kernels import choice, native
from rnorm.nn import NormLSTM
from rnorm.norms import Normalizer

D, T, B = 3, 4, 2


@pytest.fixture(autouse=True)
def _fresh_log():
    """Every test starts with no line logged yet (the once-only memory is functools' cache)."""
    choice._log_once.cache_clear()
    yield
    choice._log_once.cache_clear()


def _spec(hidden: int, dtype: torch.dtype = torch.float32, device: str = "cpu", recurrent: str = "identity") -> kernels.LayerSpec:
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    site = kernels.SiteSpec("identity") if recurrent == "identity" else kernels.SiteSpec(recurrent, zeros(4 * hidden), eps=1e-5)
    return kernels.LayerSpec(zeros(4 * hidden, hidden), site, kernels.SiteSpec("identity"), zeros(4 * hidden, D), kernels.SiteSpec("identity"))


def _choose(hidden: int, dtype=torch.float32, masked: bool = False, backend: str = "auto", recurrent: str = "identity") -> choice.Path:
    spec = _spec(hidden, dtype, recurrent=recurrent)
    mask = torch.ones(T, B, dtype=torch.bool) if masked else None
    return choice.choose(spec, torch.zeros(T, B, D, dtype=dtype), mask, backend)


@pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels are not built")
def test_auto_takes_torch_lstm_on_the_cpu_only_where_measured_faster():
    """float32 without padding from CPU_MIN_HIDDEN hidden units: torch's LSTM (oneDNN); the compiled
    kernels elsewhere, each with its reason (docs/performance.md has the measurements); other
    backends are taken as asked."""
    large = choice.CPU_MIN_HIDDEN
    assert _choose(large) == choice.Path(
        "cudnn", f"a plain LSTM after its weight transform, float32 without padding at H >= {large} (oneDNN)"
    )
    for path in (_choose(large - 1), _choose(large, torch.float64), _choose(large, masked=True)):
        assert path.name == "native" and "not torch's LSTM: the compiled CPU kernels are as fast or faster" in path.reason
    batch = _choose(large, recurrent="batch")
    assert batch.name == "native" and "not torch's LSTM: the recurrent site is of kind 'batch'" in batch.reason
    assert _choose(large, backend="native") == choice.Path("native", "the compiled CPU kernels")
    assert _choose(large, backend="torch") == choice.Path("torch", "backend 'torch' was asked for")
    assert _choose(8, backend="cudnn") == choice.Path("cudnn", "backend 'cudnn' was asked for")


def test_auto_takes_torch_lstm_on_the_cpu_where_the_op_would_run_its_torch_loop(monkeypatch):
    """Without the compiled kernels (or in a dtype they do not take) the op runs its torch-ops loop,
    which torch's LSTM beats; a layer that is not a plain LSTM still takes the op."""
    monkeypatch.setattr(native, "_KERNELS", None)
    path = _choose(8)
    assert path.name == "cudnn" and "on the CPU where the compiled CPU kernels cannot run: they are not built" in path.reason
    assert _choose(8, masked=True).name == "cudnn"
    assert _choose(8, recurrent="batch").name == "torch"
    monkeypatch.undo()
    assert _choose(8, torch.bfloat16).name == "cudnn"


def test_bfloat16_on_the_cpu_runs_torch_lstm_close_to_float32():
    """bfloat16 on the CPU (a dtype the compiled kernels do not take): torch's LSTM, padded, with
    gradients. Tolerance 0.05 relative: bfloat16 keeps 8 significant bits (0.4 % per rounding),
    over a few steps of products (measured up to 0.01 over five seeds); a wrong fold or state is off
    by the order of the values."""
    torch.manual_seed(0)
    model = NormLSTM(D, 5, input_norm="wn", recurrent_norm="wn", cell_norm="none")
    half = NormLSTM(D, 5, input_norm="wn", recurrent_norm="wn", cell_norm="none").to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    x, lengths = torch.randn(3, T, D), torch.tensor([T, 2, T])
    calls = []
    real = kernels.cudnn.lstm_layer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.cudnn, "lstm_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
        output, (h_n, c_n) = half(x.bfloat16(), lengths)
    output.float().sum().backward()
    expected, (expected_h, expected_c) = model(x, lengths)
    assert calls == [1]
    for actual, wanted in ((output, expected), (h_n, expected_h), (c_n, expected_c)):
        assert float((actual.detach().float() - wanted.detach()).abs().max() / wanted.detach().abs().max()) <= 0.05
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in half.parameters() if p.requires_grad)


def test_auto_takes_cudnn_on_cuda_where_eligible_and_not_while_tracing_padding():
    """Decided from the tensors' device and the description alone (fake CUDA tensors, no GPU needed)."""
    with FakeTensorMode():
        spec = _spec(8, device="cuda")
        x = torch.zeros(T, B, D, device="cuda")
        mask = torch.ones(T, B, dtype=torch.bool, device="cuda")
        assert choice.choose(spec, x, None, "auto") == choice.Path("cudnn", "a plain LSTM after its weight transform, on CUDA (cuDNN)")
        traced = choice.choose(spec, x, mask, "auto")
        batch = choice.choose(_spec(8, device="cuda", recurrent="batch"), x, None, "auto")
    assert traced.name == "torch" and "traced with padding" in traced.reason
    assert batch.name == "torch" and "the recurrent site is of kind 'batch'" in batch.reason


def test_unknown_backend_lists_every_choice():
    with pytest.raises(ValueError, match="Unknown fused recurrence backend 'gpu'. Available: auto, native, torch, triton, cudnn"):
        _choose(8, backend="gpu")


def test_op_backend_reasons_name_the_fallback():
    """The op's own fallbacks to its torch-ops loop, in words for the log line."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    name, reason = kernels.op.choose_backend("auto", cuda, torch.float64, False)
    assert name == "torch" and reason.startswith("the Triton kernels cannot run: ")
    assert kernels.op.choose_backend("auto", cpu, torch.float16, False) == (
        "torch",
        "the compiled CPU kernels cannot run: they need float32 or float64 tensors on the CPU, not torch.float16 on cpu",
    )
    name, reason = kernels.op.choose_backend("auto", cpu, torch.float32, True)
    assert name == "torch" and "synchronized across processes" in reason


def _lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "rnorm.kernels"]


@pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels are not built")
def test_each_path_is_logged_once_in_one_line(caplog):
    caplog.set_level(logging.INFO, logger="rnorm.kernels")
    x = torch.randn(2, 4, D)
    plain = NormLSTM(D, 5, input_norm="none", recurrent_norm="none", cell_norm="none")
    plain(x)
    plain(x)  # the same path again: nothing more
    NormLSTM(D, 5, input_norm="none", recurrent_norm="none", cell_norm="none", impl="cudnn")(x)
    NormLSTM(D, 5, impl="reference")(x)
    lines = _lines(caplog)
    assert lines == [
        "rnorm: LSTM layer directions run 'native': the compiled CPU kernels; not torch's LSTM: the compiled CPU "
        f"kernels are as fast or faster but in float32 without padding at H >= {choice.CPU_MIN_HIDDEN}.",
        "rnorm: LSTM layer directions run 'cudnn': backend 'cudnn' was asked for.",
        "rnorm: LSTM layer directions run 'reference': impl 'reference' was asked for.",
    ]
    assert all("\n" not in line for line in lines)


def test_fallback_to_the_reference_loop_is_logged(caplog):
    """A strategy without a fused form (a plugin with only ``step``) runs the reference loop, and says so."""

    class Doubling(Normalizer):
        def step(self, x, t, mask=None):
            return 2.0 * x

    caplog.set_level(logging.INFO, logger="rnorm.kernels")
    NormLSTM(D, 5, input_norm="none", recurrent_norm=Doubling, cell_norm="none")(torch.randn(2, 4, D))
    assert _lines(caplog) == ["rnorm: LSTM layer directions run 'reference': the recurrent site's strategy Doubling has no fused form."]


def test_nothing_is_logged_below_info(caplog):
    caplog.set_level(logging.WARNING, logger="rnorm.kernels")
    NormLSTM(D, 5)(torch.randn(2, 4, D))
    assert _lines(caplog) == []


@pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels are not built")
def test_fused_native_forces_the_kernels_where_auto_takes_torch_lstm(monkeypatch):
    """At H = CPU_MIN_HIDDEN in float32 without padding, ``fused`` runs torch's LSTM and
    ``fused_native`` the compiled kernels (what the benchmark compares them with)."""
    calls = []
    real_native, real_cudnn = native.forward, kernels.cudnn.lstm_layer
    monkeypatch.setattr(native, "forward", lambda *a, **k: calls.append("native") or real_native(*a, **k))
    monkeypatch.setattr(kernels.cudnn, "lstm_layer", lambda *a, **k: calls.append("cudnn") or real_cudnn(*a, **k))
    x = torch.randn(2, T, D)
    for impl in ("fused", "fused_native"):
        NormLSTM(D, choice.CPU_MIN_HIDDEN, input_norm="wn", recurrent_norm="wn", cell_norm="none", impl=impl)(x)
    assert calls == ["cudnn", "native"]
