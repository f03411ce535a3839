"""masked_linear, Triton backend: the block-triangular product of ``state.make_table`` in one launch per pass.

Backend signature (as reference.py): linear(x [*, in], weight [n_trainable, in], bias [n_trainable] | None,
frozen_weight (flat compact storage), frozen_bias [n_frozen] | None, table, taylor_score float32[out] | None,
constant_frozen: bool) -> y [*, out], where ``table`` is a ``state.Table`` or the ``LinearTiles`` built
from it (layers cache those; see ``layer_tiles``).

The tile table (``ops/tiles.py``: ``build_tiles``, host-built once per state change and view) lists one
program per (block, run of rows), the row entries, the dW programs and the dX segments; its docstring gives
their layout.

Kernels (fixed tile sizes per (kernel, dtype); no autotuning, no split-K; a block's tiles depend on the
block alone, so a finished block's summation order never changes). ``SCATTERED`` (constexpr) compiles
the gather and column-map paths only for tables that have one (a network's task-major layers have none),
so slices keep contiguous loads:
* forward: program (M tile, table program): one K loop over its block's window, bias, then a select:
  kind-2 rows are exactly 0.
* dX: program (M tile, column tile): for each segment, the rows of its block in ROWS chunks; a column the
  segment does not read keeps its accumulator (a select, so a NaN gradient of a row cannot reach an input
  that row does not read). Frozen blocks give no dX when frozen blocks are constants (``constant_frozen``),
  and the trainable block then gives dX only for inputs from FREE producers.
* dW/db: program (dW program, range of the batch): the trainable rows of one tile against its columns, reduced
  over the range; dead columns and PRUNED rows are never written (zero). One range unless the tiles are too
  few to fill the GPU (``triton_common.dw_split``); then each range writes a float32 partial, summed in a
  fixed order.
* Taylor score (when asked): |Σ a·g| / batch per neuron, in the backward op, from a copy of the output.
* ``COUNT`` (constexpr, off by default): each program atomically adds the multiply-adds it issues on
  valid elements (batch rows x block rows x columns per dot) to an int64 counter; ``count_work`` turns
  it on. The registered flop formulas give 2x the same numbers from ``work``.

Registered as custom ops (``eidetic::triton_linear``, its backward, and ``eidetic::triton_linear_tiles``
that builds a table inside a compiled graph) so layers run under torch.compile(fullgraph=True). With
``create_graph=True`` the backward differentiates F.linear on the dense weight the tiles compute
(``dense_from_tiles``). A plain nn.Linear (every neuron FREE, every input live) without Taylor scores is
handed to torch's GEMM (``DENSE_SHORTCUT``).
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
from ..tiles import (KIND_FROZEN, KIND_TRAINABLE, KIND_ZERO, TILE_NAMES, build_tiles,  # noqa: F401 (re-exported)
                     dense_from_tiles, dx_synapses_from_tiles, layer_tiles, table_align, table_shape, tile_shape)
from ..tiles import Tiles as LinearTiles
from .. import triton_common
from ..triton_common import (FP_FUSION, _counter, acc_type, add_taylor, count_work, dot_in_fp32, dot_precision,
                             dw_split, dx_segment, frozen_or_dummy, gemm_blocks, on_tensor_device, register_autocast,
                             window_columns)

# Dispatch the all-FREE, all-inputs-live layer without Taylor to torch's own GEMM (the layer *is*
# nn.Linear then). Tests and benchmarks set it to False to run the kernels on that case too.
DENSE_SHORTCUT = True



@triton.jit
def _fwd_k_tile(acc, macs, k0, x_ptr, w_base, cols_ptr, o_m, m_m, s_xm, s_xk, w_row, m_r, n_rows, start, w_start,
                width, frozen, gather, TAIL: tl.constexpr, SCATTERED: tl.constexpr, COUNT: tl.constexpr,
                PREC: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K tile of the window (columns ``k0 + [0, BLOCK_K)`` of it); only the ``TAIL`` tile masks
    columns."""
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < width
    col, w_col = window_columns(o_k, m_k, start, w_start, gather, frozen, cols_ptr, SCATTERED)
    p_x = x_ptr + o_m[:, None] * s_xm + col.to(tl.int64)[None, :] * s_xk
    p_w = w_base + w_row[:, None] + w_col[None, :]
    if TAIL:
        x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        w = tl.load(p_w, mask=m_r[:, None] & m_k[None, :], other=0.0)
    else:
        x = tl.load(p_x, mask=m_m[:, None], other=0.0)
        w = tl.load(p_w, mask=m_r[:, None], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    if COUNT:
        macs += tl.sum(m_m.to(tl.int64), axis=0) * n_rows * tl.sum(m_k.to(tl.int64), axis=0)
    return acc, macs


@triton.jit
def _fwd_k_loop(acc, macs, x_ptr, w_base, cols_ptr, o_m, m_m, s_xm, s_xk, p_row, m_r, n_rows, start, w_start, width,
                frozen, gather, SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr,
                DOT_FP32: tl.constexpr, W_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[:, window] @ W_block^T over the block's whole window: full BLOCK_K tiles without a column mask,
    then one masked tail. ``W_ALIGN`` (``tiles.table_align``) divides the rows' storage offsets (loaded here:
    ``tl.multiple_of`` marks the op that makes a value, so a hint on an argument would not survive inlining);
    with unmasked tiles and an aligned window start the compiler issues 16-byte loads."""
    w_row = tl.multiple_of(tl.load(p_row + 1, mask=m_r, other=0), W_ALIGN)
    k_full = width - width % BLOCK_K
    # the block's whole window, once: full tiles without a column mask (a mask that varies along a row keeps
    # the loads element-wide), then the masked tail
    for k0 in range(0, k_full, BLOCK_K):
        acc, macs = _fwd_k_tile(acc, macs, k0, x_ptr, w_base, cols_ptr, o_m, m_m, s_xm, s_xk, w_row, m_r, n_rows,
                                start, w_start, width, frozen, gather, False, SCATTERED, COUNT, PREC, DOT_FP32,
                                BLOCK_K)
    if k_full < width:
        acc, macs = _fwd_k_tile(acc, macs, k_full, x_ptr, w_base, cols_ptr, o_m, m_m, s_xm, s_xk, w_row, m_r,
                                n_rows, start, w_start, width, frozen, gather, True, SCATTERED, COUNT, PREC,
                                DOT_FP32, BLOCK_K)
    return acc, macs


@triton.jit
def _linear_fwd_kernel(
    x_ptr,  # [M, K] by strides
    wt_ptr, wf_ptr,  # trainable storage [n_trainable, K] contiguous, frozen compact storage (flat)
    bt_ptr, bf_ptr,  # biases (unused without HAS_BIAS)
    prog_ptr,  # int32[P, 6]
    rows_ptr,  # int64[R, 3]
    cols_ptr,  # int32[C]
    y_ptr,  # [M, N] contiguous
    work_ptr,  # int64[1] (COUNT only)
    M, N, s_xm, s_xk,
    HAS_BIAS: tl.constexpr, SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, X_ALIGN: tl.constexpr, WT_ALIGN: tl.constexpr, WF_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    o_r = tl.arange(0, BLOCK_N)
    m_r = o_r < n_rows
    p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
    out_row = tl.load(p_row, mask=m_r, other=0)
    if not SCATTERED:  # a slice's start (a gather list's start indexes the list): what X_ALIGN divides
        start = tl.multiple_of(start, X_ALIGN)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    # compact storage: the k-th live input of the block; trainable: the input column. Frozen and trainable
    # rows may be aligned differently: one loop each then, so that each declares what holds for it
    if WT_ALIGN == WF_ALIGN:
        acc, macs = _fwd_k_loop(acc, macs, x_ptr, tl.where(frozen, wf_ptr, wt_ptr), cols_ptr, o_m, m_m, s_xm, s_xk,
                                p_row, m_r, n_rows, start, tl.where(frozen, 0, start), width, frozen, gather,
                                SCATTERED, COUNT, PREC, DOT_FP32, WT_ALIGN, BLOCK_K)
    elif frozen:
        acc, macs = _fwd_k_loop(acc, macs, x_ptr, wf_ptr, cols_ptr, o_m, m_m, s_xm, s_xk, p_row, m_r, n_rows, start,
                                0, width, frozen, gather, SCATTERED, COUNT, PREC, DOT_FP32, WF_ALIGN, BLOCK_K)
    else:
        acc, macs = _fwd_k_loop(acc, macs, x_ptr, wt_ptr, cols_ptr, o_m, m_m, s_xm, s_xk, p_row, m_r, n_rows, start,
                                start, width, frozen, gather, SCATTERED, COUNT, PREC, DOT_FP32, WT_ALIGN, BLOCK_K)
    if HAS_BIAS:
        b_row = tl.load(p_row + 2, mask=m_r, other=0)
        b = tl.load(tl.where(frozen, bf_ptr, bt_ptr) + b_row, mask=m_r & (o_r * 0 + kind != 2), other=0.0)
        acc = acc + b.to(ACC)[None, :]
    out = tl.where(compute, acc, 0.0)  # kind 2 (PRUNED, or not in the view): exactly 0
    tl.store(y_ptr + o_m[:, None] * N + out_row[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_r[None, :])
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _linear_dx_kernel(
    g_ptr,  # [M, N] by strides (may be stride 0)
    wt_ptr, wf_ptr,  # storages as in the forward
    rows_ptr,  # int64[R, 3]
    dx_prog_ptr,  # int32[Q, 2]
    seg_ptr,  # int32[S, 7]
    map_ptr,  # int32[*]
    dx_ptr,  # [M, K] contiguous
    work_ptr,  # int64[1] (COUNT only)
    M, K, c_base, s_gm, s_gn,  # c_base: the first column tile of this launch (launches of at most GRID_AXIS_LIMIT)
    SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1) + c_base
    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_t = tl.arange(0, BLOCK_K)
    o_c = pid_c * BLOCK_K + o_t
    m_c = o_c < K
    seg0 = tl.load(dx_prog_ptr + pid_c * 2)
    n_seg = tl.load(dx_prog_ptr + pid_c * 2 + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    for s in range(seg0, seg0 + n_seg):  # the blocks reading some of these columns, in table order
        frozen, row0, n_rows, w_col, live = dx_segment(seg_ptr, s, map_ptr, o_t, o_c, m_c, SCATTERED)
        w_base = tl.where(frozen, wf_ptr, wt_ptr)
        for n0 in range(0, n_rows, BLOCK_N):
            o_r = n0 + tl.arange(0, BLOCK_N)
            m_r = o_r < n_rows
            p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
            out_row = tl.load(p_row, mask=m_r, other=0)
            w_row = tl.load(p_row + 1, mask=m_r, other=0)
            g = tl.load(g_ptr + o_m[:, None] * s_gm + out_row.to(tl.int64)[None, :] * s_gn,
                        mask=m_m[:, None] & m_r[None, :], other=0.0)
            w = tl.load(w_base + w_row[:, None] + w_col[None, :], mask=m_r[:, None] & live[None, :], other=0.0)
            if DOT_FP32:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            # columns the block does not read keep their sum (a select: a NaN gradient of a row cannot reach
            # an input that row does not read)
            acc = tl.where(live[None, :], tl.dot(g, w, acc, input_precision=PREC), acc)
            if COUNT:
                macs += (tl.sum(m_m.to(tl.int64), axis=0) * tl.sum(m_r.to(tl.int64), axis=0)
                         * tl.sum(live.to(tl.int64), axis=0))
    tl.store(dx_ptr + o_m[:, None] * K + o_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_c[None, :])
    if COUNT:
        tl.atomic_add(work_ptr, macs)


@triton.jit
def _dw_m_loop(acc, acc_b, macs, g_ptr, x_ptr, out_row, m_r, n_rows, col, m_k, m_lo, m_hi, s_gm, s_gn, s_xm, s_xk,
               MASK_K: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc += g[m_lo:m_hi, rows]^T @ x[m_lo:m_hi, cols] (and db's sum of g), in BLOCK_M steps; ``MASK_K``: some
    of the columns lie past the window."""
    for m0 in range(m_lo, m_hi, BLOCK_M):
        o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_m = o_m < m_hi
        g = tl.load(g_ptr + o_m[:, None] * s_gm + out_row.to(tl.int64)[None, :] * s_gn,
                    mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_x = x_ptr + o_m[:, None] * s_xm + col.to(tl.int64)[None, :] * s_xk
        if MASK_K:
            x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        else:
            x = tl.load(p_x, mask=m_m[:, None], other=0.0)
        if HAS_BIAS:
            acc_b += tl.sum(g.to(ACC), axis=0)
        if DOT_FP32:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PREC)
        if COUNT:
            macs += tl.sum(m_m.to(tl.int64), axis=0) * n_rows * tl.sum(m_k.to(tl.int64), axis=0)
    return acc, acc_b, macs


@triton.jit
def _linear_dw_kernel(
    g_ptr,  # [M, N] by strides
    x_ptr,  # [M, K] by strides
    prog_ptr,  # int32[P, 6]
    dw_prog_ptr,  # int32[Pw, 2]
    rows_ptr,  # int64[R, 3]
    cols_ptr,  # int32[C]
    dw_ptr,  # [RANGES, n_trainable, K] contiguous, zero-filled
    db_ptr,  # [RANGES, n_trainable] zero-filled (unused without HAS_BIAS)
    work_ptr,  # int64[1] (COUNT only)
    M, M_RANGE, DW_NUMEL, N_TRAINABLE, s_gm, s_gn, s_xm, s_xk,  # the batch M reduced in ranges of M_RANGE
    HAS_BIAS: tl.constexpr, SCATTERED: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, X_ALIGN: tl.constexpr, WT_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = dw_prog_ptr + tl.program_id(0) * 2
    p = prog_ptr + tl.load(d) * 6
    k0 = tl.multiple_of(tl.load(d + 1), BLOCK_K)  # the table's dW programs start every COLS = BLOCK_K columns
    part = tl.program_id(1)  # this program's range of batch rows
    m_lo = part.to(tl.int64) * M_RANGE
    m_hi = tl.minimum(M, m_lo + M_RANGE)
    dw_ptr += part.to(tl.int64) * DW_NUMEL
    db_ptr += part.to(tl.int64) * N_TRAINABLE
    row0 = tl.load(p + 1)
    n_rows = tl.load(p + 2)
    gather = tl.load(p + 3)  # 0: the slice, 1: the gather list
    start = tl.load(p + 4)
    if not SCATTERED:  # a slice's start (a gather list's start indexes the list): what X_ALIGN divides
        start = tl.multiple_of(start, X_ALIGN)
    width = tl.load(p + 5)
    o_r = tl.arange(0, BLOCK_N)
    m_r = o_r < n_rows
    p_row = rows_ptr + (row0 + o_r).to(tl.int64) * 3
    out_row = tl.load(p_row, mask=m_r, other=0)
    # slot * K: dW has the trainable storage's layout
    w_row = tl.multiple_of(tl.load(p_row + 1, mask=m_r, other=0), WT_ALIGN)
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < width
    col, _ = window_columns(o_k, m_k, start, start, gather, False, cols_ptr, SCATTERED)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    acc_b = tl.zeros([BLOCK_N], dtype=ACC)
    macs = tl.full([], 0, tl.int64)
    # a program whose columns are all inside the window loads x without a column mask (one that varies along
    # a row keeps the loads element-wide); the window's last, partial tile masks them
    if k0 + BLOCK_K <= width:
        acc, acc_b, macs = _dw_m_loop(acc, acc_b, macs, g_ptr, x_ptr, out_row, m_r, n_rows, col, m_k, m_lo, m_hi,
                                      s_gm, s_gn, s_xm, s_xk, False, HAS_BIAS, COUNT, PREC, ACC, DOT_FP32, BLOCK_M)
    else:
        acc, acc_b, macs = _dw_m_loop(acc, acc_b, macs, g_ptr, x_ptr, out_row, m_r, n_rows, col, m_k, m_lo, m_hi,
                                      s_gm, s_gn, s_xm, s_xk, True, HAS_BIAS, COUNT, PREC, ACC, DOT_FP32, BLOCK_M)
    tl.store(dw_ptr + w_row[:, None] + col[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_k[None, :])
    if HAS_BIAS:
        if k0 == 0:
            b_row = tl.load(p_row + 2, mask=m_r, other=0)
            tl.store(db_ptr + b_row, acc_b.to(db_ptr.dtype.element_ty), mask=m_r)
    if COUNT:
        tl.atomic_add(work_ptr, macs)


# ----- host functions ------------------------------------------------------------------------------

def _blocks(kind: str, dtype: torch.dtype, tiles) -> dict:
    """Launch configuration; the forward's BLOCK_N and the dX BLOCK_K are the table's ROWS and COLS, and dW
    tiles are the forward's row tiles (``table_shape``: the shape the table was built for, which under
    autocast may be another dtype's)."""
    cfg = dict(gemm_blocks(kind, dtype))
    rows_tile, cols_tile = table_shape(tiles)
    if kind == "fwd":
        cfg["BLOCK_N"] = rows_tile
    elif kind == "dx":
        cfg["BLOCK_K"] = cols_tile
    else:
        cfg["BLOCK_N"], cfg["BLOCK_K"] = rows_tile, cols_tile
    return cfg


@on_tensor_device
def linear_forward(x2, tw, fw, tb, fb, tiles, n_out, scattered=True, out=None) -> torch.Tensor:
    """x2 [M, K] -> y [M, n_out] (contiguous; written into ``out`` when given), every neuron written."""
    prog, rows, cols = tiles[0], tiles[1], tiles[2]
    M = x2.shape[0]
    y = torch.empty((M, n_out), dtype=x2.dtype, device=x2.device) if out is None else out
    if M == 0 or prog.shape[0] == 0:
        return y
    frozen = fw is not None and fw.numel() > 0  # stored frozen synapses: exact fp32 (dot_precision)
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    has_bias = tb is not None
    if has_bias:
        tb = tb.contiguous()
        fb = frozen_or_dummy(fb, tb).contiguous()
    cfg = _blocks("fwd", x2.dtype, tiles)
    count, work = _counter(rows)
    limit = triton_common.GRID_AXIS_LIMIT  # a GPU grid's second axis: at most 65535 programs, so launched in parts
    for part in prog.split(limit):  # each program reads its own table row: the parts compute what one launch would
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), part.shape[0])
        _linear_fwd_kernel[grid](
            x2, tw, fw, tb if has_bias else tw, fb if has_bias else tw, part, rows, cols, y, work,
            M, n_out, x2.stride(0), x2.stride(1),
            HAS_BIAS=has_bias, SCATTERED=scattered, COUNT=count,
            PREC=dot_precision(x2.dtype, x2.device, frozen=frozen), ACC=acc_type(x2.dtype),
            DOT_FP32=dot_in_fp32(x2.dtype), **_alignment(tiles, scattered),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    return y


def _alignment(tiles, scattered: bool) -> dict:
    """The forward's alignment constexprs (``tiles.table_align``); none on gathered windows."""
    x, wt, wf = table_align(tiles)
    return dict(X_ALIGN=1 if scattered else x, WT_ALIGN=wt, WF_ALIGN=wf)


@on_tensor_device
def linear_input_grad(g2, tw, fw, tiles, K, scattered=True) -> torch.Tensor:
    """dX [M, K] (a fresh tensor, every element written) from the output gradient g2 [M, N]."""
    rows, dx_prog, dx_seg, dx_map = tiles[1], tiles[4], tiles[5], tiles[6]
    M = g2.shape[0]
    dx = torch.empty((M, K), dtype=g2.dtype, device=g2.device)
    if M == 0 or K == 0:
        return dx
    tw = tw.contiguous()
    fw = frozen_or_dummy(fw, tw).contiguous()
    cfg = _blocks("dx", g2.dtype, tiles)
    count, work = _counter(rows)
    # a GPU grid's second axis holds at most 65535 programs: a layer reading more column tiles (over 2 million fp32
    # inputs, e.g. a head after a flatten of large feature maps) launches in several parts, each program as before
    q = dx_prog.shape[0]
    for c0 in range(0, q, triton_common.GRID_AXIS_LIMIT):
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), min(triton_common.GRID_AXIS_LIMIT, q - c0))
        _linear_dx_kernel[grid](
            g2, tw, fw, rows, dx_prog, dx_seg, dx_map, dx, work, M, K, c0, g2.stride(0), g2.stride(1),
            SCATTERED=scattered, COUNT=count, PREC=dot_precision(g2.dtype, g2.device), ACC=acc_type(g2.dtype),
            DOT_FP32=dot_in_fp32(g2.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    return dx


@on_tensor_device
def linear_weight_grad(g2, x2, n_trainable, has_bias, tiles, scattered=True):
    """(dW [n_trainable, K], db [n_trainable] or [0]): the FREE rows' gradients, 0 on PRUNED rows and dead
    synapses. With more than one range of the batch (``dw_split``: too few dW tiles to fill the GPU) each
    range writes a float32 partial and the partials are summed in order."""
    prog, rows, cols, dw_prog = tiles[0], tiles[1], tiles[2], tiles[3]
    M, K = x2.shape
    if n_trainable == 0 or M == 0 or dw_prog.shape[0] == 0:
        return (torch.zeros((n_trainable, K), dtype=x2.dtype, device=x2.device),
                torch.zeros((n_trainable,) if has_bias else (0,), dtype=x2.dtype, device=x2.device))
    cfg = _blocks("dw", x2.dtype, tiles)
    ranges, m_range = dw_split(dw_prog.shape[0], M, cfg["BLOCK_M"])
    part_dtype = x2.dtype if ranges == 1 else torch.float32
    dw = torch.zeros((ranges, n_trainable, K), dtype=part_dtype, device=x2.device)
    db = torch.zeros((ranges, n_trainable) if has_bias else (0,), dtype=part_dtype, device=x2.device)
    count, work = _counter(rows)
    _linear_dw_kernel[(dw_prog.shape[0], ranges)](
        g2, x2, prog, dw_prog, rows, cols, dw, db if has_bias else dw, work,
        M, m_range, n_trainable * K, n_trainable, g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
        HAS_BIAS=has_bias, SCATTERED=scattered, COUNT=count, PREC=dot_precision(x2.dtype, x2.device),
        ACC=acc_type(x2.dtype), DOT_FP32=dot_in_fp32(x2.dtype),
        **{k: v for k, v in _alignment(tiles, scattered).items() if k != "WF_ALIGN"},
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)
    dw = dw[0] if ranges == 1 else dw.sum(0).to(x2.dtype)
    if has_bias:
        db = db[0] if ranges == 1 else db.sum(0).to(x2.dtype)
    return dw, db


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # explicit rows: -1 is ambiguous with 0 features


# ----- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("eidetic::triton_linear", mutates_args=())
def _linear_op(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
               trainable_bias: Optional[torch.Tensor], frozen_bias: Optional[torch.Tensor], tiles: list[torch.Tensor],
               n_out: int, scattered: bool, taylor_score: Optional[torch.Tensor]) -> torch.Tensor:
    # allocated at its final shape and returned as is: a view of it would forbid in-place ops after the layer
    y = x.new_empty((*x.shape[:-1], n_out))
    linear_forward(_flat(x), trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out, scattered,
                   out=y.view(math.prod(x.shape[:-1]), n_out))
    return y


@_linear_op.register_fake
def _(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out, scattered, taylor_score):
    return x.new_empty((*x.shape[:-1], n_out))


@torch.library.custom_op("eidetic::triton_linear_backward", mutates_args=("taylor_score",))
def _linear_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, trainable_weight: torch.Tensor,
                        frozen_weight: torch.Tensor, has_bias: bool, tiles: list[torch.Tensor], scattered: bool,
                        taylor_score: Optional[torch.Tensor], need_input_grad: bool,
                        need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g2 = _flat(grad)
    x2 = _flat(x)
    K = x.shape[-1]
    if need_input_grad:
        dx = linear_input_grad(g2, trainable_weight, frozen_weight, tiles, K, scattered).view(x.shape)
    else:
        dx = x.new_empty((0,))
    if need_weight_grad:
        dw, db = linear_weight_grad(g2, x2, trainable_weight.shape[0], has_bias, tiles, scattered)
    else:
        dw, db = x.new_empty((0,)), x.new_empty((0,))
    if taylor_score is not None:
        y2 = _flat(y)
        divisor = x.shape[0] if x.dim() > 2 else y2.shape[0]
        add_taylor(taylor_score, y2.unsqueeze(-1), g2.unsqueeze(-1), divisor)
    return dx, dw, db


@_linear_backward_op.register_fake
def _(grad, x, y, trainable_weight, frozen_weight, has_bias, tiles, scattered, taylor_score, need_input_grad,
      need_weight_grad):
    dx = x.new_empty(x.shape if need_input_grad else (0,))
    dw = x.new_empty(trainable_weight.shape if need_weight_grad else (0,))
    db = x.new_empty((trainable_weight.shape[0],) if need_weight_grad and has_bias else (0,))
    return dx, dw, db


def _samples(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


@register_flop_formula(torch.ops.eidetic.triton_linear, get_raw=True)
def _linear_flops(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, tiles, n_out, scattered,
                  taylor_score, out_val=None, **kwargs) -> int:
    """2 x the multiply-adds the forward kernel schedules: samples x Σ_blocks rows x window width."""
    return 2 * _samples(x) * int(tiles[7][0])


@register_flop_formula(torch.ops.eidetic.triton_linear_backward, get_raw=True)
def _linear_backward_flops(grad, x, y, trainable_weight, frozen_weight, has_bias, tiles, scattered, taylor_score,
                           need_input_grad, need_weight_grad, out_val=None, **kwargs) -> int:
    """2 x the multiply-adds the dX and dW kernels schedule (each only when launched)."""
    work = tiles[7]
    return 2 * _samples(x) * (int(work[1]) * bool(need_input_grad) + int(work[2]) * bool(need_weight_grad))


def _setup_context(ctx, inputs, output):
    x, tw, fw, tb, fb, tiles, n_out, scattered, taylor_score = inputs
    ctx.has_bias = tb is not None
    ctx.taylor = taylor_score is not None
    ctx.n_tiles = len(tiles)
    ctx.n_out, ctx.scattered = n_out, scattered
    # the Taylor score reads a copy of the output: in-place ops after the layer may change the output itself
    ctx.save_for_backward(x, output.detach().clone() if ctx.taylor else None, tw, fw, tb, fb, taylor_score, *tiles)


def _backward(ctx, grad):
    x, y, tw, fw, tb, fb, taylor_score, *tiles = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])
    rest = (None, [None] * ctx.n_tiles, None, None, None)  # frozen bias, tiles, n_out, scattered, taylor_score
    if not (need_dx or need_dw or ctx.taylor):
        return (None,) * 4 + rest
    if torch.is_grad_enabled():  # create_graph=True: gradients as a graph (see ops/double_backward.py)
        with torch.enable_grad():
            w, b = dense_from_tiles(tw, fw, tb, fb, tiles, ctx.n_out, x.shape[-1])
            carry = dx_synapses_from_tiles(tiles, ctx.n_out, x.shape[-1])
            y_graph = attach_taylor_hook(graph_product(F.linear, x, w, b, carry), taylor_score, -1)
        dx, dw, db = graph_grads(y_graph, (x, tw, tb), (need_dx, ctx.needs_input_grad[1],
                                                         ctx.has_bias and ctx.needs_input_grad[3]), grad)
        return (dx, dw, None, db) + rest
    dx, dw, db = _linear_backward_op(grad, x, y if ctx.taylor else x, tw, fw, ctx.has_bias, tiles, ctx.scattered,
                                     taylor_score, need_dx, need_dw)
    return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None, None,
            db if ctx.has_bias and ctx.needs_input_grad[3] else None) + rest


_linear_op.register_autograd(_backward, setup_context=_setup_context)
# under torch.autocast: input, weights and biases in the autocast dtype, as F.linear; the output in it too
register_autocast("eidetic::triton_linear", cast=(0, 1, 2, 3, 4))


def linear(x, weight, bias, frozen_weight, frozen_bias, table, taylor_score=None, constant_frozen=False):
    """Backend entry point (signature of reference.linear). ``table``: the layer's ``state.Table`` for its
    view, or its ``LinearTiles`` (``layer_tiles``); y [*, out] is a fresh tensor."""
    if isinstance(table, Table):
        rows_tile, cols_tile = tile_shape(x.dtype)
        table = build_tiles(table, constant_frozen, rows_tile, cols_tile, x.device)
    if DENSE_SHORTCUT and taylor_score is None and table.dense:
        return F.linear(x, weight, bias)
    if not table.trainable:  # as the reference: storages no computed row reads get no gradient (None)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return _linear_op(x, weight, frozen_weight, bias, frozen_bias, list(table.tensors), table.n_out, table.scattered,
                      taylor_score)
