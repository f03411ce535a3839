"""masked_batch_norm, Triton backend.

Backend signature (see reference.py): batch_norm(x, running_mean, running_var, trainable_weight,
frozen_weight, trainable_bias, frozen_bias, channel_task, slot, training, momentum, eps, taylor_score,
constant_frozen, plan=None) -> y; ``plan`` is the layer's cached ``channel_order``.

The channel order (``channel_order``, host-built once per state change and view): the channels FREE first,
then frozen, then PRUNED (a view's hidden channels are PRUNED), with the size of each group. Every pass
launches one slice of it, so a pass reads only the channels that need it (on a task-major layer each group
is one contiguous range): a view of task t normalises the channels of tasks <= t and writes the others 0.
Per channel c of x viewed as [N, C, S] (L = N·S values per channel):
* batch statistics (FREE channels in training; every live channel without running statistics) come
  from a split reduction: programs (channel tile, split) each reduce one chunk with Welford/Chan
  merges of block statistics, a finalize kernel merges the splits. A small channel count thus still
  fills the GPU. The split depends on (C, S, L) only, so a channel's summation order never changes with
  the states. Frozen channels use their running statistics, which are never written.
* running statistics of FREE channels: lerp by ``momentum`` towards the batch mean and the unbiased
  batch variance, in a separate mutating op (an autograd op must be functional).
* PRUNED channels: exactly 0, written without reading x (so a NaN input stays out).
* backward: the same split reduction for Σg and Σg·x̂ over the channels that use them (FREE; frozen ones
  too when their dx uses batch statistics or a Taylor score is asked), then dx per element; the affine
  gradient reaches the trainable storage only (FREE rows; PRUNED rows 0); frozen affine rows get none. The
  Taylor score |Σ y·g| / N = |w·Σg·x̂ + b·Σg| / N falls out of the same sums. ``constant_frozen`` (frozen
  blocks as constants, see ``reference.py``): frozen channels get dx = 0 and no Taylor score, and nothing
  of theirs is read.
* ``COUNT`` (constexpr, off by default; ``triton_common.count_work``): the stats, normalisation, reduction
  and dx kernels add the (channel, value) elements of x they read to an int64 counter.
Tiles are [BLOCK_E values, BLOCK_C channels]: one channel per program when S > 1 (contiguous rows of
S), several channels side by side when S == 1 (BatchNorm1d on [N, C]).
Under ``torch.autocast`` the op runs in its input's dtype, as F.batch_norm. A layer whose channels are all
FREE, without Taylor scores, is handed to torch's batch norm (``DENSE_SHORTCUT``), as linear and conv2d are.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ...state import FREE, PRUNED
from ..double_backward import graph_grads
from . import reference
from ..triton_common import (_BLOCK_OVERRIDE, FP_FUSION, FREE_C, PRUNED_C, _counter, interpreting, is_frozen_state,
                             on_tensor_device, reduction_blocks, register_autocast, tensor_device)


# Dispatch a layer whose channels are all FREE (without Taylor scores) to torch's batch norm (the layer *is*
# nn.BatchNorm then). Tests and the compile check set it to False to run the kernels on that case too.
DENSE_SHORTCUT = True


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b correctly rounded, as torch divides: Triton's fp32 '/' is approximate on a GPU (div.full), its fp64
    '/' is exact, and div_rn takes fp32 only."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, ACC: tl.constexpr):
    """sqrt correctly rounded, as torch takes it (fp32 tl.sqrt is sqrt.approx on a GPU; sqrt_rn takes fp32 only)."""
    if ACC == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _batch_channels(task, m_c, USE_BATCH: tl.constexpr, HAS_STATS: tl.constexpr):
    """Bool[BLOCK_C]: channels normalised with batch statistics."""
    live = m_c & (task != PRUNED_C)
    if USE_BATCH:
        if HAS_STATS:
            return live & (task == FREE_C)
        else:
            return live
    else:
        return live & (task != task)  # eval with running statistics: none


@triton.jit
def _order_channels(order_ptr, lo, hi, BLOCK_C: tl.constexpr):
    """(channels, in range) of this program: entries [lo, hi) of the channel order, BLOCK_C per program."""
    o_i = lo + tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_i < hi
    return tl.load(order_ptr + o_i, mask=m_c, other=0).to(tl.int64), m_c


@triton.jit
def _store_zeros(out_ptr, o_c, m_c, start, end, C, S, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exact zeros into values [start, end) of channels ``o_c`` of a contiguous [N, C, S] output (nothing read)."""
    for e0 in range(start, end, BLOCK_E):
        o_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
        m = (o_e < end)[:, None] & m_c[None, :]
        tl.store(out_ptr + (o_e // S)[:, None] * (tl.cast(C, tl.int64) * S) + o_c[None, :] * S + (o_e % S)[:, None],
                 tl.zeros([BLOCK_E, BLOCK_C], dtype=out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_stats_kernel(
    x_ptr,  # [N, C, S] by strides
    order_ptr,  # int32[C]: channel order (FREE, frozen, PRUNED); this launch reduces entries [lo, hi)
    part_ptr,  # fp32 [3, C, SPLIT]: count, mean, M2 of each chunk (written for the launched channels only)
    work_ptr,  # int64[1] (COUNT only)
    C, lo, hi, S, L, CHUNK, SPLIT,
    s_xn, s_xc, s_xs,
    COUNT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    o_c, m_c = _order_channels(order_ptr, lo, hi, BLOCK_C)
    split = tl.program_id(1)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for e0 in range(start, end, BLOCK_E):
        o_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
        m = (o_e < end)[:, None] & m_c[None, :]
        v = tl.load(x_ptr + (o_e // S)[:, None] * s_xn + o_c[None, :] * s_xc + (o_e % S)[:, None] * s_xs,
                    mask=m, other=0.0).to(ACC)
        if COUNT:
            macs += tl.sum(tl.sum(m.to(tl.int64), axis=1), axis=0)
        nb = tl.sum(m.to(ACC), axis=0)
        mb = _div(tl.sum(v, axis=0), tl.maximum(nb, 1.0), ACC)
        d = tl.where(m, v - mb[None, :], 0.0)
        m2b = tl.sum(d * d, axis=0)
        # Chan et al.: merge the block's (count, mean, M2) into the running ones
        tot = cnt + nb
        frac = _div(nb, tl.maximum(tot, 1.0), ACC)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * cnt * frac
        cnt = tot
    p = part_ptr + o_c * SPLIT + split
    tl.store(p, cnt, mask=m_c)
    tl.store(p + C * SPLIT, mean, mask=m_c)
    tl.store(p + 2 * C * SPLIT, m2, mask=m_c)
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _bn_finalize_kernel(
    part_ptr,  # fp32 [3, C, SPLIT]: read for the channels with batch statistics only
    task_ptr,
    rm_ptr, rv_ptr,  # running statistics [C] (unused without HAS_STATS)
    mean_ptr, invstd_ptr,  # fp32 [C] out: statistics each channel is normalised with
    bmean_ptr, bvar_ptr,  # fp32 [C] out: batch mean and biased batch variance (0 where not reduced)
    C, SPLIT, eps_hi, eps_lo,  # eps = hi + lo: Triton passes Python floats as fp32
    HAS_STATS: tl.constexpr, USE_BATCH: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    task = tl.load(task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
    batch = _batch_channels(task, m_c, USE_BATCH, HAS_STATS)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    if USE_BATCH:
        for sp in range(0, SPLIT):
            p = part_ptr + o_c * SPLIT + sp
            nb = tl.load(p, mask=batch, other=0.0)
            mb = tl.load(p + C * SPLIT, mask=batch, other=0.0)
            m2b = tl.load(p + 2 * C * SPLIT, mask=batch, other=0.0)
            tot = cnt + nb
            frac = _div(nb, tl.maximum(tot, 1.0), ACC)
            delta = mb - mean
            mean = mean + delta * frac
            m2 = m2 + m2b + delta * delta * cnt * frac
            cnt = tot
    var = _div(m2, tl.maximum(cnt, 1.0), ACC)
    if HAS_STATS:
        rm = tl.load(rm_ptr + o_c, mask=m_c, other=0.0).to(ACC)
        rv = tl.load(rv_ptr + o_c, mask=m_c, other=1.0).to(ACC)
        mean_used = tl.where(batch, mean, rm)
        var_used = tl.where(batch, var, rv)
    else:
        mean_used = mean
        var_used = var
    tl.store(mean_ptr + o_c, mean_used, mask=m_c)
    eps = tl.zeros([BLOCK_C], dtype=ACC) + eps_hi + eps_lo  # added in ACC precision
    tl.store(invstd_ptr + o_c, _div(tl.full([BLOCK_C], 1.0, ACC), _sqrt(var_used + eps, ACC), ACC), mask=m_c)
    tl.store(bmean_ptr + o_c, mean, mask=m_c)
    tl.store(bvar_ptr + o_c, var, mask=m_c)


@triton.jit
def _bn_update_running_kernel(
    rm_ptr, rv_ptr,  # [C], updated in place for FREE channels
    bmean_ptr, bvar_ptr,  # fp32 [C]
    task_ptr, C, momentum_hi, momentum_lo, unbias_hi, unbias_lo,  # each float = hi + lo (fp32 pairs)
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    task = tl.load(task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
    upd = m_c & (task == FREE_C)  # frozen statistics never change; PRUNED ones are reset on recycling
    rm = tl.load(rm_ptr + o_c, mask=upd, other=0.0)
    rv = tl.load(rv_ptr + o_c, mask=upd, other=0.0)
    bm = tl.load(bmean_ptr + o_c, mask=upd, other=0.0)
    momentum = tl.zeros([BLOCK_C], dtype=ACC) + momentum_hi + momentum_lo  # added in ACC precision
    unbiased = tl.load(bvar_ptr + o_c, mask=upd, other=0.0) * (tl.zeros([BLOCK_C], dtype=ACC) + unbias_hi + unbias_lo)
    rm32 = rm.to(ACC)
    rv32 = rv.to(ACC)
    tl.store(rm_ptr + o_c, (rm32 + momentum * (bm - rm32)).to(rm.dtype), mask=upd)
    tl.store(rv_ptr + o_c, (rv32 + momentum * (unbiased - rv32)).to(rv.dtype), mask=upd)


@triton.jit
def _load_affine(t_ptr, f_ptr, slot, frozen, live, default, HAS: tl.constexpr, ACC: tl.constexpr):
    if HAS:
        return tl.load(tl.where(frozen, f_ptr + slot, t_ptr + slot), mask=live, other=default).to(ACC)
    else:
        return tl.zeros_like(slot.to(ACC)) + default


@triton.jit
def _bn_norm_kernel(
    x_ptr,  # [N, C, S] by strides
    y_ptr,  # [N, C, S] contiguous
    order_ptr,  # int32[C]: this launch writes the channels of entries [lo, hi)
    mean_ptr, invstd_ptr, task_ptr, slot_ptr,
    wt_ptr, wf_ptr, bt_ptr, bf_ptr,
    work_ptr,  # int64[1] (COUNT only)
    C, lo, hi, S, L, CHUNK,
    s_xn, s_xc, s_xs,
    ZERO: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """ZERO: the launch's channels are PRUNED (or hidden from a view): written exactly 0, nothing read."""
    o_c, m_c = _order_channels(order_ptr, lo, hi, BLOCK_C)
    split = tl.program_id(1)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, L)
    macs = tl.full([], 0, tl.int64)
    if ZERO:
        _store_zeros(y_ptr, o_c, m_c, start, end, C, S, BLOCK_E, BLOCK_C)
    else:
        task = tl.load(task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
        slot = tl.load(slot_ptr + o_c, mask=m_c, other=0).to(tl.int64)
        frozen = is_frozen_state(task)
        w = _load_affine(wt_ptr, wf_ptr, slot, frozen, m_c, 1.0, HAS_W, ACC)
        b = _load_affine(bt_ptr, bf_ptr, slot, frozen, m_c, 0.0, HAS_B, ACC)
        mean = tl.load(mean_ptr + o_c, mask=m_c, other=0.0)
        invstd = tl.load(invstd_ptr + o_c, mask=m_c, other=0.0)
        for e0 in range(start, end, BLOCK_E):
            o_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
            n = o_e // S
            s = o_e % S
            m = (o_e < end)[:, None] & m_c[None, :]
            v = tl.load(x_ptr + n[:, None] * s_xn + o_c[None, :] * s_xc + s[:, None] * s_xs, mask=m,
                        other=0.0).to(ACC)
            out = (v - mean[None, :]) * invstd[None, :] * w[None, :] + b[None, :]
            tl.store(y_ptr + n[:, None] * (tl.cast(C, tl.int64) * S) + o_c[None, :] * S + s[:, None],
                     out.to(y_ptr.dtype.element_ty), mask=m)
            if COUNT:
                macs += tl.sum(tl.sum(m.to(tl.int64), axis=1), axis=0)
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr, x_ptr,  # [N, C, S] by strides
    order_ptr,  # int32[C]: this launch reduces the channels of entries [lo, hi)
    mean_ptr, invstd_ptr,
    part_ptr,  # fp32 [2, C, SPLIT]: Σg, Σg·x̂ (zero-filled: channels not reduced sum to 0)
    work_ptr,  # int64[1] (COUNT only)
    C, lo, hi, S, L, CHUNK, SPLIT,
    s_gn, s_gc, s_gs, s_xn, s_xc, s_xs,
    COUNT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    o_c, m_c = _order_channels(order_ptr, lo, hi, BLOCK_C)
    split = tl.program_id(1)
    mean = tl.load(mean_ptr + o_c, mask=m_c, other=0.0)
    invstd = tl.load(invstd_ptr + o_c, mask=m_c, other=0.0)
    sg = tl.zeros([BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_C], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for e0 in range(start, end, BLOCK_E):
        o_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
        n = o_e // S
        s = o_e % S
        m = (o_e < end)[:, None] & m_c[None, :]
        g = tl.load(g_ptr + n[:, None] * s_gn + o_c[None, :] * s_gc + s[:, None] * s_gs, mask=m,
                    other=0.0).to(ACC)
        v = tl.load(x_ptr + n[:, None] * s_xn + o_c[None, :] * s_xc + s[:, None] * s_xs, mask=m,
                    other=0.0).to(ACC)
        xhat = (v - mean[None, :]) * invstd[None, :]
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(tl.where(m, g * xhat, 0.0), axis=0)
        if COUNT:
            macs += tl.sum(tl.sum(m.to(tl.int64), axis=1), axis=0)
    p = part_ptr + o_c * SPLIT + split
    tl.store(p, sg, mask=m_c)
    tl.store(p + C * SPLIT, sgx, mask=m_c)
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _bn_bwd_finalize_kernel(
    part_ptr,  # fp32 [2, C, SPLIT]
    task_ptr, slot_ptr,
    wt_ptr, wf_ptr, bt_ptr, bf_ptr,
    sums_ptr,  # fp32 [2, C] out: Σg, Σg·x̂
    dw_ptr, db_ptr,  # trainable storage gradients (unused without NEED_AFFINE)
    score_ptr,  # fp32 [C] Taylor score (unused without TAYLOR)
    C, SPLIT, inv_batch, constant_frozen,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_AFFINE: tl.constexpr, TAYLOR: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    task = tl.load(task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
    slot = tl.load(slot_ptr + o_c, mask=m_c, other=0).to(tl.int64)
    live = m_c & (task != PRUNED_C)
    frozen = is_frozen_state(task)
    sg = tl.zeros([BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_C], dtype=ACC)
    for sp in range(0, SPLIT):
        p = part_ptr + o_c * SPLIT + sp
        sg += tl.load(p, mask=m_c, other=0.0)
        sgx += tl.load(p + C * SPLIT, mask=m_c, other=0.0)
    tl.store(sums_ptr + o_c, sg, mask=m_c)
    tl.store(sums_ptr + C + o_c, sgx, mask=m_c)
    if NEED_AFFINE:
        # FREE channels only (dw, db start at 0): a channel seen as PRUNED may be a later task's frozen one
        # hidden by a view, whose slot indexes the frozen storage, past the end of dw and db
        free = m_c & (task == FREE_C)
        if HAS_W:
            tl.store(dw_ptr + slot, sgx.to(dw_ptr.dtype.element_ty), mask=free)
        if HAS_B:
            tl.store(db_ptr + slot, sg.to(db_ptr.dtype.element_ty), mask=free)
    if TAYLOR:
        # frozen channels as constants: their sums are not reduced and their scores get nothing (as PRUNED)
        scored = live & ~(frozen & (constant_frozen != 0))
        w = _load_affine(wt_ptr, wf_ptr, slot, frozen, live, 1.0, HAS_W, ACC)
        b = _load_affine(bt_ptr, bf_ptr, slot, frozen, live, 0.0, HAS_B, ACC)
        contrib = tl.where(scored, tl.abs((w * sgx + b * sg) * inv_batch), 0.0)
        old = tl.load(score_ptr + o_c, mask=m_c, other=0.0)
        tl.store(score_ptr + o_c, old + contrib, mask=m_c)


@triton.jit
def _bn_dx_kernel(
    g_ptr, x_ptr,  # [N, C, S] by strides
    dx_ptr,  # [N, C, S] contiguous
    order_ptr,  # int32[C]: this launch writes the channels of entries [lo, hi)
    mean_ptr, invstd_ptr, sums_ptr, task_ptr, slot_ptr, wt_ptr, wf_ptr,
    work_ptr,  # int64[1] (COUNT only)
    C, lo, hi, S, L, CHUNK,
    s_gn, s_gc, s_gs, s_xn, s_xc, s_xs,
    ZERO: tl.constexpr, HAS_W: tl.constexpr, USE_BATCH: tl.constexpr, HAS_STATS: tl.constexpr,
    COUNT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """ZERO: the launch's channels get no input gradient (PRUNED, or frozen constants): exactly 0, nothing
    read."""
    o_c, m_c = _order_channels(order_ptr, lo, hi, BLOCK_C)
    split = tl.program_id(1)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, L)
    macs = tl.full([], 0, tl.int64)
    if ZERO:
        _store_zeros(dx_ptr, o_c, m_c, start, end, C, S, BLOCK_E, BLOCK_C)
    else:
        task = tl.load(task_ptr + o_c, mask=m_c, other=PRUNED_C).to(tl.int32)
        slot = tl.load(slot_ptr + o_c, mask=m_c, other=0).to(tl.int64)
        frozen = is_frozen_state(task)
        batch = _batch_channels(task, m_c, USE_BATCH, HAS_STATS)
        w = _load_affine(wt_ptr, wf_ptr, slot, frozen, m_c, 1.0, HAS_W, ACC)
        mean = tl.load(mean_ptr + o_c, mask=m_c, other=0.0)
        invstd = tl.load(invstd_ptr + o_c, mask=m_c, other=0.0)
        # batch channels: dx = w·invstd·(g - Σg/L - x̂·Σg·x̂/L); channels with fixed statistics: g·w·invstd
        mg = tl.where(batch, tl.load(sums_ptr + o_c, mask=m_c, other=0.0) / L, 0.0)
        mgx = tl.where(batch, tl.load(sums_ptr + C + o_c, mask=m_c, other=0.0) / L, 0.0)
        scale = w * invstd
        for e0 in range(start, end, BLOCK_E):
            o_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
            n = o_e // S
            s = o_e % S
            m = (o_e < end)[:, None] & m_c[None, :]
            g = tl.load(g_ptr + n[:, None] * s_gn + o_c[None, :] * s_gc + s[:, None] * s_gs, mask=m,
                        other=0.0).to(ACC)
            v = tl.load(x_ptr + n[:, None] * s_xn + o_c[None, :] * s_xc + s[:, None] * s_xs, mask=m,
                        other=0.0).to(ACC)
            xhat = (v - mean[None, :]) * invstd[None, :]
            dx = scale[None, :] * (g - mg[None, :] - xhat * mgx[None, :])
            tl.store(dx_ptr + n[:, None] * (tl.cast(C, tl.int64) * S) + o_c[None, :] * S + s[:, None],
                     dx.to(dx_ptr.dtype.element_ty), mask=m)
            if COUNT:
                macs += tl.sum(tl.sum(m.to(tl.int64), axis=1), axis=0)
    if COUNT:
        tl.atomic_add(work_ptr, macs)


# ----- host functions ------------------------------------------------------------------------------

def _as_ncs(t: torch.Tensor) -> torch.Tensor:
    spatial = 1
    for d in t.shape[2:]:
        spatial *= d
    return t.reshape(t.shape[0], t.shape[1], spatial)  # not -1: an empty batch leaves it ambiguous


def _launch_shape(C: int, S: int, L: int):
    """(BLOCK_E, BLOCK_C, CHUNK, SPLIT): channels side by side when S == 1, else one per program;
    the values of a channel split into chunks so that about TARGET_PROGRAMS programs run."""
    cfg = reduction_blocks("bn")
    block = cfg["BLOCK"]
    block_c = 1 if S > 1 else min(cfg.get("BLOCK_C", 32), triton.next_power_of_2(max(C, 1)))
    if interpreting() and "bn" not in _BLOCK_OVERRIDE:
        # the interpreter's cost is per operation: channels side by side in tall tiles, few programs
        block_c = min(16, triton.next_power_of_2(max(C, 1)))
        block = 4096 * block_c
    block_e = max(block // block_c, 16)
    c_tiles = triton.cdiv(C, block_c)
    split = max(1, min(triton.cdiv(cfg["TARGET_PROGRAMS"], c_tiles), triton.cdiv(L, block_e)))
    chunk = triton.cdiv(triton.cdiv(L, split), block_e) * block_e
    split = max(1, triton.cdiv(L, chunk))
    return block_e, block_c, chunk, split, c_tiles


def _hi_lo(value: float) -> tuple[float, float]:
    """A float as two fp32 values whose sum keeps ~48 bits: Triton passes Python floats as fp32."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _acc(dtype):
    """(Triton, torch) accumulation dtypes: fp64 for fp64 tensors, else fp32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _dummy(*candidates):
    return next(t for t in candidates if t is not None)


def channel_order(channel_task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order int32[C] on the states' device, counts int64[3] on the CPU): the channels FREE first, then
    frozen, then PRUNED (each group ascending), and the size of each group. Every pass launches one slice of
    it: FREE [0, n_free) (batch statistics, affine gradients), live [0, n_free + n_frozen), the rest written 0.
    On a task-major layer each group is one contiguous range; a view's hidden channels are PRUNED. Built on
    the host (a layer caches it per view until a state changes); inside a compiled graph by the
    ``eidetic::triton_batch_norm_order`` op."""
    order, counts = _order_op(channel_task)
    return order, counts


@torch.library.custom_op("eidetic::triton_batch_norm_order", mutates_args=())
def _order_op(channel_task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    task = channel_task.cpu()
    groups = (task == FREE, (task != FREE) & (task != PRUNED), task == PRUNED)
    order = torch.cat([g.nonzero().flatten() for g in groups]).to(channel_task.device, torch.int32)
    return order, torch.tensor([int(g.sum()) for g in groups], dtype=torch.int64)


@_order_op.register_fake
def _(channel_task):
    return (channel_task.new_empty(channel_task.shape, dtype=torch.int32),
            channel_task.new_empty((3,), dtype=torch.int64, device="cpu"))


def _slices(counts: torch.Tensor) -> tuple[int, int, int]:
    """(n_free, n_live, C) from the order's counts: the slice ends of FREE, live and all channels."""
    n_free, n_frozen, n_pruned = (int(v) for v in counts.tolist())
    return n_free, n_free + n_frozen, n_free + n_frozen + n_pruned


@on_tensor_device
def bn_forward(x, running_mean, running_var, tw, fw, tb, fb, task, slot, order, counts, use_batch, eps):
    """-> y, mean_used, invstd, batch_mean, batch_var (statistics [C] in the accumulation dtype).

    Batch statistics are reduced for the channels that use them only (FREE, or every live channel without
    running statistics); the live channels are normalised, the others written 0 without a read."""
    acc, acc_torch = _acc(x.dtype)
    x3 = _as_ncs(x)
    N, C, S = x3.shape
    L = N * S
    dev = x.device
    has_stats = running_mean is not None
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    stats = torch.empty((4, C), dtype=acc_torch, device=dev)
    mean_used, invstd, bmean, bvar = stats.unbind(0)
    if C == 0:
        return y, mean_used, invstd, bmean, bvar
    n_free, n_live, _ = _slices(counts)
    # the split depends on (C, S, L) only, never on the states: a channel's summation order stays fixed
    block_e, block_c, chunk, split, _ = _launch_shape(C, S, L)
    count, work = _counter(x)
    part = torch.empty((3, C, split), dtype=acc_torch, device=dev)
    n_batch = (n_free if has_stats else n_live) if use_batch else 0
    if n_batch and L > 0:
        _bn_stats_kernel[(triton.cdiv(n_batch, block_c), split)](
            x3, order, part, work, C, 0, n_batch, S, L, chunk, split, *x3.stride(),
            COUNT=count, BLOCK_E=block_e, BLOCK_C=block_c, ACC=acc, enable_fp_fusion=FP_FUSION)
    fin_c = 64 if interpreting() else 128
    _bn_finalize_kernel[(triton.cdiv(C, fin_c),)](
        part, task, _dummy(running_mean, stats), _dummy(running_var, stats), mean_used, invstd, bmean, bvar,
        C, split if (n_batch and L > 0) else 0, *_hi_lo(eps), HAS_STATS=has_stats, USE_BATCH=use_batch,
        BLOCK_C=fin_c, ACC=acc, enable_fp_fusion=FP_FUSION)
    if L > 0:
        tw_ = _dummy(tw, stats)
        tb_ = _dummy(tb, stats)
        for lo, hi, zero in ((0, n_live, False), (n_live, C, True)):
            if hi > lo:
                _bn_norm_kernel[(triton.cdiv(hi - lo, block_c), split)](
                    x3, y, order, mean_used, invstd, task, slot, tw_, _frozen(fw, tw_), tb_, _frozen(fb, tb_),
                    work, C, lo, hi, S, L, chunk, *x3.stride(), ZERO=zero, HAS_W=tw is not None,
                    HAS_B=tb is not None, COUNT=count, BLOCK_E=block_e, BLOCK_C=block_c, ACC=acc,
                    enable_fp_fusion=FP_FUSION)
    return y, mean_used, invstd, bmean, bvar


def _frozen(frozen, trainable):
    return trainable if frozen is None or frozen.numel() == 0 else frozen


@on_tensor_device
def bn_backward(grad, x, mean_used, invstd, tw, fw, tb, fb, task, slot, order, counts, use_batch, has_stats,
                constant_frozen, taylor_score, need_dx, need_affine):
    """-> dx (x's shape, or [0] without ``need_dx``), dw, db (the trainable storages' shapes, or [0]).

    Σg and Σg·x̂ are reduced for the channels that need them only: FREE channels (affine gradients, batch
    statistics) and frozen ones when their input gradient uses batch statistics or a Taylor score is asked;
    ``constant_frozen``: frozen channels get dx = 0 and no Taylor score, read nothing (as PRUNED)."""
    acc, acc_torch = _acc(x.dtype)
    x3 = _as_ncs(x)
    g3 = _as_ncs(grad)
    N, C, S = x3.shape
    L = N * S
    dev = x.device
    n_trainable = tw.shape[0] if tw is not None else (tb.shape[0] if tb is not None else 0)
    dw = torch.zeros((n_trainable if need_affine and tw is not None else 0,), dtype=x.dtype, device=dev)
    db = torch.zeros((n_trainable if need_affine and tb is not None else 0,), dtype=x.dtype, device=dev)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=dev)
    if C == 0:
        return dx, dw, db
    n_free, n_live, _ = _slices(counts)
    block_e, block_c, chunk, split, _ = _launch_shape(C, S, L)
    count, work = _counter(x)
    part = torch.zeros((2, C, split), dtype=acc_torch, device=dev)
    frozen_sums = not constant_frozen and (taylor_score is not None or (need_dx and use_batch and not has_stats))
    n_reduce = n_live if frozen_sums else n_free
    if n_reduce and L > 0:
        _bn_bwd_reduce_kernel[(triton.cdiv(n_reduce, block_c), split)](
            g3, x3, order, mean_used, invstd, part, work, C, 0, n_reduce, S, L, chunk, split, *g3.stride(),
            *x3.stride(), COUNT=count, BLOCK_E=block_e, BLOCK_C=block_c, ACC=acc, enable_fp_fusion=FP_FUSION)
    sums = torch.empty((2, C), dtype=acc_torch, device=dev)
    tw_ = _dummy(tw, sums)
    tb_ = _dummy(tb, sums)
    fin_c = 64 if interpreting() else 128
    _bn_bwd_finalize_kernel[(triton.cdiv(C, fin_c),)](
        part, task, slot, tw_, _frozen(fw, tw_), tb_, _frozen(fb, tb_), sums,
        _dummy(dw if dw.numel() else None, sums), _dummy(db if db.numel() else None, sums),
        _dummy(taylor_score, sums), C, split, 1.0 / max(N, 1), int(bool(constant_frozen)),
        HAS_W=tw is not None, HAS_B=tb is not None, NEED_AFFINE=need_affine, TAYLOR=taylor_score is not None,
        BLOCK_C=fin_c, ACC=acc, enable_fp_fusion=FP_FUSION)
    if need_dx and L > 0:
        n_dx = n_free if constant_frozen else n_live
        for lo, hi, zero in ((0, n_dx, False), (n_dx, C, True)):
            if hi > lo:
                _bn_dx_kernel[(triton.cdiv(hi - lo, block_c), split)](
                    g3, x3, dx, order, mean_used, invstd, sums, task, slot, tw_, _frozen(fw, tw_), work,
                    C, lo, hi, S, L, chunk, *g3.stride(), *x3.stride(), ZERO=zero, HAS_W=tw is not None,
                    USE_BATCH=use_batch, HAS_STATS=has_stats, COUNT=count, BLOCK_E=block_e, BLOCK_C=block_c,
                    ACC=acc, enable_fp_fusion=FP_FUSION)
    return dx, dw, db


# ----- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("eidetic::triton_batch_norm", mutates_args=())
def _bn_op(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
           trainable_weight: Optional[torch.Tensor], frozen_weight: Optional[torch.Tensor],
           trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor], channel_task: torch.Tensor,
           slot: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, use_batch_stats: bool, eps: float,
           constant_frozen: bool, taylor_score: Optional[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean_used, invstd, bmean, bvar = bn_forward(x, running_mean, running_var, trainable_weight, frozen_weight,
                                                   trainable_bias, frozen_bias, channel_task, slot, order, counts,
                                                   use_batch_stats, eps)
    return y, mean_used.clone(), invstd.clone(), bmean.clone(), bvar.clone()


@_bn_op.register_fake
def _(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias, frozen_bias, channel_task,
      slot, order, counts, use_batch_stats, eps, constant_frozen, taylor_score):
    c = x.shape[1]
    acc_torch = _acc(x.dtype)[1]
    stat = lambda: x.new_empty((c,), dtype=acc_torch)  # noqa: E731
    return x.new_empty(x.shape), stat(), stat(), stat(), stat()


@torch.library.custom_op("eidetic::triton_batch_norm_update_running", mutates_args=("running_mean", "running_var"))
def _bn_update_running_op(running_mean: torch.Tensor, running_var: torch.Tensor, batch_mean: torch.Tensor,
                          batch_var: torch.Tensor, channel_task: torch.Tensor, count: int, momentum: float) -> None:
    C = running_mean.numel()
    if C == 0:
        return
    block_c = 64 if interpreting() else 128
    acc = _acc(batch_mean.dtype)[0]
    with tensor_device(running_mean):
        _bn_update_running_kernel[(triton.cdiv(C, block_c),)](running_mean, running_var, batch_mean, batch_var,
                                                             channel_task, C, *_hi_lo(momentum),
                                                             *_hi_lo(count / max(count - 1, 1)), BLOCK_C=block_c,
                                                             ACC=acc, enable_fp_fusion=FP_FUSION)


@_bn_update_running_op.register_fake
def _(running_mean, running_var, batch_mean, batch_var, channel_task, count, momentum):
    return None


@torch.library.custom_op("eidetic::triton_batch_norm_backward", mutates_args=("taylor_score",))
def _bn_backward_op(grad: torch.Tensor, x: torch.Tensor, mean_used: torch.Tensor, invstd: torch.Tensor,
                    trainable_weight: Optional[torch.Tensor], frozen_weight: Optional[torch.Tensor],
                    trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor],
                    channel_task: torch.Tensor, slot: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
                    use_batch_stats: bool, has_stats: bool, constant_frozen: bool,
                    taylor_score: Optional[torch.Tensor], need_input_grad: bool, need_affine_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_backward(grad, x, mean_used, invstd, trainable_weight, frozen_weight, trainable_bias, frozen_bias,
                       channel_task, slot, order, counts, use_batch_stats, has_stats, constant_frozen, taylor_score,
                       need_input_grad, need_affine_grad)


@_bn_backward_op.register_fake
def _(grad, x, mean_used, invstd, trainable_weight, frozen_weight, trainable_bias, frozen_bias, channel_task, slot,
      order, counts, use_batch_stats, has_stats, constant_frozen, taylor_score, need_input_grad, need_affine_grad):
    n_w = trainable_weight.shape[0] if need_affine_grad and trainable_weight is not None else 0
    n_b = trainable_bias.shape[0] if need_affine_grad and trainable_bias is not None else 0
    return x.new_empty(x.shape if need_input_grad else (0,)), x.new_empty((n_w,)), x.new_empty((n_b,))


def _setup_context(ctx, inputs, output):
    x, rm, rv, tw, fw, tb, fb, task, slot, order, counts, use_batch, eps, constant_frozen, taylor_score = inputs
    _, mean_used, invstd, _, _ = output
    ctx.use_batch = use_batch
    ctx.has_stats = rm is not None
    ctx.has_w, ctx.has_b = tw is not None, tb is not None
    ctx.taylor = taylor_score is not None
    ctx.eps = eps
    ctx.constant_frozen = constant_frozen
    # frozen channels normalise with running statistics that never change: kept for a double backward
    ctx.running = None if rm is None else (rm.detach().clone(), rv.detach().clone())
    # copies of the states: finish_task rewrites the layer's in place, and a graph kept across it must still
    # backpropagate as it was built
    ctx.save_for_backward(x, mean_used, invstd, tw, fw, tb, fb, task.clone(), slot.clone(), order, counts,
                          taylor_score)


def _backward(ctx, grad, *_stat_grads):
    x, mean_used, invstd, tw, fw, tb, fb, task, slot, order, counts, taylor_score = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.has_w and ctx.needs_input_grad[3]
    need_db = ctx.has_b and ctx.needs_input_grad[5]
    nothing = (None,) * 15
    if not (need_dx or need_dw or need_db or ctx.taylor):
        return nothing
    if torch.is_grad_enabled():  # create_graph=True: gradients as a graph, from the reference formula
        rm, rv = (None, None) if ctx.running is None else (t.clone() for t in ctx.running)
        with torch.enable_grad():
            y = reference.batch_norm(x, rm, rv, tw, fw, tb, fb, task, slot, ctx.use_batch, 0.0, ctx.eps, taylor_score)
        dx, dw, db = graph_grads(y, (x, tw, tb), (need_dx, need_dw, need_db), grad)
        return (dx, None, None, dw, None, db) + nothing[6:]
    dx, dw, db = _bn_backward_op(grad, x, mean_used, invstd, tw, fw, tb, fb, task, slot, order, counts, ctx.use_batch,
                                 ctx.has_stats, ctx.constant_frozen, taylor_score, need_dx, need_dw or need_db)
    return (dx if need_dx else None, None, None, dw if need_dw else None, None,
            db if need_db else None) + nothing[6:]


_bn_op.register_autograd(_backward, setup_context=_setup_context)
# under torch.autocast: the input's dtype, as F.batch_norm (no cast; statistics in float32 either way)
register_autocast("eidetic::triton_batch_norm", cast=())


def batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias, frozen_bias,
               channel_task, slot, training, momentum, eps, taylor_score=None, constant_frozen=False, plan=None):
    """Backend entry point (signature of reference.batch_norm). ``constant_frozen``: frozen channels get no
    input gradient (0) and no Taylor score, and their values are not read in backward. ``plan``: the pair
    ``channel_order(channel_task)``, when the caller caches it (layers do, per view); else built here."""
    if x.numel() == 0:  # no program to launch: torch's semantics for an empty batch, through the reference
        return reference.batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                    frozen_bias, channel_task, slot, training, momentum, eps, taylor_score)
    has_stats = running_mean is not None
    use_batch = bool(training) or not has_stats
    order, counts = channel_order(channel_task) if plan is None else plan
    if DENSE_SHORTCUT and taylor_score is None and not torch.compiler.is_compiling() and int(counts[0]) == x.shape[1]:
        # every channel FREE: the layer is nn.BatchNorm, so torch's own op runs it (cuDNN on a GPU), bit for bit
        # its twin; with any channel frozen the kernels below always run, so a frozen channel's bits never
        # depend on the other channels' states
        return reference.batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                    frozen_bias, channel_task, slot, training, momentum, eps)
    y, _, _, bmean, bvar = _bn_op(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                  frozen_bias, channel_task, slot, order, counts, use_batch, float(eps),
                                  bool(constant_frozen), taylor_score)
    if has_stats and use_batch:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        _bn_update_running_op(running_mean, running_var, bmean.detach(), bvar.detach(), channel_task, count,
                              float(momentum))
    return y
