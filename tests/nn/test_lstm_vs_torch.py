"""``NormLSTM`` with ``none`` on every site is ``torch.nn.LSTM``.

``NormLSTM.from_lstm`` copies the weights and sums torch's two biases into the cell's single
``bias``; both of torch's biases therefore get the gradient of that one. The initial state of a
``NormLSTM`` is its learned ``h0``/``c0`` (zero at first); torch's is ``hx``, so torch is given those
same parameters, expanded over the batch, as ``hx`` and their gradients are compared too.

Tolerance: float32 throughout, as a user would run it. torch's kernel and our per-step loop sum
in a different order, a few ulps (~1e-7) per operation; over ≤ 12 steps and 2 layers with O(1)
values and gradients the differences measured here stay around 1e-6, so ``1e-5`` (absolute and
relative) is tight enough to catch a swapped gate, a wrong bias or a state leaking through
padding, which are all O(0.1).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnorm import NormLSTM

TOL = 1e-5  # see the module docstring
B, T, D, H = 5, 8, 3, 4
LENGTHS = [7, 3, 5, 1, 6]  # the longest (7) is shorter than T: the last step is all padding

LAYOUTS = {
    "1-layer": dict(num_layers=1, bidirectional=False),
    "2-layer": dict(num_layers=2, bidirectional=False),
    "bidirectional": dict(num_layers=1, bidirectional=True),
    "2-layer-bi": dict(num_layers=2, bidirectional=True),
}


def build(layout: str, batch_first: bool) -> tuple[nn.LSTM, NormLSTM]:
    lstm = nn.LSTM(D, H, batch_first=batch_first, **LAYOUTS[layout])
    model = NormLSTM.from_lstm(lstm, input_norm="none", recurrent_norm="none", cell_norm="none")
    return lstm, model


def make_input(batch_first: bool, padded: bool) -> tuple[Tensor, Tensor | None]:
    x = torch.randn(B, T, D)
    lengths = torch.tensor(LENGTHS) if padded else None
    if padded:  # garbage in the padding: it must not leak into anything
        x[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = 100.0
    return (x if batch_first else x.transpose(0, 1).contiguous()), lengths


def run_torch(lstm: nn.LSTM, model: NormLSTM, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    hx = tuple(torch.stack([getattr(cell, name).expand(B, H) for cell in model.cells]) for name in ("h0", "c0"))
    if lengths is None:
        out, (h_n, c_n) = lstm(x, hx)
        return out, h_n, c_n
    packed = pack_padded_sequence(x, lengths, batch_first=lstm.batch_first, enforce_sorted=False)
    out, (h_n, c_n) = lstm(packed, hx)  # h_n, c_n come back in the original batch order
    out, _ = pad_packed_sequence(out, batch_first=lstm.batch_first, total_length=T)
    return out, h_n, c_n


def loss_of(out: Tensor, h_n: Tensor, c_n: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(7)
    return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (out, h_n, c_n))


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-major"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_torch_lstm(layout, batch_first, padded):
    """Outputs, ``h_n``, ``c_n`` and every gradient; with padding, against torch's packed sequences
    (whose backward direction, like ours, reverses only the unpadded part of each sequence)."""
    torch.manual_seed(0)
    lstm, model = build(layout, batch_first)
    x, lengths = make_input(batch_first, padded)

    out, (h_n, c_n) = model(x, lengths)
    ref_out, ref_h, ref_c = run_torch(lstm, model, x, lengths)
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, "output")
    assert_close(h_n, ref_h, "h_n")
    assert_close(c_n, ref_c, "c_n")

    # (ours, torch's, name): NormLSTM's single bias is torch's bias_ih + bias_hh, so both of
    # those get its gradient; h0 and c0 reach torch as hx.
    pairs = []
    for k, cell in enumerate(model.cells):
        layer, direction = divmod(k, model.num_directions)
        suffix = f"l{layer}" + ("_reverse" if direction else "")
        names = (("weight_ih", "weight_ih"), ("weight_hh", "weight_hh"), ("bias", "bias_ih"), ("bias", "bias_hh"))
        for ours, theirs in names:
            pairs.append((getattr(cell, ours), getattr(lstm, f"{theirs}_{suffix}"), f"{theirs}_{suffix}"))
        pairs += [(cell.h0, cell.h0, f"h0 of cell {k}"), (cell.c0, cell.c0, f"c0 of cell {k}")]
    params = [p for cell in model.cells for p in (cell.weight_ih, cell.weight_hh, cell.bias, cell.h0, cell.c0)]
    got = dict(zip(map(id, params), torch.autograd.grad(loss_of(out, h_n, c_n), params)))
    want = torch.autograd.grad(loss_of(ref_out, ref_h, ref_c), [q for _, q, _ in pairs])
    for (ours, _, name), expected in zip(pairs, want):
        assert_close(got[id(ours)], expected, f"gradient of {name}")


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-major"])
def test_explicit_initial_state_matches_torch(batch_first):
    torch.manual_seed(1)
    lstm, model = build("2-layer-bi", batch_first)
    x, lengths = make_input(batch_first, padded=True)
    hx = (torch.randn(4, B, H), torch.randn(4, B, H))
    out, (h_n, c_n) = model(x, lengths, hx=hx)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ref_out, (ref_h, ref_c) = lstm(packed, hx)
    ref_out, _ = pad_packed_sequence(ref_out, batch_first=batch_first, total_length=T)
    assert_close(out, ref_out, "output")
    assert_close(h_n, ref_h, "h_n")
    assert_close(c_n, ref_c, "c_n")


@pytest.mark.parametrize("layout", ["1-layer", "2-layer-bi"])
def test_padded_outputs_are_exactly_zero(layout):
    torch.manual_seed(2)
    _, model = build(layout, batch_first=True)
    x, lengths = make_input(batch_first=True, padded=True)
    out, _ = model(x, lengths)
    padding = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    assert bool((out[~padding] != 0).all())


@pytest.mark.parametrize("layout", ["1-layer", "2-layer-bi"])
def test_final_state_is_taken_at_each_true_last_step(layout):
    """``h_n`` is the forward output at step ``lengths[b] - 1`` and the backward output at step 0;
    and each sequence run alone, without padding, gives the same ``h_n`` and ``c_n``."""
    torch.manual_seed(3)
    _, model = build(layout, batch_first=True)
    x, lengths = make_input(batch_first=True, padded=True)
    out, (h_n, c_n) = model(x, lengths)
    top = model.num_directions * (model.num_layers - 1)  # h_n index of the last layer's forward
    for b, n in enumerate(LENGTHS):
        assert torch.equal(h_n[top, b], out[b, n - 1, :H])
        if model.bidirectional:
            assert torch.equal(h_n[top + 1, b], out[b, 0, H:])
        alone_out, (alone_h, alone_c) = model(x[b : b + 1, :n])
        assert_close(out[b : b + 1, :n], alone_out, f"output of sequence {b} alone")
        assert_close(h_n[:, b : b + 1], alone_h, f"h_n of sequence {b} alone")
        assert_close(c_n[:, b : b + 1], alone_c, f"c_n of sequence {b} alone")
