"""The Triton implementation's forward and backward time loops: the op's buffers in, the schema's results out.

Both fill exactly the buffers of :mod:`rnorm.kernels.schema` (allocated by
:func:`~rnorm.kernels.buffers.allocate_outputs` and
:func:`~rnorm.kernels.backward.allocate_grad_buffers`, as every implementation does) and the
backward ends in :func:`~rnorm.kernels.backward.finish`, so what the torch-ops loop, the compiled
CPU kernels and these kernels save and return is one contract.

What runs where (equation numbers of ``docs/fused_backward.md``):

* **Before the loop**, the input site of every step at once — its statistics do not depend on the
  recurrence: ``W_x x_t`` for all ``t`` in one product, then batch (eq. 9) or row (eq. 10)
  statistics over every step in one launch. The loop's kernels read the result.
* **The loop** (:mod:`~rnorm.kernels.triton.graphs` captures it), one step per launch: the
  recurrent product and everything after it (eq. 4–11); backward (11′–16) likewise.
* **After the backward loop**, the input site's backward for every step in one launch, and the
  weights', scales' and shifts' gradients as large operations (``finish``, eq. 17–20).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl
from torch import Tensor

from rnorm.kernels.backward import allocate_grad_buffers, finish
from rnorm.kernels.buffers import allocate_outputs, site_buffers
from rnorm.kernels.schema import BackwardArgs, Gradients, RecurrenceArgs, RecurrenceOutputs, present
from rnorm.kernels.triton import kernels as k
from rnorm.kernels.triton.graphs import GRAPHS, Program, stream_key
from rnorm.kernels.triton.plan import BackwardPlan, ForwardPlan, columns_per_program, pow2
from rnorm.kernels.triton.products import matmul, to_operand

__all__ = ["INTERPRET", "backward", "forward"]

#: Whether the kernels were loaded as Triton's interpreter runs them (``triton.jit`` decides when it
#: decorates them, from ``TRITON_INTERPRET``).
INTERPRET = type(k.forward_step).__name__ == "InterpretedFunction"

_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: Rows per program and features per chunk of the row kernels; columns per program of the batch kernels.
_ROWS, _FEATURES = 8, 256


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _bind(table: Tensor, buffers: dict[int, Tensor | None], slots: int, dummy: Tensor) -> None:
    """Write the addresses of ``buffers`` (by slot) into ``table``; absent slots point at ``dummy``
    (never read: the kernels' constexpr flags skip them)."""
    by_slot = {int(getattr(slot, "value", slot)): tensor for slot, tensor in buffers.items()}  # tl.constexpr keys
    tensors = [by_slot.get(slot) for slot in range(slots)]
    tensors = [t if t is not None and present(t) else dummy for t in tensors]
    tensors += [dummy] * (-len(tensors) % k.TABLE_CHUNK)
    for start in range(0, len(tensors), k.TABLE_CHUNK):
        k.write_table[(1,)](table, start, *tensors[start : start + k.TABLE_CHUNK])


def _row_launch(plan: ForwardPlan | BackwardPlan, rows: int, features: int) -> tuple[tuple[int], dict]:
    block_f = min(_FEATURES, pow2(features))
    return (_cdiv(rows, _ROWS),), dict(DT=_DTYPES[plan.dtype], BR=_ROWS, BF=block_f)


def _column_block(batch: int, features: int) -> tuple[int, int]:
    """``(BB, BC)`` of the whole-batch column kernels."""
    block_batch = pow2(batch)
    return block_batch, columns_per_program(block_batch, features)


def _step_constants(plan: ForwardPlan | BackwardPlan) -> dict:
    """The constexpr arguments both step kernels take, from the plan."""
    return dict(
        DT=_DTYPES[plan.dtype],
        OP_DT=_DTYPES[plan.operand_dtype],
        ROUND=plan.round,
        INTERPRET=plan.interpret,
        DOT_PRECISION=plan.dot_precision,
        INLINE=plan.inline,
        REC=plan.rec,
        REC_SCALE_PER_STEP=plan.rec_scale_per_step,
        CELL=plan.cell,
        CELL_SCALE_PER_STEP=plan.cell_scale_per_step,
        HSCALE=plan.hidden_scale,
        MASKED=plan.masked,
        WEIGHTS_PER_STEP=plan.weights_per_step,
        BB=plan.block_batch,
        BH=plan.block_hidden,
        BK=plan.block_k,
        num_warps=plan.num_warps,
    )


# -- forward ---------------------------------------------------------------------------------------


def _forward_workspace(plan: ForwardPlan, like: Tensor) -> dict[str, Tensor]:
    B, H = plan.batch, plan.hidden
    new = like.new_empty
    workspace = {
        "h_state": new(2, B, H),
        "c_state": new(2, B, H),
        "h_op": new(2, B, H, dtype=plan.operand_dtype),
        "wt_op": new(H, 4 * H, dtype=plan.operand_dtype),
        "r": new(B, 4 * H) if not plan.inline else None,
        "c_new": new(B, H) if plan.cell == 3 else None,
        "table": new(k.FORWARD_SLOTS + k.TABLE_CHUNK, dtype=torch.int64),
        "eps": like.new_tensor(plan.eps),
        "dummy": new(1),
    }
    return {name: tensor for name, tensor in workspace.items() if tensor is not None}


def _forward_program(plan: ForwardPlan, like: Tensor) -> Program:
    workspace = _forward_workspace(plan, like)
    table = workspace["table"]
    T, B, H = plan.steps, plan.batch, plan.hidden
    G = 4 * H
    step_args = dict(
        _step_constants(plan),
        IN_MODE=plan.input_mode,
        IN_SCALE_PER_STEP=plan.input_scale_per_step,
        HAS_SHIFT=plan.has_shift,
        SHIFT_PER_STEP=plan.shift_per_step,
        HAS_CELL_SHIFT=plan.has_cell_shift,
        CELL_SHIFT_PER_STEP=plan.cell_shift_per_step,
        SAVE=plan.save,
    )
    rec_grid, rec_meta = _row_launch(plan, B, G)
    cell_grid, cell_meta = _row_launch(plan, B, H)
    split = plan.cell == 3  # a row-statistics cell site: the step in two parts around its statistics

    def launch() -> None:
        for t in range(T):
            s = t if plan.save else 0
            if not plan.inline:  # h_{t-1} W_h^T by torch.mm (eq. 4's recurrent term)
                matmul(workspace["h_op"][t % 2], workspace["wt_op"], out=workspace["r"])
            if plan.rec == 3:
                k.row_normalize[rec_grid](
                    table, k.F_R_WS, 0, k.F_R_NORM, s * B * G, k.F_R_RSTD, s * B, k.F_EPS, 1, B, G, CENTER=plan.rec_center, **rec_meta
                )
            k.forward_step[plan.grid](table, t, s, B, H, PART=1 if split else 0, **step_args)
            if split:
                k.row_normalize[cell_grid](
                    table, k.F_CNEW_WS, 0, k.F_C_NORM, s * B * H, k.F_C_RSTD, s * B, k.F_EPS, 2, B, H, CENTER=plan.cell_center, **cell_meta
                )
                k.forward_step[plan.grid](table, t, s, B, H, PART=2, **step_args)

    return Program(workspace, launch)


def _input_terms(args: RecurrenceArgs, plan: ForwardPlan, outputs: RecurrenceOutputs, buffers: dict[int, Tensor | None]) -> None:
    """The input site's buffers, and ``W_x x_t`` for every step in one product (plus every shift where
    the terms are complete, ``IN_MODE`` 0): the site's statistics come after the table is bound
    (:func:`_normalize_input`)."""
    T, B = plan.steps, plan.batch
    G = 4 * plan.hidden
    if args.input_kind == "given":
        buffers[k.F_BASE] = args.source.contiguous()
        return
    new = args.source.new_empty
    source = to_operand(args.source.reshape(T * B, -1), plan.round, plan.operand_dtype)
    weight_t = to_operand(args.input_weight, plan.round, plan.operand_dtype).t()  # (D, G)
    if plan.input_mode == 0:  # identity: the complete terms, every shift included (eq. 4)
        base = new(T, B, G)
        shift = args.shift
        if shift is not None and shift.shape[0] == 1:
            matmul(source, weight_t, out=base.view(T * B, G), add=shift)
        else:
            matmul(source, weight_t, out=base.view(T * B, G))
            if shift is not None:
                base.add_(shift.unsqueeze(1))
        buffers[k.F_BASE] = base
        return
    site = site_buffers(args, outputs, "input", scratch=not args.save)
    # Saving, the site's buffers hold every step; without, one step: the loop needs every step here.
    v = site.u if args.save else new(T, B, G)
    matmul(source, weight_t, out=v.view(T * B, G))
    buffers[k.F_IN_V] = v
    buffers[k.F_IN_SCALE] = args.input_scale.contiguous()
    buffers[k.F_SHIFT] = None if args.shift is None else args.shift.contiguous()
    if plan.input_code == 2:
        buffers[k.F_IN_RSTD] = site.rstd if args.save else new(T, 1, G)
        buffers[k.F_IN_MEAN], buffers[k.F_IN_VAR] = site.mean, site.var
    elif plan.input_code == 3:
        buffers[k.F_IN_RSTD] = site.rstd if args.save else new(T, B, 1)


def _normalize_input(plan: ForwardPlan, table: Tensor) -> None:
    """Batch (eq. 9) or row (eq. 10) statistics of the input terms of every step, in place, one launch."""
    T, B = plan.steps, plan.batch
    G = 4 * plan.hidden
    if plan.input_code == 2:
        block_batch, block_cols = _column_block(B, G)
        k.batch_normalize_steps[(T, _cdiv(G, block_cols))](
            table, k.F_IN_V, k.F_IN_RSTD, k.F_IN_MEAN, k.F_IN_VAR, k.F_IN_SCALE, 0, B, G,
            DT=_DTYPES[plan.dtype], WEIGHTS_PER_STEP=plan.weights_per_step, BB=block_batch, BC=block_cols,
        )  # fmt: skip
    elif plan.input_code == 3:
        grid, meta = _row_launch(plan, T * B, G)
        k.row_normalize[grid](table, k.F_IN_V, 0, k.F_IN_V, 0, k.F_IN_RSTD, 0, k.F_EPS, 0, T * B, G, CENTER=plan.input_center, **meta)


def _forward_buffers(args: RecurrenceArgs, plan: ForwardPlan, outputs: RecurrenceOutputs) -> dict[int, Tensor | None]:
    """The call's buffers by forward slot (the workspace's are added by the caller)."""
    B, H = plan.batch, plan.hidden
    new = args.source.new_empty
    saved = outputs.saved
    # The input site's buffers come with its terms (_input_terms).
    rec, cell = (site_buffers(args, outputs, site, scratch=not args.save) for site in ("recurrent", "cell"))
    statistics = outputs.statistics
    buffers: dict[int, Tensor | None] = {
        k.F_ACT: saved.act if args.save else new(1, B, 4 * H),
        k.F_TANHC: saved.tanh_cell if args.save else new(1, B, H),
        k.F_CELL_NEW: saved.cell_new,
        k.F_STATES_H: saved.states_h,
        k.F_STATES_C: saved.states_c,
        k.F_OUT: outputs.output,
        k.F_R_RAW: rec.raw,
        k.F_R_NORM: rec.norm,
        k.F_R_RSTD: rec.rstd,
        k.F_R_MEAN: statistics.recurrent_mean,
        k.F_R_VAR: statistics.recurrent_var,
        k.F_R_SCALE: None if args.recurrent_scale is None else args.recurrent_scale.contiguous(),
        k.F_C_NORM: cell.norm,
        k.F_C_RSTD: cell.rstd,
        k.F_C_MEAN: statistics.cell_mean,
        k.F_C_VAR: statistics.cell_var,
        k.F_C_SCALE: None if args.cell_scale is None else args.cell_scale.contiguous(),
        k.F_C_SHIFT: None if args.cell_shift is None else args.cell_shift.contiguous(),
        k.F_HSCALE: args.hidden_scale,
        k.F_MASK: None if args.mask is None else args.mask.to(args.source.dtype),
        k.F_WEIGHTS: args.weights.contiguous(),
    }
    _input_terms(args, plan, outputs, buffers)
    return buffers


def forward(args: RecurrenceArgs) -> RecurrenceOutputs:
    """``rnorm::lstm_recurrence`` with the Triton kernels (eq. 4–11): the results of
    :func:`~rnorm.kernels.buffers.allocate_outputs`, filled as every implementation fills them."""
    _check_mode()
    outputs, states_h = allocate_outputs(args)
    plan = ForwardPlan.of(args, interpret=INTERPRET)
    device = args.source.device
    buffers = _forward_buffers(args, plan, outputs)
    program = GRAPHS.program(("forward", plan, stream_key(device)), lambda: _forward_program(plan, args.source))
    ws = program.workspace
    buffers.update({k.F_H_STATE: ws["h_state"], k.F_C_STATE: ws["c_state"], k.F_H_OP: ws["h_op"], k.F_WT_OP: ws["wt_op"]})
    buffers.update({k.F_R_WS: ws.get("r"), k.F_CNEW_WS: ws.get("c_new"), k.F_EPS: ws["eps"]})
    _bind(ws["table"], buffers, k.FORWARD_SLOTS, ws["dummy"])
    # The workspace's inputs: the states at t = 0, W_h^T as the product's operand.
    ws["h_state"][0].copy_(args.h0)
    ws["c_state"][0].copy_(args.c0)
    ws["h_op"][0].copy_(to_operand(args.h0, plan.round, plan.operand_dtype))
    ws["wt_op"].copy_(to_operand(args.recurrent_weight, plan.round, plan.operand_dtype).t())
    if args.save:
        states_h[0] = args.h0
        outputs.saved.states_c[0] = args.c0
    _normalize_input(plan, ws["table"])
    GRAPHS.run(program, device)
    last = plan.steps % 2
    outputs.h_n.copy_(ws["h_state"][last])
    outputs.c_n.copy_(ws["c_state"][last])
    return outputs


# -- backward --------------------------------------------------------------------------------------


def _backward_program(plan: BackwardPlan, like: Tensor) -> Program:
    B, H, T = plan.batch, plan.hidden, plan.steps
    G = 4 * H
    new = like.new_empty
    workspace = {
        "dh_carry": new(B, H),
        "dh_full": new(B, H),
        "dc": new(B, H),
        "dr_op": new(2, B, G, dtype=plan.operand_dtype),
        "w_op": new(G, H, dtype=plan.operand_dtype),
        "e": new(B, H),
        "d_cell": new(B, H),
        "table": new(k.BACKWARD_SLOTS + k.TABLE_CHUNK, dtype=torch.int64),
        "dummy": new(1),
    }
    table = workspace["table"]
    step_args = _step_constants(plan)
    row_args = dict(OP_DT=_DTYPES[plan.operand_dtype], ROUND=plan.round, INTERPRET=plan.interpret)
    rec_grid, rec_meta = _row_launch(plan, B, G)
    cell_grid, cell_meta = _row_launch(plan, B, H)
    split = plan.cell == 3

    def launch() -> None:
        for t in range(T - 1, -1, -1):
            has_next = int(t < T - 1)
            if has_next and not plan.inline:  # carry + dr_{t+1} W_h by torch.mm (eq. 16)
                matmul(workspace["dr_op"][(t + 1) % 2], workspace["w_op"], out=workspace["dh_full"], add=workspace["dh_carry"])
            k.backward_step[plan.grid](table, t, has_next, B, H, PART=1 if split else 0, **step_args)
            if split:  # the cell site's row statistics (eq. 14) between the two parts
                k.row_backward[cell_grid](
                    table, k.B_GCHAT, t * B * H, k.B_C_NORM, t * B * H, k.B_C_RSTD, t * B, k.B_C_SCALE,
                    k.B_DCELL_WS, 0, k.B_DCELL_WS, 0, B, H, CENTER=plan.cell_center, HAS_OUT2=False, **row_args, **cell_meta,
                )  # fmt: skip
                k.backward_step[plan.grid](table, t, has_next, B, H, PART=2, **step_args)
            if plan.rec == 3:  # the recurrent site's row statistics (eq. 14): dr_t and the next product's operand
                k.row_backward[rec_grid](
                    table, k.B_GZ, t * B * G, k.B_R_NORM, t * B * G, k.B_R_RSTD, t * B, k.B_R_SCALE,
                    k.B_GR, t * B * G, k.B_DR_OP, (t % 2) * B * G, B, G, CENTER=plan.rec_center, HAS_OUT2=True, **row_args, **rec_meta,
                )  # fmt: skip

    return Program(workspace, launch)


def _input_backward(args: BackwardArgs, plan: BackwardPlan, table: Tensor) -> None:
    """The input site's backward for every step after the loop: eq. 13 (batch) or eq. 14 (row)."""
    T, B = plan.steps, plan.batch
    G = 4 * plan.hidden
    if plan.input_code == 2:
        block_batch, block_cols = _column_block(B, G)
        k.batch_backward_steps[(T, _cdiv(G, block_cols))](
            table, B, G, DT=_DTYPES[plan.dtype], MASKED=plan.masked, WEIGHTS_PER_STEP=plan.weights_per_step, BB=block_batch, BC=block_cols
        )
    elif plan.input_code == 3:
        grid, meta = _row_launch(plan, T * B, G)
        k.row_backward[grid](
            table, k.B_GZ, 0, k.B_IN_NORM, 0, k.B_IN_RSTD, 0, k.B_IN_SCALE, k.B_GU, 0, k.B_GU, 0, T * B, G,
            OP_DT=_DTYPES[plan.operand_dtype], ROUND=plan.round, INTERPRET=plan.interpret,
            CENTER=plan.input_center, HAS_OUT2=False, **meta,
        )  # fmt: skip


def backward(args: BackwardArgs) -> Gradients:
    """``rnorm::lstm_recurrence_backward`` with the Triton kernels (eq. 11′–16 per step, then
    :func:`~rnorm.kernels.backward.finish` for eq. 17–20)."""
    _check_mode()
    saved = args.saved
    plan = BackwardPlan.of(args, interpret=INTERPRET)
    device = args.source.device
    grads = allocate_grad_buffers(args, in_loop=False)
    program = GRAPHS.program(("backward", plan, stream_key(device)), lambda: _backward_program(plan, saved.act))
    ws = program.workspace
    input_sums = grads.input_sums or (None, None)
    rec_sums = grads.recurrent_sums or (None, None)
    cell_sums = grads.cell_sums or (None, None)
    buffers: dict[int, Tensor | None] = {
        k.B_GO: args.grad_output.contiguous(),
        k.B_ACT: saved.act,
        k.B_TANHC: saved.tanh_cell,
        k.B_STATES_C: saved.states_c,
        k.B_MASK: None if args.mask is None else args.mask.to(saved.act.dtype),
        k.B_WEIGHTS: args.weights.contiguous(),
        k.B_HSCALE: args.hidden_scale,
        k.B_GCHAT: grads.grad_chat,
        k.B_GZ: grads.grad_z,
        k.B_GR: grads.grad_r,
        k.B_R_NORM: saved.recurrent_norm,
        k.B_R_RSTD: saved.recurrent_rstd,
        k.B_R_SCALE: None if args.recurrent_scale is None else args.recurrent_scale.contiguous(),
        k.B_R_SUM1: rec_sums[0],
        k.B_R_SUM2: rec_sums[1],
        k.B_C_NORM: saved.cell_norm,
        k.B_C_RSTD: saved.cell_rstd,
        k.B_C_SCALE: None if args.cell_scale is None else args.cell_scale.contiguous(),
        k.B_C_SUM1: cell_sums[0],
        k.B_C_SUM2: cell_sums[1],
        k.B_DH_CARRY: ws["dh_carry"],
        k.B_DH_FULL: ws["dh_full"],
        k.B_DC: ws["dc"],
        k.B_DR_OP: ws["dr_op"],
        k.B_W_OP: ws["w_op"],
        k.B_E_WS: ws["e"],
        k.B_DCELL_WS: ws["d_cell"],
        k.B_IN_NORM: saved.input_norm,
        k.B_IN_RSTD: saved.input_rstd,
        k.B_IN_SCALE: None if args.input_scale is None else args.input_scale.contiguous(),
        k.B_GU: grads.grad_u,
        k.B_IN_SUM1: input_sums[0],
        k.B_IN_SUM2: input_sums[1],
    }
    _bind(ws["table"], buffers, k.BACKWARD_SLOTS, ws["dummy"])
    ws["dh_carry"].copy_(args.grad_h_n)
    ws["dc"].copy_(args.grad_c_n)
    ws["w_op"].copy_(to_operand(args.recurrent_weight, plan.round, plan.operand_dtype))
    GRAPHS.run(program, device)
    # δh_{-1} = carry + dr_0 W_h (eq. 16 of step 0) and δc_{-1}: the gradients of h0 and c0.
    grad_h0 = matmul(ws["dr_op"][0], ws["w_op"], out=args.h0.new_empty(plan.batch, plan.hidden), add=ws["dh_carry"])
    grad_c0 = ws["dc"].clone()
    _input_backward(args, plan, ws["table"])
    return finish(args, grads, grad_h0, grad_c0)


def _check_mode() -> None:
    """The kernels were decorated for the interpreter or the GPU when this module was imported; a
    change of ``TRITON_INTERPRET`` since would run them the wrong way."""
    if (os.environ.get("TRITON_INTERPRET") == "1") != INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET changed after rnorm's Triton kernels were loaded "
            f"(loaded {'with' if INTERPRET else 'without'} the interpreter): set it before the first use, or restart."
        )
