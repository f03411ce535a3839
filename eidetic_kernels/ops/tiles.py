"""Tile tables of the Triton GEMM-like ops (linear, conv2d): a layer's range table (``state.make_table``) as
small int tensors, built on the host once per state change and view (layers cache them).

The same table serves both ops: its columns are input features (linear) or input channels (conv2d, whose
kernels multiply the channel offsets by kh*kw and add the kernel position). It lists:
* programs (``prog`` int32[P, 6]: kind, first row entry, rows, gather flag, column start, width): one per
  (block, run of at most ROWS of its rows). Kind 0 reads the frozen compact storage (row r of the block at
  ``offset + r*width``, its weights in column order), kind 1 the trainable storage (row ``slot*in``, weight
  column = input column), kind 2 writes zeros (PRUNED neurons, and those a view cannot see). A block's
  inputs are the slice ``[start, start + width)`` or, gather flag set, ``cols[start:start + width]``;
  only live inputs are listed, so a dead input is never read.
* row entries (``rows`` int64[R, 3]: output neuron, element offset of the row in its storage, bias index);
  PRUNED rows of the trainable block are not computed: they sit in kind-2 programs.
* dW programs (``dw_prog`` int32[Pw, 2]: trainable program, first column): one per (trainable program,
  COLS columns of its width).
* dX programs, one per COLS input columns (``dx_prog`` int32[Q, 2]: first segment, segments), each summing
  over segments (``dx_seg`` int32[S, 7]: kind, first row entry, rows, columns [lo, hi), shift, map start):
  the blocks that read some of its columns, in table order; weight column = input column - shift, or
  ``dx_map[map start + c - c0]`` (-1: not read) for scattered windows.
* ``work`` int64[3] (on the CPU): (row, column) pairs scheduled by forward, dX and dW; the ops multiply them
  by their samples (and kernel positions) in their flop formulas.
* ``shape`` int64[2] (on the CPU): (ROWS, COLS) the table is laid out for. The kernels launch with these
  tiles whatever dtype they run in: under ``torch.autocast`` an op gets a table built for its inputs' dtype
  and runs in the autocast dtype, whose own tile shape may differ.
* ``align`` int64[3] (on the CPU): how the table's offsets are aligned (``table_align``). A tensor of its own, so a
  compiled graph cached before it existed cannot be reused with a table of another layout.

``eidetic::triton_linear_tiles`` builds a table inside a compiled graph (``layer_tiles``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..state import Table, make_table
from .triton_common import gemm_blocks

KIND_FROZEN, KIND_TRAINABLE, KIND_ZERO = 0, 1, 2
_PROG, _ROW, _SEG = 6, 3, 7  # fields per program, row entry, dX segment


class Tiles(NamedTuple):
    """A layer's tile table for one view (see the module docstring); ``tensors`` in ``TILE_NAMES`` order,
    ``n_out`` the layer's output neurons; ``trainable``: whether a trainable row is computed;
    ``scattered``: whether a window is a gather list or a dX segment a column map.

    ``dense``: the layer is a plain nn.Linear / nn.Conv2d (every neuron FREE, every input live), which the
    dense shortcut hands to torch's own op."""

    tensors: tuple
    n_out: int
    dense: bool = False
    trainable: bool = True  # False: no trainable row is computed (a view), so the storage gets no gradient
    scattered: bool = True  # some window is a gather or some dX segment a map (kernels compile those paths)


TILE_NAMES = ("prog", "rows", "cols", "dw_prog", "dx_prog", "dx_seg", "dx_map", "work", "shape", "align")


def tile_shape(dtype: torch.dtype, op: str = "linear") -> tuple[int, int]:
    """(ROWS, COLS) of the tables for ``dtype`` and ``op`` ("linear" or "conv2d": the same on a GPU): rows per
    forward/dW program, input columns per dX program."""
    return gemm_blocks("fwd", dtype, op)["BLOCK_N"], gemm_blocks("dx", dtype, op)["BLOCK_K"]


def table_shape(tiles) -> tuple[int, int]:
    """(ROWS, COLS) a table (its tensors, ``TILE_NAMES`` order) was built for: the kernels' launch tiles."""
    rows_tile, cols_tile = tiles[8].tolist()
    return int(rows_tile), int(cols_tile)


# Alignment (elements) the linear kernels may assume of a table's offsets: 16 covers a 16-byte vector of any
# dtype the kernels run (4 fp32, 8 bf16/fp16).
ALIGN = 16


def _pow2_divisor(n: int) -> int:
    """The largest power of two <= ``ALIGN`` dividing ``n`` (0 is divisible by all)."""
    n = int(n)
    return ALIGN if n == 0 else min(ALIGN, n & -n)


def table_align(tiles) -> tuple[int, int, int]:
    """(X, WT, WF): powers of two (<= ``ALIGN``) that divide, for every program of the table, the first input
    column of its window when it is a slice (X; 1 when some window is a gather), every trainable row's element
    offset and window start in the trainable storage (WT), and every frozen block's element offset and width in
    the compact storage (WF). The linear kernels declare these with ``tl.multiple_of``; where all three are 16,
    their K loops' unmasked full tiles load 16 bytes at a time. A network's layers read prefix windows (start
    0) and have input counts that are multiples of 16; a frozen block's compact rows are aligned only when its
    width is."""
    x, wt, wf = tiles[9].tolist()
    return int(x), int(wt), int(wf)


def _block_columns(blk, n_in: int) -> torch.Tensor:
    """Int64[width] on the CPU: the input columns a block reads, ascending (its compact weight order)."""
    if blk.cols is not None:
        return blk.cols.cpu().long()
    a, b = blk.col_range
    cols = torch.arange(a, b)
    if blk.dead is not None:
        keep = torch.ones(b - a, dtype=torch.bool)
        keep[blk.dead.cpu().long()] = False
        cols = cols[keep]
    return cols


def build_tiles(table: Table, constant_frozen: bool, rows_tile: int, cols_tile: int,
                device: torch.device | None = None) -> Tiles:
    """The tile table of ``table`` (a layer's range table for one view) for tiles of ``rows_tile`` rows and
    ``cols_tile`` dX columns; tensors on ``device`` (default: where the table's rows are), ``work`` and
    ``shape`` on the CPU. ``constant_frozen``: frozen blocks give no dX and the trainable block dX for inputs
    from FREE producers only (the layer's mode of the same name)."""
    n_in, n_out = table.n_in, table.n_out
    if device is None:
        device = table.blocks[0].rows.device if table.blocks else torch.device("cpu")
    prog, rows, cols, dw_prog = [], [], [], []
    n_cols = n_entries = 0
    covered = torch.zeros(n_out, dtype=torch.bool)
    work = [0, 0, 0]
    x_align, wt_align, wf_align = ALIGN, _pow2_divisor(n_in), ALIGN  # see ``table_align``
    dx_blocks = []  # (kind, first row entry, rows, dX columns, their weight columns)
    for blk in table.blocks:
        out = blk.rows.cpu().long()
        read = _block_columns(blk, n_in)
        width = read.numel()
        if blk.frozen:
            kind = KIND_FROZEN
            r = torch.arange(out.numel())
            w_row, b_row = blk.offset + r * blk.width, blk.bias_start + r
            w_col = torch.arange(width)
            dx_cols = None if constant_frozen else read
        else:
            kind = KIND_TRAINABLE
            slots = torch.arange(out.numel()) if blk.slots is None else blk.slots.cpu().long()
            if blk.zero_rows is not None:  # PRUNED rows: not computed, written 0 by kind-2 programs
                keep = torch.ones(out.numel(), dtype=torch.bool)
                keep[blk.zero_rows.cpu().long()] = False
                out, slots = out[keep], slots[keep]
            w_row, b_row = slots * n_in, slots
            w_col = read
            dx_cols = read
            if constant_frozen:  # inputs from FREE producers: the only ones a gradient is wanted for
                window = blk.cols.cpu().long() if blk.cols is not None else torch.arange(*blk.col_range)
                free = torch.zeros(n_in, dtype=torch.bool)
                free[window[blk.train_pos.cpu().long()]] = True
                dx_cols = read[free[read]]
        n = out.numel()
        if n == 0:
            continue
        covered[out] = True
        if width and int(read[-1]) - int(read[0]) != width - 1:
            gather, start = 1, n_cols
            cols.append(read)
            n_cols += width
        else:
            gather, start = 0, int(read[0]) if width else 0
        if width:
            if gather:
                x_align = 1
            else:
                x_align = min(x_align, _pow2_divisor(start))
            if kind == KIND_FROZEN:
                wf_align = min(wf_align, _pow2_divisor(blk.offset), _pow2_divisor(blk.width))
            else:
                wt_align = min(wt_align, _pow2_divisor(start) if not gather else 1)
        rows.append(torch.stack([out, w_row, b_row], 1))
        for t0 in range(0, n, rows_tile):
            if kind == KIND_TRAINABLE:
                dw_prog.extend([len(prog), k0] for k0 in range(0, max(width, 1), cols_tile))
            prog.append([kind, n_entries + t0, min(rows_tile, n - t0), gather, start, width])
        work[0] += n * width
        if kind == KIND_TRAINABLE:
            work[2] += n * width
        if dx_cols is not None and dx_cols.numel():
            pos = torch.zeros(n_in, dtype=torch.long)
            pos[read] = w_col
            dx_blocks.append((kind, n_entries, n, dx_cols, pos[dx_cols]))
            work[1] += n * dx_cols.numel()
        n_entries += n
    zero = (~covered).nonzero().flatten()
    if zero.numel():
        z = torch.zeros_like(zero)
        rows.append(torch.stack([zero, z, z], 1))
        for t0 in range(0, zero.numel(), rows_tile):
            prog.append([KIND_ZERO, n_entries + t0, min(rows_tile, zero.numel() - t0), 0, 0, 0])
        n_entries += zero.numel()
    # dX: per column tile, the blocks reading some of its columns, in table order
    n_tiles = -(-n_in // cols_tile)
    per_tile = [[] for _ in range(n_tiles)]
    maps, n_map = [], 0
    for kind, row0, n, dx_cols, w_col in dx_blocks:
        tile = dx_cols // cols_tile
        bounds = torch.searchsorted(tile, torch.arange(n_tiles + 1))
        for t in torch.unique_consecutive(tile).tolist():
            a, b = int(bounds[t]), int(bounds[t + 1])
            c, w = dx_cols[a:b], w_col[a:b]
            lo, hi = int(c[0]), int(c[-1]) + 1
            shift = int(c[0] - w[0])
            if hi - lo == c.numel() and bool((c - w == shift).all()):
                per_tile[t].append([kind, row0, n, lo, hi, shift, -1])
            else:
                m = torch.full((cols_tile,), -1, dtype=torch.long)
                m[c - t * cols_tile] = w
                maps.append(m)
                per_tile[t].append([kind, row0, n, 0, 0, 0, n_map])
                n_map += cols_tile
    dx_prog, segs = [], []
    for s in per_tile:
        dx_prog.append([len(segs), len(s)])
        segs.extend(s)

    def table_of(data, fields, dtype=torch.int32, pad=False):
        t = torch.tensor(data, dtype=dtype).reshape(-1, fields) if data else torch.zeros((0, fields), dtype=dtype)
        if pad and not data:  # a valid pointer argument even when nothing is read through it
            t = torch.zeros((1, fields), dtype=dtype)
        return t.to(device)

    def cat_of(parts, dtype, empty=(1,)):  # never empty: a valid pointer argument
        return (torch.cat(parts) if parts else torch.zeros(empty, dtype=torch.long)).to(device, dtype)

    tensors = (table_of(prog, _PROG), cat_of(rows, torch.int64, (1, _ROW)), cat_of(cols, torch.int32),
               table_of(dw_prog, 2),
               table_of(dx_prog, 2), table_of(segs, _SEG, pad=True), cat_of(maps, torch.int32),
               torch.tensor(work, dtype=torch.int64),
               torch.tensor([rows_tile, cols_tile], dtype=torch.int64),
               torch.tensor([x_align, wt_align, wf_align], dtype=torch.int64))
    return Tiles(tensors, n_out, dense=table.all_trainable_dense, trainable=bool(dw_prog),
                       scattered=bool(cols) or bool(maps))


@torch.library.custom_op("eidetic::triton_linear_tiles", mutates_args=())
def _tiles_op(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor, view_task: int,
              constant_frozen: bool, rows_tile: int, cols_tile: int) -> list[torch.Tensor]:
    table = make_table(in_task, out_task, out_min_task, None if view_task < 0 else view_task)
    return list(build_tiles(table, constant_frozen, rows_tile, cols_tile, out_task.device).tensors)


@_tiles_op.register_fake
def _(in_task, out_task, out_min_task, view_task, constant_frozen, rows_tile, cols_tile):
    ctx = torch.library.get_ctx()
    dev = out_task.device
    i32 = dict(dtype=torch.int32, device=dev)
    return [out_task.new_empty((ctx.new_dynamic_size(), _PROG), **i32),
            out_task.new_empty((ctx.new_dynamic_size(), _ROW), dtype=torch.int64, device=dev),
            out_task.new_empty((ctx.new_dynamic_size(),), **i32),
            out_task.new_empty((ctx.new_dynamic_size(), 2), **i32),
            out_task.new_empty(((in_task.shape[0] + cols_tile - 1) // cols_tile, 2), **i32),
            out_task.new_empty((ctx.new_dynamic_size(), _SEG), **i32),
            out_task.new_empty((ctx.new_dynamic_size(),), **i32),
            out_task.new_empty((3,), dtype=torch.int64, device="cpu"),
            out_task.new_empty((2,), dtype=torch.int64, device="cpu"),
            out_task.new_empty((3,), dtype=torch.int64, device="cpu")]


def layer_tiles(plans: dict, table_fn, in_task, out_task, out_min_task, view_task: int | None,
                constant_frozen: bool, dtype: torch.dtype, narrow: int | None = None, op: str = "linear") -> Tiles:
    """A layer's tile table for its current view, cached in ``plans`` (the layer's plan cache, cleared at
    every state change). Eager: built on the host from ``table_fn()`` (the layer's cached range table).
    Inside a compiled graph a cached table is an input of the graph; a missing one is built by the
    ``eidetic::triton_linear_tiles`` op when the graph runs, and cached as well. ``narrow``: the view at
    prefix width reading ``narrow`` inputs (``state.narrow_table``; eager only). ``op``: "linear" or "conv2d"
    (``tile_shape``)."""
    rows_tile, cols_tile = tile_shape(dtype, op)
    key = ("triton tiles", view_task, bool(constant_frozen), rows_tile, cols_tile, narrow)
    tiles = plans.get(key)
    if tiles is None:
        if torch.compiler.is_compiling() and narrow is None:
            tiles = Tiles(tuple(_tiles_op(in_task, out_task, out_min_task, -1 if view_task is None else
                                                view_task, bool(constant_frozen), rows_tile, cols_tile)),
                                out_task.shape[0])
        else:
            tiles = build_tiles(table_fn(), constant_frozen, rows_tile, cols_tile, out_task.device)
        plans[key] = tiles
    return tiles



def dense_from_tiles(tw, fw, tb, fb, tiles, n_out: int, n_in: int, kernel: tuple = ()):
    """(W [n_out, n_in, *kernel], b [n_out] | None) that the tiles compute, zeros on dead synapses and on
    kind-2 rows; differentiable w.r.t. ``tw``/``tb`` only (frozen storage read detached). For double backward
    (eager). ``kernel``: the convolution's (kh, kw), () for linear."""
    prog, rows, cols = (t.cpu() for t in tiles[:3])
    dev = tw.device
    kk = math.prod(kernel)
    w = tw.new_zeros((n_out, n_in, kk))
    b = None if tb is None else tb.new_zeros((n_out,))
    flat_t, flat_f = tw.reshape(-1, kk), fw.detach().reshape(-1, kk)  # one row per (neuron, input) synapse
    for kind, row0, n, gather, start, width in prog.tolist():
        if kind == KIND_ZERO or n == 0:
            continue
        entries = rows[row0:row0 + n]
        out = entries[:, 0].to(dev)
        k = torch.arange(width)
        col = cols[start:start + width].long() if gather else start + k
        if width:
            w_col = k if kind == KIND_FROZEN else col
            index = (entries[:, 1:2] + w_col[None, :]).to(dev)
            vals = (flat_f if kind == KIND_FROZEN else flat_t)[index]
            w = w.index_put((out[:, None], col.to(dev)[None, :]), vals)
        if b is not None:
            src = fb.detach() if kind == KIND_FROZEN else tb
            b = b.index_put((out,), src[entries[:, 2].to(dev)])
    return w.reshape(n_out, n_in, *kernel), b


def dx_synapses_from_tiles(tiles, n_out: int, n_in: int) -> torch.Tensor:
    """Bool [n_out, n_in] on the CPU: the synapses the dX programs carry a gradient through (every live synapse
    of a computed row; with frozen blocks as constants, the trainable rows' synapses from FREE producers only).
    For double backward (eager), whose graph must give the input the gradient the kernels give it."""
    rows, dx_prog, segs, maps = (t.cpu() for t in (tiles[1], tiles[4], tiles[5], tiles[6]))
    cols_tile = table_shape(tiles)[1]
    carry = torch.zeros((n_out, n_in), dtype=torch.bool)
    for t, (first, count) in enumerate(dx_prog.tolist()):
        for kind, row0, n, lo, hi, _shift, map0 in segs[first:first + count].tolist():
            out = rows[row0:row0 + n, 0]
            if map0 < 0:
                carry[out[:, None], torch.arange(lo, hi)[None, :]] = True
            else:
                read = (maps[map0:map0 + cols_tile] >= 0).nonzero().flatten() + t * cols_tile
                carry[out[:, None], read[read < n_in][None, :]] = True
    return carry

