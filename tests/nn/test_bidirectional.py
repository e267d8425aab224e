"""The backward direction reverses only the unpadded part of each sequence (BN §5.4, BN-e**).

References: a unidirectional NormLSTM loaded with one direction's cell (``cells[k]``) run over
sequences reversed by hand (``x[b, :n].flip(0)``) and re-reversed by hand; and ``torch.nn.LSTM``
over a packed sequence for the layout of outputs and ``h_n``. Float64; the references perform the
same operations as the layer, so they agree to rounding and ``TOL`` (1e-12) is tight.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnorm import NormLSTM

TOL = dict(rtol=1e-12, atol=1e-12)
D, H = 3, 4


def _model(norm: str = "bn", input_norm: str | None = None, **kwargs) -> NormLSTM:
    torch.manual_seed(0)
    sites = dict(input_norm=input_norm or norm, recurrent_norm=norm, cell_norm=norm)
    model = NormLSTM(D, H, bidirectional=True, **sites, **kwargs).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _direction(model: NormLSTM, index: int) -> NormLSTM:
    """A unidirectional one-layer NormLSTM computing what ``model.cells[index]`` computes."""
    cell = model.cells[index]
    norms = dict(input_norm=cell.input_norm.__class__, recurrent_norm=cell.recurrent_norm.__class__,
                 cell_norm=cell.cell_norm.__class__)
    single = NormLSTM(cell.input_size, H, **norms).double()
    single.cells[0].load_state_dict(cell.state_dict())  # population statistics included
    return single.train(model.training)


def _batch(lengths: list[int], steps: int, seed: int = 1, pad: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), steps, D, generator=g, dtype=torch.double) + 0.5
    lengths = torch.tensor(lengths)
    x[torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1)] = pad
    return x, lengths


def _reverse_by_hand(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = x[b, :n].flip(0)
    return out


def _train_a_little(model: NormLSTM) -> None:
    model.train()
    for seed in range(2):
        model(*_batch([7, 7, 7, 7], 7, seed=50 + seed))


@pytest.mark.parametrize(("norm", "training"), [("bn", False), ("ln", True), ("ln", False), ("normprop", True)])
def test_each_direction_equals_a_unidirectional_cell_on_the_hand_reversed_sequence(norm, training):
    # Per sample: in eval, or with strategies that do not couple the samples of a batch.
    model = _model(norm)
    _train_a_little(model)
    model.train(training)
    forward, backward = _direction(model, 0), _direction(model, 1)
    x, lengths = _batch([6, 2, 4, 6], 7, pad=9.0)
    out, (h_n, c_n) = model(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        out_f, (h_f, c_f) = forward(x[b : b + 1, :n])
        out_b, (h_b, c_b) = backward(x[b : b + 1, :n].flip(1))
        torch.testing.assert_close(out[b, :n, :H], out_f[0], **TOL)
        torch.testing.assert_close(out[b, :n, H:], out_b[0].flip(0), **TOL)  # re-reversed by hand
        torch.testing.assert_close(h_n[:, b], torch.cat([h_f[:, 0], h_b[:, 0]]), **TOL)
        torch.testing.assert_close(c_n[:, b], torch.cat([c_f[:, 0], c_b[:, 0]]), **TOL)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


@pytest.mark.parametrize("input_norm", ["bn", "seqbn"])
def test_backward_direction_in_training_sees_the_hand_reversed_padded_batch(input_norm):
    # With batch statistics the samples are coupled: compare whole batches, and the statistics
    # the backward cell collects must be those of the hand-reversed batch.
    model = _model("bn", input_norm=input_norm)
    forward, backward = _direction(model, 0), _direction(model, 1)
    x, lengths = _batch([6, 6, 4, 4, 3], 7, pad=1e4)  # garbage padding: must stay out
    out, (h_n, c_n) = model(x, lengths)
    out_f, (h_f, c_f) = forward(x, lengths)
    out_b, (h_b, c_b) = backward(_reverse_by_hand(x, lengths), lengths)
    torch.testing.assert_close(out[..., :H], out_f, **TOL)
    torch.testing.assert_close(out[..., H:], _reverse_by_hand(out_b, lengths), **TOL)
    torch.testing.assert_close(h_n, torch.cat([h_f, h_b]), **TOL)
    torch.testing.assert_close(c_n, torch.cat([c_f, c_b]), **TOL)
    for key, value in backward.cells[0].state_dict().items():
        torch.testing.assert_close(model.cells[1].state_dict()[key], value, **TOL, msg=key)
    for key, value in forward.cells[0].state_dict().items():
        torch.testing.assert_close(model.cells[0].state_dict()[key], value, **TOL, msg=key)


def test_reversing_the_whole_padded_sequence_would_be_wrong():
    # Guards the reference above: flipping the whole padded tensor (padding first) gives another
    # answer, so the agreement really checks that only the unpadded part is reversed.
    model = _model("ln").eval()
    backward = _direction(model, 1)
    x, lengths = _batch([6, 3], 6, pad=0.0)
    out, _ = model(x, lengths)
    wrong, _ = backward(x[1:2].flip(1))
    assert (out[1, :3, H:] - wrong[0].flip(0)[:3]).abs().max() > 1e-3


def test_two_layers_layout_and_h_n_order_match_torch_lstm_on_packed_sequences():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True).double()
    model = NormLSTM.from_lstm(lstm, input_norm="none", recurrent_norm="none", cell_norm="none")
    x, lengths = _batch([5, 2, 4], 6, pad=3.0)
    h0 = torch.randn(4, 3, H, dtype=torch.double)
    c0 = torch.randn(4, 3, H, dtype=torch.double)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_packed, (ref_h, ref_c) = lstm(packed, (h0, c0))
    ref_out, _ = pad_packed_sequence(ref_packed, batch_first=True, total_length=6)
    out, (h_n, c_n) = model(x, lengths, hx=(h0, c0))
    # Different GEMM groupings and a different recurrence loop: rounding of ~1e-15, hence 1e-10.
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-10, atol=1e-10)  # l0 fwd, l0 bwd, l1 fwd, l1 bwd
    torch.testing.assert_close(c_n, ref_c, rtol=1e-10, atol=1e-10)


def test_two_layers_compose_from_single_directions_in_eval():
    model = _model("bn", num_layers=2)
    _train_a_little(model)
    model.eval()
    x, lengths = _batch([5, 3, 5], 5)
    out, (h_n, c_n) = model(x, lengths)
    assert out.shape == (3, 5, 2 * H) and h_n.shape == c_n.shape == (4, 3, H)
    directions = [_direction(model, k) for k in range(4)]  # l0 fwd, l0 bwd, l1 fwd, l1 bwd
    for b, n in enumerate(lengths.tolist()):
        layer_input, hs = x[b : b + 1, :n], []
        for layer in range(2):
            fwd, (h_f, _) = directions[2 * layer](layer_input)
            bwd, (h_b, _) = directions[2 * layer + 1](layer_input.flip(1))
            layer_input = torch.cat([fwd, bwd.flip(1)], dim=2)  # [forward, backward]
            hs += [h_f[0, 0], h_b[0, 0]]
        torch.testing.assert_close(out[b, :n], layer_input[0], **TOL)
        torch.testing.assert_close(h_n[:, b], torch.stack(hs), **TOL)
