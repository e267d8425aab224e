"""NormLSTMCell used one step at a time computes what NormLSTM computes over the sequence."""

import pytest
import torch

from rnorm import NormLSTM
from rnorm.norms import available, get


def _site_norm(name: str, site: str) -> str:
    return name if site in get(name).supported_sites else "none"


# seqbn needs the whole sequence (it raises when stepped; tested in tests/nn/test_errors.py).
STEPPABLE = [name for name in available() if name != "seqbn"]


@pytest.mark.parametrize("name", STEPPABLE)
@pytest.mark.parametrize("training", [True, False])
def test_stepping_the_cell_matches_the_layer(name, training):
    torch.manual_seed(0)
    norms = {f"{site}_norm": _site_norm(name, site) for site in ("input", "recurrent", "cell")}
    layer = NormLSTM(3, 5, **norms).double()
    layer.train()
    layer(torch.randn(6, 7, 3, dtype=torch.double))  # non-trivial population statistics
    layer.train(training)
    reference = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 7, 3, dtype=torch.double)
    lengths = torch.tensor([7, 7, 5, 4, 4, 2])
    output, (h_n, c_n) = layer(x, lengths=lengths)
    after_layer = {k: v.clone() for k, v in layer.state_dict().items()}

    layer.load_state_dict(reference)  # undo the statistics update of the layer's forward
    cell = layer.cells[0]
    state, steps = None, []
    for t in range(x.shape[1]):
        mask = t < lengths
        state = cell(x[:, t], state, t=t, mask=mask)
        steps.append(state[0] * mask.unsqueeze(1))
    # Same operations in the same order, in float64: agreement to rounding.
    torch.testing.assert_close(torch.stack(steps, 1), output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0], h_n[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[1], c_n[0], rtol=1e-12, atol=1e-12)
    # Population statistics: the layer's vectorized input-site update and the stepped one agree up
    # to summation order (float64 default tolerances, ~1e-7 relative, are far above that).
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, after_layer[key], msg=key)


def test_cell_rejects_a_wrong_input_shape():
    cell = NormLSTM(3, 5).cells[0]
    with pytest.raises(ValueError, match=r"Expected x of shape \(B, 3\), but got \(4, 2\)"):
        cell(torch.randn(4, 2))


def test_cell_rejects_a_single_sample_step_with_batch_statistics_in_training():
    cell = NormLSTM(3, 5).cells[0]  # bn on every site
    with pytest.raises(ValueError, match="at least 2 unpadded samples at a step, but step 4 has only 1"):
        cell(torch.randn(3, 3), t=4, mask=torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="step 0 has only 1"):
        cell(torch.randn(1, 3))
    cell.eval()  # population statistics: one sample is fine
    assert cell(torch.randn(1, 3))[0].shape == (1, 5)
