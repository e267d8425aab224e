"""The fused recurrence's time loops with the per-step work in the compiled CPU kernels.

Each step is the step's GEMMs in torch and one call into ``rnorm.kernels._fused_step``
(``rnorm/kernels/csrc/fused_step.cpp``), which does everything between the GEMMs in a few passes.
On the pMNIST shape that replaces about 20 small torch calls per step forward and 40 backward, each
2–10 µs of overhead and one pass over memory.

The boundary is checked: a loop hands the kernels one :class:`ForwardBuffers` or
:class:`BackwardBuffers` (the extension's ``FORWARD_BUFFERS`` / ``BACKWARD_BUFFERS`` name the same
fields), each tensor crossing as a DLPack capsule with torch's own record of its dtype, device,
shape and strides; the extension checks every buffer against the plan's sizes and kinds before a
step runs and keeps them alive while the plan lives.

The extension is optional at install time. :func:`available` says whether it is built; without it
the op runs its torch-ops loop, which computes the same function, and warns once
(:data:`MISSING_MESSAGE`). Set ``RNORM_REQUIRE_NATIVE=1`` (CI does) to make the test suite fail
where it is missing.

:func:`denormals_flushed` (which :mod:`rnorm.kernels.op` wraps around every CPU loop, this one's and
the torch-ops one) flushes denormal floats to zero in the calling thread: gradients that fade over
hundreds of steps become denormal, which x86 computes with many times slower microcode; flushing
changes no number above the denormal range.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rnorm.kernels.backward import allocate_grad_buffers, finish
from rnorm.kernels.buffers import SITES, Dims, allocate_outputs, kinds_of, site_buffers
from rnorm.kernels.kinds import get_kind
from rnorm.kernels.schema import BackwardArgs, Gradients, RecurrenceArgs, RecurrenceOutputs, present

__all__ = ["MISSING_MESSAGE", "BackwardBuffers", "ForwardBuffers", "available", "denormals_flushed", "load"]

MISSING_MESSAGE = (
    "rnorm's compiled CPU kernels (rnorm.kernels._fused_step) are not built: the fused LSTM recurrence runs its "
    "torch-ops loop instead, which computes the same function 2-3 times more slowly on CPU. They are built when "
    "rnorm is installed with a C++ compiler present (pip install --no-build-isolation --force-reinstall --no-deps rnorm, "
    "or pip install -e . in a checkout)."
)


def _import_kernels() -> ModuleType | None:
    """The extension built by setup.py, or ``None``: not built (no C++ compiler at install time),
    or built from an older version of its source (an editable install not rebuilt), which would
    not match this module's buffers."""
    try:
        from rnorm.kernels import _fused_step
    except ImportError:
        return None
    source = Path(__file__).with_name("csrc") / "fused_step.cpp"  # present in a source checkout only
    if source.is_file():
        sha = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        if sha != getattr(_fused_step, "SOURCE_SHA", None):
            warnings.warn(
                f"rnorm.kernels._fused_step was built from another version of {source}; the fused recurrence runs "
                "with torch operations until it is rebuilt (pip install -e .).",
                stacklevel=2,
            )
            return None
    return _fused_step


_KERNELS = _import_kernels()


def load() -> ModuleType | None:
    """The compiled kernels, or ``None`` if the extension was not built."""
    return _KERNELS


def available() -> bool:
    """Whether the compiled CPU kernels are built and importable."""
    return _KERNELS is not None


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormal floats to zero in this thread for the duration, then restore the caller's mode
    (a no-op without the extension, which is what reads and writes the mode)."""
    if _KERNELS is None:
        yield
        return
    previous = _KERNELS.flush_denormals(True)
    try:
        yield
    finally:
        _KERNELS.restore_denormals(previous)


@dataclass
class ForwardBuffers:
    """The buffers of a forward plan (``T`` steps, ``S`` saved steps, ``R`` 1 or ``T`` rows, ``F`` a site's features).

    ``z`` ``(B, 4H)`` scratch; ``given`` ``(T, B, 4H)`` input terms; ``shift`` ``(R, 4H)``;
    ``cell_shift`` ``(R, H)``; ``act`` ``(S, B, 4H)``; ``tanh_cell``, ``cell_new`` ``(S, B, H)``;
    ``states_h``, ``states_c`` ``(T + 1, B, H)`` when saving, else ``(2, B, H)`` used in turn;
    ``output`` ``(T, B, H)`` (``None``: the states); ``hidden_scale`` ``(1,)`` or ``(H,)``; ``mask``
    ``(T, B)`` of 0/1; ``weights`` ``(R, B)``; per site: ``u`` ``(S, B, F)`` (the raw term, normalized in
    place), ``scale`` ``(R, F)``, ``rstd`` ``(S, 1, F)`` batch / ``(S, B, 1)`` row kinds, ``mean`` and
    ``var`` ``(T, 1, F)``.
    """

    z: Tensor | None = None
    given: Tensor | None = None
    shift: Tensor | None = None
    cell_shift: Tensor | None = None
    act: Tensor | None = None
    tanh_cell: Tensor | None = None
    cell_new: Tensor | None = None
    states_h: Tensor | None = None
    states_c: Tensor | None = None
    output: Tensor | None = None
    hidden_scale: Tensor | None = None
    mask: Tensor | None = None
    weights: Tensor | None = None
    input_u: Tensor | None = None
    input_scale: Tensor | None = None
    input_rstd: Tensor | None = None
    input_mean: Tensor | None = None
    input_var: Tensor | None = None
    recurrent_u: Tensor | None = None
    recurrent_scale: Tensor | None = None
    recurrent_rstd: Tensor | None = None
    recurrent_mean: Tensor | None = None
    recurrent_var: Tensor | None = None
    cell_u: Tensor | None = None
    cell_scale: Tensor | None = None
    cell_rstd: Tensor | None = None
    cell_mean: Tensor | None = None
    cell_var: Tensor | None = None


@dataclass
class BackwardBuffers:
    """The buffers of a backward plan: what the forward saved and where the gradients go (see
    :class:`~rnorm.kernels.backward.GradBuffers`). ``dh``, ``dc`` ``(B, H)`` enter holding the
    gradients of ``h_T``, ``c_T`` and leave holding those of ``h0``, ``c0`` (less the recurrent GEMM's
    part, which the loop adds). Per site: ``norm`` (x̂) and ``rstd`` as saved, ``scale`` ``(R, F)``,
    ``sum_dy``, ``sum_dy_xhat`` ``(T, 1, F)`` (batch), ``gamma_grad`` ``(F,)`` (row kinds), ``raw``
    ``(T, B, F)`` and ``scale_rows`` ``(T, F)`` (affine), ``grad`` ``(T, B, F)`` the term's gradient.
    """

    grad_output: Tensor | None = None
    dh: Tensor | None = None
    dc: Tensor | None = None
    mask: Tensor | None = None
    weights: Tensor | None = None
    act: Tensor | None = None
    tanh_cell: Tensor | None = None
    states_c: Tensor | None = None
    hidden_scale: Tensor | None = None
    grad_chat: Tensor | None = None
    grad_z: Tensor | None = None
    input_norm: Tensor | None = None
    input_rstd: Tensor | None = None
    input_scale: Tensor | None = None
    input_sum_dy: Tensor | None = None
    input_sum_dy_xhat: Tensor | None = None
    input_gamma_grad: Tensor | None = None
    input_raw: Tensor | None = None
    input_scale_rows: Tensor | None = None
    input_grad: Tensor | None = None
    recurrent_norm: Tensor | None = None
    recurrent_rstd: Tensor | None = None
    recurrent_scale: Tensor | None = None
    recurrent_sum_dy: Tensor | None = None
    recurrent_sum_dy_xhat: Tensor | None = None
    recurrent_gamma_grad: Tensor | None = None
    recurrent_raw: Tensor | None = None
    recurrent_scale_rows: Tensor | None = None
    recurrent_grad: Tensor | None = None
    cell_norm: Tensor | None = None
    cell_rstd: Tensor | None = None
    cell_scale: Tensor | None = None
    cell_sum_dy: Tensor | None = None
    cell_sum_dy_xhat: Tensor | None = None
    cell_gamma_grad: Tensor | None = None


def _plain(buffers: ForwardBuffers | BackwardBuffers) -> ForwardBuffers | BackwardBuffers:
    """The buffers detached from autograd (DLPack refuses tensors that require grad) and absent ones as ``None``."""
    for f in fields(buffers):
        tensor = getattr(buffers, f.name)
        if tensor is not None:
            setattr(buffers, f.name, tensor.detach() if present(tensor) else None)
    return buffers


def _rows(tensor: Tensor | None, features: int) -> Tensor | None:
    """A per-step ``(R, F)`` table from a scale or shift: γ or β ``(F,)`` becomes one row."""
    return None if tensor is None else tensor.reshape(-1, features)


def _codes(*kinds: str) -> tuple[int, int, int]:
    """The kernels' numbers of the three sites' kinds (a given input counts as the identity)."""
    return tuple(0 if kind == "given" else get_kind(kind).code for kind in kinds)


#: Weights of at least this many elements use oneDNN's prepacked GEMM for the recurrent products
#: (float32 only). Measured on 2 cores: (64, 1000) @ (1000, 4000) 3.6 -> 2.5 ms forward and backward,
#: (128, 2000) @ (2000, 8000) 29 -> 20 ms; at (64, 100) @ (100, 400) no gain (backward slower).
_PACKED_MIN_ELEMENTS = 1 << 20


class RecurrentProduct:
    """``h @ W^T`` (forward) or ``dr @ W`` (backward) for one layer call, ``W`` ``(4H, H)``.

    Large float32 weights go through oneDNN's prepacked GEMM (reordered once per call, as
    ``torch.nn.LSTM``'s oneDNN path does) where torch has it and oneDNN is enabled; otherwise, or
    if the probe of that private operator fails, ``torch.mm``.
    """

    def __init__(self, weight: Tensor, batch_size: int, transpose: bool) -> None:
        self.matrix = weight.t() if transpose else weight  # mm's right operand
        self.packed = None
        if weight.dtype == torch.float32 and weight.numel() >= _PACKED_MIN_ELEMENTS and _onednn_enabled():
            try:
                # _linear_pointwise computes x @ packed^T; packed from the (out, in) matrix
                out_in = weight if transpose else weight.t().contiguous()
                packed = torch.ops.mkldnn._reorder_linear_weight(out_in, batch_size)
                probe = torch.ops.mkldnn._linear_pointwise(weight.new_zeros(1, self.matrix.shape[0]), packed, None, "none", [], "")
                if probe.shape == (1, self.matrix.shape[1]):
                    self.packed = packed
            except (RuntimeError, AttributeError, TypeError):
                self.packed = None

    def _product(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def write(self, x: Tensor, out: Tensor) -> None:
        """``out = x @ matrix``."""
        if self.packed is None:
            torch.mm(x, self.matrix, out=out)
        else:
            out.copy_(self._product(x))

    def add_to(self, x: Tensor, out: Tensor) -> None:
        """``out += x @ matrix``."""
        if self.packed is None:
            out.addmm_(x, self.matrix)
        else:
            out.add_(self._product(x))

    def add(self, base: Tensor, x: Tensor, out: Tensor) -> None:
        """``out = base + x @ matrix``."""
        if self.packed is None:
            torch.addmm(base, x, self.matrix, out=out)
        else:
            torch.add(base, self._product(x), out=out)


def _onednn_enabled() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch._C._get_mkldnn_enabled()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def forward(args: RecurrenceArgs) -> RecurrenceOutputs:
    """The forward time loop (``docs/fused_backward.md`` eq. 4–11): GEMMs in torch, the rest in the kernels."""
    kernels = _KERNELS
    outputs, full_states_h = allocate_outputs(args)
    dims = Dims.of(args)
    num_steps, batch_size, hidden, gates = dims.steps, dims.batch, dims.hidden, dims.gates
    new = args.source.new_empty
    save, masked = args.save, args.mask is not None
    sites = {site: site_buffers(args, outputs, site, scratch=not save) for site in SITES}
    saved = outputs.saved
    if save:
        states_h, states_c = full_states_h, saved.states_c
        act, tanh_cell = saved.act, saved.tanh_cell
        cell_new = saved.cell_new if masked else None  # None: c_t is the next state
        output = outputs.output if masked else None  # None: the states, whose rows 1.. are the output
    else:  # the states alternate between two rows
        states_h, states_c = new(2, batch_size, hidden), new(2, batch_size, hidden)
        act, tanh_cell = new(1, batch_size, gates), new(1, batch_size, hidden)
        cell_new = new(1, batch_size, hidden) if masked else None
        output = outputs.output
    states_h[0] = args.h0
    states_c[0] = args.c0
    input_kind, rec_kind = args.input_kind, args.recurrent_kind
    site_u = {site: b.u for site, b in sites.items()}
    buffers = ForwardBuffers(
        z=new(batch_size, gates),
        given=args.source if input_kind == "given" else None,
        shift=args.shift,
        cell_shift=_rows(args.cell_shift, hidden),
        act=act,
        tanh_cell=tanh_cell,
        cell_new=cell_new,
        states_h=states_h,
        states_c=states_c,
        output=output,
        hidden_scale=args.hidden_scale,
        mask=None if not masked else args.mask.to(args.source.dtype),
        weights=args.weights.contiguous(),
    )
    for site, b in sites.items():
        features = dims.features(site)
        setattr(buffers, f"{site}_u", site_u[site])
        setattr(buffers, f"{site}_scale", _rows(b.scale, features))
        setattr(buffers, f"{site}_rstd", b.rstd)
        setattr(buffers, f"{site}_mean", b.mean)
        setattr(buffers, f"{site}_var", b.var)
    handle = kernels.forward_plan(
        _plain(buffers), num_steps, batch_size, hidden, save, input_kind == "given", _codes(input_kind, rec_kind, args.cell_kind), tuple(args.eps)
    )
    source = args.source.detach()
    in_weight_t = None if args.input_weight is None else args.input_weight.detach().t()  # (D, 4H)
    recurrent = RecurrentProduct(args.recurrent_weight.detach(), batch_size, transpose=True)
    in_out, rec_out, z = site_u["input"], site_u["recurrent"], buffers.z
    mm, step = torch.mm, kernels.forward
    for t in range(num_steps):
        s = t if save else 0
        h = states_h[t] if save else states_h[t & 1]
        # The step's GEMMs (BN eq. 6's W_x x_t and W_h h_{t-1}); the kernel does the rest.
        if input_kind == "identity":
            mm(source[t], in_weight_t, out=z)
        elif input_kind != "given":
            mm(source[t], in_weight_t, out=in_out[s])
        if rec_kind == "identity":
            if input_kind == "identity":
                recurrent.add_to(h, z)
            elif input_kind == "given":
                recurrent.add(source[t], h, z)
            else:
                recurrent.write(h, z)
        else:
            recurrent.write(h, rec_out[s])
        step(handle, t)
    last = num_steps if save else num_steps & 1
    outputs.h_n.copy_(states_h[last])
    outputs.c_n.copy_(states_c[last])
    return outputs


def backward(args: BackwardArgs, *, reuse: bool) -> Gradients:
    """The backward time loop (eq. 11–16) in the kernels, the recurrent GEMM in torch; with ``reuse``
    the gradients overwrite the saved buffers they no longer need (see
    :func:`~rnorm.kernels.backward.allocate_grad_buffers`)."""
    kernels = _KERNELS
    saved = args.saved
    num_steps, batch_size, gates = saved.act.shape
    hidden = gates // 4
    grads = allocate_grad_buffers(args, in_loop=True, reuse=reuse)
    dh, dc = args.grad_h_n.detach().contiguous().clone(), args.grad_c_n.detach().contiguous().clone()
    masked = args.mask is not None
    buffers = BackwardBuffers(
        grad_output=args.grad_output.contiguous(),
        dh=dh,
        dc=dc,
        mask=args.mask.to(saved.act.dtype) if masked else None,
        weights=args.weights.contiguous(),
        act=saved.act,
        tanh_cell=saved.tanh_cell,
        states_c=saved.states_c,
        hidden_scale=args.hidden_scale,
        grad_chat=grads.grad_chat,
        grad_z=grads.grad_z,
    )
    kinds = kinds_of(args)
    site_grads = {"input": grads.grad_u, "recurrent": None if args.recurrent_kind == "identity" else grads.grad_r, "cell": None}
    for site, kind in kinds.items():
        features = hidden if site == "cell" else gates
        sums = getattr(grads, f"{site}_sums")
        accumulated = grads.accumulated.get(site)
        step_kind = None if kind == "given" else get_kind(kind)
        setattr(buffers, f"{site}_norm", getattr(saved, f"{site}_norm"))
        setattr(buffers, f"{site}_rstd", getattr(saved, f"{site}_rstd"))
        setattr(buffers, f"{site}_scale", _rows(getattr(args, f"{site}_scale"), features))
        setattr(buffers, f"{site}_sum_dy", None if sums is None else sums[0])
        setattr(buffers, f"{site}_sum_dy_xhat", None if sums is None else sums[1])
        setattr(buffers, f"{site}_gamma_grad", accumulated if step_kind is not None and step_kind.per_row else None)
        if site != "cell":
            setattr(buffers, f"{site}_raw", getattr(saved, f"{site}_raw"))
            setattr(buffers, f"{site}_scale_rows", accumulated if step_kind is not None and step_kind.name == "affine" else None)
            setattr(buffers, f"{site}_grad", site_grads[site])
    handle = kernels.backward_plan(_plain(buffers), num_steps, batch_size, hidden, _codes(*kinds.values()))
    grad_r = grads.grad_r
    recurrent = RecurrentProduct(args.recurrent_weight.detach(), batch_size, transpose=False)
    step = kernels.backward
    for t in range(num_steps - 1, -1, -1):
        step(handle, t)
        if masked:  # dh holds what ended sequences pass on; the gates' part adds to it
            recurrent.add_to(grad_r[t], dh)
        else:
            recurrent.write(grad_r[t], dh)
    return finish(args, grads, dh, dc)
