"""One direction of one layer of a normalized LSTM: weights, three normalization sites, initial state."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnorm.nn.init import INPUT_INITS, RECURRENT_INITS, GateInit, gate_groups, init_gate_blocks
from rnorm.nn.recurrence import lstm_step
from rnorm.norms import NormalizerSpec, resolve


class NormLSTMCell(nn.Module):
    """A normalized LSTM cell: BN eq. 6–8 and NP eq. 15–17 with a strategy on each site.

    Usable on its own, one step at a time (for models whose next input depends on the last output,
    such as DRAW), and as the building block of :class:`~rnorm.nn.NormLSTM`, which projects and
    normalizes all input steps at once and runs the recurrence over them.

    Args:
        input_size: ``D``, features of ``x_t``.
        hidden_size: ``H``.
        input_norm, recurrent_norm, cell_norm: the strategy of each site: a registered name, a
            Normalizer class or partial, or a built Normalizer (copied).
        input_norm_kwargs, recurrent_norm_kwargs, cell_norm_kwargs: hyperparameters for them.
        bias: learn the gate bias ``b`` (the only shift of the input and recurrent terms: BN §3).
        learn_initial_state: learn ``h_0`` and ``c_0`` (initialized to zero); else they stay zero.
            With per-step batch normalization on the recurrent site ``h_0`` stays fixed anyway: its
            training gradient is identically zero there.
        initial_state_noise: std of Gaussian noise added to the initial state in training (BN §5.1).
        initial_state_noise_on: ``h0_c0`` (default): noise on ``h_0`` and ``c_0``; ``h0``: on ``h_0``
            only, as the authors' code does (``sequential_mnist.py --noise``).
        initial_state_noise_in_eval: add the noise in evaluation too (the authors' code does; their
            inference graph draws it as well); by default evaluation has none.
        input_init: initializer of ``W_x``: ``orthogonal`` (default) or ``uniform`` for each gate
            block, or a mapping of gate groups to schemes, each group one matrix
            (``{ifgo: orthogonal}``: the authors' one orthogonal ``W_x``); see :mod:`rnorm.nn.init`.
        recurrent_init: initializer of ``W_h``: ``orthogonal`` (default), ``identity`` or ``uniform``
            for each gate block, or a mapping of gate groups to schemes (``{g: identity, ifo:
            orthogonal}``: the authors' ``--init id``, identity on the candidate block only).
        forget_bias: initial bias of the forget gate (the papers' text is silent; the authors' code uses 1).

    Shapes: ``weight_ih`` ``(4H, D)``, ``weight_hh`` ``(4H, H)``, ``bias`` ``(4H,)``, gates in
    ``torch.nn.LSTM``'s order (i, f, g, o).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        input_norm: NormalizerSpec = "bn",
        recurrent_norm: NormalizerSpec = "bn",
        cell_norm: NormalizerSpec = "bn",
        input_norm_kwargs: dict[str, Any] | None = None,
        recurrent_norm_kwargs: dict[str, Any] | None = None,
        cell_norm_kwargs: dict[str, Any] | None = None,
        bias: bool = True,
        learn_initial_state: bool = True,
        initial_state_noise: float = 0.0,
        initial_state_noise_on: Literal["h0_c0", "h0"] = "h0_c0",
        initial_state_noise_in_eval: bool = False,
        input_init: GateInit = "orthogonal",
        recurrent_init: GateInit = "orthogonal",
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"Expected input_size and hidden_size >= 1, but got {input_size} and {hidden_size}.")
        if initial_state_noise < 0:
            raise ValueError(f"Expected initial_state_noise >= 0, but got {initial_state_noise}.")
        if initial_state_noise_on not in ("h0_c0", "h0"):
            raise ValueError(f"Expected initial_state_noise_on 'h0_c0' or 'h0', but got {initial_state_noise_on!r}.")
        gate_groups(input_init, INPUT_INITS, "input_init")  # clear errors before anything is built
        gate_groups(recurrent_init, RECURRENT_INITS, "recurrent_init")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.initial_state_noise = float(initial_state_noise)
        self.initial_state_noise_on = initial_state_noise_on
        self.initial_state_noise_in_eval = bool(initial_state_noise_in_eval)
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias = nn.Parameter(torch.zeros(gates)) if bias else None
        self.h0 = nn.Parameter(torch.zeros(hidden_size), requires_grad=learn_initial_state)
        self.c0 = nn.Parameter(torch.zeros(hidden_size), requires_grad=learn_initial_state)
        init_gate_blocks(self.weight_ih, input_init, INPUT_INITS)
        init_gate_blocks(self.weight_hh, recurrent_init, RECURRENT_INITS)
        if self.bias is not None:
            with torch.no_grad():
                self.bias[hidden_size : 2 * hidden_size] = forget_bias
        self.input_norm = resolve(input_norm, **(input_norm_kwargs or {}))(site="input", num_features=gates)
        self.recurrent_norm = resolve(recurrent_norm, **(recurrent_norm_kwargs or {}))(site="recurrent", num_features=gates)
        self.cell_norm = resolve(cell_norm, **(cell_norm_kwargs or {}))(site="cell", num_features=hidden_size)
        sites = {"input": self.input_norm, "recurrent": self.recurrent_norm, "cell": self.cell_norm}
        for norm in sites.values():
            norm.attach(sites)
        self._per_step_batch_statistics = any(norm.batch_statistics == "step" for norm in sites.values())
        if self.recurrent_norm.batch_statistics == "step":
            # h_0 enters only through W_h h_0, the same for every sample, which per-step batch
            # normalization subtracts: its gradient is identically 0 in training. Kept fixed, so that
            # an optimizer like Adam cannot turn round-off into steps that move it (evaluation, with
            # population statistics, would see the drift).
            self.h0.requires_grad_(False)

    def _synchronized(self) -> bool:
        return any(norm.synchronized for norm in self.norms)

    @property
    def norms(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The (input, recurrent, cell) strategies."""
        return self.input_norm, self.recurrent_norm, self.cell_norm

    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(h_0, c_0)``, ``(B, H)`` each: the learned state, plus noise where configured.

        The noise (std ``initial_state_noise``, a fresh draw per sample) goes on ``h_0`` and ``c_0``
        or on ``h_0`` only (``initial_state_noise_on``), in training and, with
        ``initial_state_noise_in_eval``, in evaluation too.
        """
        h0 = self.h0.expand(batch_size, -1)
        c0 = self.c0.expand(batch_size, -1)
        if self.initial_state_noise > 0 and (self.training or self.initial_state_noise_in_eval):
            h0 = h0 + self.initial_state_noise * torch.randn_like(h0)
            if self.initial_state_noise_on == "h0_c0":
                c0 = c0 + self.initial_state_noise * torch.randn_like(c0)
        return h0, c0

    def input_terms(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalized input terms plus bias for all steps at once: one GEMM, one normalization.

        Args:
            x: ``(T, B, D)``.
            mask: ``(T, B)`` boolean, ``True`` on real steps, or ``None``.

        Returns:
            ``(T, B, 4H)``.
        """
        projected = F.linear(x, self.input_norm.transform_weight(self.weight_ih))  # (T, B, 4H)
        terms = self.input_norm(projected, mask)
        return terms if self.bias is None else terms + self.bias

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, t: int = 0, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One step.

        Args:
            x: ``(B, D)``, the input at step ``t``.
            state: ``(h, c)``, ``(B, H)`` each; ``None`` for :meth:`initial_state`.
            t: the step index (0-based), for step-dependent strategies such as ``bn``.
            mask: ``(B,)`` boolean, ``False`` for sequences that have ended (their state is kept).

        Returns:
            The new ``(h, c)``.
        """
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"Expected x of shape (B, {self.input_size}), but got {tuple(x.shape)}.")
        # Local check only: with statistics synchronized across processes the global batch counts,
        # and checking it would cost a collective per step.
        if self.training and self._per_step_batch_statistics and not self._synchronized():
            samples = x.shape[0] if mask is None else int(mask.sum())
            if samples == 1:
                raise ValueError(
                    f"Batch normalization in training needs at least 2 unpadded samples at a step, but "
                    f"step {t} has only 1. Use a larger batch or a strategy without batch statistics."
                )
        h, c = self.initial_state(x.shape[0]) if state is None else state
        input_term = self.input_norm.step(F.linear(x, self.input_norm.transform_weight(self.weight_ih)), t, mask)
        if self.bias is not None:
            input_term = input_term + self.bias
        weight_hh_t = self.recurrent_norm.transform_weight(self.weight_hh).t()
        h_new, c_new = lstm_step(
            input_term, h, c, weight_hh_t, t, mask, self.recurrent_norm, self.cell_norm, self.cell_norm.hidden_scale
        )
        if mask is None:
            return h_new, c_new
        keep = mask.unsqueeze(1)
        return torch.where(keep, h_new, h), torch.where(keep, c_new, c)

    def extra_repr(self) -> str:
        noise = f"initial_state_noise={self.initial_state_noise}"
        if self.initial_state_noise > 0:
            noise += f" on {self.initial_state_noise_on}" + (" (also in eval)" if self.initial_state_noise_in_eval else "")
        return f"{self.input_size}, {self.hidden_size}, {noise}"
