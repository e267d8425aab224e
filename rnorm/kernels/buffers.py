"""Allocation of the forward's results, shared by every implementation and by the fake one.

Tracing (``torch.compile``, ``torch.export``) runs the fake implementation to learn the shapes,
strides and storage offsets of the op's results; running the same allocation there and in the
real implementations makes them agree by construction (``torch.library.opcheck`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rnorm.kernels.kinds import get_kind
from rnorm.kernels.schema import BackwardArgs, RecurrenceArgs, RecurrenceOutputs, Saved, Statistics, absent, present

__all__ = ["Dims", "SiteBuffers", "allocate_outputs", "saved_layout", "site_buffers", "statistics_layout"]

SITES = ("input", "recurrent", "cell")


@dataclass(frozen=True)
class Dims:
    """The sizes of one call: ``T`` steps, ``B`` samples, ``H`` hidden units, ``S`` saved steps."""

    steps: int
    batch: int
    hidden: int
    saved_steps: int

    @property
    def gates(self) -> int:
        return 4 * self.hidden

    @classmethod
    def of(cls, args: RecurrenceArgs) -> Dims:
        steps, batch = args.source.shape[0], args.source.shape[1]
        return cls(steps, batch, args.recurrent_weight.shape[1], steps if args.save else 1)

    def features(self, site: str) -> int:
        """``F`` of a site: ``4H`` for the input and recurrent terms, ``H`` for the cell."""
        return self.hidden if site == "cell" else self.gates


def kinds_of(args: RecurrenceArgs | BackwardArgs) -> dict[str, str]:
    """Each site's kind, ``"given"`` input included."""
    return {"input": args.input_kind, "recurrent": args.recurrent_kind, "cell": args.cell_kind}


def saved_layout(dims: Dims, kinds: dict[str, str], masked: bool) -> dict[str, tuple[int, ...] | None]:
    """The shape of every field of :class:`~rnorm.kernels.schema.Saved` when the forward saves
    (``None``: absent), for ``dims``, each site's kind and whether there is padding.

    The one definition of the saved buffers' layout: :func:`allocate_outputs` allocates it, and
    :mod:`rnorm.kernels.validate` checks a backward's buffers against it.
    """
    steps, batch, hidden, saved = dims.steps, dims.batch, dims.hidden, dims.saved_steps
    layout: dict[str, tuple[int, ...] | None] = {
        "states_h": (steps + 1, batch, hidden) if masked else None,
        "states_c": (steps + 1, batch, hidden),
        "act": (saved, batch, dims.gates),
        "tanh_cell": (saved, batch, hidden),
        "cell_new": (saved, batch, hidden) if masked else None,
    }
    for site, kind in kinds.items():
        layout.update({f"{site}_{name}": shape for name, shape in _site_layout(kind, dims, site).items()})
    return layout


def statistics_layout(dims: Dims, kinds: dict[str, str]) -> dict[str, tuple[int, ...] | None]:
    """The shape of every field of :class:`~rnorm.kernels.schema.Statistics` (``None``: absent):
    ``(T, 1, F)`` per-step batch mean and variance of the batch-statistics sites."""
    layout: dict[str, tuple[int, ...] | None] = {}
    for site, kind in kinds.items():
        batch_kind = kind != "given" and get_kind(kind).statistics == "batch"
        shape = (dims.steps, 1, dims.features(site)) if batch_kind else None
        layout[f"{site}_mean"] = layout[f"{site}_var"] = shape
    return layout


def allocate_outputs(args: RecurrenceArgs) -> tuple[RecurrenceOutputs, Tensor | None]:
    """Uninitialized results of ``rnorm::lstm_recurrence`` for ``args`` (see :class:`~rnorm.kernels.schema.Saved`),
    and, when it saves, the ``(T + 1, B, H)`` buffer of the states ``h_0 … h_T`` the loop writes.

    That buffer is ``saved.states_h`` with padding (the carried states differ from the outputs, which
    are 0 at padded steps). Without padding each ``h_t`` is written once: ``output`` is then rows
    ``1..T`` of that buffer, whose row 0 holds ``h0``, and ``saved.states_h`` is absent.
    """
    dims = Dims.of(args)
    new = args.source.new_empty
    steps, batch, hidden = dims.steps, dims.batch, dims.hidden
    masked = args.mask is not None

    def allocate(shape: tuple[int, ...] | None) -> Tensor:  # a new one each time: an op's results must not alias each other
        return absent(args.source) if shape is None else new(shape)

    statistics = Statistics(**{name: allocate(shape) for name, shape in statistics_layout(dims, kinds_of(args)).items()})
    if not args.save:
        saved_none = Saved(**{name: allocate(None) for name in Saved.__dataclass_fields__})
        return RecurrenceOutputs(new(steps, batch, hidden), new(batch, hidden), new(batch, hidden), statistics, saved_none), None
    states_h = new(steps + 1, batch, hidden)
    output = new(steps, batch, hidden) if masked else states_h[1:]
    layout = saved_layout(dims, kinds_of(args), masked)
    buffers = {name: states_h if name == "states_h" and masked else allocate(shape) for name, shape in layout.items()}
    outputs = RecurrenceOutputs(output, new(batch, hidden), new(batch, hidden), statistics, Saved(**buffers))
    return outputs, states_h


def _site_layout(kind: str, dims: Dims, site: str) -> dict[str, tuple[int, ...] | None]:
    """The shapes of ``raw`` (not for the cell), ``norm``, ``rstd`` of one site for ``dims.saved_steps``
    steps (``None`` where the kind has none)."""
    features, batch, steps = dims.features(site), dims.batch, dims.saved_steps
    step_kind = None if kind == "given" else get_kind(kind)
    layout: dict[str, tuple[int, ...] | None] = {"norm": None, "rstd": None}
    if site != "cell":  # an affine site's raw term, for its scale's gradient; the cell's reads c_t itself
        layout["raw"] = (steps, batch, features) if step_kind is not None and step_kind.name == "affine" else None
    if step_kind is not None and step_kind.normalizing:
        layout["norm"] = (steps, batch, features)
        layout["rstd"] = (steps, batch, 1) if step_kind.per_row else (steps, 1, features)
    return layout


@dataclass
class SiteBuffers:
    """One site as an implementation's loop sees it: its kind, ε, scale, and where step ``s``'s
    raw term (affine), normalized term and ``1/std`` (normalizing) and step ``t``'s batch mean and
    variance (batch) go."""

    kind: str
    eps: float
    scale: Tensor | None
    raw: Tensor
    norm: Tensor
    rstd: Tensor
    mean: Tensor
    var: Tensor

    @property
    def u(self) -> Tensor:
        """Where the raw term goes: ``raw`` (affine), else ``norm`` (normalized there in place)."""
        return self.raw if present(self.raw) else self.norm


def site_buffers(args: RecurrenceArgs, outputs: RecurrenceOutputs, site: str, *, scratch: bool = False) -> SiteBuffers:
    """The buffers of ``site``: the saved ones of ``outputs``, or, for a forward that does not save
    (``scratch``), one-step buffers of the same layout."""
    kind = kinds_of(args)[site]
    eps = args.eps[SITES.index(site)]
    scale = getattr(args, f"{site}_scale")
    stats = outputs.statistics
    mean, var = getattr(stats, f"{site}_mean"), getattr(stats, f"{site}_var")
    layout = _site_layout(kind, Dims.of(args), site)
    if scratch:
        parts = {name: absent(args.source) if shape is None else args.source.new_empty(shape) for name, shape in layout.items()}
    else:
        parts = {name: getattr(outputs.saved, f"{site}_{name}") for name in layout}
    raw = parts["raw"] if "raw" in parts else absent(args.source)
    return SiteBuffers(kind, eps, scale, raw, parts["norm"], parts["rstd"], mean, var)
