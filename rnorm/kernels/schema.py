"""The contract of the fused recurrence's ops: what goes in, what comes out, what the backward reads.

``torch.library`` ops take and return flat lists of tensors and scalars. Here each list is a
dataclass, so that every implementation (the torch-ops loop, the compiled CPU kernels, the fake
implementation that tracing uses) and the autograd formula name their buffers instead of counting
positions; the ops' schema strings are generated from these same classes (:func:`op_schema`), so
the order is defined once.

Conventions (``T`` steps, ``B`` samples, ``D`` input features, ``H`` hidden units, ``G = 4H`` gate
columns in ``torch.nn.LSTM``'s order i, f, g, o; ``S`` is ``T`` when the forward saves for the
backward, else 1):

* **z-space.** The ``g`` block's pre-activation arrives doubled (in the weights or scales that
  produce it), so that one sigmoid over the ``(B, G)`` gates gives every gate, with
  ``tanh(a) = 2 σ(2a) − 1`` for ``g``; the cell site's scale and shift arrive doubled for the output
  tanh in the same way (``docs/fused_backward.md``, eq. 1–3).
* **Absent is empty.** Ops cannot return ``None``: a buffer a configuration does not use is a
  zero-element tensor (:func:`absent`), and :func:`present` tells the two apart.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from torch import Tensor

__all__ = [
    "BackwardArgs",
    "Gradients",
    "RecurrenceArgs",
    "RecurrenceOutputs",
    "Saved",
    "Statistics",
    "absent",
    "from_flat",
    "op_schema",
    "present",
    "to_flat",
]

_T = TypeVar("_T")


def absent(like: Tensor) -> Tensor:
    """The stand-in for a buffer that a configuration does not use: 0 elements, ``like``'s dtype and device."""
    return like.new_empty(0)


def present(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` holds a buffer (not ``None``, not :func:`absent`)."""
    return tensor is not None and tensor.numel() > 0


def _mutable() -> Any:
    """A field that :data:`~rnorm.kernels.op.backward_` may overwrite (its alias annotation ``!``)."""
    return dataclasses.field(metadata={"mutable": True})


@dataclasses.dataclass
class RecurrenceArgs:
    """The arguments of ``rnorm::lstm_recurrence``: one direction of one layer, prepared.

    Built by :func:`rnorm.kernels.prepare.prepare` from a :class:`~rnorm.kernels.LayerSpec`; the
    tensors that need gradients are the results of differentiable preparation (z-space, merged
    shifts), so that the op's gradients map back to the layer's parameters through autograd.
    """

    source: Tensor  #: ``(T, B, D)`` the input; ``(T, B, G)`` the input terms when ``input_kind`` is ``"given"``
    input_weight: Tensor | None  #: ``(G, D)`` ``W_x`` in z-space; ``None`` when the terms are given
    recurrent_weight: Tensor  #: ``(G, H)`` ``W_h`` (in z-space when the recurrent site is the identity)
    shift: Tensor | None  #: ``(1 or T, G)`` every additive term of the gates (bias, site shifts), z-space
    input_scale: Tensor | None  #: affine ``(1 or T, G)``; normalizing: γ ``(G,)``; z-space
    recurrent_scale: Tensor | None  #: likewise
    cell_scale: Tensor | None  #: affine ``(1 or T, H)``; normalizing: γ ``(H,)``; doubled
    cell_shift: Tensor | None  #: ``(1 or T, H)`` or β ``(H,)``; doubled
    h0: Tensor  #: ``(B, H)``
    c0: Tensor  #: ``(B, H)``
    mask: Tensor | None  #: ``(T, B)`` boolean, ``True`` on real steps; ``None``: no padding
    weights: Tensor  #: ``(T or 1, B)``: each step's batch mean is ``weights[t] @ u`` (mask over count)
    counts: Tensor  #: ``(T,)`` unpadded samples per step (of the global batch when synchronized)
    hidden_scale: Tensor | None  #: Norm-Prop's constant on ``h_t``, ``(1,)`` or ``(H,)``; no gradient
    input_kind: str  #: a step kind of :data:`~rnorm.kernels.STEP_KINDS`, or ``"given"``
    recurrent_kind: str
    cell_kind: str
    eps: list[float]  #: input, recurrent, cell
    synchronized: bool  #: batch statistics all-reduced over the default process group at each step
    save: bool  #: keep what the backward reads (training with gradients)
    backend: str  #: one of :data:`rnorm.kernels.op.BACKENDS` (see :func:`rnorm.kernels.op.resolve_backend`)
    precision: str  #: the products' operand precision (:mod:`rnorm.kernels.precision`): ieee, tf32, bf16, fp16


@dataclasses.dataclass
class Statistics:
    """The batch-statistics sites' per-step mean and biased variance ``(T, 1, F)``, for the population
    statistics (absent for other kinds)."""

    input_mean: Tensor
    input_var: Tensor
    recurrent_mean: Tensor
    recurrent_var: Tensor
    cell_mean: Tensor
    cell_var: Tensor


@dataclasses.dataclass
class Saved:
    """What the forward keeps for the backward (all absent when it does not save).

    ``act`` holds σ(i), σ(f), tanh(g), σ(o); ``*_norm`` a normalizing site's x̂ and ``*_rstd`` its
    ``1/std`` (``(S, 1, F)`` batch, ``(S, B, 1)`` row kinds); ``*_raw`` an affine site's term ``u``
    (for its scale's gradient). Fields marked mutable may be overwritten by the in-place backward.
    """

    states_h: Tensor  #: ``(T + 1, B, H)`` carried states with padding; absent: ``h_{t-1}`` is ``output[t-1]`` (``h0`` at 0)
    states_c: Tensor  #: ``(T + 1, B, H)`` carried cells, ``c0`` in row 0
    act: Tensor = _mutable()  #: ``(S, B, G)``
    tanh_cell: Tensor  #: ``(S, B, H)`` tanh(ĉ_t)
    cell_new: Tensor  #: ``(S, B, H)`` ``c_t`` before padding carries; absent: ``states_c[1:]``
    input_raw: Tensor = _mutable()
    input_norm: Tensor = _mutable()
    input_rstd: Tensor
    recurrent_raw: Tensor = _mutable()
    recurrent_norm: Tensor = _mutable()
    recurrent_rstd: Tensor
    cell_norm: Tensor
    cell_rstd: Tensor


@dataclasses.dataclass
class RecurrenceOutputs:
    """The results of ``rnorm::lstm_recurrence``: the layer's, then :class:`Statistics` and :class:`Saved`."""

    output: Tensor  #: ``(T, B, H)``, 0 at padded steps
    h_n: Tensor  #: ``(B, H)`` each sequence's state at its last real step
    c_n: Tensor  #: ``(B, H)``
    statistics: Statistics
    saved: Saved


@dataclasses.dataclass
class BackwardArgs:
    """The arguments of ``rnorm::lstm_recurrence_backward`` (and of its in-place twin)."""

    grad_output: Tensor  #: ``(T, B, H)``
    grad_h_n: Tensor  #: ``(B, H)``
    grad_c_n: Tensor  #: ``(B, H)``
    output: Tensor  #: the forward's output: ``h_t`` where ``states_h`` is absent
    saved: Saved
    source: Tensor
    input_weight: Tensor | None
    recurrent_weight: Tensor
    input_scale: Tensor | None
    recurrent_scale: Tensor | None
    cell_scale: Tensor | None
    h0: Tensor
    mask: Tensor | None
    weights: Tensor
    counts: Tensor
    hidden_scale: Tensor | None
    shift_shape: list[int]  #: the forward's ``shift``'s shape (``[]``: none)
    cell_shift_shape: list[int]  #: its ``cell_shift``'s (``[]``: none)
    input_kind: str
    recurrent_kind: str
    cell_kind: str
    synchronized: bool
    backend: str
    precision: str  #: the forward's


@dataclasses.dataclass
class Gradients:
    """The backward's results: the gradient of every tensor input of the forward that can have one
    (absent where the input is ``None``)."""

    source: Tensor
    input_weight: Tensor
    recurrent_weight: Tensor
    shift: Tensor
    input_scale: Tensor
    recurrent_scale: Tensor
    cell_scale: Tensor
    cell_shift: Tensor
    h0: Tensor
    c0: Tensor


# -- flattening ---------------------------------------------------------------------------------


def _leaves(cls: type) -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """``(name, type, field)`` of every leaf field of dataclass ``cls``, nested dataclasses inlined."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind)
        else:
            yield f.name, kind, f


def to_flat(value: Any) -> list[Any]:
    """The leaves of dataclass instance ``value`` in schema order (nested dataclasses inlined)."""
    flat: list[Any] = []
    for name, nested in _LAYOUTS[type(value)]:
        item = getattr(value, name)
        flat.extend(to_flat(item) if nested is not None else [item])
    return flat


def from_flat(cls: type[_T], flat: Sequence[Any]) -> _T:
    """The inverse of :func:`to_flat`: an instance of ``cls`` from its leaves in schema order."""
    items = iter(flat)
    instance = _build(cls, items)
    if next(items, _END) is not _END:
        raise ValueError(f"Too many values for {cls.__name__}.")
    return instance


_END = object()


def _build(cls: type[_T], items: Iterator[Any]) -> _T:
    values: dict[str, Any] = {}
    for name, nested in _LAYOUTS[cls]:
        if nested is not None:
            values[name] = _build(nested, items)
        else:
            value = next(items, _END)
            if value is _END:
                raise ValueError(f"Too few values for {cls.__name__}: {name} is missing.")
            values[name] = value
    return cls(**values)


_TYPES = {
    Tensor: "Tensor",
    Tensor | None: "Tensor?",
    str: "str",
    bool: "bool",
    int: "int",
    float: "float",
    list[float]: "float[]",
    list[int]: "int[]",
}


def op_schema(args: type, returns: type, *, mutating: bool = False) -> str:
    """The ``torch.library`` schema of an op taking the leaves of ``args`` and returning those of
    ``returns`` (all tensors); with ``mutating``, fields marked mutable get alias annotations."""
    parts = []
    aliases = iter("abcdefghijklmnopqrstuvwxyz")
    for name, kind, f in _leaves(args):
        text = _TYPES[kind]
        if mutating and f.metadata.get("mutable"):
            text = f"Tensor({next(aliases)}!)"
        parts.append(f"{text} {name}")
    outputs = ", ".join("Tensor" for _ in _leaves(returns))
    return f"({', '.join(parts)}) -> ({outputs})"


def _layout(cls: type) -> tuple[tuple[str, type | None], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None) for f in dataclasses.fields(cls))


#: Each schema class's fields and, for nested dataclasses, their class: computed once here, because
#: ``torch.compile`` traces the flattening and does not follow ``typing.get_type_hints``.
_LAYOUTS = {cls: _layout(cls) for cls in (RecurrenceArgs, Statistics, Saved, RecurrenceOutputs, BackwardArgs, Gradients)}
