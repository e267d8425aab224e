"""``rnorm::lstm_recurrence`` as a PyTorch op, and the typed description it is built from.

``torch.library.opcheck`` checks what tracing relies on: the schema, the autograd registration, the
fake implementation against the real one (shapes, strides, storage offsets) and the op under
AOTAutograd with dynamic shapes, forward and backward. The numbers themselves are compared with the
reference loop in tests/nn/test_fused.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.library import opcheck

from rnorm import kernels
from rnorm.kernels import native
from rnorm.kernels.prepare import prepare
from rnorm.kernels.schema import Saved, from_flat, to_flat
from rnorm.norms import FusedStep

H, D, T, B = 3, 2, 5, 4


def _p(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _spec(input_kind: str, recurrent_kind: str, cell_kind: str) -> kernels.LayerSpec:
    def site(kind: str, features: int) -> kernels.SiteSpec:
        if kind == "identity":
            return kernels.SiteSpec("identity")
        if kind == "affine":
            return kernels.SiteSpec("affine", scale=_p(T, features), shift=_p(1, features))
        return kernels.SiteSpec(kind, scale=_p(features), shift=_p(features), eps=1e-3)

    return kernels.LayerSpec(
        recurrent_weight=_p(4 * H, H),
        recurrent=site(recurrent_kind, 4 * H),
        cell=site(cell_kind, H),
        input_weight=_p(4 * H, D),
        input=site(input_kind, 4 * H),
        bias=_p(4 * H),
        hidden_scale=torch.full((H,), 0.7, dtype=torch.float64),
    )


KINDS = [("batch", "batch", "batch"), ("affine", "layer", "rms"), ("identity", "identity", "affine"), ("rms", "affine", "identity")]
MASK = torch.tensor([[True] * B] * 3 + [[True, True, False, True]] * 2)  # (T, B): one sequence of 3 steps


def _args(kinds, backend: str, masked: bool) -> tuple:
    args, _ = prepare(_spec(*kinds), _p(T, B, D), _p(B, H), _p(B, H), MASK if masked else None, backend)
    return tuple(to_flat(args))


@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("kinds", KINDS, ids=["/".join(k) for k in KINDS])
def test_op_passes_opcheck_with_the_torch_loop(kinds, masked):
    opcheck(torch.ops.rnorm.lstm_recurrence.default, _args(kinds, "torch", masked))


@pytest.mark.skipif(not native.available(), reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("kinds", KINDS[:2], ids=["/".join(k) for k in KINDS[:2]])
def test_op_passes_opcheck_with_the_compiled_kernels(kinds):
    """Without the AOTAutograd comparison: in eager mode the compiled backward overwrites the saved
    buffers it has read (by design, see rnorm.kernels.op), which that test compares afterwards; the
    compiled path's backward under tracing is the functional op, checked above."""
    opcheck(
        torch.ops.rnorm.lstm_recurrence.default,
        _args(kinds, "auto", True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_inference_saves_nothing_and_training_saves_what_the_backward_reads():
    with torch.no_grad():
        outputs = torch.ops.rnorm.lstm_recurrence(*_args(KINDS[0], "torch", True))
    saved = from_flat(Saved, outputs[-len(Saved.__dataclass_fields__) :])
    assert all(t.numel() == 0 for t in to_flat(saved))
    training = torch.ops.rnorm.lstm_recurrence(*_args(KINDS[0], "torch", True))
    saved = from_flat(Saved, training[-len(Saved.__dataclass_fields__) :])
    assert saved.act.shape == (T, B, 4 * H) and saved.states_h.shape == (T + 1, B, H)
    assert saved.recurrent_rstd.shape == (T, 1, 4 * H) and saved.input_raw.numel() == 0


def test_descriptions_that_cannot_run_are_refused_with_what_was_expected():
    spec = _spec("batch", "batch", "batch")
    x, h = torch.randn(T, B, D, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"Expected h0 of shape \({B}, {H}\), but got \(1, {H}\)"):
        kernels.lstm_layer(spec, x, h[:1], h)
    with pytest.raises(ValueError, match=rf"Expected x with {D} features"):
        kernels.lstm_layer(spec, torch.randn(T, B, D + 1, dtype=torch.float64), h, h)
    bad_gamma = kernels.SiteSpec("batch", scale=torch.ones(5, dtype=torch.float64), eps=1e-5)
    with pytest.raises(ValueError, match=r"recurrent site's scale \(gamma\) of shape \(12,\), but got \(5,\)"):
        kernels.lstm_layer(kernels.LayerSpec(spec.recurrent_weight, bad_gamma, spec.cell, spec.input_weight, spec.input), x, h, h)
    with pytest.raises(ValueError, match=r"cell site cannot be of kind 'sequence'"):
        terms = torch.zeros(T, B, 4 * H, dtype=torch.float64)  # given input terms
        kernels.lstm_layer(kernels.LayerSpec(spec.recurrent_weight, spec.recurrent, kernels.SiteSpec("sequence", torch.ones(H), eps=1e-5)), terms, h, h)
    with pytest.raises(ValueError, match=r"Expected the recurrent weight as x, torch.float32 on cpu, but got torch.float64"):
        kernels.lstm_layer(spec, x.float(), h.float(), h.float())
    with pytest.raises(ValueError, match="Available: auto, native, torch"):
        kernels.lstm_layer(spec, x, h, h, backend="gpu")



def test_synchronization_the_kernels_cannot_run_is_refused():
    """The kernels all-reduce every batch site of a layer or none, and only batch statistics: a
    description asking for anything else is refused rather than run with other statistics."""
    spec = _spec("batch", "batch", "batch")
    x, h = torch.randn(T, B, D, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    synced = dataclasses.replace(spec.recurrent, synchronized=True)
    with pytest.raises(ValueError, match="synchronized across processes on some sites but not others"):
        kernels.lstm_layer(dataclasses.replace(spec, recurrent=synced), x, h, h)
    layer = kernels.SiteSpec("layer", scale=torch.ones(H, dtype=torch.float64), eps=1e-5, synchronized=True)
    with pytest.raises(ValueError, match="cell site is of kind 'layer': only 'batch' statistics can be synchronized"):
        kernels.lstm_layer(dataclasses.replace(spec, cell=layer), x, h, h)


def test_step_kinds_come_from_one_table():
    assert list(kernels.STEP_KINDS) == ["identity", "affine", "batch", "layer", "rms", "sequence"]
    assert kernels.get_kind("rms").per_row and not kernels.get_kind("rms").center
    with pytest.raises(ValueError, match="Unknown fused step kind 'group'. Known kinds: identity, affine, batch, layer, rms, sequence"):
        FusedStep("group")
    with pytest.raises(TypeError):
        kernels.STEP_KINDS["group"] = kernels.StepKind("group", 9)  # read-only
