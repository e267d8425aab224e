"""Every built-in strategy inside a ``NormLSTM`` against an independent reference from the papers.

The reference (:class:`PaperLSTM`) is written here from the equations, without ``rnorm.functional``
or ``rnorm.nn.recurrence``: a plain per-step loop over BN eq. 5–8 (Cooijmans et al.) and NP eq.
15–17 (Laurent et al.), with gates in ``torch.nn.LSTM``'s order (i, f, g, o). It reads only the
model's parameters (weights, bias, ``h0``/``c0``, γ, β) and Norm-Prop's fixed ``cell_var`` /
``hidden_var`` buffers (their values are tested elsewhere); the hyperparameters (``eps``,
``momentum``) are the documented defaults, and the population statistics are kept by the reference
itself from the start, so the module's running statistics are checked, not borrowed.

Second references: ``wn`` against ``torch.nn.LSTM`` with
``torch.nn.utils.parametrizations.weight_norm`` on its weights, and ``ln`` against
``torch.nn.functional.layer_norm``.

Everything runs in float64, so the only differences are round-off: the module and the reference
compute the same quantities in a different order (one GEMM over all steps vs one per step,
``rsqrt`` vs ``1 / sqrt``, masked sums vs indexing), a few ulps (~1e-16) per operation. Tolerances
are normwise: an entry may differ by ``tol`` times the largest entry it is compared with (for a
gradient, the largest gradient entry of the whole model), since round-off scales with the size of
the terms summed, not with the result (the gradient of ``h0`` under a ``bn`` recurrent site, for
one, is exactly zero in training: BN removes what every sample shares, and it comes out as
round-off).

* ``TOL = 1e-10``: training mode (outputs, state, gradients) and running statistics. Measured
  differences stay below 2e-13 over every configuration and layout here (three seeds).
* ``EVAL_TOL = 1e-8``: eval mode. Population variances of these small random models go down to
  1e-7 (and to exactly 0 for the recurrent term at step 0, where every sample starts from the same
  learned ``h0``), so each eval-mode BN multiplies round-off by up to ``1 / sqrt(eps) ≈ 316``,
  compounding over layers and steps: measured differences reach 2e-11 on outputs and 6e-10 on
  gradients.

Any modelling difference is many orders of magnitude larger: an unbiased variance is off by
``n / (n - 1) >= 1.2`` for ``n <= 6`` samples, a missing β, γ or a wrong population slot by O(0.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnorm import NormLSTM
from rnorm.norms import available, get

TOL, EVAL_TOL = 1e-10, 1e-8  # see the module docstring

# The documented defaults the reference assumes (rnorm/norms/*.py docstrings).
EPS = 1e-5
MOMENTUM = 0.1

SITES = ("input", "recurrent", "cell")
SITE_ATTR = {"input": "input_norm", "recurrent": "recurrent_norm", "cell": "cell_norm"}

#: (input, recurrent, cell) strategies: each built-in alone, then ablations that mix them.
CONFIGS: dict[str, tuple[str, str, str]] = {
    "none": ("none", "none", "none"),
    "bn": ("bn", "bn", "bn"),
    "seqbn": ("seqbn", "none", "none"),  # sequencewise BN exists on the input site only
    "ln": ("ln", "ln", "ln"),
    "wn": ("wn", "wn", "none"),  # weight norm re-parametrizes weights: no cell site
    "normprop": ("normprop", "normprop", "normprop"),
    "bn-e*": ("seqbn", "bn", "bn"),  # BN §5.4
    "ln/bn/none": ("ln", "bn", "none"),
    "none/ln/bn": ("none", "ln", "bn"),
    "wn/bn/normprop": ("wn", "bn", "normprop"),
}
BATCH_STATISTICS = {"bn", "seqbn"}

#: (num_layers, bidirectional)
LAYOUTS = {"1-layer": (1, False), "2-layer": (2, False), "bidirectional": (1, True), "2-layer-bi": (2, True)}

B, D, H = 5, 3, 4
# Training lengths: at least 2 unpadded samples at every step (per-step BN needs them), the
# longest (6) shorter than the padded tensor (T = 7) so that the all-padding last step is skipped.
TRAIN_T, TRAIN_LENGTHS = 7, [6, 4, 6, 2, 5]
SECOND_T = 4  # a shorter second training batch: steps 0-3 get a second estimate, 4-5 keep one
# Evaluation runs past T_max = 6 (steps 6-8 must reuse step 5's statistics); one sequence of length 1.
EVAL_T, EVAL_LENGTHS = 9, [9, 3, 7, 1, 5]


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One population statistic: mean, variance and how many minibatch estimates went into it."""

    mean: Tensor
    var: Tensor
    count: int = 0

    def fold(self, mean: Tensor, var: Tensor, momentum: float | None) -> None:
        self.count += 1
        if self.count == 1:  # the first estimate is taken as is
            self.mean, self.var = mean.clone(), var.clone()
        elif momentum is None:  # cumulative average of the minibatch estimates (BN §3)
            self.mean = self.mean + (mean - self.mean) / self.count
            self.var = self.var + (var - self.var) / self.count
        else:  # exponential moving average, torch.nn.BatchNorm's convention
            self.mean = (1 - momentum) * self.mean + momentum * mean
            self.var = (1 - momentum) * self.var + momentum * var


@dataclass
class PaperLSTM:
    """A normalized LSTM written directly from the papers, sharing ``model``'s parameters.

    ``population[(cell index, site)]`` lists the population statistic of each step (``bn``) or
    the single shared one (``seqbn``), grown and updated by training-mode calls.
    """

    model: NormLSTM
    strategies: tuple[str, str, str]
    momentum: float | None = MOMENTUM
    layer_norm: str = "manual"  # or "torch": torch.nn.functional.layer_norm
    population: dict[tuple[int, str], list[Slot]] = field(default_factory=dict)

    # -- sites ----------------------------------------------------------------------------------
    def strategy(self, site: str) -> str:
        return self.strategies[SITES.index(site)]

    def norm(self, k: int, site: str) -> nn.Module:
        return getattr(self.model.cells[k], SITE_ATTR[site])

    def effective_weight(self, k: int, site: str, weight: Tensor) -> Tensor:
        """NP eq. 15 / weight norm: ``γ_i W_i / ||W_i||₂`` for every row ``i``."""
        if self.strategy(site) in ("wn", "normprop"):
            gamma = self.norm(k, site).gamma
            return gamma.unsqueeze(1) * weight / torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        return weight

    def batch_norm(self, k: int, site: str, rows: Tensor, value: Tensor, slot: int, training: bool) -> Tensor:
        """BN eq. 5 on ``value`` with statistics of ``rows`` (training) or of population ``slot``.

        γ on every site; β only on the cell (BN §3: ``β_x = β_h = 0``, the bias ``b`` shifts).
        """
        slots = self.population.setdefault((k, site), [])
        if training:
            mean = rows.mean(dim=0)
            var = ((rows - mean) ** 2).mean(dim=0)  # biased: divide by n
            if slot == len(slots):
                slots.append(Slot(torch.zeros_like(mean), torch.ones_like(var)))
            slots[slot].fold(mean.detach(), var.detach(), self.momentum)
        elif slots:
            mean, var = slots[slot].mean, slots[slot].var
        else:  # never trained: mean 0, variance 1, like an untrained torch.nn.BatchNorm1d
            mean, var = value.new_zeros(value.shape[-1]), value.new_ones(value.shape[-1])
        norm = self.norm(k, site)
        out = norm.gamma * (value - mean) / torch.sqrt(var + EPS)
        return out + norm.beta if site == "cell" else out

    def population_slot(self, k: int, site: str, t: int) -> int:
        """Step ``t`` (0-based) uses the statistics of step ``min(t, T_max)`` (BN §3)."""
        t_max = len(self.population.get((k, site), []))
        return t if t_max == 0 else min(t, t_max - 1)

    def activation(self, k: int, site: str, value: Tensor, active: Tensor, t: int, training: bool) -> Tensor:
        """The site's transform of ``value`` ``(B, F)`` at step ``t``; ``active`` marks unpadded rows."""
        strategy = self.strategy(site)
        norm = self.norm(k, site)
        if strategy == "bn":
            slot = t if training else self.population_slot(k, site, t)
            return self.batch_norm(k, site, value[active], value, slot, training)  # padded rows never count
        if strategy == "ln":
            if self.layer_norm == "torch":
                return F.layer_norm(value, (value.shape[-1],), norm.gamma, norm.beta, EPS)
            mean = value.mean(dim=-1, keepdim=True)
            var = ((value - mean) ** 2).mean(dim=-1, keepdim=True)
            return norm.gamma * (value - mean) / torch.sqrt(var + EPS) + norm.beta
        if strategy == "normprop" and site == "cell":
            return norm.gamma * value / torch.sqrt(norm.cell_var)  # γ_c c_t / sqrt(Var[c_t]), NP eq. 17
        # none; seqbn (applied to all steps at once); wn and normprop on weight sites (in the weight)
        return value

    def hidden_scale(self, k: int) -> Tensor | float:
        if self.strategy("cell") == "normprop":
            return 1.0 / torch.sqrt(self.norm(k, "cell").hidden_var)  # NP eq. 17
        return 1.0

    # -- one direction of one layer -------------------------------------------------------------
    def direction(self, k: int, x: Tensor, lengths: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Run cell ``k`` over ``x`` ``(T, B, D)``; output zero on padding, state frozen there."""
        cell = self.model.cells[k]
        num_steps, batch = x.shape[:2]
        hidden = cell.hidden_size
        w_x = self.effective_weight(k, "input", cell.weight_ih)
        w_h = self.effective_weight(k, "recurrent", cell.weight_hh)
        input_terms = [x[t] @ w_x.T for t in range(num_steps)]  # (B, 4H) each
        if self.strategy("input") == "seqbn":
            # one statistic over every unpadded (step, sample) pair (BN §5.4, BN-e*)
            terms = torch.stack(input_terms)  # (T, B, 4H)
            unpadded = torch.arange(num_steps).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
            input_terms = list(self.batch_norm(k, "input", terms[unpadded], terms, 0, training))
        h = cell.h0.expand(batch, hidden)
        c = cell.c0.expand(batch, hidden)
        outputs = []
        for t in range(num_steps):
            active = lengths > t  # (B,)
            if not bool(active.any()):
                outputs.append(x.new_zeros(batch, hidden))
                continue
            gates = (
                self.activation(k, "input", input_terms[t], active, t, training)
                + self.activation(k, "recurrent", h @ w_h.T, active, t, training)
                + cell.bias
            )  # BN eq. 6 / NP eq. 15
            i, f, g, o = (gates[:, j * hidden : (j + 1) * hidden] for j in range(4))
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # BN eq. 7 / NP eq. 16
            h_new = torch.sigmoid(o) * torch.tanh(self.activation(k, "cell", c_new, active, t, training))  # eq. 8
            h_new = h_new * self.hidden_scale(k)
            keep = active.unsqueeze(1)
            h = torch.where(keep, h_new, h)
            c = torch.where(keep, c_new, c)
            outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        return torch.stack(outputs), h, c

    def __call__(self, x: Tensor, lengths: Tensor | None, training: bool) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``(B, T, D)`` (batch first, the model's default); returns what ``NormLSTM`` does."""
        x = x.transpose(0, 1)  # (T, B, D)
        num_steps, batch = x.shape[:2]
        lengths = torch.full((batch,), num_steps) if lengths is None else lengths
        directions = 2 if self.model.bidirectional else 1
        layer_input, h_n, c_n = x, [], []
        for layer in range(self.model.num_layers):
            outputs = []
            for d in range(directions):
                k = layer * directions + d
                sequence = layer_input if d == 0 else reverse_each(layer_input, lengths)
                output, h, c = self.direction(k, sequence, lengths, training)
                outputs.append(output if d == 0 else reverse_each(output, lengths))
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=2)
        return layer_input.transpose(0, 1), (torch.stack(h_n), torch.stack(c_n))


def reverse_each(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first ``lengths[b]`` steps of every sequence of ``x`` ``(T, B, F)``; padding stays."""
    out = x.clone()
    for b, n in enumerate(lengths.tolist()):
        out[:n, b] = x[:n, b].flip(0)
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_model(config: str, layout: str = "1-layer", **kwargs) -> NormLSTM:
    num_layers, bidirectional = LAYOUTS[layout]
    inp, rec, cell = CONFIGS[config]
    model = NormLSTM(
        D, H, num_layers=num_layers, bidirectional=bidirectional,
        input_norm=inp, recurrent_norm=rec, cell_norm=cell, **kwargs,
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            # Move every parameter off its initial value (γ, β, bias, h0, c0 start at constants),
            # so that a γ swapped for a β, a missing bias or an ignored h0 shows.
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_input(num_steps: int, lengths: list[int] | None) -> tuple[Tensor, Tensor | None]:
    # Padding holds large random values, not zeros: they must not reach any output or statistic.
    x = torch.randn(B, num_steps, D, dtype=torch.float64)
    if lengths is None:
        return x, None
    lengths_t = torch.tensor(lengths)
    padding = torch.arange(num_steps).unsqueeze(0) >= lengths_t.unsqueeze(1)  # (B, T)
    x[padding] = 10.0 * torch.randn(int(padding.sum()), D, dtype=torch.float64)
    return x, lengths_t


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def loss_of(out: Tensor, h_n: Tensor, c_n: Tensor, seed: int = 123) -> Tensor:
    """A scalar that weighs every output, ``h_n`` and ``c_n`` entry by a fixed random number."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, h_n, c_n)]
    return sum((t * w).sum() for t, w in zip((out, h_n, c_n), weights))


def grads(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def assert_close(actual: Tensor, expected: Tensor, what: str, tol: float = TOL, scale: float | None = None) -> None:
    """Equal up to ``tol`` relative to each entry or to ``scale`` (default: the largest expected entry)."""
    scale = float(expected.detach().abs().max()) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def compare_forward(model: NormLSTM, ref: PaperLSTM, x: Tensor, lengths: Tensor | None, training: bool) -> None:
    """Outputs, ``h_n``, ``c_n`` and the gradient of every parameter agree."""
    names, params = trainable(model)
    out, (h_n, c_n) = model(x, lengths)
    ref_out, (ref_h, ref_c) = ref(x, lengths, training)
    tol = TOL if training else EVAL_TOL
    assert_close(out, ref_out, "output", tol)
    assert_close(h_n, ref_h, "h_n", tol)
    assert_close(c_n, ref_c, "c_n", tol)
    if lengths is not None:
        padded = torch.arange(x.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)
        assert bool((out[padded] == 0).all()), "padded outputs must be exactly zero"
    got = grads(loss_of(out, h_n, c_n), params)
    want = grads(loss_of(ref_out, ref_h, ref_c), params)
    scale = max(float(g.abs().max()) for g in want)
    for name, g, w in zip(names, got, want):
        assert_close(g, w, f"gradient of {name}", tol, scale)


def assert_population_matches(model: NormLSTM, ref: PaperLSTM) -> None:
    """Every ``bn``/``seqbn`` site holds the reference's population statistics, slot by slot."""
    checked = 0
    for k, cell in enumerate(model.cells):
        for site in SITES:
            strategy = ref.strategy(site)
            if strategy not in BATCH_STATISTICS:
                continue
            norm = getattr(cell, SITE_ATTR[site])
            slots = ref.population.get((k, site), [])
            # bn has one slot per step up to T_max; seqbn a single one from construction on
            assert norm.running_mean.shape[0] == (1 if strategy == "seqbn" else len(slots)), f"cell {k} {site}: T_max"
            if not slots:
                continue
            assert_close(norm.running_mean, torch.stack([s.mean for s in slots]), f"cell {k} {site} running_mean")
            assert_close(norm.running_var, torch.stack([s.var for s in slots]), f"cell {k} {site} running_var")
            assert norm.num_batches_tracked.tolist() == [s.count for s in slots], f"cell {k} {site} num_batches_tracked"
            checked += 1
    assert checked == sum(
        model.num_layers * model.num_directions for s in ref.strategies if s in BATCH_STATISTICS
    ), "a batch-statistics site was never exercised"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_configs_cover_every_builtin_strategy():
    builtin = {name for name in available() if get(name).__module__.startswith("rnorm.")}
    covered = {strategy for config in CONFIGS.values() for strategy in config}
    assert builtin <= covered, f"no reference for {sorted(builtin - covered)}"


@pytest.mark.parametrize("config", CONFIGS)
def test_parameters_are_where_the_docs_say(config):
    """The reference relies on it: γ on every normalizing site, β on every ``ln`` site and on the
    ``bn`` cell site only, Norm-Prop's variances as buffers of its cell site."""
    model = make_model(config)
    cell = model.cells[0]
    for site, strategy in zip(SITES, CONFIGS[config]):
        norm = getattr(cell, SITE_ATTR[site])
        names = {n for n, _ in norm.named_parameters()}
        expected = {
            "none": set(),
            "bn": {"gamma", "beta"} if site == "cell" else {"gamma"},
            "seqbn": {"gamma"},
            "ln": {"gamma", "beta"},
            "wn": {"gamma"},
            "normprop": {"gamma"},
        }[strategy]
        assert names == expected, f"{site} site of {strategy}"
        if strategy == "normprop" and site == "cell":
            assert {"cell_var", "hidden_var"} <= {n for n, _ in norm.named_buffers()}


# Every configuration runs 1-layer and 2-layer bidirectional; the plain 2-layer and 1-layer
# bidirectional layouts add nothing new for most, so only bn, BN-e* and Norm-Prop run them too.
CONFIG_LAYOUTS = [
    (config, layout)
    for config in CONFIGS
    for layout in LAYOUTS
    if layout not in ("2-layer", "bidirectional") or config in ("bn", "bn-e*", "normprop")
]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize(("config", "layout"), CONFIG_LAYOUTS)
def test_training_forward_matches_reference(config, layout, padded):
    """Batch statistics: two training forwards (the second shorter), outputs, state, gradients and
    the running statistics after each (first estimate of a step as is, then momentum 0.1)."""
    torch.manual_seed(0)
    model = make_model(config, layout).train()
    ref = PaperLSTM(model, CONFIGS[config])
    x, lengths = make_input(TRAIN_T, TRAIN_LENGTHS if padded else None)
    compare_forward(model, ref, x, lengths, training=True)
    assert_population_matches(model, ref)
    x, lengths = make_input(SECOND_T, [4, 2, 3, 4, 4] if padded else None)
    compare_forward(model, ref, x, lengths, training=True)
    assert_population_matches(model, ref)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize(("config", "layout"), CONFIG_LAYOUTS)
def test_eval_forward_matches_reference(config, layout, padded):
    """Population statistics after two training forwards, on sequences longer than T_max: step
    ``t`` uses step ``min(t, T_max)``'s statistics."""
    torch.manual_seed(1)
    model = make_model(config, layout).train()
    ref = PaperLSTM(model, CONFIGS[config])
    with torch.no_grad():
        for num_steps, lengths in ((TRAIN_T, TRAIN_LENGTHS), (SECOND_T, None)):
            x, lengths = make_input(num_steps, lengths)
            model(x, lengths)
            ref(x, lengths, training=True)
    model.eval()
    x, lengths = make_input(EVAL_T, EVAL_LENGTHS if padded else None)
    compare_forward(model, ref, x, lengths, training=False)
    assert_population_matches(model, ref)  # evaluation leaves the population statistics alone
    for site, strategy in zip(SITES, CONFIGS[config]):
        if strategy == "bn":  # T_max is the longest training length, 6, not the padded 7
            assert getattr(model.cells[0], SITE_ATTR[site]).t_max == 6


@pytest.mark.parametrize("config", ["bn", "bn-e*", "seqbn"])
def test_untrained_eval_uses_zero_mean_unit_variance(config):
    torch.manual_seed(2)
    model = make_model(config).eval()
    ref = PaperLSTM(model, CONFIGS[config])
    x, lengths = make_input(EVAL_T, EVAL_LENGTHS)
    compare_forward(model, ref, x, lengths, training=False)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, None])
@pytest.mark.parametrize("config", ["bn", "bn-e*"])
def test_running_statistics_follow_momentum(config, momentum):
    """Three training batches of lengths 5, 3 and 7 (padded): new slots start from their first
    estimate, old ones move by ``momentum`` (``None``: the cumulative average)."""
    torch.manual_seed(3)
    kwargs = {"momentum": momentum}
    model = make_model(
        config, input_norm_kwargs=kwargs, recurrent_norm_kwargs=kwargs, cell_norm_kwargs=kwargs
    ).train()
    ref = PaperLSTM(model, CONFIGS[config], momentum=momentum)
    with torch.no_grad():
        for num_steps, lengths in ((5, None), (3, [3, 2, 3, 3, 2]), (8, [7, 7, 5, 2, 6])):
            x, lengths = make_input(num_steps, lengths)
            model(x, lengths)
            ref(x, lengths, training=True)
            assert_population_matches(model, ref)
    assert model.cells[0].cell_norm.num_batches_tracked.tolist() == [3, 3, 3, 2, 2, 1, 1]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", ["ln", "ln/bn/none", "none/ln/bn"])
def test_ln_matches_torch_layer_norm(config, training):
    """The same LSTM with every ``ln`` site computed by ``torch.nn.functional.layer_norm``."""
    torch.manual_seed(4)
    model = make_model(config, "2-layer-bi").train()
    ref = PaperLSTM(model, CONFIGS[config], layer_norm="torch")
    if not training:
        with torch.no_grad():
            x, lengths = make_input(TRAIN_T, TRAIN_LENGTHS)
            model(x, lengths)
            ref(x, lengths, training=True)
        model.eval()
    x, lengths = make_input(TRAIN_T, TRAIN_LENGTHS)
    compare_forward(model, ref, x, lengths, training=training)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("layout", ["1-layer", "2-layer-bi"])
def test_wn_matches_torch_weight_norm(layout, padded):
    """``wn/wn/none`` is ``torch.nn.LSTM`` with ``weight_norm`` (``w = g v / ||v||`` per row) on its
    weights: ``g`` is γ, ``v`` the raw weight, ``bias_ih`` the bias and ``bias_hh`` zero."""
    torch.manual_seed(5)
    model = make_model("wn", layout)
    num_layers, bidirectional = LAYOUTS[layout]
    lstm = nn.LSTM(D, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=True).double()
    pairs = []  # (NormLSTM parameter, torch parameter, how the torch one maps onto it)
    for k, cell in enumerate(model.cells):
        layer, d = divmod(k, model.num_directions)
        suffix = f"l{layer}" + ("_reverse" if d else "")
        for kind, site in (("ih", "input_norm"), ("hh", "recurrent_norm")):
            name = f"weight_{kind}_{suffix}"
            weight_norm(lstm, name, dim=0)
            param = getattr(lstm.parametrizations, name)
            with torch.no_grad():
                param.original0.copy_(getattr(cell, site).gamma.unsqueeze(1))  # g: (4H, 1)
                param.original1.copy_(getattr(cell, f"weight_{kind}"))  # v: (4H, fan_in)
            pairs.append((getattr(cell, site).gamma, param.original0, lambda g: g.squeeze(1)))
            pairs.append((getattr(cell, f"weight_{kind}"), param.original1, lambda g: g))
        with torch.no_grad():
            getattr(lstm, f"bias_ih_{suffix}").copy_(cell.bias)
            getattr(lstm, f"bias_hh_{suffix}").zero_()
        pairs.append((cell.bias, getattr(lstm, f"bias_ih_{suffix}"), lambda g: g))
    x, lengths = make_input(TRAIN_T, TRAIN_LENGTHS if padded else None)
    # torch.nn.LSTM takes the initial state as hx: give it the model's learned h0, c0
    hx = tuple(torch.stack([getattr(c, s).expand(B, H) for c in model.cells]) for s in ("h0", "c0"))
    if padded:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        packed_out, (h_n, c_n) = lstm(packed, hx)
        out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=TRAIN_T)
    else:
        out, (h_n, c_n) = lstm(x, hx)
    got_out, (got_h, got_c) = model(x, lengths)
    assert_close(got_out, out, "output")
    assert_close(got_h, h_n, "h_n")
    assert_close(got_c, c_n, "c_n")
    ours = [p for p, _, _ in pairs] + [getattr(c, s) for c in model.cells for s in ("h0", "c0")]
    theirs = [q for _, q, _ in pairs] + [getattr(c, s) for c in model.cells for s in ("h0", "c0")]
    maps = [m for _, _, m in pairs] + [lambda g: g] * (2 * len(model.cells))
    got = grads(loss_of(got_out, got_h, got_c), ours)
    want = grads(loss_of(out, h_n, c_n), theirs)
    scale = max(float(w.abs().max()) for w in want)
    for i, (g, w, m) in enumerate(zip(got, want, maps)):
        assert_close(g, m(w), f"gradient {i}", scale=scale)
