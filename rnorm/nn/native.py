"""The fused recurrence's time loops with the per-step work in the compiled CPU kernels.

:mod:`rnorm.nn.fused` allocates the buffers and does what comes before and after the loops; here
each step is the step's GEMMs in torch and one call into ``rnorm.nn._fused_step``
(``rnorm/nn/csrc/fused_step.cpp``), which does everything between the GEMMs in a few passes. On
the pMNIST shape that replaces about 20 small torch calls per step forward and 40 backward, each
2–10 µs of overhead and one pass over memory.

The extension is optional. :func:`load` returns it, or ``None`` where it was not built (no
compiler at install time); the fused recurrence then runs its torch-ops loop, which computes the
same function.

Both loops take the buffers by data pointer: every tensor handed over is contiguous, on the CPU, of
the compute dtype and alive until the loop ends (the caller holds it).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rnorm.nn.fused import _Plan, _Site

__all__ = ["available", "load", "supports"]

#: FusedStep kinds as the kernels number them; "identity" and "given" sites are done by the GEMMs.
_KINDS = {"identity": 0, "given": 0, "affine": 1, "batch": 2, "layer": 3, "rms": 4}
_BASE_BUFFER, _BASE_GIVEN, _BASE_ZERO = 0, 1, 2

def _import_kernels() -> ModuleType | None:
    """The extension built by setup.py, or ``None``: not built (no C++ compiler at install time),
    or built from an older version of its source (an editable install not rebuilt), which would
    not match this module's plans."""
    try:
        from rnorm.nn import _fused_step
    except ImportError:
        return None
    source = Path(__file__).with_name("csrc") / "fused_step.cpp"  # present in a source checkout only
    if source.is_file():
        sha = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        if sha != getattr(_fused_step, "SOURCE_SHA", None):
            warnings.warn(
                f"rnorm.nn._fused_step was built from another version of {source}; the fused recurrence runs "
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


def supports(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: CPU, all float32 or all float64."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float64):
        return False
    return all(t.device.type == "cpu" for t in tensors if t is not None)


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


def _ptr(tensor: Tensor | None) -> int | None:
    if tensor is None:
        return None
    if not tensor.is_contiguous():
        raise RuntimeError("rnorm native kernels: a buffer is not contiguous (a bug in rnorm.nn.fused)")
    return tensor.data_ptr()


def _step(tensor: Tensor | None, per_step: int) -> int:
    """Elements between consecutive steps' rows of a per-step ``(S, F)`` parameter; 0 when one row serves every step."""
    if tensor is None or tensor.dim() == 1 or tensor.shape[0] == 1:
        return 0
    return per_step


def _per_unit(hidden_scale: Tensor | None) -> int:
    """1 where Norm-Prop's scale on ``h`` has one value per unit ``(H,)``, 0 where it is one number (or absent)."""
    return int(hidden_scale is not None and hidden_scale.numel() > 1)


def _rstd_step(kind: str, batch: int, features: int) -> int:
    """Elements between consecutive steps' ``1/std``: one per feature (batch) or per sample (layer, rms)."""
    return features if kind == "batch" else batch if kind in ("layer", "rms") else 0


def _site_entries(prefix: str, site: _Site, scale: Tensor | None, batch: int, features: int) -> dict:
    kind = site.kind
    u = site.raw if site.raw is not None else site.norm
    return {
        f"{prefix}_kind": _KINDS[kind],
        f"{prefix}_u": _ptr(u),
        f"{prefix}_u_step": batch * features,
        f"{prefix}_scale": _ptr(scale),
        f"{prefix}_scale_step": _step(scale, features),
        f"{prefix}_rstd": _ptr(site.rstd),
        f"{prefix}_rstd_step": _rstd_step(kind, batch, features),
        f"{prefix}_mean": _ptr(site.mean),
        f"{prefix}_var": _ptr(site.var),
        f"{prefix}_eps": float(site.eps),
    }


def forward_loop(  # noqa: PLR0913
    kernels: ModuleType,
    plan: _Plan,
    source: Tensor,
    in_weight_t: Tensor | None,
    rec_weight_t: Tensor,
    shift: Tensor | None,
    sites: tuple[_Site, _Site, _Site],
    cell_shift: Tensor | None,
    buffers: dict[str, Tensor | None],
    probe: Tensor | None,
    save: bool,
) -> None:
    """Runs the forward time loop, filling ``buffers`` and the sites' buffers.

    ``buffers``: ``z`` ``(B, 4H)``, ``act`` ``(steps, B, 4H)``, ``tanh_cell`` ``(steps, B, H)``,
    ``cell_new`` (``None``: the next state), ``states_h``/``states_c`` ``(T + 1, B, H)`` when
    ``save`` else ``(2, B, H)`` used in turn (row 0 holding ``h0``/``c0``), ``output`` ``(T, B, H)``
    (``None``: the states), ``weights`` ``(T or 1, B)``.
    """
    num_steps, batch_size = source.shape[:2]
    hidden = rec_weight_t.shape[0]
    gates = 4 * hidden
    in_site, rec_site, cell_site = sites
    input_kind, rec_kind = plan.input_kind, plan.rec_kind
    z = buffers["z"]
    if "identity" in (input_kind, rec_kind):
        base = _BASE_BUFFER  # the identity sites' GEMMs (and a given input term) land in z
    elif input_kind == "given":
        base = _BASE_GIVEN
    else:
        base = _BASE_ZERO
    weights = buffers["weights"]
    hidden_scale = plan.hidden_scale
    entries = {
        "itemsize": source.element_size(),
        "num_steps": num_steps,
        "batch": batch_size,
        "hidden": hidden,
        "save": int(save),
        "base": base,
        "z": _ptr(z),
        "given": _ptr(source) if input_kind == "given" else None,
        "shift": _ptr(shift),
        "shift_step": _step(shift, gates),
        "cell_shift": _ptr(cell_shift),
        "cell_shift_step": _step(cell_shift, hidden),
        "act": _ptr(buffers["act"]),
        "tanh_cell": _ptr(buffers["tanh_cell"]),
        "cell_new": _ptr(buffers["cell_new"]),
        "states_h": _ptr(buffers["states_h"]),
        "states_c": _ptr(buffers["states_c"]),
        "output": _ptr(buffers["output"]),
        "probe": _ptr(probe),
        "hidden_scale": _ptr(hidden_scale),
        "hidden_scale_step": _per_unit(hidden_scale),
        "mask": _ptr(buffers["mask"]),
        "weights": _ptr(weights),
        "weights_step": batch_size if weights.shape[0] > 1 else 0,
    }
    entries.update(_site_entries("input", in_site, in_site.scale, batch_size, gates))
    entries.update(_site_entries("recurrent", rec_site, rec_site.scale, batch_size, gates))
    entries.update(_site_entries("cell", cell_site, cell_site.scale, batch_size, hidden))
    handle = kernels.forward_plan(entries)
    step = kernels.forward
    states_h = buffers["states_h"]
    mm = torch.mm
    recurrent = RecurrentProduct(rec_weight_t.t(), batch_size, transpose=True)
    in_out = in_site.raw if in_site.raw is not None else in_site.norm
    rec_out = rec_site.raw if rec_site.raw is not None else rec_site.norm
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


def backward_loop(  # noqa: PLR0913
    kernels: ModuleType,
    plan: _Plan,
    rec_weight: Tensor,
    saved: dict[str, Tensor | None],
    grads: dict[str, Tensor | None],
    scales: dict[str, Tensor | None],
    chat_factor: float,
    scale_chat: bool,
    dh: Tensor,
    dc: Tensor,
) -> None:
    """Runs the backward time loop: fills ``grads`` (``grad_z``, ``grad_r``, ``grad_u``,
    ``grad_chat``, ``grad_probe``, the batch sites' ``*_sums`` and, per site, ``scale_sums``: the
    layer and rms sites' ``Σ ∂y x̂``, the affine sites' ``Σ_b ∂y u`` per step) and leaves the gradients of
    ``h0`` and ``c0`` in ``dh`` and ``dc`` ``(B, H)``, which enter holding those of ``h_T``, ``c_T``."""
    act = saved["act"]
    num_steps, batch_size, gates = act.shape
    hidden = gates // 4
    weights = plan.weights.reshape(plan.weights.shape[0], -1)
    hidden_scale = plan.hidden_scale
    entries = {
        "itemsize": act.element_size(),
        "num_steps": num_steps,
        "batch": batch_size,
        "hidden": hidden,
        "grad_output": _ptr(saved["grad_output"]),
        "dh": _ptr(dh),
        "dc": _ptr(dc),
        "mask": _ptr(None if plan.mask is None else saved["mask"]),
        "weights": _ptr(weights),
        "weights_step": batch_size if weights.shape[0] > 1 else 0,
        "act": _ptr(act),
        "tanh_cell": _ptr(saved["tanh_cell"]),
        "states_c": _ptr(saved["states_c"]),
        "chat_factor": float(chat_factor),
        "scale_chat": int(scale_chat),
        "hidden_scale": _ptr(hidden_scale),
        "hidden_scale_step": _per_unit(hidden_scale),
        "grad_chat": _ptr(grads["grad_chat"]),
        "grad_probe": _ptr(grads["grad_probe"]),
        "grad_z": _ptr(grads["grad_z"]),
    }
    kinds = {"input": plan.input_kind, "recurrent": plan.rec_kind, "cell": plan.cell_kind}
    for site, kind in kinds.items():
        features = hidden if site == "cell" else gates
        sums = grads[f"{site}_sums"]
        scale = scales[site]
        accumulated = grads["scale_sums"].get(site)
        entries.update(
            {
                f"{site}_kind": _KINDS[kind],
                f"{site}_norm": _ptr(saved[f"{site}_norm"]),
                f"{site}_rstd": _ptr(saved[f"{site}_rstd"]),
                f"{site}_rstd_step": _rstd_step(kind, batch_size, features),
                f"{site}_scale": _ptr(scale),
                f"{site}_scale_step": _step(scale, features),
                f"{site}_sum_dy": _ptr(None if sums is None else sums[0]),
                f"{site}_sum_dy_xhat": _ptr(None if sums is None else sums[1]),
                f"{site}_gamma_grad": _ptr(accumulated if kind in ("layer", "rms") else None),
                f"{site}_raw": _ptr(saved.get(f"{site}_raw")),
                f"{site}_scale_rows": _ptr(accumulated if kind == "affine" else None),
                f"{site}_grad": _ptr(grads.get(f"{site}_grad")),
            }
        )
    handle = kernels.backward_plan(entries)
    step = kernels.backward
    grad_r = grads["grad_r"]
    masked = plan.mask is not None
    recurrent = RecurrentProduct(rec_weight, batch_size, transpose=False)
    for t in range(num_steps - 1, -1, -1):
        step(handle, t)
        if masked:  # dh holds what ended sequences pass on; the gates' part adds to it
            recurrent.add_to(grad_r[t], dh)
        else:
            recurrent.write(grad_r[t], dh)
