"""The normalized LSTM layer: stacked, optionally bidirectional, padding-aware."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnorm.functional.distributed import global_step_counts, world_size
from rnorm.functional.masking import check_lengths, lengths_to_mask, mask_to_lengths, reverse_padded
from rnorm.nn.cell import NormLSTMCell
from rnorm.nn.dispatch import get_recurrence
from rnorm.nn.init import GateInit
from rnorm.norms import NormalizerSpec


class NormLSTM(nn.Module):
    """A multi-layer LSTM with a normalization strategy on each of its three sites.

    BN-LSTM is ``bn/bn/bn`` (the default), BN-e* ``seqbn/bn/bn``, LN-LSTM ``ln/ln/ln``, Norm-Prop
    ``normprop/normprop/normprop``, weight norm ``wn/wn/none`` and a plain LSTM ``none/none/none``;
    any mix is allowed. Inputs, outputs and ``(h_n, c_n)`` are shaped as in ``torch.nn.LSTM``.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        num_layers: stacked layers.
        bidirectional: add a backward direction that reverses only the unpadded part of each
            sequence (BN §5.4); outputs are ``[forward, backward]`` on the feature axis.
        batch_first: ``x`` is ``(B, T, D)`` (default) rather than ``(T, B, D)``.
        dropout: dropout on the outputs of every layer but the last, in training.
        input_norm, recurrent_norm, cell_norm: the strategy of each site (a registered name, see
            ``rnorm normalizers``; a Normalizer class or partial; or a built Normalizer).
        input_norm_kwargs, recurrent_norm_kwargs, cell_norm_kwargs: hyperparameters of each.
        bias: learn the gate bias.
        learn_initial_state: learn ``h_0``, ``c_0`` per layer and direction (zeros at init).
        initial_state_noise: std of Gaussian noise on the initial state in training (BN §5.1).
        initial_state_noise_on: ``h0_c0`` (default): the noise goes on ``h_0`` and ``c_0``; ``h0``:
            on ``h_0`` only, as in the authors' code.
        initial_state_noise_in_eval: also add the noise in evaluation, as the authors' code does.
        input_init: initializer of ``W_x``: ``orthogonal`` or ``uniform`` for each gate block, or
            a mapping of gate groups to schemes, each group one matrix, e.g. ``{ifgo: orthogonal}``
            (see :mod:`rnorm.nn.init`).
        recurrent_init: initializer of ``W_h``: ``orthogonal``, ``identity`` or ``uniform`` for each
            gate block, or a mapping of gate groups to schemes, e.g. ``{g: identity, ifo: orthogonal}``.
        forget_bias: initial forget-gate bias.
        impl: the recurrence implementation: ``fused`` (default: the fastest path for the layer
            and device: torch's own LSTM where the layer is a plain LSTM after its weight
            transform and that is faster (cuDNN on CUDA), else the op of :mod:`rnorm.kernels`, its
            per-step work in the compiled CPU kernels where they are built and in the Triton
            kernels on CUDA; the reference loop for strategies without a fused form),
            ``fused_torch`` (the op with torch operations per step; allows backward through one
            graph more than once), ``fused_native`` (the op with the compiled CPU kernels, forced),
            ``triton`` (the op with the Triton kernels, forced: CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``), ``cudnn`` (torch's own LSTM; an error naming the
            reason where the layer is not a plain LSTM after its weight transform) or ``reference``
            (the per-step loop of the papers' equations); see :data:`rnorm.nn.dispatch.RECURRENCES`.
            The path taken is logged once at INFO on the ``rnorm.kernels`` logger
            (docs/performance.md, "Which path runs where").

    Example:
        >>> import torch
        >>> lstm = NormLSTM(3, 8, input_norm="bn", recurrent_norm="bn", cell_norm="bn")
        >>> out, (h_n, c_n) = lstm(torch.randn(4, 10, 3), lengths=torch.tensor([10, 7, 3, 10]))
        >>> tuple(out.shape), tuple(h_n.shape), float(out[2, 3:].detach().abs().sum())
        ((4, 10, 8), (1, 4, 8), 0.0)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        dropout: float = 0.0,
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
        impl: str = "fused",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"Expected num_layers >= 1, but got {num_layers}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1), but got {dropout}.")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.batch_first, self.dropout = bidirectional, batch_first, float(dropout)
        self.num_directions = 2 if bidirectional else 1
        self.recurrence = get_recurrence(impl)
        self.impl = impl
        cell_options = dict(
            input_norm=input_norm,
            recurrent_norm=recurrent_norm,
            cell_norm=cell_norm,
            input_norm_kwargs=input_norm_kwargs,
            recurrent_norm_kwargs=recurrent_norm_kwargs,
            cell_norm_kwargs=cell_norm_kwargs,
            bias=bias,
            learn_initial_state=learn_initial_state,
            initial_state_noise=initial_state_noise,
            initial_state_noise_on=initial_state_noise_on,
            initial_state_noise_in_eval=initial_state_noise_in_eval,
            input_init=input_init,
            recurrent_init=recurrent_init,
            forget_bias=forget_bias,
        )
        # cells[layer * num_directions + direction], the order of torch.nn.LSTM's h_n.
        self.cells = nn.ModuleList(
            NormLSTMCell(input_size if layer == 0 else hidden_size * self.num_directions, hidden_size, **cell_options)
            for layer in range(num_layers)
            for _ in range(self.num_directions)
        )
        kinds = {getattr(norm, "batch_statistics", None) for cell in self.cells for norm in cell.norms}
        self._batch_statistics = kinds - {None}

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **kwargs: Any) -> NormLSTM:
        """A NormLSTM with the sizes, layout and weights of ``lstm`` (its two biases summed).

        ``kwargs`` choose the strategies and other options not fixed by ``lstm``; with ``none`` on
        every site the result computes what ``lstm`` computes.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"Expected a torch.nn.LSTM, but got {type(lstm).__name__}.")
        if lstm.proj_size:
            raise ValueError("LSTMs with projections (proj_size > 0) have no NormLSTM counterpart.")
        layout = dict(
            input_size=lstm.input_size,
            hidden_size=lstm.hidden_size,
            num_layers=lstm.num_layers,
            bidirectional=lstm.bidirectional,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout,
        )
        clash = sorted(set(layout) & set(kwargs))
        if clash:
            raise ValueError(f"{clash} are taken from the given LSTM and cannot be passed as well.")
        model = cls(**layout, **kwargs)
        with torch.no_grad():
            for index, cell in enumerate(model.cells):
                layer, direction = divmod(index, model.num_directions)
                suffix = f"l{layer}" + ("_reverse" if direction else "")
                cell.weight_ih.copy_(getattr(lstm, f"weight_ih_{suffix}"))
                cell.weight_hh.copy_(getattr(lstm, f"weight_hh_{suffix}"))
                if cell.bias is not None:
                    if lstm.bias:
                        cell.bias.copy_(getattr(lstm, f"bias_ih_{suffix}") + getattr(lstm, f"bias_hh_{suffix}"))
                    else:
                        cell.bias.zero_()
        return model.to(lstm.weight_ih_l0.device, lstm.weight_ih_l0.dtype)

    def forward(
        self,
        x: Tensor,
        lengths: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        hx: tuple[Tensor, Tensor] | None = None,
        hidden_probe: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the layer over padded sequences.

        Args:
            x: ``(B, T, D)`` if ``batch_first`` else ``(T, B, D)``; finite floats.
            lengths: ``(B,)`` integers in ``[1, T]``: the real steps of each sequence (padding
                at the end). ``None`` means every sequence has ``T`` steps.
            mask: instead of ``lengths``, a boolean mask laid out like ``x`` without its feature
                axis (``(B, T)`` if ``batch_first``), ``True`` on real steps.
            hx: optional initial ``(h_0, c_0)``, each ``(num_layers * num_directions, B, H)``;
                by default the learned initial state (with noise in training, if configured).
            hidden_probe: for gradient-flow analysis: zeros ``(T, B, H)`` (time-major) that
                require grad, added to every ``h_t`` of the last layer's forward direction; after
                backward their ``.grad[t]`` is the total ``∂loss/∂h_t`` (BN §4, Fig. 1a).

        Returns:
            ``(output, (h_n, c_n))``: ``output`` ``(B, T, num_directions * H)`` (or time-major),
            zero at padded positions; ``h_n``, ``c_n`` ``(num_layers * num_directions, B, H)`` at
            each sequence's last real step.
        """
        x, lengths, hx = self._check_input(x, lengths, mask, hx)
        num_steps, batch_size = x.shape[0], x.shape[1]
        step_mask = None
        if torch.compiler.is_compiling():  # traced: no value-dependent shapes; padded steps change nothing
            if lengths is not None:
                step_mask = lengths_to_mask(lengths, num_steps, x.device)  # (T, B)
        else:
            steps_used = num_steps if lengths is None else int(lengths.max())
            if self.training and self._batch_statistics:
                steps_used = self._check_batch_statistics(lengths, batch_size, num_steps, x.device)
            if steps_used > num_steps:
                # Synchronized statistics, and another process has longer sequences: every process
                # must run as many steps (the statistics of each are all-reduced), these ones padded.
                x = F.pad(x, (0, 0, 0, 0, 0, steps_used - num_steps))  # (T', B, D)
                lengths = torch.full((batch_size,), num_steps) if lengths is None else lengths
            if lengths is not None:
                x = x[:steps_used]  # steps past every sequence's end change nothing: skip them
                step_mask = lengths_to_mask(lengths, steps_used, x.device)  # (T', B)
        if lengths is not None:
            lengths = lengths.to(x.device)
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            directions = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                cell = self.cells[index]
                state = cell.initial_state(batch_size) if hx is None else (hx[0][index], hx[1][index])
                sequence = layer_input if direction == 0 else reverse_padded(layer_input, lengths)
                probed = hidden_probe is not None and layer == self.num_layers - 1 and direction == 0
                output, (h, c) = self.recurrence(
                    cell,
                    sequence,
                    *state,
                    step_mask,
                    hidden_probe=self._probe_steps(hidden_probe, sequence.shape[0]) if probed else None,
                )
                directions.append(output if direction == 0 else reverse_padded(output, lengths))
                h_n.append(h)
                c_n.append(c)
            layer_input = directions[0] if self.num_directions == 1 else torch.cat(directions, dim=2)
            if layer < self.num_layers - 1 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
        output = layer_input[:num_steps]  # without steps run only for other processes
        if output.shape[0] < num_steps:
            output = F.pad(output, (0, 0, 0, 0, 0, num_steps - output.shape[0]))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (torch.stack(h_n), torch.stack(c_n))

    def _probe_steps(self, probe: Tensor, num_steps: int) -> Tensor:
        """The probe's first ``num_steps`` rows, padded with zeros if the recurrence runs longer."""
        if probe.dim() != 3 or probe.shape[2] != self.hidden_size:
            raise ValueError(f"Expected hidden_probe of shape (T, B, {self.hidden_size}), but got {tuple(probe.shape)}.")
        if probe.shape[0] >= num_steps:
            return probe[:num_steps]
        return torch.cat([probe, probe.new_zeros(num_steps - probe.shape[0], *probe.shape[1:])])

    def _check_input(
        self, x: Tensor, lengths: Tensor | None, mask: Tensor | None, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """Validate the arguments of :meth:`forward`; return ``x`` time-major, the lengths, and ``hx``
        (``x`` and ``hx`` in the module's dtype under autocast).

        Shapes and dtypes are checked always. Checks that read values (finite input, lengths in
        ``[1, T]``, masks that are padding at the end) run in eager mode only, so that tracing
        (``torch.compile``, ``torch.export``) sees no value-dependent branch: on the CPU they raise
        ``ValueError``; on other devices finiteness is a device-side assertion, which does not wait
        for the device (docs/compile_and_export.md, "What is checked where").
        """
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            layout = "(B, T, D)" if self.batch_first else "(T, B, D)"
            raise ValueError(f"Expected a 3-D input {layout}, but got {shape}.")
        if not x.is_floating_point():
            raise ValueError(f"Expected a floating-point input, but got dtype {x.dtype}.")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"Expected input feature size {self.input_size}, but got {x.shape[-1]}.")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"Expected a non-empty batch and sequence, but got shape {tuple(x.shape)}.")
        x = self._match_dtype(x)
        traced = torch.compiler.is_compiling()
        if not traced:
            if x.device.type == "cpu":
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("The input contains NaN or infinite values.")
            else:  # no host synchronization: the device raises if the assertion fails
                torch._assert_async(torch.isfinite(x).all(), "NormLSTM: the input contains NaN or infinite values.")
        if self.batch_first:
            x = x.transpose(0, 1)
        num_steps, batch_size = x.shape[0], x.shape[1]
        if lengths is not None and mask is not None:
            raise ValueError("Pass either lengths or mask, not both.")
        if mask is not None:
            expected = (batch_size, num_steps) if self.batch_first else (num_steps, batch_size)
            if tuple(mask.shape) != expected:
                raise ValueError(f"Expected a mask of shape {expected}, but got {tuple(mask.shape)}.")
            if mask.dtype != torch.bool:
                raise ValueError(f"Expected a 2-D boolean mask (B, T), but got dtype {mask.dtype}.")
            batch_major = mask if self.batch_first else mask.t()
            lengths = batch_major.sum(1) if traced else mask_to_lengths(batch_major)
        if lengths is not None:
            if traced:
                if tuple(lengths.shape) != (batch_size,) or lengths.is_floating_point():
                    raise ValueError(f"Expected integer lengths of shape ({batch_size},), but got {lengths.dtype} {tuple(lengths.shape)}.")
            else:
                lengths = check_lengths(lengths, batch_size, num_steps)
        if hx is not None:
            expected = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
            shapes = [tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__ for s in hx]
            if len(hx) != 2 or any(shape != expected for shape in shapes):
                raise ValueError(f"Expected hx = (h_0, c_0), each of shape {expected}, but got shapes {shapes}.")
            hx = (self._match_dtype(hx[0], "hx"), self._match_dtype(hx[1], "hx"))
        return x, lengths, hx

    def _match_dtype(self, x: Tensor, what: str = "input") -> Tensor:
        """``x`` in the module's dtype: converted under ``torch.autocast`` (the recurrence then runs
        in the module's precision, statistics included), else a ``ValueError`` saying how to match them."""
        dtype = self.cells[0].weight_hh.dtype
        if x.dtype == dtype:
            return x
        if torch.is_autocast_enabled(x.device.type):
            return x.to(dtype)
        raise ValueError(
            f"Expected the {what} in the module's dtype {dtype}, but got {x.dtype}: convert one of them, e.g. "
            f"x.to({dtype}) or module.to({x.dtype}), or run under torch.autocast."
        )

    def _check_batch_statistics(
        self, lengths: Tensor | None, batch_size: int, num_steps: int, device: torch.device
    ) -> int:
        """Check that every batch statistic has 2 samples; return the number of steps to run.

        With synchronized statistics (``bn``, ``seqbn`` under ``torch.distributed``) the samples
        are those of the global batch, and the steps those of its longest sequence.
        """
        # A batch statistic of one sample normalizes it to exactly 0 and has no useful gradient.
        if lengths is None:
            lengths = torch.full((batch_size,), num_steps)
        counts = (lengths.unsqueeze(0) > torch.arange(num_steps).unsqueeze(1)).sum(1)  # (T,)
        synced = any(norm.synchronized for cell in self.cells for norm in cell.norms)
        processes = world_size() if synced else 1
        batch = f"batch size {batch_size}"
        if processes > 1:  # every process gets the same counts, so all raise or none does
            counts = global_step_counts(counts.to(device)).cpu()  # (T',), T' the longest anywhere
            batch = f"global batch size {int(counts[0])} over {processes} processes"
        if "step" not in self._batch_statistics:
            if int(counts.sum()) < 2:
                raise ValueError("Sequencewise batch normalization in training needs at least 2 unpadded steps in a batch, but got 1.")
            return int((counts > 0).sum())
        lonely = (counts == 1).nonzero()
        if lonely.numel():
            step = int(lonely[0])
            if int(counts[0]) == 1:
                cause = (
                    "The batch holds a single sequence: usually an epoch's last batch (the number of training "
                    "examples modulo the batch size). rnorm's data modules merge it into the batch before "
                    "(last_batch: auto); with your own DataLoader, drop or merge it."
                )
            else:
                cause = (
                    "Only one sequence of the batch is this long: batch sequences of similar length together, or "
                    "crop at the batch's second-longest length (QADataModule's trim_unshared_tail)."
                )
            raise ValueError(
                f"Batch normalization in training needs at least 2 unpadded samples at every step, but step {step} "
                f"has only 1 ({batch}). {cause} Or use a strategy without batch statistics ('ln', 'normprop'), or "
                f"'seqbn' on the input site."
            )
        return int((counts > 0).sum())  # counts never grow with t: the longest sequence's length

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, dropout={self.dropout}, impl={self.impl!r}"
        )
