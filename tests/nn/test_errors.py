"""Clear errors: each message names what was wrong and what was expected."""

import re

import pytest
import torch

from rnorm import NormLSTM, NormLSTMCell
from rnorm.norms import available

D, H = 3, 4


def _model(**kwargs) -> NormLSTM:
    torch.manual_seed(0)
    return NormLSTM(D, H, **kwargs)


# -- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_first", "layout"), [(True, r"\(B, T, D\)"), (False, r"\(T, B, D\)")])
def test_wrong_rank(batch_first, layout):
    with pytest.raises(ValueError, match=rf"Expected a 3-D input {layout}, but got \(4, 3\)"):
        _model(batch_first=batch_first)(torch.randn(4, 3))


def test_wrong_feature_size():
    with pytest.raises(ValueError, match=r"Expected input feature size 3, but got 5"):
        _model()(torch.randn(2, 6, 5))


def test_integer_input():
    with pytest.raises(ValueError, match=r"Expected a floating-point input, but got dtype torch.int64"):
        _model()(torch.ones(2, 6, D, dtype=torch.long))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"Expected a non-empty batch and sequence, but got shape \(2, 0, 3\)"):
        _model()(torch.randn(2, 0, D))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_input(bad, training):
    x = torch.randn(3, 5, D)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"The input contains NaN or infinite values"):
        _model().train(training)(x)


# -- lengths and masks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("lengths", "message"), [
    ([5, 0, 3], r"Expected lengths in \[1, 5\], but got 0 at index 1"),
    ([5, 3, -2], r"Expected lengths in \[1, 5\], but got -2 at index 2"),
    ([5, 6, 3], r"Expected lengths in \[1, 5\], but got 6 at index 1"),
])
def test_lengths_out_of_range(lengths, message):
    with pytest.raises(ValueError, match=message):
        _model().eval()(torch.randn(3, 5, D), torch.tensor(lengths))


def test_float_lengths():
    with pytest.raises(ValueError, match=r"Expected integer lengths, but got dtype torch.float32"):
        _model().eval()(torch.randn(3, 5, D), torch.tensor([5.0, 4.0, 3.0]))


def test_bool_lengths():
    with pytest.raises(ValueError, match=r"Expected integer lengths, but got dtype torch.bool"):
        _model().eval()(torch.randn(3, 5, D), torch.tensor([True, True, True]))


@pytest.mark.parametrize("lengths", [[5, 4], [[5, 4, 3]], [5, 4, 3, 2]])
def test_wrong_lengths_shape(lengths):
    message = f"Expected lengths of shape (3,), but got {tuple(torch.tensor(lengths).shape)}."
    with pytest.raises(ValueError, match=re.escape(message)):
        _model().eval()(torch.randn(3, 5, D), torch.tensor(lengths))


def test_non_prefix_mask():
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    message = r"True on its real steps then False on padding, but row 1 has a False before a True"
    with pytest.raises(ValueError, match=message):
        _model().eval()(torch.randn(2, 3, D), mask=mask)


def test_mask_with_an_empty_row():
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"at least one real step, but mask row 1 is all False"):
        _model().eval()(torch.randn(2, 3, D), mask=mask)


@pytest.mark.parametrize(("batch_first", "expected"), [(True, r"\(2, 3\)"), (False, r"\(3, 2\)")])
def test_mask_of_the_wrong_shape(batch_first, expected):
    # The message quotes the mask as it was passed, in the caller's layout.
    x = torch.randn(2, 3, D) if batch_first else torch.randn(3, 2, D)
    with pytest.raises(ValueError, match=rf"Expected a mask of shape {expected}, but got \(2, 4\)"):
        _model(batch_first=batch_first).eval()(x, mask=torch.ones(2, 4, dtype=torch.bool))


def test_non_boolean_mask():
    with pytest.raises(ValueError, match=r"Expected a 2-D boolean mask \(B, T\), but got dtype torch.int64"):
        _model().eval()(torch.randn(2, 3, D), mask=torch.ones(2, 3, dtype=torch.long))


def test_both_lengths_and_mask():
    with pytest.raises(ValueError, match=r"Pass either lengths or mask, not both"):
        _model()(torch.randn(2, 3, D), torch.tensor([3, 3]), mask=torch.ones(2, 3, dtype=torch.bool))


# -- batch statistics in training -----------------------------------------------------------------


def test_bn_training_step_with_one_unpadded_sample():
    message = r"at least 2 unpadded samples at every step, but step 3 has only 1 \(batch size 3\)\. Only one sequence of the batch is this long"
    with pytest.raises(ValueError, match=message):
        _model()(torch.randn(3, 5, D), torch.tensor([5, 3, 3]))


@pytest.mark.parametrize("site", ["input_norm", "recurrent_norm", "cell_norm"])
def test_bn_training_with_batch_size_one(site):
    sites = {"input_norm": "none", "recurrent_norm": "none", "cell_norm": "none", site: "bn"}
    # The real cause of a batch of one sequence: usually an epoch's short last batch.
    with pytest.raises(ValueError, match=r"but step 0 has only 1 \(batch size 1\)\. The batch holds a single sequence: usually an epoch's last batch"):
        _model(**sites)(torch.randn(1, 4, D))


def test_batch_size_one_is_fine_in_eval_and_without_batch_statistics():
    _model().eval()(torch.randn(1, 4, D))
    _model(input_norm="ln", recurrent_norm="ln", cell_norm="ln")(torch.randn(1, 4, D))
    _model(input_norm="seqbn", recurrent_norm="none", cell_norm="none")(torch.randn(1, 4, D))  # 4 steps


def test_seqbn_training_with_a_single_unpadded_step():
    model = _model(input_norm="seqbn", recurrent_norm="none", cell_norm="none")
    message = r"Sequencewise batch normalization in training needs at least 2 unpadded steps"
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, D), torch.tensor([1]))


# -- strategies and initializers ------------------------------------------------------------------


def test_unknown_strategy_lists_the_known_names():
    known = ", ".join(sorted(available()))
    with pytest.raises(ValueError, match=rf"'batchnorm' is not a registered normalizer\. Available names: {known}\."):
        _model(recurrent_norm="batchnorm")


@pytest.mark.parametrize(("site", "name", "cls", "supported"), [
    ("cell", "wn", "WeightNorm", r"\['input', 'recurrent'\]"),
    ("recurrent", "seqbn", "SequenceBatchNorm", r"\['input'\]"),
    ("cell", "seqbn", "SequenceBatchNorm", r"\['input'\]"),
])
def test_strategy_on_an_unsupported_site(site, name, cls, supported):
    message = rf"{cls} cannot normalize the '{site}' site; it supports {supported}\. Use 'none' there instead\."
    with pytest.raises(ValueError, match=message):
        _model(**{f"{site}_norm": name})


def test_a_non_strategy_is_rejected():
    with pytest.raises(TypeError, match=r"Expected a normalizer name, a Normalizer subclass.*but got 3 of type int"):
        _model(input_norm=3)


def test_seqbn_cannot_step_the_cell():
    cell = NormLSTMCell(D, H, input_norm="seqbn")
    with pytest.raises(RuntimeError, match=r"seqbn normalizes a whole sequence at once .* use 'bn' on this site"):
        cell(torch.randn(2, D))


@pytest.mark.parametrize(("option", "message"), [
    ("input_init", r"Unknown input_init 'xavier'; expected one of \('orthogonal', 'uniform'\)"),
    ("recurrent_init", r"Unknown recurrent_init 'xavier'; expected one of \('orthogonal', 'identity', 'uniform'\)"),
])
def test_unknown_initializer(option, message):
    with pytest.raises(ValueError, match=message):
        _model(**{option: "xavier"})


@pytest.mark.parametrize(("spec", "message"), [
    ({"g": "identity", "if": "orthogonal"}, r"keys of recurrent_init to name each gate of 'ifgo' exactly once .* got \['g', 'if'\]"),
    ({"g": "identity", "ifgo": "orthogonal"}, r"keys of recurrent_init to name each gate of 'ifgo' exactly once"),
    ({"gi": "identity", "fo": "orthogonal"}, r"recurrent_init: the identity initializes one square gate block, but 'gi' groups 2"),
    ({"g": "xavier", "ifo": "orthogonal"}, r"Unknown recurrent_init 'xavier' for gates 'g'"),
])
def test_bad_grouped_initializer(spec, message):
    with pytest.raises(ValueError, match=message):
        _model(recurrent_init=spec)


def test_identity_input_init_is_not_offered():
    with pytest.raises(ValueError, match=r"Unknown input_init 'identity'"):
        _model(input_init="identity")


# -- state and conversion -------------------------------------------------------------------------


@pytest.mark.parametrize("hx_shape", [(1, 3, H), (2, 2, H), (2, 3, H + 1)])
def test_bad_hx_shape(hx_shape):
    model = _model(num_layers=2).eval()
    good = torch.zeros(2, 3, H)
    with pytest.raises(ValueError, match=r"Expected hx = \(h_0, c_0\), each of shape \(2, 3, 4\)"):
        model(torch.randn(3, 5, D), hx=(torch.zeros(hx_shape), good))
    with pytest.raises(ValueError, match=r"Expected hx = \(h_0, c_0\), each of shape \(2, 3, 4\)"):
        model(torch.randn(3, 5, D), hx=(good, torch.zeros(hx_shape)))


def test_hx_with_three_tensors():
    good = torch.zeros(1, 3, H)
    with pytest.raises(ValueError, match=r"Expected hx = \(h_0, c_0\)"):
        _model().eval()(torch.randn(3, 5, D), hx=(good, good, good))


def test_from_lstm_with_proj_size():
    with pytest.raises(ValueError, match=r"LSTMs with projections \(proj_size > 0\) have no NormLSTM counterpart"):
        NormLSTM.from_lstm(torch.nn.LSTM(D, H, proj_size=2))


def test_from_lstm_with_a_clashing_option_or_a_non_lstm():
    with pytest.raises(ValueError, match=r"\['hidden_size'\] are taken from the given LSTM"):
        NormLSTM.from_lstm(torch.nn.LSTM(D, H), hidden_size=8)
    with pytest.raises(TypeError, match=r"Expected a torch.nn.LSTM, but got GRU"):
        NormLSTM.from_lstm(torch.nn.GRU(D, H))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_layers=0), r"Expected num_layers >= 1, but got 0"),
    (dict(dropout=1.0), r"Expected dropout in \[0, 1\), but got 1.0"),
    (dict(initial_state_noise=-0.1), r"Expected initial_state_noise >= 0, but got -0.1"),
    (dict(impl="fast"), r"Unknown recurrence implementation 'fast'\. Available: cudnn, fused, fused_native, fused_torch, reference, triton"),
])
def test_bad_layer_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model(**kwargs)
