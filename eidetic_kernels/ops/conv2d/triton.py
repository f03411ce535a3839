"""masked_conv2d, Triton backend: an implicit GEMM over NCHW (no unfold tensor in memory) on the layer's tile
table (``ops/tiles.py``), one launch per pass.

Backend signature (as reference.py): conv2d(x [N, C_in, H, W], weight [n_trainable, C_in, kh, kw], bias
[n_trainable] | None, frozen_weight (flat compact storage), frozen_bias [n_frozen] | None, table, stride,
padding, dilation, taylor_score float32[C_out] | None, constant_frozen: bool) -> y [N, C_out, H', W'], where
``table`` is a ``state.Table`` or the ``Tiles`` built from it (layers cache those; see ``tiles.layer_tiles``).
Padding must be explicit integers (ValueError for a string).

The table's columns are input channels; a weight (row entry e, column c, kernel position kk) lies at element
``(e.offset + c)·kh·kw + kk`` of its storage: frozen block b is ``[rows, width, kh, kw]`` at element
``offset·kh·kw`` of the flat frozen storage, the trainable storage ``[n_trainable, C_in, kh, kw]``.

Kernels (fixed tile sizes per (kernel, dtype); no autotuning, no split-K; a block's tiles depend on the block
alone, so a finished block's summation order never changes):
* forward: program (M tile over the N·H'·W' output positions, table program): one K loop over the block's
  kernel positions x live input channels (kernel position outside, so the input positions and their padding
  mask are computed per output position, not per element); input patches are gathered straight from x with
  bounds masks for the zero padding; bias, then a select: kind-2 rows (PRUNED, or not in the view) are exactly 0.
* dX: program (M tile over the N·H·W input positions, COLS input channels): for each segment (a block
  reading some of these channels), its rows in chunks, each kernel position one dot; (ih, iw) receives
  from (oh, ow) when ih + pad - kh·dil is a multiple of the stride inside the output. A channel the segment
  does not read keeps its sum (a select). Frozen blocks give no dX with ``constant_frozen``, and the
  trainable block then gives dX only for inputs from FREE producers.
* dW/db: program (dW program, kernel position x BLOCK_K tile of its COLS channels, range of output
  positions): the trainable rows of one tile against those columns, reduced over the range; dead channels
  and PRUNED rows are never written (zero). One range unless the tiles are too few to fill the GPU
  (``triton_common.dw_split``); then each range writes a float32 partial, summed in a fixed order.
* Taylor score (when asked): |Σ_{n,h,w} a·g| / N per output channel, in the backward op, from a copy of the
  output (in-place ops after the layer stay allowed).
* ``COUNT`` (constexpr, off by default; ``triton_common.count_work``): each program atomically adds the
  multiply-adds it issues on valid positions (positions x rows x channels x kernel positions per dot). The
  registered flop formulas give 2x the same numbers from the table's ``work``: forward N·H'·W'·kh·kw·work[0],
  dX N·H·W·kh·kw·work[1], dW N·H'·W'·kh·kw·work[2].

Registered as custom ops (``eidetic::triton_conv2d`` and its backward) so layers run under
torch.compile(fullgraph=True). With ``create_graph=True`` the backward differentiates F.conv2d on the dense
weight the tiles compute (``tiles.dense_from_tiles``). A plain nn.Conv2d (every neuron FREE, every input
live) without Taylor scores is handed to torch's conv (``DENSE_SHORTCUT``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ...state import Table
from ..double_backward import graph_grads, graph_product
from ..taylor import attach_taylor_hook
from ..tiles import build_tiles, dense_from_tiles, dx_synapses_from_tiles, table_shape, tile_shape
from ..triton_common import (_BLOCK_OVERRIDE, FP_FUSION, _counter, acc_type, add_taylor, dot_in_fp32, dot_precision,
                             dx_segment, dw_split, frozen_or_dummy, gemm_blocks, interpreting, on_tensor_device,
                             register_autocast, window_columns)

# Dispatch the all-FREE, all-inputs-live layer without Taylor to torch's own conv (the layer *is* nn.Conv2d
# then). Tests set it to False to run the kernels on that case too.
DENSE_SHORTCUT = True


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [N, C_in, H, W] by strides
    wt_ptr, wf_ptr,  # trainable storage [n_trainable, C_in, KH, KW] contiguous, frozen compact storage (flat)
    bt_ptr, bf_ptr,  # biases (unused without HAS_BIAS)
    prog_ptr,  # int32[P, 6]
    rows_ptr,  # int64[R, 3]
    cols_ptr,  # int32[C]
    y_ptr,  # [N, C_out, OH, OW] contiguous
    work_ptr,  # int64[1] (COUNT only)
    C_out, H, W, OH, OW, M,  # M = N*OH*OW
    s_xn, s_xc, s_xh, s_xw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    KK: tl.constexpr = KH * KW
    pid_m = tl.program_id(0)
    p = prog_ptr + tl.program_id(1) * 6
    kind = tl.load(p)
    row0 = tl.load(p + 1)
    n_rows = tl.load(p + 2)
    gather = tl.load(p + 3)  # 0: the slice, 1: the gather list
    start = tl.load(p + 4)
    width = tl.load(p + 5)
    frozen = kind == 0
    compute = kind != 2
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    n_i = o_m // (OH * OW)
    r = o_m % (OH * OW)
    ih0 = (r // OW) * SH - PH
    iw0 = (r % OW) * SW - PW
    o_r = tl.arange(0, BLOCK_N)
    m_r = o_r < n_rows
    p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
    out_row = tl.load(p_row, mask=m_r, other=0)
    w_row = tl.load(p_row + 1, mask=m_r, other=0)
    w_base = tl.where(frozen, wf_ptr, wt_ptr)
    w_start = tl.where(frozen, 0, start)  # compact storage: the c-th live channel; trainable: the channel

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    x_n = n_i * s_xn
    # the block's whole window x kernel positions, once: kernel position outside, channels inside, so the
    # input positions and their padding mask are per output position only ([BLOCK_M], not [BLOCK_M, BLOCK_K])
    for kk in range(0, KK):
        ih = ih0 + (kk // KW) * DH
        iw = iw0 + (kk % KW) * DW
        m_p = m_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_p = x_n + ih * s_xh + iw * s_xw
        for c0 in range(0, width, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            m_k = c < width
            col, w_col = window_columns(c, m_k, start, w_start, gather, frozen, cols_ptr, SCATTERED)
            x = tl.load(x_ptr + x_p[:, None] + col.to(tl.int64)[None, :] * s_xc,
                        mask=m_p[:, None] & m_k[None, :], other=0.0)
            w = tl.load(w_base + (w_row[:, None] + w_col[None, :]) * KK + kk,
                        mask=m_r[:, None] & m_k[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
            if COUNT:
                macs += tl.sum(m_m.to(tl.int64), axis=0) * n_rows * tl.sum(m_k.to(tl.int64), axis=0)
    if HAS_BIAS:
        b_row = tl.load(p_row + 2, mask=m_r, other=0)
        b = tl.load(tl.where(frozen, bf_ptr, bt_ptr) + b_row, mask=m_r & (o_r * 0 + kind != 2), other=0.0)
        acc = acc + b.to(ACC)[None, :]
    out = tl.where(compute, acc, 0.0)  # kind 2 (PRUNED, or not in the view): exactly 0
    p_y = y_ptr + n_i[:, None] * (tl.cast(C_out, tl.int64) * OH * OW) + out_row[None, :] * (OH * OW) + r[:, None]
    tl.store(p_y, out.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _conv_dx_kernel(
    g_ptr,  # [N, C_out, OH, OW] by strides (may be stride 0)
    wt_ptr, wf_ptr,  # storages as in the forward
    rows_ptr,  # int64[R, 3]
    dx_prog_ptr,  # int32[Q, 2]
    seg_ptr,  # int32[S, 7]
    map_ptr,  # int32[*]
    dx_ptr,  # [N, C_in, H, W] contiguous
    work_ptr,  # int64[1] (COUNT only)
    C_in, H, W, OH, OW, M,  # M = N*H*W
    s_gn, s_gc, s_gh, s_gw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N: rows, BLOCK_K: channels
):
    KK: tl.constexpr = KH * KW
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    n_i = o_m // (H * W)
    r = o_m % (H * W)
    ih = r // W
    iw = r % W
    o_t = tl.arange(0, BLOCK_K)
    o_c = pid_c * BLOCK_K + o_t
    m_c = o_c < C_in
    seg0 = tl.load(dx_prog_ptr + pid_c * 2)
    n_seg = tl.load(dx_prog_ptr + pid_c * 2 + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    for s in range(seg0, seg0 + n_seg):  # the blocks reading some of these channels, in table order
        frozen, row0, n_rows, w_col, live = dx_segment(seg_ptr, s, map_ptr, o_t, o_c, m_c, SCATTERED)
        w_base = tl.where(frozen, wf_ptr, wt_ptr)
        for n0 in range(0, n_rows, BLOCK_N):
            o_r = n0 + tl.arange(0, BLOCK_N)
            m_r = o_r < n_rows
            p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
            out_row = tl.load(p_row, mask=m_r, other=0)
            w_row = tl.load(p_row + 1, mask=m_r, other=0)
            for kk in range(0, KK):
                oh_s = ih + PH - (kk // KW) * DH
                ow_s = iw + PW - (kk % KW) * DW
                oh = oh_s // SH
                ow = ow_s // SW
                m_g = (m_m & (oh_s >= 0) & (ow_s >= 0) & (oh_s - oh * SH == 0) & (ow_s - ow * SW == 0)
                       & (oh < OH) & (ow < OW))
                g = tl.load(g_ptr + (n_i * s_gn + oh * s_gh + ow * s_gw)[:, None] + out_row[None, :] * s_gc,
                            mask=m_g[:, None] & m_r[None, :], other=0.0)
                w = tl.load(w_base + (w_row[:, None] + w_col[None, :]) * KK + kk,
                            mask=m_r[:, None] & live[None, :], other=0.0)
                if DOT_FP32:
                    g = g.to(tl.float32)
                    w = w.to(tl.float32)
                # channels the block does not read keep their sum (a select: a NaN gradient of a row cannot
                # reach an input that row does not read)
                acc = tl.where(live[None, :], tl.dot(g, w, acc, input_precision=PREC), acc)
                if COUNT:
                    macs += (tl.sum(m_m.to(tl.int64), axis=0) * tl.sum(m_r.to(tl.int64), axis=0)
                             * tl.sum(live.to(tl.int64), axis=0))
    p_dx = dx_ptr + n_i[:, None] * (tl.cast(C_in, tl.int64) * H * W) + o_c[None, :].to(tl.int64) * (H * W) + r[:, None]
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _conv_dw_kernel(
    g_ptr,  # [N, C_out, OH, OW] by strides
    x_ptr,  # [N, C_in, H, W] by strides
    prog_ptr,  # int32[P, 6]
    dw_prog_ptr,  # int32[Pw, 2]
    rows_ptr,  # int64[R, 3]
    cols_ptr,  # int32[C]
    dw_ptr,  # [RANGES, n_trainable, C_in, KH, KW] contiguous, zero-filled
    db_ptr,  # [RANGES, n_trainable] zero-filled (unused without HAS_BIAS)
    work_ptr,  # int64[1] (COUNT only)
    H, W, OH, OW, M, M_RANGE, DW_NUMEL, N_TRAINABLE,  # M = N*OH*OW, reduced in ranges of M_RANGE
    s_gn, s_gc, s_gh, s_gw, s_xn, s_xc, s_xh, s_xw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, COLS: tl.constexpr,  # COLS: channels per dW program (the table's)
    HAS_BIAS: tl.constexpr, SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    KK: tl.constexpr = KH * KW
    d = dw_prog_ptr + tl.program_id(0) * 2
    p = prog_ptr + tl.load(d) * 6
    c0 = tl.load(d + 1)
    part = tl.program_id(2)  # this program's range of output positions
    m_lo = part.to(tl.int64) * M_RANGE
    m_hi = tl.minimum(M, m_lo + M_RANGE)
    dw_ptr += part.to(tl.int64) * DW_NUMEL
    db_ptr += part.to(tl.int64) * N_TRAINABLE
    row0 = tl.load(p + 1)
    n_rows = tl.load(p + 2)
    gather = tl.load(p + 3)  # 0: the slice, 1: the gather list
    start = tl.load(p + 4)
    width = tl.load(p + 5)
    o_r = tl.arange(0, BLOCK_N)
    m_r = o_r < n_rows
    p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
    out_row = tl.load(p_row, mask=m_r, other=0)
    w_row = tl.load(p_row + 1, mask=m_r, other=0)  # slot * C_in: dW has the trainable storage's layout
    macs = tl.full([], 0, tl.int64)
    if HAS_BIAS:
        if (c0 == 0) & (tl.program_id(1) == 0):  # db once per row tile (also for a block without live inputs)
            acc_b = tl.zeros([BLOCK_N], dtype=ACC)
            for m0 in range(m_lo, m_hi, BLOCK_M):
                o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                m_m = o_m < m_hi
                n_i = o_m // (OH * OW)
                r = o_m % (OH * OW)
                g = tl.load(g_ptr + (n_i * s_gn + (r // OW) * s_gh + (r % OW) * s_gw)[:, None]
                            + out_row[None, :] * s_gc, mask=m_m[:, None] & m_r[None, :], other=0.0)
                acc_b += tl.sum(g.to(ACC), axis=0)
            b_row = tl.load(p_row + 2, mask=m_r, other=0)
            tl.store(db_ptr + b_row, acc_b.to(db_ptr.dtype.element_ty), mask=m_r)
    # this program's columns: one kernel position (grid axis 1 = kernel position x BLOCK_K channel tile of its
    # dW program's COLS channels), so the input positions and their padding mask are per output position only
    n_ct = (COLS + BLOCK_K - 1) // BLOCK_K
    kk = tl.program_id(1) // n_ct
    c_end = tl.minimum(c0 + COLS, width)
    c_first = c0 + (tl.program_id(1) % n_ct) * BLOCK_K
    c = c_first + tl.arange(0, BLOCK_K)
    m_k = c < c_end
    if c_first < c_end:
        col, _ = window_columns(c, m_k, start, start, gather, False, cols_ptr, SCATTERED)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_m = o_m < m_hi
            n_i = o_m // (OH * OW)
            r = o_m % (OH * OW)
            oh = r // OW
            ow = r % OW
            g = tl.load(g_ptr + (n_i * s_gn + oh * s_gh + ow * s_gw)[:, None] + out_row[None, :] * s_gc,
                        mask=m_m[:, None] & m_r[None, :], other=0.0)
            ih = oh * SH - PH + (kk // KW) * DH
            iw = ow * SW - PW + (kk % KW) * DW
            m_p = m_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x = tl.load(x_ptr + (n_i * s_xn + ih * s_xh + iw * s_xw)[:, None] + col.to(tl.int64)[None, :] * s_xc,
                        mask=m_p[:, None] & m_k[None, :], other=0.0)
            if DOT_FP32:
                g = g.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PREC)
            if COUNT:
                macs += tl.sum(m_m.to(tl.int64), axis=0) * n_rows * tl.sum(m_k.to(tl.int64), axis=0)
        tl.store(dw_ptr + (w_row[:, None] + col[None, :]) * KK + kk, acc.to(dw_ptr.dtype.element_ty),
                 mask=m_r[:, None] & m_k[None, :])
    if COUNT:
        tl.atomic_add(work_ptr, macs)


# ----- host functions ------------------------------------------------------------------------------

def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometry(stride, padding, dilation, kernel_size):
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
                KH=kernel_size[0], KW=kernel_size[1])


def _blocks(kind: str, dtype: torch.dtype, tiles, c_in: int | None = None) -> dict:
    """Launch configuration; the forward's BLOCK_N and the dX BLOCK_K are the ROWS and COLS the table was built
    for (``table_shape``: under autocast, another dtype's), and dW tiles are the forward's row tiles against
    COLS flattened (channel, kernel position) columns. On a GPU the
    dX kernel reads its rows in chunks of at most 32 and dW its positions in chunks of 16: both gather their
    tiles with per-element offsets, and wider chunks spill registers (ptxas, fp32 on sm_80: dX 36.9 KB at 128
    rows, 1.4 KB at 32; dW 15.5 KB at 32 positions, 56 bytes at 16)."""
    cfg = dict(gemm_blocks(kind, dtype, "conv2d"))
    rows_tile, cols_tile = table_shape(tiles)
    if kind == "fwd":
        cfg["BLOCK_N"] = rows_tile
    elif kind == "dx":
        cfg["BLOCK_K"] = cols_tile
    else:
        cfg["BLOCK_N"], cfg["BLOCK_K"] = rows_tile, cols_tile
    if kind not in _BLOCK_OVERRIDE:
        if kind == "fwd" and c_in is not None:
            # the forward's dots span channels of one kernel position: a layer with few input channels (an RGB
            # input) gets narrower ones. ``c_in`` is the layer's (its storage's), never a view's, so a
            # finished block's tiles do not depend on the width it is evaluated at
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(c_in)))
        elif kind == "dx" and not interpreting():
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
        elif kind == "dw" and not interpreting():
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 16)
    return cfg


@on_tensor_device
def conv_forward(x, tw, fw, tb, fb, tiles, n_out, kernel_size, stride, padding, dilation,
                 scattered=True) -> torch.Tensor:
    """x [N, C_in, H, W] -> y [N, n_out, H', W'] (a fresh contiguous tensor), every output channel written."""
    prog, rows, cols = tiles[0], tiles[1], tiles[2]
    N, C_in, H, W = x.shape
    KH, KW = kernel_size
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    y = torch.empty((N, n_out, OH, OW), dtype=x.dtype, device=x.device)
    M = N * OH * OW
    if M == 0 or prog.shape[0] == 0:
        return y
    frozen = fw is not None and fw.numel() > 0  # stored frozen synapses: exact fp32 (dot_precision)
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    has_bias = tb is not None
    if has_bias:
        tb = tb.contiguous()
        fb = frozen_or_dummy(fb, tb).contiguous()
    cfg = _blocks("fwd", x.dtype, tiles, c_in=tw.shape[1])
    count, work = _counter(rows)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), prog.shape[0])
    _conv_fwd_kernel[grid](
        x, tw, fw, tb if has_bias else tw, fb if has_bias else tw, prog, rows, cols, y, work,
        n_out, H, W, OH, OW, M, *x.stride(), **_geometry(stride, padding, dilation, kernel_size),
        HAS_BIAS=has_bias, SCATTERED=scattered, COUNT=count,
        PREC=dot_precision(x.dtype, x.device, conv=True, frozen=frozen), ACC=acc_type(x.dtype),
        DOT_FP32=dot_in_fp32(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    return y


@on_tensor_device
def conv_input_grad(g, tw, fw, tiles, x_shape, kernel_size, stride, padding, dilation,
                    scattered=True) -> torch.Tensor:
    """dX [N, C_in, H, W] (a fresh tensor, every element written) from the output gradient g [N, C_out, H', W']."""
    rows, dx_prog, dx_seg, dx_map = tiles[1], tiles[4], tiles[5], tiles[6]
    N, C_in, H, W = x_shape
    OH, OW = g.shape[2:]
    dx = torch.empty(x_shape, dtype=g.dtype, device=g.device)
    M = N * H * W
    if dx.numel() == 0:
        return dx
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    cfg = _blocks("dx", g.dtype, tiles)
    count, work = _counter(rows)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), dx_prog.shape[0])
    _conv_dx_kernel[grid](
        g, tw, fw, rows, dx_prog, dx_seg, dx_map, dx, work, C_in, H, W, OH, OW, M, *g.stride(),
        **_geometry(stride, padding, dilation, kernel_size), SCATTERED=scattered, COUNT=count,
        PREC=dot_precision(g.dtype, g.device, conv=True), ACC=acc_type(g.dtype), DOT_FP32=dot_in_fp32(g.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    return dx


@on_tensor_device
def conv_weight_grad(g, x, trainable_shape, has_bias, tiles, stride, padding, dilation, scattered=True):
    """(dW [n_trainable, C_in, kh, kw], db [n_trainable] or [0]): the FREE rows' gradients, 0 on PRUNED rows
    and dead synapses. Programs: (dW program, kernel position x BLOCK_K tile of its channels, range of output
    positions); with more than one range (``dw_split``: too few tiles to fill the GPU) each range writes a
    float32 partial and the partials are summed in order."""
    prog, rows, cols, dw_prog = tiles[0], tiles[1], tiles[2], tiles[3]
    n_trainable = trainable_shape[0]
    H, W = x.shape[2:]
    OH, OW = g.shape[2:]
    M = x.shape[0] * OH * OW
    if n_trainable == 0 or M == 0 or dw_prog.shape[0] == 0:
        return (torch.zeros(trainable_shape, dtype=x.dtype, device=x.device),
                torch.zeros((n_trainable,) if has_bias else (0,), dtype=x.dtype, device=x.device))
    cfg = _blocks("dw", x.dtype, tiles)
    cols_tile = table_shape(tiles)[1]
    col_tiles = math.prod(trainable_shape[2:]) * triton.cdiv(cols_tile, cfg["BLOCK_K"])  # kernel position x chunk
    ranges, m_range = dw_split(dw_prog.shape[0] * col_tiles, M, cfg["BLOCK_M"])
    part_dtype = x.dtype if ranges == 1 else torch.float32
    dw = torch.zeros((ranges,) + tuple(trainable_shape), dtype=part_dtype, device=x.device)
    db = torch.zeros((ranges, n_trainable) if has_bias else (0,), dtype=part_dtype, device=x.device)
    count, work = _counter(rows)
    _conv_dw_kernel[(dw_prog.shape[0], col_tiles, ranges)](
        g, x, prog, dw_prog, rows, cols, dw, db if has_bias else dw, work, H, W, OH, OW, M, m_range,
        math.prod(trainable_shape), n_trainable, *g.stride(), *x.stride(),
        **_geometry(stride, padding, dilation, trainable_shape[2:]),
        COLS=cols_tile, HAS_BIAS=has_bias, SCATTERED=scattered, COUNT=count,
        PREC=dot_precision(x.dtype, x.device, conv=True), ACC=acc_type(x.dtype), DOT_FP32=dot_in_fp32(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    dw = dw[0] if ranges == 1 else dw.sum(0).to(x.dtype)
    if has_bias:
        db = db[0] if ranges == 1 else db.sum(0).to(x.dtype)
    return dw, db


# ----- custom ops ----------------------------------------------------------------------------------

def _out_shape(x, trainable_weight, n_out, stride, padding, dilation):
    KH, KW = trainable_weight.shape[2:]
    return (x.shape[0], n_out, _out_size(x.shape[2], KH, stride[0], padding[0], dilation[0]),
            _out_size(x.shape[3], KW, stride[1], padding[1], dilation[1]))


@torch.library.custom_op("eidetic::triton_conv2d", mutates_args=())
def _conv_op(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
             trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor], tiles: list[torch.Tensor],
             n_out: int, scattered: bool, stride: list[int], padding: list[int], dilation: list[int],
             taylor_score: Optional[torch.Tensor]) -> torch.Tensor:
    return conv_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out,
                        tuple(trainable_weight.shape[2:]), stride, padding, dilation, scattered)


@_conv_op.register_fake
def _(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out, scattered, stride, padding,
      dilation, taylor_score):
    return x.new_empty(_out_shape(x, trainable_weight, n_out, stride, padding, dilation))


@torch.library.custom_op("eidetic::triton_conv2d_backward", mutates_args=("taylor_score",))
def _conv_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, trainable_weight: torch.Tensor,
                      frozen_weight: torch.Tensor, has_bias: bool, tiles: list[torch.Tensor], scattered: bool,
                      stride: list[int], padding: list[int], dilation: list[int],
                      taylor_score: Optional[torch.Tensor], need_input_grad: bool,
                      need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ks = tuple(trainable_weight.shape[2:])
    if need_input_grad:
        dx = conv_input_grad(grad, trainable_weight, frozen_weight, tiles, x.shape, ks, stride, padding, dilation,
                             scattered)
    else:
        dx = x.new_empty((0,))
    if need_weight_grad:
        dw, db = conv_weight_grad(grad, x, tuple(trainable_weight.shape), has_bias, tiles, stride, padding,
                                  dilation, scattered)
    else:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    if taylor_score is not None and y.shape[0]:  # an empty batch adds nothing
        n, c = y.shape[:2]
        add_taylor(taylor_score, y.reshape(n, c, -1), grad.reshape(n, c, -1), n)
    return dx, dw, db


@_conv_backward_op.register_fake
def _(grad, x, y, trainable_weight, frozen_weight, has_bias, tiles, scattered, stride, padding, dilation,
      taylor_score, need_input_grad, need_weight_grad):
    dx = x.new_empty(x.shape if need_input_grad else (0,))
    dw = x.new_empty(trainable_weight.shape if need_weight_grad else (0,))
    db = x.new_empty((trainable_weight.shape[0],) if need_weight_grad and has_bias else (0,))
    return dx, dw, db


def _kernel_positions(trainable_weight) -> int:
    return math.prod(trainable_weight.shape[2:])


@register_flop_formula(torch.ops.eidetic.triton_conv2d, get_raw=True)
def _conv_flops(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out, scattered, stride,
                padding, dilation, taylor_score, out_val=None, **kwargs) -> int:
    """2 x the multiply-adds the forward kernel schedules: N·H'·W' x kh·kw x Σ_blocks rows x window width."""
    _, _, OH, OW = _out_shape(x, trainable_weight, n_out, stride, padding, dilation)
    return 2 * x.shape[0] * OH * OW * _kernel_positions(trainable_weight) * int(tiles[7][0])


@register_flop_formula(torch.ops.eidetic.triton_conv2d_backward, get_raw=True)
def _conv_backward_flops(grad, x, y, trainable_weight, frozen_weight, has_bias, tiles, scattered, stride, padding,
                         dilation, taylor_score, need_input_grad, need_weight_grad, out_val=None, **kwargs) -> int:
    """2 x the multiply-adds the dX (over N·H·W input positions) and dW (over N·H'·W' output positions) kernels
    schedule, each only when launched."""
    work = tiles[7]
    kk = _kernel_positions(trainable_weight)
    dx = x.shape[0] * x.shape[2] * x.shape[3] * int(work[1]) * bool(need_input_grad)
    dw = grad.shape[0] * grad.shape[2] * grad.shape[3] * int(work[2]) * bool(need_weight_grad)
    return 2 * kk * (dx + dw)


def _setup_context(ctx, inputs, output):
    x, tw, fw, tb, fb, tiles, n_out, scattered, stride, padding, dilation, taylor_score = inputs
    ctx.has_bias = tb is not None
    ctx.taylor = taylor_score is not None
    ctx.n_tiles = len(tiles)
    ctx.n_out, ctx.scattered = n_out, scattered
    ctx.geometry = (stride, padding, dilation)
    # the Taylor score reads a copy of the output: in-place ops after the layer may change the output itself
    ctx.save_for_backward(x, output.detach().clone() if ctx.taylor else None, tw, fw, tb, fb, taylor_score, *tiles)


def _backward(ctx, grad):
    x, y, tw, fw, tb, fb, taylor_score, *tiles = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])
    # frozen bias, tiles, n_out, scattered, stride, padding, dilation, taylor_score
    rest = (None, [None] * ctx.n_tiles) + (None,) * 6
    if not (need_dx or need_dw or ctx.taylor):
        return (None,) * 4 + rest
    if torch.is_grad_enabled():  # create_graph=True: gradients as a graph (see ops/double_backward.py)
        with torch.enable_grad():
            w, b = dense_from_tiles(tw, fw, tb, fb, tiles, ctx.n_out, x.shape[1], tuple(tw.shape[2:]))
            carry = dx_synapses_from_tiles(tiles, ctx.n_out, x.shape[1])
            conv = lambda x_, w_, b_: F.conv2d(x_, w_, b_, *ctx.geometry)  # noqa: E731
            y_graph = attach_taylor_hook(graph_product(conv, x, w, b, carry), taylor_score, 1)
        dx, dw, db = graph_grads(y_graph, (x, tw, tb), (need_dx, ctx.needs_input_grad[1],
                                                         ctx.has_bias and ctx.needs_input_grad[3]), grad)
        return (dx, dw, None, db) + rest
    dx, dw, db = _conv_backward_op(grad, x, y if ctx.taylor else x, tw, fw, ctx.has_bias, tiles, ctx.scattered,
                                   *ctx.geometry, taylor_score, need_dx, need_dw)
    return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None) + rest


_conv_op.register_autograd(_backward, setup_context=_setup_context)
# under torch.autocast: input, weights and biases in the autocast dtype, as F.conv2d; the output in it too
register_autocast("eidetic::triton_conv2d", cast=(0, 1, 2, 3, 4))


def _pair(v) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def conv2d(x, weight, bias, frozen_weight, frozen_bias, table, stride, padding, dilation, taylor_score=None,
           constant_frozen=False):
    """Backend entry point (signature of reference.conv2d). ``table``: the layer's ``state.Table`` for its view,
    or its ``Tiles`` (``tiles.layer_tiles``); y [N, C_out, H', W'] is a fresh tensor. Raises ValueError for a
    string padding."""
    if isinstance(padding, str):
        raise ValueError(f"the Triton conv2d takes explicit integer padding, got {padding!r} "
                         "(EideticConv2d resolves 'same'/'valid' to ints)")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if isinstance(table, Table):
        rows_tile, cols_tile = tile_shape(x.dtype, "conv2d")
        table = build_tiles(table, constant_frozen, rows_tile, cols_tile, x.device)
    if DENSE_SHORTCUT and taylor_score is None and table.dense:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    if not table.trainable:  # as the reference: storages no computed row reads get no gradient (None)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return _conv_op(x, weight, frozen_weight, bias, frozen_bias, list(table.tensors), table.n_out, table.scattered,
                    stride, padding, dilation, taylor_score)

