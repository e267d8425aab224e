"""Gradient flow through batch-normalized recurrences as a function of the initial γ (BN Fig. 1a).

Cooijmans et al. (Recurrent Batch Normalization, §4) plot the norm of the gradient of the loss with
respect to the hidden state, ``∂loss/∂h_t``, against ``t`` for a batch-normalized tanh RNN on
sequential MNIST, one line per initial γ: for large γ it vanishes going back in time (read the plot
right to left), for small γ it stays nearly constant. Whether that holds depends on ingredients
the text does not state; the authors' code (``sequential_mnist.py``, the plain-RNN version with
``DumpVariables(..., before_training=True)``) fixes them, and :data:`PRESETS` names two settings:

* ``paper-fig1a``, the figure's setup: ``h_t = tanh(BN(W_h h_{t-1} + W_x x_t; γ, β = 0))``, **one**
  batch normalization over the sum, ``W_h`` the **identity**, ``W_x`` a random unit-norm column,
  ``h_0 = 0``, ``H = 100``; at initialization, on the first 100 training images in file order,
  pixels in the authors' ``--permuted`` order (784 draws *with* replacement; the paper's text calls
  it sequential MNIST); an orthogonal classifier with zero bias; the norm taken per example and
  averaged over the batch; γ = 0.1, 0.2, …, 1.0; float64 (in float32 the large-γ curves underflow
  to exactly 0 early in the sequence, where the figure's curves stop). Then the paper's statement
  holds: γ = 0.1 stays level, γ = 1 vanishes.
* ``rnorm``, what this command measured before: separate normalizations of ``W_h h_{t-1}`` and
  ``W_x x_t``, an **orthogonal** (mixing) ``W_h``, scanline order, a shuffled batch of 64, a
  ``torch.nn.Linear`` classifier, the Frobenius norm over batch and units, γ in 0.1, 0.3, 0.5, 0.7,
  1.0, and the BN-LSTM (:class:`~rnorm.NormLSTM`, ``bn`` on its three sites) beside the RNN. There
  large γ makes the gradient **explode** going back in time, by 10^12 and more: batch
  normalization's gradient explosion at initialization.

Why the two differ is explained in ``docs/analysis.md``: with the identity each unit is its own
one-dimensional recurrence, and tanh's saturation shrinks each step's gain below 1 for large γ; a
mixing ``W_h`` makes every pre-activation a sum over many units, nearly Gaussian across the batch,
and batch normalization's ``1/σ`` gain then outweighs the saturation. Each ingredient is an option
(:class:`FlowSettings`), so each can be changed on its own.

Where every sample of the batch has the same state (``h_0``, and in scanline order the black first
rows), a normalized term has batch variance 0 and batch normalization's Jacobian is
``γ / sqrt(eps)`` ≈ 316 γ per such step; the norm can overflow there, or underflow to 0 for large γ
in float32. :func:`run` then warns and names the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnorm.analysis.output import add_analysis_parser, require_pyplot, save_figure, write_csv
from rnorm.functional.normalization import affine, masked_moments, normalize
from rnorm.nn import NormLSTM

__all__ = [
    "PRESETS",
    "BNTanhRNN",
    "FlowSettings",
    "add_parser",
    "gradient_flow",
    "hidden_states",
    "measurement_batch",
    "run",
    "settings_for",
]

CSV_NAME, PNG_NAME = "gradient_flow.csv", "gradient_flow.png"
#: The authors' seed of ``np.random.randint`` for their pMNIST order (``sequential_mnist.py --seed 1``).
AUTHORS_ORDER_SEED = 1


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """Every ingredient that decides the measurement (the CLI has one option per field).

    Attributes:
        models: ``rnn`` (:class:`BNTanhRNN`) and/or ``lstm`` (:class:`~rnorm.NormLSTM`, ``bn`` everywhere).
        recurrent_init: ``W_h``: ``identity`` (the LSTM: identity candidate block, the other three
            one orthogonal matrix, the authors' ``--init id``) or ``orthogonal``.
        bn_placement: ``sum``: one normalization of ``W_h h + W_x x`` (RNN only); ``separate``: each term.
        order: pixel order: ``scanline``, ``permutation`` (a true permutation, seed 0) or
            ``authors`` (the authors' draw with replacement, their seed 1).
        batch: ``first``: the first ``batch_size`` training images in file order; ``shuffled``: the
            first batch of the (seeded) training loader.
        stats_grad: ``through``: the gradient flows through the batch mean and variance;
            ``detached``: they are constants (RNN only).
        norm: ``example-mean``: each example's ``||∂loss/∂h_t||₂``, averaged over the batch;
            ``frobenius``: one norm over batch and units.
        dtype: ``float64`` or ``float32``.
        classifier: ``orthogonal`` weight and zero bias (the authors'), or ``default``
            (``torch.nn.Linear``'s initialization).
        hidden_size: ``H``.
        batch_size: ``B``.
        gammas: the initial γ values.
    """

    models: tuple[Literal["rnn", "lstm"], ...]
    recurrent_init: Literal["identity", "orthogonal"]
    bn_placement: Literal["sum", "separate"]
    order: Literal["scanline", "permutation", "authors"]
    batch: Literal["first", "shuffled"]
    stats_grad: Literal["through", "detached"]
    norm: Literal["example-mean", "frobenius"]
    dtype: Literal["float64", "float32"]
    classifier: Literal["orthogonal", "default"]
    hidden_size: int
    batch_size: int
    gammas: tuple[float, ...]


PRESETS: dict[str, FlowSettings] = {
    "paper-fig1a": FlowSettings(
        models=("rnn",),
        recurrent_init="identity",
        bn_placement="sum",
        order="authors",
        batch="first",
        stats_grad="through",
        norm="example-mean",
        dtype="float64",
        classifier="orthogonal",
        hidden_size=100,
        batch_size=100,
        gammas=tuple(round(0.1 * k, 1) for k in range(1, 11)),
    ),
    "rnorm": FlowSettings(
        models=("rnn", "lstm"),
        recurrent_init="orthogonal",
        bn_placement="separate",
        order="scanline",
        batch="shuffled",
        stats_grad="through",
        norm="frobenius",
        dtype="float64",
        classifier="default",
        hidden_size=100,
        batch_size=64,
        gammas=(0.1, 0.3, 0.5, 0.7, 1.0),
    ),
}


def _choices() -> dict[str, tuple[str, ...]]:
    """The values each choice field of :class:`FlowSettings` allows, read from its ``Literal`` hints."""
    choices = {}
    for name, hint in typing.get_type_hints(FlowSettings).items():
        if typing.get_origin(hint) is tuple:  # models: tuple[Literal[...], ...]
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            choices[name] = typing.get_args(hint)
    return choices


CHOICES = _choices()


def settings_for(preset: str = "paper-fig1a", **overrides: Any) -> FlowSettings:
    """A preset with some fields replaced (``None`` keeps the preset's value), every value checked.

    >>> settings_for("paper-fig1a", recurrent_init="orthogonal").recurrent_init
    'orthogonal'
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)}.")
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(FlowSettings)})
    if unknown:
        raise ValueError(f"Unknown gradient-flow settings {unknown}.")
    changes = {name: value for name, value in overrides.items() if value is not None}
    for name in ("models", "gammas"):
        if name in changes:
            changes[name] = tuple(changes[name])
    settings = dataclasses.replace(PRESETS[preset], **changes)
    for name, allowed in CHOICES.items():
        values = getattr(settings, name)
        for value in values if name == "models" else (values,):
            if value not in allowed:
                raise ValueError(f"Expected {name} in {allowed}, but got {value!r}.")
    if not settings.models or not settings.gammas:
        raise ValueError(f"Expected at least one model and one gamma, but got {settings.models} and {settings.gammas}.")
    if settings.hidden_size < 1 or settings.batch_size < 2:
        raise ValueError(
            f"Expected hidden_size >= 1 and batch_size >= 2, but got {settings.hidden_size} and {settings.batch_size}."
        )
    if "lstm" in settings.models and (settings.bn_placement, settings.stats_grad) != ("separate", "through"):
        raise ValueError(
            "The lstm model normalizes W_h h and W_x x separately with the gradient through the statistics "
            "(BN eq. 6): bn_placement 'sum' and stats_grad 'detached' apply to the rnn model only."
        )
    return settings


class BNTanhRNN(nn.Module):
    """The batch-normalized tanh RNN of BN Fig. 1a, ``h_t = tanh(BN_t(…) + b)``, ``h_0 = 0``, ``b = 0``.

    ``bn_placement="sum"``: ``tanh(BN_t(W_h h_{t-1} + W_x x_t; γ))``, as in the authors' code;
    ``"separate"``: ``tanh(BN_t(W_h h_{t-1}; γ) + BN_t(W_x x_t; γ))``. Each ``BN_t`` uses the batch
    mean and biased variance of step ``t`` (BN eq. 5), ``eps = 1e-5``, no β.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        gamma_init: initial γ of every normalization.
        recurrent_init: ``W_h`` the ``identity`` or ``orthogonal``; ``W_x`` is orthogonal (for
            ``D = 1`` a random unit-norm column).
        bn_placement: ``sum`` or ``separate``.
        stats_grad: ``through`` (the gradient flows through the batch statistics) or ``detached``.

    Example:
        >>> rnn = BNTanhRNN(1, 4, gamma_init=0.1, recurrent_init="identity", bn_placement="sum")
        >>> states = rnn(torch.randn(3, 5, 1))
        >>> len(states), tuple(states[0].shape)
        (5, (3, 4))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gamma_init: float = 0.1,
        recurrent_init: Literal["identity", "orthogonal"] = "orthogonal",
        bn_placement: Literal["sum", "separate"] = "separate",
        stats_grad: Literal["through", "detached"] = "through",
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.bn_placement, self.stats_grad, self.eps = bn_placement, stats_grad, 1e-5
        self.weight_ih = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, input_size)))
        if recurrent_init == "identity":
            self.weight_hh = nn.Parameter(torch.eye(hidden_size))
        else:
            self.weight_hh = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, hidden_size)))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        sites = ("sum",) if bn_placement == "sum" else ("recurrent", "input")
        gamma = torch.full((hidden_size,), float(gamma_init))
        self.gammas = nn.ParameterDict({site: nn.Parameter(gamma.clone()) for site in sites})

    def _bn(self, z: Tensor, site: str) -> Tensor:
        """BN eq. 5 over the batch of one step: ``z`` ``(B, H)``."""
        mean, var, _ = masked_moments(z, None, (0,))  # (H,) each, biased variance
        if self.stats_grad == "detached":
            mean, var = mean.detach(), var.detach()
        return affine(normalize(z, mean, var, self.eps), self.gammas[site], None)

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
            recurrent = F.linear(h, self.weight_hh)  # (B, H)
            inputs = F.linear(x[:, t], self.weight_ih)  # (B, H)
            if self.bn_placement == "sum":
                pre = self._bn(recurrent + inputs, "sum")
            else:
                pre = self._bn(recurrent, "recurrent") + self._bn(inputs, "input")
            h = torch.tanh(pre + self.bias)
            states.append(h)
        return states


def _build(model_kind: str, gamma: float, input_size: int, settings: FlowSettings) -> nn.Module:
    if model_kind == "rnn":
        return BNTanhRNN(
            input_size, settings.hidden_size, gamma, settings.recurrent_init, settings.bn_placement, settings.stats_grad
        )
    if model_kind == "lstm":
        kwargs = {"gamma_init": gamma}
        recurrent_init = {"g": "identity", "ifo": "orthogonal"} if settings.recurrent_init == "identity" else "orthogonal"
        return NormLSTM(
            input_size,
            settings.hidden_size,
            input_norm="bn",
            recurrent_norm="bn",
            cell_norm="bn",
            input_norm_kwargs=kwargs,
            recurrent_norm_kwargs=kwargs,
            cell_norm_kwargs=kwargs,
            recurrent_init=recurrent_init,
        )
    raise ValueError(f"Expected model_kind 'rnn' or 'lstm', but got {model_kind!r}.")


def _classifier(settings: FlowSettings, num_classes: int) -> nn.Linear:
    if settings.classifier == "orthogonal":
        from rnorm.tasks.base import orthogonal_linear

        return orthogonal_linear(settings.hidden_size, num_classes)
    return nn.Linear(settings.hidden_size, num_classes)


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
    model_kind: Literal["rnn", "lstm"], inputs: Tensor, targets: Tensor, settings: FlowSettings, seed: int = 0
) -> Tensor:
    """The norm of ``∂loss/∂h_t`` for each initial γ and step, at initialization and with batch statistics.

    For every γ the model and then the classifier are drawn from the same ``seed`` (only γ differs).
    The computation runs in ``inputs``' floating dtype; the loss is the batch-mean cross-entropy of
    the classifier on ``h_T``.

    Args:
        model_kind: ``"rnn"`` (:class:`BNTanhRNN`) or ``"lstm"`` (:class:`~rnorm.NormLSTM`, ``bn`` everywhere).
        inputs: ``(B, T, D)``, ``B >= 2``.
        targets: ``(B,)`` class indices.
        settings: the model's ingredients, the γ values, ``H`` and the norm (:class:`FlowSettings`).
        seed: seed of the weights and of the classifier.

    Returns:
        ``(len(settings.gammas), T)``: row ``i``, column ``t - 1`` is the norm of the gradient at ``h_t``.
    """
    if inputs.dim() != 3 or inputs.shape[0] < 2:
        raise ValueError(f"Expected inputs of shape (B, T, D) with B >= 2, but got {tuple(inputs.shape)}.")
    if targets.shape != inputs.shape[:1]:
        raise ValueError(f"Expected targets of shape ({inputs.shape[0]},), but got {tuple(targets.shape)}.")
    num_classes = max(10, int(targets.max()) + 1)
    rows = []
    for gamma in settings.gammas:
        torch.manual_seed(seed)
        model = _build(model_kind, float(gamma), inputs.shape[2], settings).to(inputs.dtype).train()
        classifier = _classifier(settings, num_classes).to(inputs.dtype).requires_grad_(False)
        states = hidden_states(model, inputs)
        grads = torch.autograd.grad(F.cross_entropy(classifier(states[-1]), targets), states)
        grads = torch.stack(grads)  # (T, B, H)
        if settings.norm == "example-mean":
            rows.append(grads.norm(dim=2).mean(dim=1))  # (T,)
        else:
            rows.append(grads.flatten(1).norm(dim=1))  # (T,)
    return torch.stack(rows)  # (G, T)


def measurement_batch(settings: FlowSettings, data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """The batch of the measurement: inputs ``(B, 784, 1)`` in ``settings.dtype``, pixels in [0, 1], targets ``(B,)``.

    Read from MNIST's training images in ``data_dir`` (``None``: the sample shipped with rnorm,
    whose first 100 training images are MNIST's), in the pixel order and batch ``settings`` name.
    """
    from rnorm.data.mnist import SequentialMNISTDataModule

    data = SequentialMNISTDataModule(
        data_dir=data_dir,
        permute=settings.order != "scanline",
        permutation_seed=AUTHORS_ORDER_SEED if settings.order == "authors" else 0,
        permutation_draw="authors" if settings.order == "authors" else "randperm",
        mode="pixel",
        batch_size=settings.batch_size,
    )
    data.setup("fit")
    if settings.batch == "first":
        dataset = data.dataset("train")
        if len(dataset) < settings.batch_size:
            raise ValueError(
                f"Expected at least {settings.batch_size} training images, but {data.folder} has {len(dataset)}."
            )
        inputs, targets = zip(*(dataset[i] for i in range(settings.batch_size)))
        inputs, targets = torch.stack(inputs), torch.stack(targets)
    else:
        inputs, targets = next(iter(data.train_dataloader()))
        inputs, targets = inputs[: settings.batch_size], targets[: settings.batch_size]
    return inputs.to(getattr(torch, settings.dtype)), targets


def run(
    output_dir: str | Path,
    preset: str = "paper-fig1a",
    data_dir: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    plot: bool = True,
    **overrides: Any,
) -> list[Path]:
    """Measure every model of the settings and write ``gradient_flow.csv`` (and ``.png``).

    Args:
        output_dir: where the files go (created if missing).
        preset: a name in :data:`PRESETS`.
        data_dir: folder with the MNIST IDX files; ``None``: the sample shipped with rnorm.
        steps: keep the first ``steps`` steps of each sequence; ``None`` keeps all 784.
        seed: seed of the weights and classifier.
        plot: also draw ``gradient_flow.png`` (needs matplotlib).
        overrides: fields of :class:`FlowSettings` replacing the preset's (``None``: the preset's).

    Returns:
        The written paths: the CSV (columns ``model, gamma, t, grad_norm``), then the PNG if drawn.

    Warns:
        UserWarning: naming the steps where a norm overflowed (``inf``/``nan``) or underflowed to 0.
    """
    settings = settings_for(preset, **overrides)
    if steps is not None and steps < 1:
        raise ValueError(f"Expected steps >= 1 (or None), but got {steps}.")
    if plot:
        require_pyplot()  # fail before the measurement, not after
    inputs, targets = measurement_batch(settings, data_dir)
    inputs = inputs[:, :steps]
    results = {kind: gradient_flow(kind, inputs, targets, settings, seed) for kind in settings.models}
    _warn_non_finite(results, settings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        (kind, gamma, t + 1, float(value))
        for kind, norms_ in results.items()
        for gamma, row in zip(settings.gammas, norms_)
        for t, value in enumerate(row.tolist())
    ]
    paths = [write_csv(output_dir / CSV_NAME, ("model", "gamma", "t", "grad_norm"), rows)]
    if plot:
        paths.append(save_figure(_figure(results, settings), output_dir / PNG_NAME))
    return paths


def _spans(steps: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _warn_non_finite(results: dict[str, Tensor], settings: FlowSettings) -> None:
    """One warning naming, per model and γ, the steps whose norm is inf/nan or exactly 0."""
    lines = []
    for kind, values in results.items():
        for gamma, row in zip(settings.gammas, values):
            for what, bad in (("overflowed to inf/nan", ~torch.isfinite(row)), ("underflowed to 0", row == 0)):
                steps = (bad.nonzero().flatten() + 1).tolist()
                if steps:
                    lines.append(f"  {kind}, gamma = {gamma:g}: {what} at t = {_spans(steps)}")
    if lines:
        warnings.warn(
            f"The gradient norm is not a finite positive number at some steps ({settings.dtype}); these values "
            "are written as they are (inf, nan, 0) and the plot leaves them out:\n" + "\n".join(lines)
            + ("\nfloat64 (--dtype float64) postpones both." if settings.dtype == "float32" else ""),
            stacklevel=3,
        )


def _figure(results: dict[str, Tensor], settings: FlowSettings) -> Any:
    plt = require_pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    titles = {"rnn": "BN tanh RNN", "lstm": "BN-LSTM"}
    for axis, (kind, values) in zip(axes[0], results.items()):
        steps = range(1, values.shape[1] + 1)
        colors = plt.cm.viridis([i / max(1, len(settings.gammas) - 1) for i in range(len(settings.gammas))])
        for gamma, row, color in zip(settings.gammas, values, colors):
            axis.plot(steps, row.numpy(), label=f"γ = {gamma:g}", color=color)
        axis.set_yscale("log")
        axis.set_xlabel("t")
        axis.set_ylabel("||∂loss/∂h_t||₂" + (" (mean over examples)" if settings.norm == "example-mean" else ""))
        placement = "BN(W_h h + W_x x)" if settings.bn_placement == "sum" else "BN(W_h h) + BN(W_x x)"
        axis.set_title(f"{titles.get(kind, kind)}: {placement}, W_h {settings.recurrent_init}", fontsize="medium")
        axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


INGREDIENT_HELP = {
    "recurrent_init": "W_h (for the LSTM, identity is the candidate block only)",
    "bn_placement": "sum: BN(W_h h + W_x x); separate: BN(W_h h) + BN(W_x x) (RNN only)",
    "order": "pixel order; authors: their draw with replacement, seed 1",
    "batch": "first: the first training images in file order; shuffled: the training loader's first batch",
    "stats_grad": "whether the gradient flows through the batch mean and variance (detached: RNN only)",
    "norm": "example-mean: each example's norm, averaged; frobenius: over batch and units",
    "dtype": "float32 underflows for large gamma",
    "classifier": "orthogonal weight and zero bias, or torch.nn.Linear's default",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``gradient-flow`` subcommand; its ``run`` default takes the namespace, returns the paths."""
    parser = add_analysis_parser(
        subparsers,
        "gradient-flow",
        help="gradient norm over time for several initial gamma (BN Fig. 1a)",
        description=__doc__.split("\n\n")[0],
        run=_run_from_args,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="paper-fig1a",
        help="paper-fig1a: the figure's setup (default); rnorm: separately normalized terms, mixing W_h, RNN and BN-LSTM",
    )
    parser.add_argument("--data_dir", default=None, help="folder with the MNIST IDX files (default: the shipped sample)")
    parser.add_argument("--steps", type=int, default=None, help="keep the first STEPS steps (default: all 784)")
    parser.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("ingredients (each default: the preset's)")
    group.add_argument("--models", nargs="+", choices=CHOICES["models"], default=None, help="the BN tanh RNN, the BN-LSTM")
    for name, text in INGREDIENT_HELP.items():
        group.add_argument(f"--{name}", choices=CHOICES[name], default=None, help=text)
    group.add_argument("--gammas", type=float, nargs="+", default=None, help="initial gamma values")
    group.add_argument("--hidden_size", type=int, default=None)
    group.add_argument("--batch_size", type=int, default=None)
    return parser


def _run_from_args(args: argparse.Namespace) -> list[Path]:
    fields = [field.name for field in dataclasses.fields(FlowSettings)]
    return run(
        args.output_dir,
        preset=args.preset,
        data_dir=args.data_dir,
        steps=args.steps,
        seed=args.seed,
        plot=args.plot,
        **{name: getattr(args, name) for name in fields},
    )
