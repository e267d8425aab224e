"""One direction of one layer, by implementation: the fused op of :mod:`rnorm.kernels`, or the reference loop.

:func:`fused_layer` describes a :class:`~rnorm.nn.NormLSTMCell` to the kernels (its effective
weights and each site's per-step form, :meth:`~rnorm.norms.Normalizer.fused_step`) and hands the
training statistics back to the strategies; :func:`reference_layer` runs the papers' equations step
by step (:mod:`rnorm.nn.recurrence`). The fused path runs the reference where it cannot compute the
same function:

* a recurrent- or cell-site strategy without a fused form (a plugin that only implements ``step``);
* batch statistics synchronized across processes on some sites but not others;
* a ``hidden_probe`` (gradient-flow analysis): a diagnostic, kept out of the kernels.

An input-site strategy without a fused form, or ``seqbn`` on an input wider than ``H`` (where the
covariance route of :func:`~rnorm.kernels.prepare.sequence_to_affine` costs more than the input
terms), has its input terms computed before the loop by the cell, as in the reference.

Each fallback is logged once (``rnorm.kernels`` logger, INFO), as is every path
:func:`rnorm.kernels.lstm_layer` chooses. ``impl="cudnn"`` (torch's own LSTM) raises instead of
falling back, except for the hidden probe, a diagnostic that does not change the model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from rnorm.kernels import LayerSpec, Path, SiteSpec, log_path, lstm_layer, mixed_synchronization
from rnorm.nn.cell import NormLSTMCell
from rnorm.nn.recurrence import reference_recurrence
from rnorm.norms.base import FusedStep

__all__ = ["RECURRENCES", "fused_layer", "get_recurrence", "reference_layer"]

Recurrence = Callable[..., tuple[Tensor, tuple[Tensor, Tensor]]]


def reference_layer(
    cell: NormLSTMCell,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    hidden_probe: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One direction of one layer, the reference way: the input terms of all steps at once
    (:meth:`NormLSTMCell.input_terms`), then :func:`~rnorm.nn.recurrence.reference_recurrence`.

    Args:
        cell: the weights and strategies.
        x: ``(T, B, D)``.
        h0, c0: ``(B, H)`` each.
        mask: ``(T, B)`` boolean or ``None``.
        hidden_probe: see :func:`~rnorm.nn.recurrence.reference_recurrence`.

    Returns:
        ``output`` ``(T, B, H)`` (0 at padded steps) and ``(h_n, c_n)`` ``(B, H)`` each.
    """
    return reference_recurrence(
        cell.input_terms(x, mask),
        cell.recurrent_norm.transform_weight(cell.weight_hh),
        h0,
        c0,
        mask,
        cell.recurrent_norm,
        cell.cell_norm,
        hidden_probe,
    )


def _site(fused: FusedStep) -> SiteSpec:
    return SiteSpec(fused.kind, fused.scale, fused.shift, fused.eps, fused.synchronized)


def fused_layer(
    cell: NormLSTMCell,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    hidden_probe: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One direction of one layer through :func:`rnorm.kernels.lstm_layer`; the arguments and results
    of :func:`reference_layer`, ``backend`` one of :data:`rnorm.kernels.LAYER_BACKENDS`.

    Raises:
        ValueError: ``backend="cudnn"`` where the layer is not a plain LSTM after its weight
            transform (the reason), including where the fused path would run the reference loop.
    """
    if hidden_probe is not None:
        reason = "a hidden probe (gradient-flow analysis) is kept out of the kernels"
        return _reference(cell, x, h0, c0, mask, reason, hidden_probe)
    num_steps = x.shape[0]
    norms = cell.norms
    for norm in norms:
        norm.start(num_steps)
    inp, rec, cel = (norm.fused_step(num_steps) for norm in norms)
    if rec is None or cel is None:
        site, norm = ("recurrent", cell.recurrent_norm) if rec is None else ("cell", cell.cell_norm)
        reason = f"the {site} site's strategy {type(norm).__name__} has no fused form"
        return _reference(cell, x, h0, c0, mask, reason, backend=backend)
    if mixed_synchronization((inp, rec, cel)):
        reason = "batch statistics synchronized across processes on some sites but not others"
        return _reference(cell, x, h0, c0, mask, reason, backend=backend)
    if inp is None or (inp.kind == "sequence" and x.shape[2] > cell.hidden_size):
        source, input_weight, input_site, bias = cell.input_terms(x, mask), None, None, None  # (T, B, 4H)
    else:
        source, input_site, bias = x, _site(inp), cell.bias
        input_weight = cell.input_norm.transform_weight(cell.weight_ih)
    spec = LayerSpec(
        recurrent_weight=cell.recurrent_norm.transform_weight(cell.weight_hh),
        recurrent=_site(rec),
        cell=_site(cel),
        input_weight=input_weight,
        input=input_site,
        bias=bias,
        hidden_scale=cell.cell_norm.hidden_scale,
    )
    result = lstm_layer(spec, source, h0, c0, mask, backend=backend)
    for site, fused in (("input", inp), ("recurrent", rec), ("cell", cel)):
        statistics = result.statistics.get(site)
        if statistics is not None and fused.record is not None:
            fused.record(statistics.mean, statistics.var, statistics.count)
    return result.output, (result.h_n, result.c_n)


def _reference(
    cell: NormLSTMCell,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    reason: str,
    hidden_probe: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The reference loop where the fused path cannot compute the function, logged once with ``reason``;
    an error instead where ``backend="cudnn"`` was asked for (no hidden probe: that is a diagnostic)."""
    if backend == "cudnn":
        raise ValueError(
            f"impl='cudnn': this layer is not a plain LSTM after its weight transform: {reason}. Use impl 'fused'."
        )
    log_path(Path("reference", reason))
    return reference_layer(cell, x, h0, c0, mask, hidden_probe)


def _forced_reference(
    cell: NormLSTMCell, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, hidden_probe: Tensor | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """:func:`reference_layer`, logged once as asked for."""
    log_path(Path("reference", "impl 'reference' was asked for"))
    return reference_layer(cell, x, h0, c0, mask, hidden_probe)


#: Implementations of one direction of one layer by name; each takes and returns what
#: :func:`reference_layer` does. ``fused`` is :func:`rnorm.kernels.lstm_layer` with its best path for
#: the device (torch's LSTM where the layer is a plain LSTM after its weight transform and that is
#: faster, else the op with its best implementation: the compiled kernels on CPU where built, the
#: Triton kernels on CUDA where they run); ``fused_torch`` the same op with its torch-ops loop
#: everywhere (allows backward through one graph more than once); ``fused_native`` the same op with
#: the compiled CPU kernels, forced (an error naming the reason where they cannot run; what ``fused``
#: is measured against); ``triton`` the same op with the
#: Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``; an error naming the reason
#: elsewhere); ``cudnn`` torch's own LSTM (an error naming the reason where the layer is not a plain
#: LSTM after its weight transform); ``reference`` the per-step loop of the papers' equations.
RECURRENCES: dict[str, Recurrence] = {
    "fused": fused_layer,
    "fused_torch": partial(fused_layer, backend="torch"),
    "fused_native": partial(fused_layer, backend="native"),
    "triton": partial(fused_layer, backend="triton"),
    "cudnn": partial(fused_layer, backend="cudnn"),
    "reference": _forced_reference,
}


def get_recurrence(impl: str) -> Recurrence:
    """The implementation named ``impl``; ``ValueError`` listing the names if unknown."""
    try:
        return RECURRENCES[impl]
    except KeyError:
        raise ValueError(f"Unknown recurrence implementation {impl!r}. Available: {', '.join(sorted(RECURRENCES))}.") from None
