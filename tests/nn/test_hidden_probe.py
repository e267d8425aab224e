"""hidden_probe gives the total gradient through time, which the stacked output cannot."""

import torch

from rnorm import NormLSTM


def test_probe_gradient_is_the_total_gradient_of_each_hidden_state():
    torch.manual_seed(0)
    lstm = NormLSTM(3, 4, num_layers=2, input_norm="ln", recurrent_norm="ln", cell_norm="ln").double()
    x = torch.randn(5, 6, 3, dtype=torch.double)
    probe = torch.zeros(6, 5, 4, dtype=torch.double, requires_grad=True)
    output, (h_n, _) = lstm(x, hidden_probe=probe)
    loss = (h_n[-1] ** 2).sum()  # reads only the final state, like a classifier
    loss.backward()

    # Reference: finite differences of the loss in h_t, by perturbing the probe at step t only.
    eps = 1e-6
    for t in (0, 3, 5):
        bump = torch.zeros_like(probe)
        bump[t, 1, 2] = eps
        up = (lstm(x, hidden_probe=bump)[1][0][-1] ** 2).sum()
        down = (lstm(x, hidden_probe=-bump)[1][0][-1] ** 2).sum()
        # Central difference in float64: truncation error O(eps^2), rounding O(1e-16 / eps).
        assert abs(float(probe.grad[t, 1, 2]) - float(up - down) / (2 * eps)) < 1e-7
    assert probe.grad[0].abs().sum() > 0  # early steps receive gradient through the recurrence
    # Zeros change nothing. The probed direction runs the reference loop (diagnostics stay out of the
    # fused kernels), the rest the fused one: equal up to the rounding of their different orders of
    # operations (float64: about 1e-15 here; float64's default tolerance 1e-7 far below a real change).
    torch.testing.assert_close(output, lstm(x)[0])
