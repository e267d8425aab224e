"""The compiled CPU kernels' boundary: named buffers, every one checked before a step runs.

Before this boundary was checked, buffers crossed as raw pointers and a plan built with 1-element
buffers for a (64, 400) step was accepted, and the kernel wrote about 45,000 floats past them; here
such a plan is refused with an error naming the buffer, before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from rnorm import kernels
from rnorm.kernels import native
from rnorm.nn import NormLSTM

NATIVE = pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels (rnorm.kernels._fused_step) are not built")


def test_native_kernels_are_built_where_required():
    """CI sets RNORM_REQUIRE_NATIVE=1 (.ci/run): a build that silently failed fails the run there,
    instead of skipping the native tests and passing on the slower path."""
    if os.environ.get("RNORM_REQUIRE_NATIVE") != "1":
        pytest.skip("RNORM_REQUIRE_NATIVE is not set (CI sets it)")
    assert native.available(), native.MISSING_MESSAGE


@NATIVE
def test_python_and_the_extension_name_the_same_buffers_and_kinds():
    ext = native.load()
    assert {f.name for f in dataclasses.fields(native.ForwardBuffers)} == set(ext.FORWARD_BUFFERS)
    assert {f.name for f in dataclasses.fields(native.BackwardBuffers)} == set(ext.BACKWARD_BUFFERS)
    assert ext.KINDS == {name: kind.code for name, kind in kernels.STEP_KINDS.items() if kind.code is not None}


def _forward_buffers(steps: int, batch: int, hidden: int, dtype=torch.float32, size=None) -> native.ForwardBuffers:
    """Buffers of a plan with batch statistics on the recurrent site, identity elsewhere; ``size``
    replaces every shape by that many elements."""
    gates = 4 * hidden

    def new(*shape: int) -> torch.Tensor:
        return torch.zeros(size if size is not None else shape, dtype=dtype)

    return native.ForwardBuffers(
        z=new(batch, gates),
        act=new(1, batch, gates),
        tanh_cell=new(1, batch, hidden),
        states_h=new(2, batch, hidden),
        states_c=new(2, batch, hidden),
        output=new(steps, batch, hidden),
        weights=new(1, batch),
        recurrent_u=new(1, batch, gates),
        recurrent_scale=new(1, gates),
        recurrent_rstd=new(1, 1, gates),
        recurrent_mean=new(steps, 1, gates),
        recurrent_var=new(steps, 1, gates),
    )


BATCH_ON_RECURRENT = (0, 2, 0)  # identity, batch, identity


@NATIVE
def test_undersized_buffers_are_refused_before_any_write():
    ext = native.load()
    tiny = _forward_buffers(3, 64, 100, size=(1,))
    with pytest.raises(ValueError, match=r"buffer 'z' has shape \(1,\), but the plan's sizes and kinds need \(64, 400\)"):
        ext.forward_plan(tiny, 3, 64, 100, False, False, BATCH_ON_RECURRENT, (0.0, 1e-5, 0.0))
    right = _forward_buffers(3, 64, 100)
    right.recurrent_mean = torch.zeros(2, 1, 400)  # one step short
    with pytest.raises(ValueError, match=r"'recurrent_mean' has shape \(2, 1, 400\), but .* need \(3, 1, 400\)"):
        ext.forward_plan(right, 3, 64, 100, False, False, BATCH_ON_RECURRENT, (0.0, 1e-5, 0.0))


@NATIVE
def test_buffers_of_another_dtype_layout_or_kind_are_refused():
    ext = native.load()
    config = (3, 4, 5, False, False, BATCH_ON_RECURRENT, (0.0, 1e-5, 0.0))
    mixed = _forward_buffers(3, 4, 5)
    mixed.output = mixed.output.double()
    with pytest.raises(ValueError, match=r"buffer 'output' is not of the plan's dtype \(float32\)"):
        ext.forward_plan(mixed, *config)
    strided = _forward_buffers(3, 4, 5)
    strided.states_c = torch.zeros(2, 5, 4).transpose(1, 2)
    with pytest.raises(ValueError, match=r"buffer 'states_c' is not contiguous"):
        ext.forward_plan(strided, *config)
    missing = _forward_buffers(3, 4, 5)
    missing.recurrent_rstd = None
    with pytest.raises(ValueError, match=r"buffer 'recurrent_rstd' is required by the plan's kinds but is None"):
        ext.forward_plan(missing, *config)
    with pytest.raises(ValueError, match=r"unknown kind 9"):
        ext.forward_plan(_forward_buffers(3, 4, 5), 3, 4, 5, False, False, (0, 9, 0), (0.0, 1e-5, 0.0))
    integers = _forward_buffers(3, 4, 5)
    integers.act = integers.act.long()
    with pytest.raises(ValueError, match=r"'act' must be float32 or float64"):
        ext.forward_plan(integers, *config)


@NATIVE
def test_a_checked_plan_runs_its_steps_and_no_others():
    ext = native.load()
    plan = ext.forward_plan(_forward_buffers(3, 4, 5), 3, 4, 5, False, False, BATCH_ON_RECURRENT, (0.0, 1e-5, 0.0))
    ext.forward(plan, 2)
    with pytest.raises(IndexError, match="out of range"):
        ext.forward(plan, 3)


@NATIVE
def test_denormal_flushing_is_scoped_to_the_kernel_calls():
    """The loops run with denormals flushed to zero (FTZ/DAZ) and give the caller's mode back."""
    tiny = torch.tensor([1e-39])  # a float32 denormal (the smallest normal is 1.2e-38)
    assert float(tiny * 1.0) != 0.0  # flushing is off here, as by default
    ext = native.load()
    previous = ext.flush_denormals(True)
    try:
        if ext.CAN_FLUSH_DENORMALS:
            assert float(tiny * 1.0) == 0.0
    finally:
        ext.restore_denormals(previous)
    assert float(tiny * 1.0) != 0.0
    model = NormLSTM(2, 3)
    output, _ = model(torch.randn(4, 5, 2))
    output.sum().backward()
    assert float(tiny * 1.0) != 0.0  # restored after the forward and backward loops


def test_missing_kernels_warn_once_and_the_torch_loop_runs(monkeypatch):
    """Without the extension the default path is the torch-ops loop, announced once, naming how to build."""
    monkeypatch.setattr(native, "_KERNELS", None)
    model = NormLSTM(2, 3)
    x = torch.randn(4, 5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per location
        model(x)
        model(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch-ops loop" in messages[0] and "pip install" in messages[0]
    with pytest.raises(RuntimeError, match="they are not built"):
        kernels.resolve_backend("native", x.device, x.dtype, False)
