"""The Triton kernels of the fused recurrence: one time step per launch, forward and backward.

Imported only when the Triton implementation runs (it imports ``triton``). The host side
(:mod:`rnorm.kernels.triton.loops`) launches them; the equation numbers are ``docs/fused_backward.md``'s.

**Buffers through a table.** Every kernel reads the addresses of its buffers from a small device
table of ``int64`` (``table[SLOT]``, the slots below) instead of taking them as arguments. A captured
CUDA graph then replays with the buffers of each new call: the host rewrites the table
(:func:`write_table`) and replays, and the graph itself never changes.

**Tiles.** The step kernels are *column-blocked*: program ``p`` owns hidden units
``p·BH … p·BH + BH − 1`` — the four gate columns ``k, H + k, 2H + k, 3H + k`` of each — for the whole
batch (``BB`` rows, ``B`` padded to a power of two), so the per-column batch statistics of the
recurrent term and of the cell, the gates and the cell itself stay in registers. Row statistics
(layer and RMS normalization) need every column of a row: the row kernels (:func:`row_normalize`,
:func:`row_backward`) run between the parts of a step (``PART`` 1 and 2) where a site has them.

**What the GPU compiler needs and the interpreter does not check.** ``tl.dot`` operands are at least
16 in every dimension (``BB``, ``BH``, ``BK`` ≥ 16, padding masked), every block shape is a power
of two, accumulators are the tensors' dtype (``out_dtype``), and under ``TRITON_INTERPRET=1`` no
``tl.dot`` sees bf16 or fp16 (the operand buffers then hold float32 values rounded to that
precision, :func:`_operand`). Sizes and steps are never specialized (``do_not_specialize``): a
size of 1 would become a constant, and each step index a new compilation. Only the ``tl`` API of
Triton 3.6 is used (the GPU machine's); ``benchmarks/triton_compile_check.py`` compiles every
variant for sm_90 without a GPU.

Site codes (constexpr ``REC``, ``CELL``): 0 identity, 1 affine, 2 batch statistics, 3 row
statistics (layer or RMS; ``CENTER`` tells them apart). Input modes (``IN_MODE``): 0 the terms
arrive complete (given terms, or ``W_x x_t`` plus every shift computed before the loop), 1 the
input site's ``v_t`` (raw term for affine, x̂ for normalizing kinds, computed before the loop) times
its scale plus the shift.
"""

from __future__ import annotations

import triton
import triton.language as tl

# -- forward table slots ---------------------------------------------------------------------------
F_BASE = tl.constexpr(0)  #: (T, B, G) complete input terms (IN_MODE 0)
F_IN_V = tl.constexpr(1)  #: (T, B, G) the input site's raw term (affine) or x̂ (normalizing)
F_IN_SCALE = tl.constexpr(2)  #: (S, G) or γ (G,)
F_SHIFT = tl.constexpr(3)  #: (S, G) every additive term of the gates
F_ACT = tl.constexpr(4)  #: (S', B, G) σ(i), σ(f), tanh(g), σ(o)
F_TANHC = tl.constexpr(5)  #: (S', B, H) tanh(ĉ)
F_CELL_NEW = tl.constexpr(6)  #: (S', B, H) c_t before padding carries (saved with padding)
F_STATES_H = tl.constexpr(7)  #: (T + 1, B, H) carried states (saved with padding)
F_STATES_C = tl.constexpr(8)  #: (T + 1, B, H) carried cells (saved)
F_OUT = tl.constexpr(9)  #: (T, B, H) the output, 0 at padded steps
F_R_RAW = tl.constexpr(10)  #: (S', B, G) the recurrent term (affine site)
F_R_NORM = tl.constexpr(11)  #: (S', B, G) its x̂ (normalizing site)
F_R_RSTD = tl.constexpr(12)  #: (S', 1, G) batch or (S', B, 1) row 1/std
F_R_MEAN = tl.constexpr(13)  #: (T, 1, G) batch statistics
F_R_VAR = tl.constexpr(14)
F_R_SCALE = tl.constexpr(15)
F_C_NORM = tl.constexpr(16)  #: (S', B, H) the cell's x̂
F_C_RSTD = tl.constexpr(17)
F_C_MEAN = tl.constexpr(18)
F_C_VAR = tl.constexpr(19)
F_C_SCALE = tl.constexpr(20)  #: doubled (eq. 3)
F_C_SHIFT = tl.constexpr(21)
F_HSCALE = tl.constexpr(22)  #: Norm-Prop's κ, (1,) or (H,)
F_MASK = tl.constexpr(23)  #: (T, B) 1 on real steps, 0 on padding
F_WEIGHTS = tl.constexpr(24)  #: (T or 1, B) mask over count: batch means are w @ u
F_EPS = tl.constexpr(25)  #: (3,) ε of the input, recurrent and cell sites
F_H_STATE = tl.constexpr(26)  #: workspace (2, B, H): h_t, rows used in turn
F_C_STATE = tl.constexpr(27)  #: workspace (2, B, H): c_t
F_H_OP = tl.constexpr(28)  #: workspace (2, B, H): h_t as the recurrent product's operand
F_WT_OP = tl.constexpr(29)  #: workspace (H, G): W_h transposed, operand precision
F_R_WS = tl.constexpr(30)  #: workspace (B, G): h_{t-1} W_h^T when torch.mm computes it
F_CNEW_WS = tl.constexpr(31)  #: workspace (B, H): c_t for a row-statistics cell site
F_IN_RSTD = tl.constexpr(32)  #: (S, 1, G) or (S, B, 1)
F_IN_MEAN = tl.constexpr(33)
F_IN_VAR = tl.constexpr(34)
FORWARD_SLOTS = 35

# -- backward table slots --------------------------------------------------------------------------
B_GO = tl.constexpr(0)  #: (T, B, H) ∂L/∂output
B_ACT = tl.constexpr(1)
B_TANHC = tl.constexpr(2)
B_STATES_C = tl.constexpr(3)  #: (T + 1, B, H): c_{t-1} is row t
B_MASK = tl.constexpr(4)
B_WEIGHTS = tl.constexpr(5)
B_HSCALE = tl.constexpr(6)
B_GCHAT = tl.constexpr(7)  #: (T, B, H) ∂L/∂(2ĉ) times its factor (eq. 12)
B_GZ = tl.constexpr(8)  #: (T, B, G) ∂L/∂z
B_GR = tl.constexpr(9)  #: (T, B, G) ∂L/∂(W_h h_{t-1})
B_R_NORM = tl.constexpr(10)
B_R_RSTD = tl.constexpr(11)
B_R_SCALE = tl.constexpr(12)
B_R_SUM1 = tl.constexpr(13)  #: (T, 1, G) Σ_b w dy (eq. 13)
B_R_SUM2 = tl.constexpr(14)  #: (T, 1, G) Σ_b w dy x̂
B_C_NORM = tl.constexpr(15)
B_C_RSTD = tl.constexpr(16)
B_C_SCALE = tl.constexpr(17)
B_C_SUM1 = tl.constexpr(18)
B_C_SUM2 = tl.constexpr(19)
B_DH_CARRY = tl.constexpr(20)  #: workspace (B, H): what reaches h_{t-1} other than through W_h
B_DH_FULL = tl.constexpr(21)  #: workspace (B, H): carry + dr_{t+1} W_h when torch.mm computes it
B_DC = tl.constexpr(22)  #: workspace (B, H): ∂L/∂c_t, in and out
B_DR_OP = tl.constexpr(23)  #: workspace (2, B, G): dr_t as the product's operand, rows used in turn
B_W_OP = tl.constexpr(24)  #: workspace (G, H): W_h, operand precision
B_E_WS = tl.constexpr(25)  #: workspace (B, H): e_t (eq. 11′), between the parts of a step
B_DCELL_WS = tl.constexpr(26)  #: workspace (B, H): ∂L/∂c_t through a row-statistics cell site
B_IN_NORM = tl.constexpr(27)
B_IN_RSTD = tl.constexpr(28)
B_IN_SCALE = tl.constexpr(29)
B_GU = tl.constexpr(30)  #: (T, B, G) ∂L/∂(W_x x_t)
B_IN_SUM1 = tl.constexpr(31)
B_IN_SUM2 = tl.constexpr(32)
BACKWARD_SLOTS = 33

TABLE_CHUNK = 8  #: pointers written per launch of :func:`write_table`


@triton.jit(do_not_specialize=["start"], do_not_specialize_on_alignment=["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"])
def write_table(table, start, p0, p1, p2, p3, p4, p5, p6, p7):
    """``table[start + i] = address of p_i``: the buffers of this call, for the kernels and graphs that
    read the table. One compiled variant whatever the offsets and alignments of the buffers."""
    tl.store(table + start + 0, p0.to(tl.int64, bitcast=True))
    tl.store(table + start + 1, p1.to(tl.int64, bitcast=True))
    tl.store(table + start + 2, p2.to(tl.int64, bitcast=True))
    tl.store(table + start + 3, p3.to(tl.int64, bitcast=True))
    tl.store(table + start + 4, p4.to(tl.int64, bitcast=True))
    tl.store(table + start + 5, p5.to(tl.int64, bitcast=True))
    tl.store(table + start + 6, p6.to(tl.int64, bitcast=True))
    tl.store(table + start + 7, p7.to(tl.int64, bitcast=True))


# -- small helpers (inlined) ------------------------------------------------------------------------


@triton.jit
def _p(table, slot: tl.constexpr, dtype: tl.constexpr):
    """The buffer of ``slot`` as a pointer to ``dtype``."""
    return tl.load(table + slot).to(tl.pointer_type(dtype))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _operand(x, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` as a matrix-product operand: unchanged (ROUND 0), or rounded to bf16 (1) or fp16 (2) to
    nearest even. Under the interpreter the result stays float32 (no half-precision ``tl.dot`` there):
    bf16 by integer rounding of the float32 bits, exact for finite values."""
    y = x
    if ROUND == 1:
        if INTERPRET:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.bfloat16)
    elif ROUND == 2:
        if INTERPRET:
            y = x.to(tl.float16).to(tl.float32)
        else:
            y = x.to(tl.float16)
    return y


@triton.jit
def _batch_stats(u, w, eps):
    """Batch statistics of ``u`` ``(BB, BC)`` per column, rows weighted by ``w`` ``(BB,)`` (mask over
    count, 0 on padded and absent rows): x̂, mean, biased variance and 1/std (eq. 9)."""
    mean = tl.sum(u * w[:, None], axis=0)
    centered = u - mean[None, :]
    var = tl.sum(centered * centered * w[:, None], axis=0)
    rstd = 1.0 / tl.sqrt(var + eps)
    return centered * rstd[None, :], mean, var, rstd


@triton.jit
def _batch_grad(dy, xhat, rstd, gamma, w, m, MASKED: tl.constexpr):
    """∂L/∂u of ``y = γ x̂`` under batch statistics (eq. 13), and the weighted means S₁, S₂ per column."""
    s1 = tl.sum(dy * w[:, None], axis=0)
    s2 = tl.sum(dy * xhat * w[:, None], axis=0)
    du = (dy - s1[None, :] - xhat * s2[None, :]) * (gamma * rstd)[None, :]
    if MASKED:
        du = du * m[:, None]  # padded rows entered no statistic
    return du, s1, s2


@triton.jit
def _batch_site(
    table, u, NORM: tl.constexpr, RSTD: tl.constexpr, MEAN: tl.constexpr, VAR: tl.constexpr, SCALE: tl.constexpr,
    EPS_INDEX: tl.constexpr, saved_off, rstd_off, stats_off, tile, cols, cmask, tmask, w, DT: tl.constexpr,
):  # fmt: skip
    """A batch-statistics site on its columns ``cols`` (eq. 9): x̂ into ``NORM`` (``saved_off`` +
    ``tile``), 1/std, mean and variance stored; returns γ x̂."""
    xhat, mean, var, rstd = _batch_stats(u, w, tl.load(_p(table, F_EPS, DT) + EPS_INDEX))
    tl.store(_p(table, NORM, DT) + saved_off + tile, xhat, mask=tmask)
    tl.store(_p(table, RSTD, DT) + rstd_off + cols, rstd, mask=cmask)
    tl.store(_p(table, MEAN, DT) + stats_off + cols, mean, mask=cmask)
    tl.store(_p(table, VAR, DT) + stats_off + cols, var, mask=cmask)
    return xhat * tl.load(_p(table, SCALE, DT) + cols, mask=cmask, other=0.0)[None, :]


@triton.jit
def _batch_site_grad(
    table, dy, NORM: tl.constexpr, RSTD: tl.constexpr, SCALE: tl.constexpr, SUM1: tl.constexpr, SUM2: tl.constexpr,
    step_off, stats_off, tile, cols, cmask, tmask, w, m, DT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The backward of a batch-statistics site on its columns ``cols`` (eq. 13): returns ∂L/∂u and
    stores the step's S₁, S₂ (γ's and β's gradients)."""
    xhat = tl.load(_p(table, NORM, DT) + step_off + tile, mask=tmask, other=0.0)
    rstd = tl.load(_p(table, RSTD, DT) + stats_off + cols, mask=cmask, other=0.0)
    gamma = tl.load(_p(table, SCALE, DT) + cols, mask=cmask, other=0.0)
    du, s1, s2 = _batch_grad(dy, xhat, rstd, gamma, w, m, MASKED)
    tl.store(_p(table, SUM1, DT) + stats_off + cols, s1, mask=cmask)
    tl.store(_p(table, SUM2, DT) + stats_off + cols, s2, mask=cmask)
    return du


@triton.jit
def _row(table, slot: tl.constexpr, dtype: tl.constexpr, t, PER_STEP: tl.constexpr, width, cols, cmask):
    """Row ``t`` (``PER_STEP``) or the only row of a ``(S, width)`` table of scales or shifts, at ``cols``."""
    base = _p(table, slot, dtype)
    if PER_STEP:
        base += t.to(tl.int64) * width
    return tl.load(base + cols, mask=cmask, other=0.0)


@triton.jit
def _tile(B, H, BB: tl.constexpr, BH: tl.constexpr):
    """This program's rows (the whole batch, padded to ``BB``) and block of hidden units, their masks,
    and the offsets of the ``(BB, BH)`` tile in a ``(B, H)`` buffer."""
    rows = tl.arange(0, BB)
    units = tl.program_id(0) * BH + tl.arange(0, BH)
    rmask = rows < B
    umask = units < H
    return rows, units, rmask, umask, rmask[:, None] & umask[None, :], rows[:, None] * H + units[None, :]


@triton.jit
def _weights_and_mask(
    table, W_SLOT: tl.constexpr, MASK_SLOT: tl.constexpr, t, B, rows,
    NEED_W: tl.constexpr, MASKED: tl.constexpr, WEIGHTS_PER_STEP: tl.constexpr, DT: tl.constexpr, BB: tl.constexpr,
):  # fmt: skip
    """Step ``t``'s batch weights ``w`` (mask over count; zeros unless ``NEED_W``) and mask ``m`` (ones
    unless ``MASKED``), ``(BB,)`` each, 0 beyond the batch."""
    rmask = rows < B
    w = tl.zeros((BB,), dtype=DT)
    if NEED_W:
        weights = _p(table, W_SLOT, DT)
        if WEIGHTS_PER_STEP:
            weights += t.to(tl.int64) * B
        w = tl.load(weights + rows, mask=rmask, other=0.0)
    m = tl.full((BB,), 1.0, dtype=DT)
    if MASKED:
        m = tl.load(_p(table, MASK_SLOT, DT) + t.to(tl.int64) * B + rows, mask=rmask, other=0.0)
    return w, m


# -- forward ---------------------------------------------------------------------------------------


@triton.jit
def _gate_preactivation(
    table, r, g: tl.constexpr, t, s, B, H, rows, units, umask, tmask, w,
    DT: tl.constexpr, IN_MODE: tl.constexpr, IN_SCALE_PER_STEP: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SHIFT_PER_STEP: tl.constexpr, REC: tl.constexpr, REC_SCALE_PER_STEP: tl.constexpr,
):  # fmt: skip
    """``z`` of gate block ``g`` (eq. 4) from the recurrent term ``r`` ``(BB, BH)``: the input term,
    the shift, and the recurrent site (whose x̂ or raw term and statistics it stores)."""
    G = 4 * H
    cols = g * H + units
    offs = rows[:, None] * G + cols[None, :]
    step = t.to(tl.int64) * B * G
    saved = s.to(tl.int64) * B * G
    if IN_MODE == 0:
        z = tl.load(_p(table, F_BASE, DT) + step + offs, mask=tmask, other=0.0)
    else:
        v = tl.load(_p(table, F_IN_V, DT) + step + offs, mask=tmask, other=0.0)
        z = v * _row(table, F_IN_SCALE, DT, t, IN_SCALE_PER_STEP, G, cols, umask)[None, :]
        if HAS_SHIFT:
            z = _row(table, F_SHIFT, DT, t, SHIFT_PER_STEP, G, cols, umask)[None, :] + z
    if REC == 0:
        z = z + r
    elif REC == 1:
        tl.store(_p(table, F_R_RAW, DT) + saved + offs, r, mask=tmask)
        z = z + r * _row(table, F_R_SCALE, DT, t, REC_SCALE_PER_STEP, G, cols, umask)[None, :]
    elif REC == 2:
        stats = t.to(tl.int64) * G
        z = z + _batch_site(table, r, F_R_NORM, F_R_RSTD, F_R_MEAN, F_R_VAR, F_R_SCALE, 1, saved, s.to(tl.int64) * G, stats, offs, cols, umask, tmask, w, DT)
    else:  # row statistics: x̂ written by row_normalize
        xhat = tl.load(_p(table, F_R_NORM, DT) + saved + offs, mask=tmask, other=0.0)
        z = z + xhat * tl.load(_p(table, F_R_SCALE, DT) + cols, mask=umask, other=0.0)[None, :]
    return z


@triton.jit(do_not_specialize=["t", "s", "B", "H"])
def forward_step(
    table, t, s, B, H,
    DT: tl.constexpr, OP_DT: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INLINE: tl.constexpr,
    IN_MODE: tl.constexpr, IN_SCALE_PER_STEP: tl.constexpr, HAS_SHIFT: tl.constexpr, SHIFT_PER_STEP: tl.constexpr,
    REC: tl.constexpr, REC_SCALE_PER_STEP: tl.constexpr,
    CELL: tl.constexpr, CELL_SCALE_PER_STEP: tl.constexpr, HAS_CELL_SHIFT: tl.constexpr, CELL_SHIFT_PER_STEP: tl.constexpr,
    HSCALE: tl.constexpr, MASKED: tl.constexpr, SAVE: tl.constexpr, WEIGHTS_PER_STEP: tl.constexpr,
    PART: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Step ``t`` of the forward (eq. 4–11) for one block of hidden units.

    ``s`` is where the step's saved rows go (``t``, or 0 without saving). ``PART`` 0 does the whole
    step; with a row-statistics cell site, part 1 stops at ``c_t`` (written to the workspace for
    :func:`row_normalize`) and part 2 goes on from its x̂. ``INLINE``: this kernel computes its slice
    of ``h_{t-1} W_h^T`` with ``tl.dot``; otherwise it reads it from the workspace (torch.mm's).
    """
    G = 4 * H
    rows, units, rmask, umask, tmask, hoffs = _tile(B, H, BB, BH)
    prev = t % 2  # rows of the workspace states used in turn
    nxt = 1 - prev
    state = B.to(tl.int64) * H
    saved_h = s.to(tl.int64) * B * H
    act = _p(table, F_ACT, DT) + s.to(tl.int64) * B * G
    w, m = _weights_and_mask(table, F_WEIGHTS, F_MASK, t, B, rows, REC == 2 or CELL == 2, MASKED, WEIGHTS_PER_STEP, DT, BB)
    keep = m[:, None] > 0.5

    if PART != 2:
        # -- the recurrent product h_{t-1} W_h^T, this block's four gate columns -----------------------
        if INLINE:
            acc_i = tl.zeros((BB, BH), dtype=DT)
            acc_f = tl.zeros((BB, BH), dtype=DT)
            acc_g = tl.zeros((BB, BH), dtype=DT)
            acc_o = tl.zeros((BB, BH), dtype=DT)
            h_op = _p(table, F_H_OP, OP_DT) + prev * state
            wt = _p(table, F_WT_OP, OP_DT)
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < H
                h = tl.load(h_op + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                wmask = kmask[:, None] & umask[None, :]
                wrow = wt + ks[:, None] * G + units[None, :]
                acc_i = tl.dot(h, tl.load(wrow, mask=wmask, other=0.0), acc_i, input_precision=DOT_PRECISION, out_dtype=DT)
                acc_f = tl.dot(h, tl.load(wrow + H, mask=wmask, other=0.0), acc_f, input_precision=DOT_PRECISION, out_dtype=DT)
                acc_g = tl.dot(h, tl.load(wrow + 2 * H, mask=wmask, other=0.0), acc_g, input_precision=DOT_PRECISION, out_dtype=DT)
                acc_o = tl.dot(h, tl.load(wrow + 3 * H, mask=wmask, other=0.0), acc_o, input_precision=DOT_PRECISION, out_dtype=DT)
        else:
            product = _p(table, F_R_WS, DT) + rows[:, None] * G + units[None, :]
            acc_i = tl.load(product, mask=tmask, other=0.0)
            acc_f = tl.load(product + H, mask=tmask, other=0.0)
            acc_g = tl.load(product + 2 * H, mask=tmask, other=0.0)
            acc_o = tl.load(product + 3 * H, mask=tmask, other=0.0)

        # -- gates (eq. 4-5), in z-space: one sigmoid each, tanh(g) = 2σ(z_g) − 1 ------------------------
        z_i = _gate_preactivation(table, acc_i, 0, t, s, B, H, rows, units, umask, tmask, w, DT, IN_MODE, IN_SCALE_PER_STEP, HAS_SHIFT, SHIFT_PER_STEP, REC, REC_SCALE_PER_STEP)
        z_f = _gate_preactivation(table, acc_f, 1, t, s, B, H, rows, units, umask, tmask, w, DT, IN_MODE, IN_SCALE_PER_STEP, HAS_SHIFT, SHIFT_PER_STEP, REC, REC_SCALE_PER_STEP)
        z_g = _gate_preactivation(table, acc_g, 2, t, s, B, H, rows, units, umask, tmask, w, DT, IN_MODE, IN_SCALE_PER_STEP, HAS_SHIFT, SHIFT_PER_STEP, REC, REC_SCALE_PER_STEP)
        z_o = _gate_preactivation(table, acc_o, 3, t, s, B, H, rows, units, umask, tmask, w, DT, IN_MODE, IN_SCALE_PER_STEP, HAS_SHIFT, SHIFT_PER_STEP, REC, REC_SCALE_PER_STEP)
        a_i = _sigmoid(z_i)
        a_f = _sigmoid(z_f)
        a_g = 2.0 * _sigmoid(z_g) - 1.0
        a_o = _sigmoid(z_o)
        aoffs = rows[:, None] * G + units[None, :]
        tl.store(act + aoffs, a_i, mask=tmask)
        tl.store(act + aoffs + H, a_f, mask=tmask)
        tl.store(act + aoffs + 2 * H, a_g, mask=tmask)
        tl.store(act + aoffs + 3 * H, a_o, mask=tmask)

        # -- cell (eq. 6) and its padding carry (eq. 11) ---------------------------------------------------
        c_state = _p(table, F_C_STATE, DT)
        c_prev = tl.load(c_state + prev * state + hoffs, mask=tmask, other=0.0)
        c_new = a_f * c_prev + a_i * a_g
        c_carry = c_new
        if MASKED:
            c_carry = tl.where(keep, c_new, c_prev)
            if SAVE:
                tl.store(_p(table, F_CELL_NEW, DT) + saved_h + hoffs, c_new, mask=tmask)
        tl.store(c_state + nxt * state + hoffs, c_carry, mask=tmask)
        if SAVE:
            tl.store(_p(table, F_STATES_C, DT) + (t + 1).to(tl.int64) * state + hoffs, c_carry, mask=tmask)

        # -- the cell site (eq. 7): c̃ = 2 ĉ ---------------------------------------------------------------
        if CELL == 0:
            c_tilde = 2.0 * c_new
        elif CELL == 1:
            c_tilde = c_new * _row(table, F_C_SCALE, DT, t, CELL_SCALE_PER_STEP, H, units, umask)[None, :]
            if HAS_CELL_SHIFT:
                c_tilde = _row(table, F_C_SHIFT, DT, t, CELL_SHIFT_PER_STEP, H, units, umask)[None, :] + c_tilde
        elif CELL == 2:
            c_tilde = _batch_site(
                table, c_new, F_C_NORM, F_C_RSTD, F_C_MEAN, F_C_VAR, F_C_SCALE, 2,
                saved_h, s.to(tl.int64) * H, t.to(tl.int64) * H, hoffs, units, umask, tmask, w, DT,
            )  # fmt: skip
            if HAS_CELL_SHIFT:
                c_tilde = tl.load(_p(table, F_C_SHIFT, DT) + units, mask=umask, other=0.0)[None, :] + c_tilde
        else:  # row statistics: row_normalize reads c_t from the workspace, part 2 goes on
            c_tilde = c_new
            tl.store(_p(table, F_CNEW_WS, DT) + hoffs, c_new, mask=tmask)
    else:
        # -- part 2: the row-statistics cell site from its x̂ ------------------------------------------------
        xhat = tl.load(_p(table, F_C_NORM, DT) + saved_h + hoffs, mask=tmask, other=0.0)
        c_tilde = xhat * tl.load(_p(table, F_C_SCALE, DT) + units, mask=umask, other=0.0)[None, :]
        if HAS_CELL_SHIFT:
            c_tilde = tl.load(_p(table, F_C_SHIFT, DT) + units, mask=umask, other=0.0)[None, :] + c_tilde
        a_o = tl.load(act + rows[:, None] * G + 3 * H + units[None, :], mask=tmask, other=0.0)

    if PART != 1:
        # -- the output (eq. 8) and its padding (eq. 11) ---------------------------------------------------
        tanh_cell = 2.0 * _sigmoid(c_tilde) - 1.0
        tl.store(_p(table, F_TANHC, DT) + saved_h + hoffs, tanh_cell, mask=tmask)
        h_new = a_o * tanh_cell
        if HSCALE == 1:
            h_new = h_new * tl.load(_p(table, F_HSCALE, DT))
        elif HSCALE == 2:
            h_new = h_new * tl.load(_p(table, F_HSCALE, DT) + units, mask=umask, other=0.0)[None, :]
        h_state = _p(table, F_H_STATE, DT)
        h_carry = h_new
        out = h_new
        if MASKED:
            h_prev = tl.load(h_state + prev * state + hoffs, mask=tmask, other=0.0)
            h_carry = tl.where(keep, h_new, h_prev)
            out = h_new * m[:, None]
            if SAVE:
                tl.store(_p(table, F_STATES_H, DT) + (t + 1).to(tl.int64) * state + hoffs, h_carry, mask=tmask)
        tl.store(_p(table, F_OUT, DT) + t.to(tl.int64) * state + hoffs, out, mask=tmask)
        tl.store(h_state + nxt * state + hoffs, h_carry, mask=tmask)
        tl.store(_p(table, F_H_OP, OP_DT) + nxt * state + hoffs, _operand(h_carry, ROUND, INTERPRET), mask=tmask)


@triton.jit(do_not_specialize=["src_off", "dst_off", "rstd_off", "R", "F"])
def row_normalize(
    table, SRC: tl.constexpr, src_off, DST: tl.constexpr, dst_off, RSTD: tl.constexpr, rstd_off,
    EPS: tl.constexpr, EPS_INDEX: tl.constexpr, R, F,
    DT: tl.constexpr, CENTER: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    """Layer (``CENTER``) or RMS normalization of ``R`` rows of ``F`` features (eq. 10): x̂ into ``DST``
    (may be ``SRC``), 1/std per row into ``RSTD``. Three passes over each row block (mean, variance, x̂)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    src = _p(table, SRC, DT) + src_off + rows.to(tl.int64)[:, None] * F
    dst = _p(table, DST, DT) + dst_off + rows.to(tl.int64)[:, None] * F
    mean = tl.zeros((BR,), dtype=DT)
    if CENTER:
        total = tl.zeros((BR,), dtype=DT)
        for f0 in range(0, F, BF):
            cols = f0 + tl.arange(0, BF)
            tile = rmask[:, None] & (cols < F)[None, :]
            total += tl.sum(tl.load(src + cols[None, :], mask=tile, other=0.0), axis=1)
        mean = total / F
    squares = tl.zeros((BR,), dtype=DT)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        tile = rmask[:, None] & (cols < F)[None, :]
        centered = tl.where(tile, tl.load(src + cols[None, :], mask=tile, other=0.0) - mean[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    rstd = 1.0 / tl.sqrt(squares / F + tl.load(_p(table, EPS, DT) + EPS_INDEX))
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        tile = rmask[:, None] & (cols < F)[None, :]
        x = tl.load(src + cols[None, :], mask=tile, other=0.0)
        tl.store(dst + cols[None, :], (x - mean[:, None]) * rstd[:, None], mask=tile)
    tl.store(_p(table, RSTD, DT) + rstd_off + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["B", "F"])
def batch_normalize_steps(
    table, U: tl.constexpr, RSTD: tl.constexpr, MEAN: tl.constexpr, VAR: tl.constexpr, SCALE: tl.constexpr, EPS_INDEX: tl.constexpr,
    B, F, DT: tl.constexpr, WEIGHTS_PER_STEP: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Batch normalization (eq. 9) of every step of ``U`` ``(T, B, F)`` in place, one program per
    (step, column block): the input site, whose statistics do not depend on the recurrence."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rows = tl.arange(0, BB)
    cmask = cols < F
    tile = (rows < B)[:, None] & cmask[None, :]
    step = t.to(tl.int64) * B * F
    offs = rows[:, None] * F + cols[None, :]
    w, _ = _weights_and_mask(table, F_WEIGHTS, F_MASK, t, B, rows, True, False, WEIGHTS_PER_STEP, DT, BB)
    u = tl.load(_p(table, U, DT) + step + offs, mask=tile, other=0.0)
    stats = t.to(tl.int64) * F
    _batch_site(table, u, U, RSTD, MEAN, VAR, SCALE, EPS_INDEX, step, stats, stats, offs, cols, cmask, tile, w, DT)


# -- backward --------------------------------------------------------------------------------------


@triton.jit
def _recurrent_grad(
    table, dz, g: tl.constexpr, t, B, H, rows, units, umask, tmask, w, m,
    DT: tl.constexpr, OP_DT: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr,
    REC: tl.constexpr, REC_SCALE_PER_STEP: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Gate block ``g`` of ``∂L/∂u^h_t`` (the recurrent site's backward, eq. 13 for batch statistics)
    into ``B_GR`` and, as the next product's operand, ``B_DR_OP``. Row statistics: :func:`row_backward`."""
    G = 4 * H
    cols = g * H + units
    offs = rows[:, None] * G + cols[None, :]
    step = t.to(tl.int64) * B * G
    dr = dz
    if REC == 1:
        dr = dz * _row(table, B_R_SCALE, DT, t, REC_SCALE_PER_STEP, G, cols, umask)[None, :]
    elif REC == 2:
        dr = _batch_site_grad(
            table, dz, B_R_NORM, B_R_RSTD, B_R_SCALE, B_R_SUM1, B_R_SUM2, step, t.to(tl.int64) * G, offs, cols, umask, tmask, w, m, DT, MASKED
        )
    if REC == 1 or REC == 2:
        tl.store(_p(table, B_GR, DT) + step + offs, dr, mask=tmask)
    if REC != 3:
        slot = (t % 2).to(tl.int64) * B * G
        tl.store(_p(table, B_DR_OP, OP_DT) + slot + offs, _operand(dr, ROUND, INTERPRET), mask=tmask)


@triton.jit(do_not_specialize=["t", "has_next", "B", "H"])
def backward_step(
    table, t, has_next, B, H,
    DT: tl.constexpr, OP_DT: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INLINE: tl.constexpr,
    REC: tl.constexpr, REC_SCALE_PER_STEP: tl.constexpr, CELL: tl.constexpr, CELL_SCALE_PER_STEP: tl.constexpr,
    HSCALE: tl.constexpr, MASKED: tl.constexpr, WEIGHTS_PER_STEP: tl.constexpr,
    PART: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Step ``t`` of the backward (eq. 11′–16) for one block of hidden units.

    First ``δh_t`` = the carry + ``dr_{t+1} W_h`` (eq. 16 of the step after, ``has_next``; with
    ``INLINE`` this kernel computes its columns with ``tl.dot``, otherwise torch.mm wrote them),
    then the padding (11′), the output and cell site (12; 13 for batch statistics), the gates (15)
    and the recurrent site. With a row-statistics cell site, part 1 stops at ``∂L/∂c̃`` and part 2
    goes on from ``∂L/∂c_t`` (:func:`row_backward`'s).
    """
    G = 4 * H
    rows, units, rmask, umask, tmask, hoffs = _tile(B, H, BB, BH)
    aoffs = rows[:, None] * G + units[None, :]
    state = B.to(tl.int64) * H
    step_h = t.to(tl.int64) * state
    act = _p(table, B_ACT, DT) + t.to(tl.int64) * B * G
    w, m = _weights_and_mask(table, B_WEIGHTS, B_MASK, t, B, rows, REC == 2 or CELL == 2, MASKED, WEIGHTS_PER_STEP, DT, BB)
    hs = tl.full((BH,), 1.0, dtype=DT)
    if HSCALE == 1:
        hs = hs * tl.load(_p(table, B_HSCALE, DT))
    elif HSCALE == 2:
        hs = tl.load(_p(table, B_HSCALE, DT) + units, mask=umask, other=0.0)
    a_o = tl.load(act + aoffs + 3 * H, mask=tmask, other=0.0)
    tanh_cell = tl.load(_p(table, B_TANHC, DT) + step_h + hoffs, mask=tmask, other=0.0)

    if PART != 2:
        # -- δh_t: what step t + 1 sends back through W_h (eq. 16), plus the carry -------------------------
        carry = _p(table, B_DH_CARRY, DT) + hoffs
        dh = tl.load(carry, mask=tmask, other=0.0)
        if has_next:
            if INLINE:
                acc = tl.zeros((BB, BH), dtype=DT)
                dr_op = _p(table, B_DR_OP, OP_DT) + ((t + 1) % 2).to(tl.int64) * B * G
                w_op = _p(table, B_W_OP, OP_DT)
                for j0 in range(0, G, BK):
                    js = j0 + tl.arange(0, BK)
                    jmask = js < G
                    dr = tl.load(dr_op + rows[:, None] * G + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
                    wv = tl.load(w_op + js[:, None] * H + units[None, :], mask=jmask[:, None] & umask[None, :], other=0.0)
                    acc = tl.dot(dr, wv, acc, input_precision=DOT_PRECISION, out_dtype=DT)
                dh = dh + acc
            else:
                dh = tl.load(_p(table, B_DH_FULL, DT) + hoffs, mask=tmask, other=0.0)
        # -- padding (eq. 11′) and through h = κ o tanh(ĉ) (eq. 12) ---------------------------------------
        grad_out = tl.load(_p(table, B_GO, DT) + step_h + hoffs, mask=tmask, other=0.0)
        if MASKED:
            e = (grad_out + dh) * m[:, None]
            tl.store(carry, dh - dh * m[:, None], mask=tmask)  # ended sequences pass their state's gradient on
        else:
            e = grad_out + dh
            tl.store(carry, tl.zeros((BB, BH), dtype=DT), mask=tmask)
        q = e * (a_o - a_o * tanh_cell * tanh_cell)
        if CELL != 0:
            q = q * (0.5 * hs)[None, :]  # the cell site works on 2ĉ (eq. 3)
        elif HSCALE != 0:
            q = q * hs[None, :]
        if CELL != 0:
            tl.store(_p(table, B_GCHAT, DT) + step_h + hoffs, q, mask=tmask)
        if PART == 1:
            tl.store(_p(table, B_E_WS, DT) + hoffs, e, mask=tmask)
        d_cell = q
        if CELL == 1:
            d_cell = q * _row(table, B_C_SCALE, DT, t, CELL_SCALE_PER_STEP, H, units, umask)[None, :]
        elif CELL == 2:
            d_cell = _batch_site_grad(
                table, q, B_C_NORM, B_C_RSTD, B_C_SCALE, B_C_SUM1, B_C_SUM2, step_h, t.to(tl.int64) * H, hoffs, units, umask, tmask, w, m, DT, MASKED
            )
    else:
        e = tl.load(_p(table, B_E_WS, DT) + hoffs, mask=tmask, other=0.0)
        d_cell = tl.load(_p(table, B_DCELL_WS, DT) + hoffs, mask=tmask, other=0.0)

    if PART != 1:
        # -- through the gates (eq. 15; the g block's ∂tanh(z/2)/∂z = (1 − g²)/2) -------------------------
        dc_ptr = _p(table, B_DC, DT) + hoffs
        dc = tl.load(dc_ptr, mask=tmask, other=0.0)
        dc_new = dc
        if MASKED:
            dc_new = dc * m[:, None]
        total = dc_new + d_cell
        a_i = tl.load(act + aoffs, mask=tmask, other=0.0)
        a_f = tl.load(act + aoffs + H, mask=tmask, other=0.0)
        a_g = tl.load(act + aoffs + 2 * H, mask=tmask, other=0.0)
        c_prev = tl.load(_p(table, B_STATES_C, DT) + step_h + hoffs, mask=tmask, other=0.0)
        dz_i = total * ((a_i - a_i * a_i) * a_g)
        dz_f = total * ((a_f - a_f * a_f) * c_prev)
        dz_g = total * ((a_g * a_g - 1.0) * -0.5 * a_i)
        dz_o = (e * hs[None, :]) * ((a_o - a_o * a_o) * tanh_cell)
        tl.store(dc_ptr, (dc - dc_new) + total * a_f, mask=tmask)
        gz = _p(table, B_GZ, DT) + t.to(tl.int64) * B * G + aoffs
        tl.store(gz, dz_i, mask=tmask)
        tl.store(gz + H, dz_f, mask=tmask)
        tl.store(gz + 2 * H, dz_g, mask=tmask)
        tl.store(gz + 3 * H, dz_o, mask=tmask)
        # -- through the recurrent site ------------------------------------------------------------------
        _recurrent_grad(table, dz_i, 0, t, B, H, rows, units, umask, tmask, w, m, DT, OP_DT, ROUND, INTERPRET, REC, REC_SCALE_PER_STEP, MASKED)
        _recurrent_grad(table, dz_f, 1, t, B, H, rows, units, umask, tmask, w, m, DT, OP_DT, ROUND, INTERPRET, REC, REC_SCALE_PER_STEP, MASKED)
        _recurrent_grad(table, dz_g, 2, t, B, H, rows, units, umask, tmask, w, m, DT, OP_DT, ROUND, INTERPRET, REC, REC_SCALE_PER_STEP, MASKED)
        _recurrent_grad(table, dz_o, 3, t, B, H, rows, units, umask, tmask, w, m, DT, OP_DT, ROUND, INTERPRET, REC, REC_SCALE_PER_STEP, MASKED)


@triton.jit(do_not_specialize=["dy_off", "xhat_off", "rstd_off", "out_off", "out2_off", "R", "F"])
def row_backward(
    table, DY: tl.constexpr, dy_off, XHAT: tl.constexpr, xhat_off, RSTD: tl.constexpr, rstd_off, GAMMA: tl.constexpr,
    OUT: tl.constexpr, out_off, OUT2: tl.constexpr, out2_off, R, F,
    DT: tl.constexpr, OP_DT: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr,
    CENTER: tl.constexpr, HAS_OUT2: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    """∂L/∂u of ``y = γ x̂`` under row statistics (eq. 14) for ``R`` rows of ``F``, into ``OUT`` and,
    with ``HAS_OUT2``, as a product operand into ``OUT2``. Two passes over each row block."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    row_offs = rows.to(tl.int64)[:, None] * F
    dy_ptr = _p(table, DY, DT) + dy_off + row_offs
    xhat_ptr = _p(table, XHAT, DT) + xhat_off + row_offs
    gamma_ptr = _p(table, GAMMA, DT)
    sum_g = tl.zeros((BR,), dtype=DT)
    sum_gx = tl.zeros((BR,), dtype=DT)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        cmask = cols < F
        tile = rmask[:, None] & cmask[None, :]
        g = tl.load(dy_ptr + cols[None, :], mask=tile, other=0.0) * tl.load(gamma_ptr + cols, mask=cmask, other=0.0)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * tl.load(xhat_ptr + cols[None, :], mask=tile, other=0.0), axis=1)
    mean_g = tl.zeros((BR,), dtype=DT)
    if CENTER:  # RMS: no mean was subtracted, so no mean term
        mean_g = sum_g / F
    mean_gx = sum_gx / F
    rstd = tl.load(_p(table, RSTD, DT) + rstd_off + rows, mask=rmask, other=0.0)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        cmask = cols < F
        tile = rmask[:, None] & cmask[None, :]
        g = tl.load(dy_ptr + cols[None, :], mask=tile, other=0.0) * tl.load(gamma_ptr + cols, mask=cmask, other=0.0)[None, :]
        xhat = tl.load(xhat_ptr + cols[None, :], mask=tile, other=0.0)
        du = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(_p(table, OUT, DT) + out_off + row_offs + cols[None, :], du, mask=tile)
        if HAS_OUT2:
            tl.store(_p(table, OUT2, OP_DT) + out2_off + row_offs + cols[None, :], _operand(du, ROUND, INTERPRET), mask=tile)


@triton.jit(do_not_specialize=["B", "F"])
def batch_backward_steps(
    table, B, F, DT: tl.constexpr, MASKED: tl.constexpr, WEIGHTS_PER_STEP: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """The input site's batch-statistics backward (eq. 13) for every step, one program per (step,
    column block), after the time loop: ``B_GU`` and the sums behind γ's and β's gradients."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rows = tl.arange(0, BB)
    rmask = rows < B
    cmask = cols < F
    tile = rmask[:, None] & cmask[None, :]
    step = t.to(tl.int64) * B * F
    offs = rows[:, None] * F + cols[None, :]
    w, m = _weights_and_mask(table, B_WEIGHTS, B_MASK, t, B, rows, True, MASKED, WEIGHTS_PER_STEP, DT, BB)
    dy = tl.load(_p(table, B_GZ, DT) + step + offs, mask=tile, other=0.0)
    du = _batch_site_grad(
        table, dy, B_IN_NORM, B_IN_RSTD, B_IN_SCALE, B_IN_SUM1, B_IN_SUM2, step, t.to(tl.int64) * F, offs, cols, cmask, tile, w, m, DT, MASKED
    )
    tl.store(_p(table, B_GU, DT) + step + offs, du, mask=tile)
