"""masked_linear, Triton backend: y = x·(W⊙M)ᵀ + b with M computed in the kernels from the states.

Backend signature (see reference.py): linear(x, trainable_weight, frozen_weight, trainable_bias,
frozen_bias, in_task, out_task, out_min_task, slot, plan, taylor_score) -> y.

Kernels:
* forward: tile [BLOCK_M batch rows, BLOCK_N neurons]; each neuron's row is read from the trainable
  or the frozen storage at ``slot[i]``; for each input window present in the tile the dead inputs
  are selected away (masked loads) and only that window's rows keep the result. PRUNED -> exactly 0.
* dX: tile [BLOCK_M, BLOCK_K inputs], loop over neurons; per window, gradients of other rows are
  selected away and only inputs live for the window keep the product.
* dW/db: tile [BLOCK_N neurons, BLOCK_K inputs], loop over the batch; only FREE rows are computed
  (a tile without FREE rows costs no FLOPs), PRUNED rows of the trainable storage get 0.
* Taylor score (when asked): |Σ a·g| / batch per neuron, in the same backward op.

Registered as custom ops (``eidetic::triton_linear`` and its backward) so layers run under
torch.compile(fullgraph=True).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..double_backward import dense_weight, graph_grads, trainable_bias
from ..taylor import attach_taylor_hook
from ..triton_common import (FREE_C, acc_type, PRUNED_C, add_taylor, any_true, dot_in_fp32, dot_precision,
                             frozen_or_dummy, gemm_blocks, input_live, is_frozen_state, window_of)

# Dispatch the all-FREE, all-inputs-live layer without Taylor to torch's own GEMM (the layer *is*
# nn.Linear then). Tests and benchmarks set it to False to run the kernels on that case too.
DENSE_SHORTCUT = True


@triton.jit
def _linear_fwd_kernel(
    x_ptr,  # [M, K] by strides
    wt_ptr, wf_ptr,  # trainable [n_trainable, K], frozen [n_frozen, K] storages
    bt_ptr, bf_ptr,  # biases (unused without HAS_BIAS)
    in_task_ptr,  # int16[K]
    out_task_ptr, out_min_ptr, slot_ptr,  # int16[N], int16[N], int32[N]
    y_ptr,  # [M, N] contiguous
    M, N, K,
    s_xm, s_xk, s_wtn, s_wfn,  # storages are contiguous along K
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    task = tl.load(out_task_ptr + o_n, mask=m_n, other=PRUNED_C).to(tl.int32)
    lo = tl.load(out_min_ptr + o_n, mask=m_n, other=0).to(tl.int32)
    slot = tl.load(slot_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    frozen = is_frozen_state(task)
    # each row's base pointer in the storage its state selects
    p_row = tl.where(frozen, wf_ptr + slot * s_wfn, wt_ptr + slot * s_wtn)

    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    remaining = task != PRUNED_C
    while any_true(remaining):
        in_w, t, lmin = window_of(remaining, task, lo)
        remaining = remaining & (~in_w)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            it = tl.load(in_task_ptr + o_k, mask=m_k, other=PRUNED_C).to(tl.int32)
            live_k = m_k & input_live(it, t, lmin)
            # masked loads are selects: a dead input or weight is never read, so never multiplied
            x = tl.load(x_ptr + o_m[:, None] * s_xm + o_k[None, :] * s_xk,
                        mask=m_m[:, None] & live_k[None, :], other=0.0)
            w = tl.load(p_row[:, None] + o_k[None, :],
                        mask=in_w[:, None] & live_k[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        out = tl.where(in_w[None, :], acc, out)  # rows of other windows may hold NaN here: dropped

    live = task != PRUNED_C
    if HAS_BIAS:
        p_b = tl.where(frozen, bf_ptr + slot, bt_ptr + slot)
        b = tl.load(p_b, mask=live, other=0.0).to(ACC)
        out = out + b[None, :]
    out = tl.where(live[None, :], out, 0.0)  # PRUNED: exactly 0
    tl.store(y_ptr + o_m[:, None] * N + o_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _linear_dx_kernel(
    g_ptr,  # [M, N] by strides (may be stride 0)
    wt_ptr, wf_ptr,
    in_task_ptr, out_task_ptr, out_min_ptr, slot_ptr,
    dx_ptr,  # [M, K] contiguous
    M, N, K,
    s_gm, s_gn, s_wtn, s_wfn,
    PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    o_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_k = o_k < K
    it = tl.load(in_task_ptr + o_k, mask=m_k, other=PRUNED_C).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        task = tl.load(out_task_ptr + o_n, mask=m_n, other=PRUNED_C).to(tl.int32)
        lo = tl.load(out_min_ptr + o_n, mask=m_n, other=0).to(tl.int32)
        slot = tl.load(slot_ptr + o_n, mask=m_n, other=0).to(tl.int64)
        frozen = is_frozen_state(task)
        p_row = tl.where(frozen, wf_ptr + slot * s_wfn, wt_ptr + slot * s_wtn)
        remaining = task != PRUNED_C
        while any_true(remaining):
            in_w, t, lmin = window_of(remaining, task, lo)
            remaining = remaining & (~in_w)
            live_k = m_k & input_live(it, t, lmin)
            g = tl.load(g_ptr + o_m[:, None] * s_gm + o_n[None, :] * s_gn,
                        mask=m_m[:, None] & in_w[None, :], other=0.0)
            w = tl.load(p_row[:, None] + o_k[None, :],
                        mask=in_w[:, None] & live_k[None, :], other=0.0)
            if DOT_FP32:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.where(live_k[None, :], tl.dot(g, w, acc, input_precision=PREC), acc)
    tl.store(dx_ptr + o_m[:, None] * K + o_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_k[None, :])


@triton.jit
def _linear_dw_kernel(
    g_ptr,  # [M, N] by strides
    x_ptr,  # [M, K] by strides
    in_task_ptr, out_task_ptr, out_min_ptr, slot_ptr,
    dw_ptr,  # [n_trainable, K] contiguous
    db_ptr,  # [n_trainable] (unused without HAS_BIAS)
    M, N, K,
    s_gm, s_gn, s_xm, s_xk,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    task = tl.load(out_task_ptr + o_n, mask=m_n, other=0).to(tl.int32)  # padding rows act frozen: skipped
    trainable = m_n & (~is_frozen_state(task))
    if any_true(trainable):  # a tile of frozen rows has nothing to write and nothing to compute
        lo = tl.load(out_min_ptr + o_n, mask=m_n, other=0).to(tl.int32)
        slot = tl.load(slot_ptr + o_n, mask=m_n, other=0).to(tl.int64)
        it = tl.load(in_task_ptr + o_k, mask=m_k, other=PRUNED_C).to(tl.int32)
        dw = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        remaining = m_n & (task == FREE_C)  # PRUNED rows keep 0
        while any_true(remaining):
            in_w, t, lmin = window_of(remaining, task, lo)
            remaining = remaining & (~in_w)
            live_k = m_k & input_live(it, t, lmin)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
            acc_b = tl.zeros([BLOCK_N], dtype=ACC)
            for m0 in range(0, M, BLOCK_M):
                o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                m_m = o_m < M
                g = tl.load(g_ptr + o_m[:, None] * s_gm + o_n[None, :] * s_gn,
                            mask=m_m[:, None] & in_w[None, :], other=0.0)
                x = tl.load(x_ptr + o_m[:, None] * s_xm + o_k[None, :] * s_xk,
                            mask=m_m[:, None] & live_k[None, :], other=0.0)
                if HAS_BIAS:
                    acc_b += tl.sum(g.to(ACC), axis=0)
                if DOT_FP32:
                    g = g.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(tl.trans(g), x, acc, input_precision=PREC)
            dw = tl.where(in_w[:, None], acc, dw)
            db = tl.where(in_w, acc_b, db)
        tl.store(dw_ptr + slot[:, None] * K + o_k[None, :], dw.to(dw_ptr.dtype.element_ty),
                 mask=trainable[:, None] & m_k[None, :])
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(db_ptr + slot, db.to(db_ptr.dtype.element_ty), mask=trainable)


# ----- host functions ------------------------------------------------------------------------------

def _zeros_min_task(out_task):
    return torch.zeros_like(out_task)


def linear_forward(x2, tw, fw, tb, fb, in_task, out_task, out_min_task, slot, out=None) -> torch.Tensor:
    """x2 [M, K] -> y [M, N] (contiguous; written into ``out`` when given) through the forward kernel."""
    M, K = x2.shape
    N = out_task.numel()
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device) if out is None else out
    if M == 0 or N == 0:
        return y
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    if tb is not None:
        tb = tb.contiguous()
        fb = frozen_or_dummy(fb, tb).contiguous()
    cfg = gemm_blocks("fwd", x2.dtype)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    has_bias = tb is not None
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _linear_fwd_kernel[grid](
        x2, tw, fw, tb if has_bias else tw, fb if has_bias else tw, in_task, out_task, out_min_task, slot, y,
        M, N, K, x2.stride(0), x2.stride(1), tw.stride(0), fw.stride(0),
        HAS_BIAS=has_bias, ACC=acc_type(x2.dtype), PREC=dot_precision(x2.dtype, x2.device), DOT_FP32=dot_in_fp32(x2.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def linear_input_grad(g2, tw, fw, in_task, out_task, out_min_task, slot, K) -> torch.Tensor:
    M, N = g2.shape
    dx = torch.empty((M, K), dtype=g2.dtype, device=g2.device)
    if M == 0 or K == 0:
        return dx
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    cfg = gemm_blocks("dx", g2.dtype)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    _linear_dx_kernel[grid](
        g2, tw, fw, in_task, out_task, out_min_task, slot, dx, M, N, K,
        g2.stride(0), g2.stride(1), tw.stride(0), fw.stride(0),
        ACC=acc_type(g2.dtype), PREC=dot_precision(g2.dtype, g2.device), DOT_FP32=dot_in_fp32(g2.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx


def linear_weight_grad(g2, x2, n_trainable, has_bias, in_task, out_task, out_min_task, slot):
    M, N = g2.shape
    K = x2.shape[1]
    dw = torch.zeros((n_trainable, K), dtype=x2.dtype, device=x2.device)
    db = torch.zeros((n_trainable,) if has_bias else (0,), dtype=x2.dtype, device=x2.device)
    if n_trainable == 0:
        return dw, db
    if M == 0 or K == 0:
        return dw.zero_(), db.zero_()
    cfg = gemm_blocks("dw", x2.dtype)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(N, BN), triton.cdiv(K, BK))
    _linear_dw_kernel[grid](
        g2, x2, in_task, out_task, out_min_task, slot, dw, db if has_bias else dw, M, N, K,
        g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
        HAS_BIAS=has_bias, ACC=acc_type(x2.dtype), PREC=dot_precision(x2.dtype, x2.device), DOT_FP32=dot_in_fp32(x2.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, db


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ----- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("eidetic::triton_linear", mutates_args=())
def _linear_op(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
               trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor],
               in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor, slot: torch.Tensor,
               taylor_score: Optional[torch.Tensor]) -> torch.Tensor:
    # allocated at its final shape and returned as is: a view of it would forbid in-place ops after the layer
    y = x.new_empty((*x.shape[:-1], out_task.numel()))
    linear_forward(_flat(x), trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task,
                   out_min_task, slot, out=y.view(-1, out_task.numel()))
    return y


@_linear_op.register_fake
def _(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task, slot,
      taylor_score):
    return x.new_empty((*x.shape[:-1], out_task.shape[0]))


@torch.library.custom_op("eidetic::triton_linear_backward", mutates_args=("taylor_score",))
def _linear_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, trainable_weight: torch.Tensor,
                        frozen_weight: torch.Tensor, has_bias: bool, in_task: torch.Tensor,
                        out_task: torch.Tensor, out_min_task: torch.Tensor, slot: torch.Tensor,
                        taylor_score: Optional[torch.Tensor], need_input_grad: bool,
                        need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g2 = _flat(grad)
    x2 = _flat(x)
    K = x.shape[-1]
    if need_input_grad:
        dx = linear_input_grad(g2, trainable_weight, frozen_weight, in_task, out_task, out_min_task, slot, K)
        dx = dx.view(x.shape)
    else:
        dx = x.new_empty((0,))
    if need_weight_grad:
        dw, db = linear_weight_grad(g2, x2, trainable_weight.shape[0], has_bias, in_task, out_task, out_min_task,
                                    slot)
    else:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    if taylor_score is not None:
        y2 = _flat(y)
        divisor = x.shape[0] if x.dim() > 2 else y2.shape[0]
        add_taylor(taylor_score, y2.unsqueeze(-1), g2.unsqueeze(-1), divisor)
    return dx, dw, db


@_linear_backward_op.register_fake
def _(grad, x, y, trainable_weight, frozen_weight, has_bias, in_task, out_task, out_min_task, slot, taylor_score,
      need_input_grad, need_weight_grad):
    dx = x.new_empty(x.shape if need_input_grad else (0,))
    dw = x.new_empty(trainable_weight.shape if need_weight_grad else (0,))
    db = x.new_empty((trainable_weight.shape[0],) if need_weight_grad and has_bias else (0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, tw, fw, tb, fb, in_task, out_task, out_min_task, slot, taylor_score = inputs
    ctx.has_bias = tb is not None
    ctx.taylor = taylor_score is not None
    # the Taylor score reads a copy of the output: in-place ops after the layer may change the output itself
    ctx.save_for_backward(x, output.detach().clone() if ctx.taylor else None, tw, fw, tb, in_task, out_task,
                          out_min_task, slot, taylor_score)


def _backward(ctx, grad):
    x, y, tw, fw, tb, in_task, out_task, out_min_task, slot, taylor_score = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])
    if not (need_dx or need_dw or ctx.taylor):
        return None, None, None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: gradients as a graph (see ops/double_backward.py)
        with torch.enable_grad():
            w = dense_weight(tw, fw, in_task, out_task, out_min_task, slot)
            y_graph = attach_taylor_hook(F.linear(x, w, trainable_bias(tb, fw.shape[0], out_task, slot)),
                                         taylor_score, -1)
        dx, dw, db = graph_grads(y_graph, (x, tw, tb), (need_dx, ctx.needs_input_grad[1],
                                                         ctx.has_bias and ctx.needs_input_grad[3]), grad)
        return (dx, dw, None, db) + (None,) * 6
    dx, dw, db = _linear_backward_op(grad, x, y if ctx.taylor else x, tw, fw, ctx.has_bias, in_task, out_task,
                                     out_min_task, slot, taylor_score, need_dx, need_dw)
    return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None, None, None, None, None, None, None)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task,
           slot, plan=None, taylor_score=None):
    """Backend entry point (signature of reference.linear); ``plan`` is only used for the dense shortcut."""
    if (DENSE_SHORTCUT and taylor_score is None and plan is not None and plan.all_trainable_dense):
        return F.linear(x, trainable_weight, trainable_bias)
    if out_min_task is None:
        out_min_task = _zeros_min_task(out_task)
    return _linear_op(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task,
                      out_min_task, slot, taylor_score)
