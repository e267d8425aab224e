"""Gradient flow through batch-normalized recurrences as a function of the initial γ (BN §4, Fig. 1a).

Cooijmans et al. (Recurrent Batch Normalization, §4) plot the norm of the gradient of the loss
with respect to the hidden state, ``||∂loss/∂h_t||₂``, against ``t`` for a batch-normalized tanh
RNN on sequential MNIST, one line per initial γ: with γ = 1 the pre-activations have unit
variance, tanh saturates, and the gradient vanishes as it goes back in time (read the plot right
to left); with a small γ it stays nearly constant. This module measures that for

* ``rnn``: :class:`BNTanhRNN`, ``h_t = tanh(BN_t(W_h h_{t-1}; γ) + BN_t(W_x x_t; γ) + b)``, with
  rnorm's own per-timestep batch normalization (``bn``, :class:`~rnorm.norms.TimeBatchNorm`);
* ``lstm``: :class:`~rnorm.NormLSTM` with ``bn`` on its three sites, every γ initialized to the
  same value,

both untrained (seeded), in training mode (batch statistics), on one batch, with the loss the
cross-entropy of a fixed random linear classifier on the last hidden state. The norm is taken over
the batch and the units; ``t`` runs from 1 (``h_1``, after reading ``x_1``) to ``T``.

**Degenerate batch statistics at the start.** ``h_0`` is the same for every sample, so at ``t = 1``
the recurrent term ``W_h h_0`` has batch variance 0; in scanline order the first rows of every digit
are black, so the state stays the same for all samples until the first step at which some image of
the batch has a non-zero pixel (step 61 for the default batch). Where a term has batch variance 0,
batch normalization divides by ``sqrt(0 + eps)``: its Jacobian is ``γ / sqrt(eps)`` (≈ 316 γ with
``eps = 1e-5``) times the batch-centering projection, so the backward pass multiplies the gradient
by about that much at each such step. Over the black first rows the early end of the curve reaches
1e100 and beyond, or overflows to ``inf`` (and ``nan`` in the LSTM, where an infinite gradient meets
a zero factor); everything is computed in float64 to postpone this. This is batch normalization's
response to a constant batch, not the tanh saturation the figure is about, and it hides the
comparison of γ over those steps. ``permute=True`` (``--permute``) reads the pixels in one fixed
random order, as in permuted MNIST (BN §5.1): the batch then varies from the first step, and only
``t = 1`` is affected. It is off by default, to match the paper's setting.

**What it measures** (default settings, 784 steps; ratio of the norm at ``t = 200`` to that at
``t = 784``, scanline / permuted order): with γ = 0.1 it is 5e-3 / 2e-2 (RNN) and 0.4 / 0.2
(LSTM): no growth, a moderate decay, close to the paper's "nearly constant". With γ = 1 the norm
does not vanish going back in time but grows, by 6e12 / 1e14 (RNN) and 3e24 / 2e25 (LSTM): at
initialization, with batch statistics, these batch-normalized recurrences explode rather than
vanish for large γ. Small γ still gives the better-behaved gradient, for the opposite reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnorm import norms
from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.nn import NormLSTM

__all__ = ["DEFAULT_GAMMAS", "BNTanhRNN", "add_parser", "gradient_flow", "hidden_states", "run"]

DEFAULT_GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)
MODELS = ("rnn", "lstm")
CSV_NAME, PNG_NAME = "gradient_flow.csv", "gradient_flow.png"


class BNTanhRNN(nn.Module):
    """The batch-normalized tanh RNN of BN Fig. 1a: ``h_t = tanh(BN_t(W_h h_{t-1}) + BN_t(W_x x_t) + b)``.

    Both terms are normalized by rnorm's ``bn`` strategy (statistics per time step, γ initialized to
    ``gamma_init``, no β: the bias ``b`` shifts). ``W_h`` and ``W_x`` are orthogonal, ``b = 0`` and ``h_0 = 0``.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        gamma_init: initial γ of both normalizations.

    Example:
        >>> rnn = BNTanhRNN(1, 4, gamma_init=0.1)
        >>> states = rnn(torch.randn(3, 5, 1))
        >>> len(states), tuple(states[0].shape)
        (5, (3, 4))
    """

    def __init__(self, input_size: int, hidden_size: int, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, input_size)))
        self.weight_hh = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, hidden_size)))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.input_norm = norms.create("bn", site="input", num_features=hidden_size, gamma_init=gamma_init)
        self.recurrent_norm = norms.create("bn", site="recurrent", num_features=hidden_size, gamma_init=gamma_init)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Run over ``x`` ``(B, T, D)``; returns ``[h_1, …, h_T]``, each ``(B, H)`` (stack: ``(T, B, H)``).

        Each ``h_t`` is the tensor the next step reads, so ``h_t.retain_grad()`` (or
        ``torch.autograd.grad``) gives the full ``∂loss/∂h_t``, through the rest of the sequence.
        """
        B, T, D = x.shape
        if D != self.input_size:
            raise ValueError(f"Expected x of shape (B, T, {self.input_size}), but got {tuple(x.shape)}.")
        h = x.new_zeros(B, self.hidden_size)
        states = []
        for t in range(T):
            recurrent = self.recurrent_norm.step(F.linear(h, self.weight_hh), t)  # (B, H)
            inputs = self.input_norm.step(F.linear(x[:, t], self.weight_ih), t)  # (B, H)
            h = torch.tanh(recurrent + inputs + self.bias)
            states.append(h)
        return states


def _build(model_kind: str, gamma: float, input_size: int, hidden_size: int) -> nn.Module:
    if model_kind == "rnn":
        return BNTanhRNN(input_size, hidden_size, gamma_init=gamma)
    if model_kind == "lstm":
        kwargs = {"gamma_init": gamma}
        return NormLSTM(
            input_size,
            hidden_size,
            input_norm="bn",
            recurrent_norm="bn",
            cell_norm="bn",
            input_norm_kwargs=kwargs,
            recurrent_norm_kwargs=kwargs,
            cell_norm_kwargs=kwargs,
        )
    raise ValueError(f"Expected model_kind 'rnn' or 'lstm', but got {model_kind!r}.")


def hidden_states(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """``[h_1, …, h_T]``, each ``(B, H)``: the tensors the next step reads, so their gradients are total.

    :class:`BNTanhRNN` returns them. A one-layer :class:`~rnorm.NormLSTM` is stepped through its cell
    (``NormLSTMCell.forward(x_t, state, t)``, which computes what the layer computes: tested in
    ``tests/nn/test_cell.py``). Reading the layer's ``output`` would not do: it is a stack of copies
    whose gradient holds only what the loss reads directly. Its ``hidden_probe`` would, but the
    recurrence indexes the probe once per step, and each index's backward writes a full ``(T, B, H)``
    gradient: ``O(T²)`` work, minutes at ``T = 784``.
    """
    if isinstance(model, BNTanhRNN):
        return model(inputs)
    if not isinstance(model, NormLSTM) or model.num_layers != 1 or model.bidirectional:
        raise ValueError(f"Expected a BNTanhRNN or a one-layer unidirectional NormLSTM, but got {type(model).__name__}.")
    cell = model.cells[0]
    state, states = None, []
    for t in range(inputs.shape[1]):
        state = cell(inputs[:, t], state, t=t)  # (h_t, c_t), (B, H) each
        states.append(state[0])
    return states


def gradient_flow(
    model_kind: Literal["rnn", "lstm"],
    gammas: Sequence[float],
    inputs: Tensor,
    targets: Tensor,
    hidden_size: int,
    seed: int,
) -> Tensor:
    """``||∂loss/∂h_t||₂`` for each initial γ and step, at initialization and with batch statistics.

    For every γ the model and the classifier are drawn from the same ``seed`` (only γ differs). The
    computation runs in ``inputs``' floating dtype; pass float64 for long scanline sequences (see
    the module docstring).

    Args:
        model_kind: ``"rnn"`` (:class:`BNTanhRNN`) or ``"lstm"`` (:class:`~rnorm.NormLSTM`, ``bn`` everywhere).
        gammas: the initial γ values.
        inputs: ``(B, T, D)``, ``B >= 2``.
        targets: ``(B,)`` class indices in ``[0, 10)``.
        hidden_size: ``H``.
        seed: seed of the weights and of the classifier.

    Returns:
        ``(len(gammas), T)``: row ``i``, column ``t - 1`` is the norm of the gradient at ``h_t``.
    """
    if inputs.dim() != 3 or inputs.shape[0] < 2:
        raise ValueError(f"Expected inputs of shape (B, T, D) with B >= 2, but got {tuple(inputs.shape)}.")
    if targets.shape != inputs.shape[:1]:
        raise ValueError(f"Expected targets of shape ({inputs.shape[0]},), but got {tuple(targets.shape)}.")
    num_classes = max(10, int(targets.max()) + 1)
    rows = []
    for gamma in gammas:
        torch.manual_seed(seed)
        model = _build(model_kind, float(gamma), inputs.shape[2], hidden_size).to(inputs.dtype).train()
        classifier = nn.Linear(hidden_size, num_classes).to(inputs.dtype).requires_grad_(False)
        states = hidden_states(model, inputs)
        for h in states:
            h.retain_grad()
        F.cross_entropy(classifier(states[-1]), targets).backward()
        rows.append(torch.stack([h.grad.norm() for h in states]))
    return torch.stack(rows)  # (G, T)


def _first_batch(data_module: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    data_module.setup("fit")
    inputs, targets = next(iter(data_module.train_dataloader()))
    return inputs[:batch_size], targets[:batch_size]


def run(
    output_dir: str | Path,
    data_module: Any = None,
    gammas: Sequence[float] | None = None,
    hidden_size: int = 100,
    batch_size: int = 64,
    steps: int | None = None,
    seed: int = 0,
    plot: bool = True,
    permute: bool = False,
    data_dir: str | None = None,
) -> list[Path]:
    """Measure both models on the first training batch and write ``gradient_flow.csv`` (and ``.png``).

    Args:
        output_dir: where the files go (created if missing).
        data_module: a data module with ``setup`` and ``train_dataloader``; default
            ``SequentialMNISTDataModule(data_dir, permute=permute, mode="pixel")``.
        gammas: initial γ values; default :data:`DEFAULT_GAMMAS`.
        hidden_size: ``H`` of both models.
        batch_size: samples of the batch (at most the data module's batch).
        steps: keep the first ``steps`` steps of each sequence; ``None`` keeps all.
        seed: seed of the weights and classifier.
        plot: also draw ``gradient_flow.png`` (needs matplotlib).
        permute, data_dir: options of the default data module (ignored when one is given).

    Returns:
        The written paths: the CSV (columns ``model, gamma, t, grad_norm``), then the PNG if drawn.
    """
    gammas = list(DEFAULT_GAMMAS if gammas is None else gammas)
    if steps is not None and steps < 1:
        raise ValueError(f"Expected steps >= 1 (or None), but got {steps}.")
    if plot:
        require_pyplot()  # fail before the measurement, not after
    if data_module is None:
        from rnorm.data.mnist import SequentialMNISTDataModule

        data_module = SequentialMNISTDataModule(data_dir=data_dir, permute=permute, mode="pixel", batch_size=batch_size)
    inputs, targets = _first_batch(data_module, batch_size)
    inputs = inputs[:, :steps].double()  # float64: see the module docstring
    results = {kind: gradient_flow(kind, gammas, inputs, targets, hidden_size, seed) for kind in MODELS}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        (kind, gamma, t + 1, float(value))
        for kind, norms_ in results.items()
        for gamma, row in zip(gammas, norms_)
        for t, value in enumerate(row.tolist())
    ]
    paths = [write_csv(output_dir / CSV_NAME, ("model", "gamma", "t", "grad_norm"), rows)]
    if plot:
        paths.append(save_figure(_figure(results, gammas), output_dir / PNG_NAME))
    return paths


def _figure(results: dict[str, Tensor], gammas: Sequence[float]) -> Any:
    plt = require_pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    titles = {"rnn": "BN tanh RNN", "lstm": "BN-LSTM"}
    for axis, (kind, values) in zip(axes[0], results.items()):
        steps = range(1, values.shape[1] + 1)
        for gamma, row in zip(gammas, values):
            axis.plot(steps, row.numpy(), label=f"γ = {gamma:g}")
        axis.set_yscale("log")
        axis.set_xlabel("t")
        axis.set_ylabel("||∂loss/∂h_t||₂")
        axis.set_title(titles.get(kind, kind))
        axis.legend()
    figure.tight_layout()
    return figure


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``gradient-flow`` subcommand; its ``run`` default takes the namespace, returns the paths."""
    parser = add_analysis_parser(
        subparsers,
        "gradient-flow",
        help="gradient norm over time for several initial gamma (BN Fig. 1a)",
        description=__doc__.split("\n\n")[0],
        run=_run_from_args,
    )
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files (default: the embedded sample)")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(DEFAULT_GAMMAS), help="initial gamma values")
    parser.add_argument("--hidden-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="truncate sequences to this many steps (default: all 784)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--permute", action="store_true", help="fixed random pixel order (pMNIST); see the docs")
    return parser


def _run_from_args(args: argparse.Namespace) -> list[Path]:
    return run(
        args.output_dir,
        gammas=args.gammas,
        hidden_size=args.hidden_size,
        batch_size=args.batch_size,
        steps=args.steps,
        seed=args.seed,
        plot=args.plot,
        permute=args.permute,
        data_dir=args.data_dir,
    )
