"""masked_conv2d, Triton backend: an implicit GEMM over NCHW (no unfold tensor in memory).

Backend signature (see reference.py): conv2d(x, trainable_weight, frozen_weight, trainable_bias,
frozen_bias, in_task, out_task, out_min_task, slot, stride, padding, dilation, plan, taylor_score) -> y.

GEMM view: rows m = (n, oh, ow), columns = output channels, reduction k = (ci, kh, kw); the input
patch element of (m, k) is gathered straight from x with bounds masks for the zero padding. The
mask rule, windows, storage selection and NaN-safety are those of the linear kernels
(``ops/triton_common.py``): a synapse ci -> co is live by the states of ci and co.
* dX: rows (n, ih, iw), columns ci, reduction (co, kh, kw); a (co, kh, kw) contributes to ih when
  ih + pad - kh·dil is a multiple of the stride inside the output.
* dW/db: FREE rows only, tiles without FREE rows skipped; PRUNED rows of the trainable storage get 0.
* Taylor score: |Σ_{n,h,w} a·g| / N per output channel.
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

DENSE_SHORTCUT = True  # all FREE, all inputs live, no Taylor: torch's own conv (see linear/triton.py)


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [N, C_in, H, W] by strides
    wt_ptr, wf_ptr,  # [n_trainable, C_in*KH*KW], [n_frozen, C_in*KH*KW] contiguous rows
    bt_ptr, bf_ptr,
    in_task_ptr, out_task_ptr, out_min_ptr, slot_ptr,
    y_ptr,  # [N, C_out, OH, OW] contiguous
    C_out, H, W, OH, OW, M, K,
    s_xn, s_xc, s_xh, s_xw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < C_out
    n_i = o_m // (OH * OW)
    r = o_m % (OH * OW)
    ih0 = (r // OW) * SH - PH
    iw0 = (r % OW) * SW - PW
    task = tl.load(out_task_ptr + o_n, mask=m_n, other=PRUNED_C).to(tl.int32)
    lo = tl.load(out_min_ptr + o_n, mask=m_n, other=0).to(tl.int32)
    slot = tl.load(slot_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    frozen = is_frozen_state(task)
    p_row = tl.where(frozen, wf_ptr + slot * K, wt_ptr + slot * K)

    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    remaining = task != PRUNED_C
    while any_true(remaining):
        in_w, t, lmin = window_of(remaining, task, lo)
        remaining = remaining & (~in_w)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            ci = o_k // (KH * KW)
            kk = o_k % (KH * KW)
            it = tl.load(in_task_ptr + ci, mask=m_k, other=PRUNED_C).to(tl.int32)
            live_k = m_k & input_live(it, t, lmin)
            ih = ih0[:, None] + (kk // KW)[None, :] * DH
            iw = iw0[:, None] + (kk % KW)[None, :] * DW
            m_x = (m_m[:, None] & live_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            x = tl.load(x_ptr + n_i[:, None] * s_xn + ci[None, :] * s_xc + ih * s_xh + iw * s_xw,
                        mask=m_x, other=0.0)
            w = tl.load(p_row[:, None] + o_k[None, :], mask=in_w[:, None] & live_k[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        out = tl.where(in_w[None, :], acc, out)

    live = task != PRUNED_C
    if HAS_BIAS:
        p_b = tl.where(frozen, bf_ptr + slot, bt_ptr + slot)
        b = tl.load(p_b, mask=live, other=0.0).to(ACC)
        out = out + b[None, :]
    out = tl.where(live[None, :], out, 0.0)
    p_y = y_ptr + n_i[:, None] * (C_out * OH * OW) + o_n[None, :].to(tl.int64) * (OH * OW) + r[:, None]
    tl.store(p_y, out.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _conv_dx_kernel(
    g_ptr,  # [N, C_out, OH, OW] by strides
    wt_ptr, wf_ptr,
    in_task_ptr, out_task_ptr, out_min_ptr, slot_ptr,
    dx_ptr,  # [N, C_in, H, W] contiguous
    C_in, H, W, OH, OW, M, KR, K,  # M = N*H*W, KR = C_out*KH*KW, K = C_in*KH*KW (weight row length)
    s_gn, s_gc, s_gh, s_gw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N: input channels
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_c = o_c < C_in
    n_i = o_m // (H * W)
    r = o_m % (H * W)
    ih = (r // W).to(tl.int32)
    iw = (r % W).to(tl.int32)
    it = tl.load(in_task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, KR, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < KR
        co = o_k // (KH * KW)
        kk = o_k % (KH * KW)
        kh = kk // KW
        kw = kk % KW
        task = tl.load(out_task_ptr + co, mask=m_k, other=PRUNED_C).to(tl.int32)
        lo = tl.load(out_min_ptr + co, mask=m_k, other=0).to(tl.int32)
        slot = tl.load(slot_ptr + co, mask=m_k, other=0).to(tl.int64)
        frozen = is_frozen_state(task)
        p_row = tl.where(frozen, wf_ptr + slot * K, wt_ptr + slot * K) + kk  # + ci * KH*KW below
        oh_s = ih[:, None] + PH - kh[None, :] * DH
        ow_s = iw[:, None] + PW - kw[None, :] * DW
        oh = oh_s // SH
        ow = ow_s // SW
        m_g = ((oh_s >= 0) & (ow_s >= 0) & (oh_s - oh * SH == 0) & (ow_s - ow * SW == 0)
               & (oh < OH) & (ow < OW) & m_m[:, None])
        remaining = m_k & (task != PRUNED_C)
        while any_true(remaining):
            in_w, t, lmin = window_of(remaining, task, lo)
            remaining = remaining & (~in_w)
            live_c = m_c & input_live(it, t, lmin)
            g = tl.load(g_ptr + n_i[:, None] * s_gn + co[None, :].to(tl.int64) * s_gc + oh * s_gh + ow * s_gw,
                        mask=m_g & in_w[None, :], other=0.0)
            w = tl.load(p_row[:, None] + o_c[None, :] * (KH * KW), mask=in_w[:, None] & live_c[None, :],
                        other=0.0)
            if DOT_FP32:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.where(live_c[None, :], tl.dot(g, w, acc, input_precision=PREC), acc)
    p_dx = dx_ptr + n_i[:, None] * (C_in * H * W) + o_c[None, :].to(tl.int64) * (H * W) + r[:, None]
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])


@triton.jit
def _conv_dw_kernel(
    g_ptr,  # [N, C_out, OH, OW] by strides
    x_ptr,  # [N, C_in, H, W] by strides
    in_task_ptr, out_task_ptr, out_min_ptr, slot_ptr,
    dw_ptr,  # [n_trainable, K] contiguous
    db_ptr,
    C_out, H, W, OH, OW, M, K,
    s_gn, s_gc, s_gh, s_gw, s_xn, s_xc, s_xh, s_xw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n = o_n < C_out
    m_k = o_k < K
    task = tl.load(out_task_ptr + o_n, mask=m_n, other=0).to(tl.int32)  # padding rows act frozen
    trainable = m_n & (~is_frozen_state(task))
    if any_true(trainable):
        lo = tl.load(out_min_ptr + o_n, mask=m_n, other=0).to(tl.int32)
        slot = tl.load(slot_ptr + o_n, mask=m_n, other=0).to(tl.int64)
        ci = o_k // (KH * KW)
        kk = o_k % (KH * KW)
        it = tl.load(in_task_ptr + ci, mask=m_k, other=PRUNED_C).to(tl.int32)
        dw = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        remaining = m_n & (task == FREE_C)
        while any_true(remaining):
            in_w, t, lmin = window_of(remaining, task, lo)
            remaining = remaining & (~in_w)
            live_k = m_k & input_live(it, t, lmin)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
            acc_b = tl.zeros([BLOCK_N], dtype=ACC)
            for m0 in range(0, M, BLOCK_M):
                o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                m_m = o_m < M
                n_i = o_m // (OH * OW)
                r = o_m % (OH * OW)
                oh = r // OW
                ow = r % OW
                g = tl.load(g_ptr + n_i[:, None] * s_gn + o_n[None, :].to(tl.int64) * s_gc
                            + (oh * s_gh + ow * s_gw)[:, None],
                            mask=m_m[:, None] & in_w[None, :], other=0.0)
                ih = (oh * SH - PH)[:, None] + (kk // KW)[None, :] * DH
                iw = (ow * SW - PW)[:, None] + (kk % KW)[None, :] * DW
                m_x = m_m[:, None] & live_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x = tl.load(x_ptr + n_i[:, None] * s_xn + ci[None, :] * s_xc + ih * s_xh + iw * s_xw,
                            mask=m_x, other=0.0)
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

def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometry(stride, padding, dilation):
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def conv_forward(x, tw, fw, tb, fb, in_task, out_task, out_min_task, slot, kernel_size, stride, padding, dilation):
    N, C_in, H, W = x.shape
    KH, KW = kernel_size
    C_out = out_task.numel()
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    y = torch.empty((N, C_out, OH, OW), dtype=x.dtype, device=x.device)
    M, K = N * OH * OW, C_in * KH * KW
    if y.numel() == 0:
        return y
    tw = tw.reshape(tw.shape[0], K).contiguous()
    fw = frozen_or_dummy(fw, tw).reshape(-1, K).contiguous()
    has_bias = tb is not None
    if has_bias:
        tb = tb.contiguous()
        fb = frozen_or_dummy(fb, tb).contiguous()
    cfg = gemm_blocks("fwd", x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C_out, cfg["BLOCK_N"]))
    _conv_fwd_kernel[grid](
        x, tw, fw, tb if has_bias else tw, fb if has_bias else tw, in_task, out_task, out_min_task, slot, y,
        C_out, H, W, OH, OW, M, K, *x.stride(), **_geometry(stride, padding, dilation), KH=KH, KW=KW,
        HAS_BIAS=has_bias, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype, x.device), DOT_FP32=dot_in_fp32(x.dtype), **cfg)
    return y


def conv_input_grad(g, tw, fw, in_task, out_task, out_min_task, slot, x_shape, kernel_size, stride, padding,
                    dilation):
    N, C_in, H, W = x_shape
    KH, KW = kernel_size
    C_out, OH, OW = g.shape[1:]
    dx = torch.empty(x_shape, dtype=g.dtype, device=g.device)
    K = C_in * KH * KW
    if dx.numel() == 0:
        return dx
    tw = tw.reshape(tw.shape[0], K).contiguous()
    fw = frozen_or_dummy(fw, tw).reshape(-1, K).contiguous()
    cfg = gemm_blocks("dx", g.dtype)
    M = N * H * W
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C_in, cfg["BLOCK_N"]))
    _conv_dx_kernel[grid](
        g, tw, fw, in_task, out_task, out_min_task, slot, dx, C_in, H, W, OH, OW, M, C_out * KH * KW, K,
        *g.stride(), **_geometry(stride, padding, dilation), KH=KH, KW=KW,
        ACC=acc_type(g.dtype), PREC=dot_precision(g.dtype, g.device), DOT_FP32=dot_in_fp32(g.dtype), **cfg)
    return dx


def conv_weight_grad(g, x, n_trainable, has_bias, in_task, out_task, out_min_task, slot, kernel_size, stride,
                     padding, dilation):
    N, C_in, H, W = x.shape
    KH, KW = kernel_size
    C_out, OH, OW = g.shape[1:]
    K = C_in * KH * KW
    dw = torch.zeros((n_trainable, C_in, KH, KW), dtype=x.dtype, device=x.device)
    db = torch.zeros((n_trainable,) if has_bias else (0,), dtype=x.dtype, device=x.device)
    if n_trainable == 0:
        return dw, db
    M = N * OH * OW
    if M == 0 or K == 0:
        return dw.zero_(), db.zero_()
    cfg = gemm_blocks("dw", x.dtype)
    grid = (triton.cdiv(C_out, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _conv_dw_kernel[grid](
        g, x, in_task, out_task, out_min_task, slot, dw, db if has_bias else dw, C_out, H, W, OH, OW, M, K,
        *g.stride(), *x.stride(), **_geometry(stride, padding, dilation), KH=KH, KW=KW,
        HAS_BIAS=has_bias, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype, x.device), DOT_FP32=dot_in_fp32(x.dtype), **cfg)
    return dw, db


# ----- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("eidetic::triton_conv2d", mutates_args=())
def _conv_op(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
             trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor], in_task: torch.Tensor,
             out_task: torch.Tensor, out_min_task: torch.Tensor, slot: torch.Tensor, stride: list[int],
             padding: list[int], dilation: list[int], taylor_score: Optional[torch.Tensor]) -> torch.Tensor:
    return conv_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task,
                        out_min_task, slot, tuple(trainable_weight.shape[2:]), stride, padding, dilation)


@_conv_op.register_fake
def _(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task, slot,
      stride, padding, dilation, taylor_score):
    KH, KW = trainable_weight.shape[2:]
    OH = _out_size(x.shape[2], KH, stride[0], padding[0], dilation[0])
    OW = _out_size(x.shape[3], KW, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], out_task.shape[0], OH, OW))


@torch.library.custom_op("eidetic::triton_conv2d_backward", mutates_args=("taylor_score",))
def _conv_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, trainable_weight: torch.Tensor,
                      frozen_weight: torch.Tensor, has_bias: bool, in_task: torch.Tensor, out_task: torch.Tensor,
                      out_min_task: torch.Tensor, slot: torch.Tensor, stride: list[int], padding: list[int],
                      dilation: list[int], taylor_score: Optional[torch.Tensor], need_input_grad: bool,
                      need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ks = tuple(trainable_weight.shape[2:])
    if need_input_grad:
        dx = conv_input_grad(grad, trainable_weight, frozen_weight, in_task, out_task, out_min_task, slot, x.shape,
                             ks, stride, padding, dilation)
    else:
        dx = x.new_empty((0,))
    if need_weight_grad:
        dw, db = conv_weight_grad(grad, x, trainable_weight.shape[0], has_bias, in_task, out_task, out_min_task,
                                  slot, ks, stride, padding, dilation)
    else:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    if taylor_score is not None:
        n, c = y.shape[:2]
        add_taylor(taylor_score, y.reshape(n, c, -1), grad.reshape(n, c, -1), n)
    return dx, dw, db


@_conv_backward_op.register_fake
def _(grad, x, y, trainable_weight, frozen_weight, has_bias, in_task, out_task, out_min_task, slot, stride,
      padding, dilation, taylor_score, need_input_grad, need_weight_grad):
    dx = x.new_empty(x.shape if need_input_grad else (0,))
    dw = x.new_empty(trainable_weight.shape if need_weight_grad else (0,))
    db = x.new_empty((trainable_weight.shape[0],) if need_weight_grad and has_bias else (0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, tw, fw, tb, fb, in_task, out_task, out_min_task, slot, stride, padding, dilation, taylor_score = inputs
    ctx.has_bias = tb is not None
    ctx.taylor = taylor_score is not None
    ctx.geometry = (stride, padding, dilation)
    # the Taylor score reads a copy of the output: in-place ops after the layer may change the output itself
    ctx.save_for_backward(x, output.detach().clone() if ctx.taylor else None, tw, fw, tb, in_task, out_task,
                          out_min_task, slot, taylor_score)


def _backward(ctx, grad):
    x, y, tw, fw, tb, in_task, out_task, out_min_task, slot, taylor_score = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])
    nothing = (None,) * 13
    if not (need_dx or need_dw or ctx.taylor):
        return nothing
    if torch.is_grad_enabled():  # create_graph=True: gradients as a graph (see ops/double_backward.py)
        with torch.enable_grad():
            w = dense_weight(tw, fw, in_task, out_task, out_min_task, slot)
            y_graph = attach_taylor_hook(F.conv2d(x, w, trainable_bias(tb, fw.shape[0], out_task, slot),
                                                  *ctx.geometry), taylor_score, 1)
        dx, dw, db = graph_grads(y_graph, (x, tw, tb), (need_dx, ctx.needs_input_grad[1],
                                                         ctx.has_bias and ctx.needs_input_grad[3]), grad)
        return (dx, dw, None, db) + nothing[4:]
    dx, dw, db = _conv_backward_op(grad, x, y if ctx.taylor else x, tw, fw, ctx.has_bias, in_task, out_task,
                                   out_min_task, slot, *ctx.geometry, taylor_score, need_dx, need_dw)
    return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None) + nothing[4:]


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def conv2d(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task, slot,
           stride, padding, dilation, plan=None, taylor_score=None):
    """Backend entry point (signature of reference.conv2d); ``plan`` is only used for the dense shortcut."""
    if isinstance(padding, str):
        raise ValueError(f"the Triton conv2d takes explicit integer padding, got {padding!r} "
                         "(EideticConv2d resolves 'same'/'valid' to ints)")
    stride, padding, dilation = (list(stride), list(padding), list(dilation))
    if DENSE_SHORTCUT and taylor_score is None and plan is not None and plan.all_trainable_dense:
        return F.conv2d(x, trainable_weight, trainable_bias, stride, padding, dilation)
    if out_min_task is None:
        out_min_task = torch.zeros_like(out_task)
    return _conv_op(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task,
                    out_min_task, slot, stride, padding, dilation, taylor_score)
