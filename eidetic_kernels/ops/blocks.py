"""The block-triangular product shared by the reference linear and conv.

A layer's outputs are computed block by block from its range table (``eidetic_kernels.state.make_table``):
frozen block b is ``dense_op(x[window_b], W_b, b_b)`` with ``W_b`` a view of the compact frozen storage
(only its live synapses are stored), the trainable block one ``dense_op`` over the trainable storage.
Block outputs are concatenated in table order; the table says whether that already is neuron order
(the task-major layout of a network) or needs one gather into it.

Why blocks and not W ⊙ M: a frozen neuron must never see a later neuron's output, not even multiplied by
zero (0 · NaN = NaN). A frozen block reads only its window (a slice, or a gather: never a product with a
0/1 mask) and only weights no later task can write. Every choice below depends on the block and its
inputs' shape only, never on the view or on later tasks, so a finished task's outputs are bit-stable.

Gradients: frozen blocks have constant weights, so their backward is dX only (``_ConstantWeightOp`` keeps
the weights, not the input). With ``constant_frozen=True`` (what ``EideticNetwork`` turns on for its own
training) frozen blocks are constants to autograd altogether, and the trainable block computes dX only
for inputs that come from FREE producers (``_TrainableBlockOp``): every other input can reach no trainable
parameter. That is exact for every parameter gradient and Taylor score; it is not the full gradient of
the layer's input (``autograd.grad`` on activations, saliency), hence an opt-in.

Merged training product (convolutions on the CPU, ``DenseOp.merge_share``): in that mode, inside a network
(task-major rows, no view), a layer whose live synapses are a large share of its weight runs as ONE product
whose constant weight holds every block's synapses and zeros elsewhere, built per call. oneDNN runs a
convolution over 3-13 output channels far below the efficiency of the whole layer's, so after a few tasks
the per-block convolutions cost more than the whole layer; one product costs what ``nn.Conv2d`` does.
The zeros of a frozen row multiply the inputs its block never reads (later tasks' features and the free
capacity), so with NaN or inf there (0 * NaN = NaN) its output in this product is NaN where its block's is not.
The frozen rows' outputs computed this way feed the task being trained only, whose own capacity holds that NaN
anyway: finished tasks' views always run block by block, so neither their bits nor their finiteness depend on
this choice. (FlopCounterMode counts the whole product.)

Written training product (linear, same mode): in that layout the blocks of a linear layer write their outputs
straight into one output tensor (``DenseOp.forward_into``: a GEMM into a column slice), where the block-by-block
product would concatenate them, a copy of the whole activation per layer and step (``_WrittenOp``).

Grouped frozen blocks (both ops, same mode): consecutive frozen blocks that read the same slice (every finished
task's block of a first layer reads the whole raw input) run as one product over their adjacent storage, a
view; ten products of a tenth of the rows cost more than one over all of them. Same argument: training only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..state import Block, Table
from .eager import eager_backward

# Training merges the blocks of a convolution into one product where that pays (``DenseOp.merge_share``), and
# runs consecutive frozen blocks that read the same slice as one product (``_same_window_runs``). Tests set it
# to False to compare with the block-by-block product.
MERGE_IN_TRAINING = True

# Merged training product (``_MergedOp``): with trainable rows at least this share of the layer, the backward runs
# on the whole output gradient (frozen rows' weights 0) instead of a copy of the trainable rows' part of it.
_WHOLE_GRAD_SHARE = 0.5

# Output assembly on the CPU: with at least this many contiguous elements per (sample, neuron),
# scattering each block's output (index_add_) beats one gather from their concatenation.
_LONG_BLOCK = 256


@dataclass(frozen=True)
class DenseOp:
    """A dense op and its two gradients. ``dim``: the feature dim of inputs and outputs."""

    forward: Callable  # (x, weight, bias) -> y
    input_grad: Callable  # (grad_y, weight, x_shape) -> grad_x
    weight_grad: Callable  # (x, grad_y, weight) -> (grad_w, grad_b); the weight's values are not read
    dim: int
    # the trainable block computes dX for inputs from FREE producers only (a separate dX and dW) once the
    # other inputs are at least this share of its window; below it one fused backward over the window
    # (dX for every input) is cheaper. 0: always split (GEMMs); convolutions pay per backward call.
    split_backward_share: float = 0.0
    # (x, grad_y, weight) -> (grad_x, grad_w, grad_b) in one call, for the fused backward; None: two calls
    fused_grad: Callable | None = None
    # training with frozen blocks as constants: one product over the whole layer (a weight assembled
    # with zeros on the synapses that do not exist) instead of one per block, once the live synapses are
    # at least this share of the layer's. 0: never (GEMMs: narrow products run near full efficiency).
    merge_share: float = 0.0
    # (x [M, in] 2-D, weight, bias, out [M, rows] a column slice of a row-major output) -> None: the product
    # written into ``out`` (the written training product, ``_WrittenOp``); None: the op has none
    forward_into: Callable | None = None


def block_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, frozen_weight: torch.Tensor,
                  frozen_bias: torch.Tensor | None, table: Table, op: DenseOp,
                  constant_frozen: bool = False) -> torch.Tensor:
    """Outputs of a layer (Linear/Conv) from its storages and range table.

    x [*, in] (linear, dim -1) or [N, C_in, H, W] (conv, dim 1); weight: trainable storage [n_trainable, in,
    *kernel] (a Parameter: gets gradients); frozen_weight: flat compact frozen storage (never differentiated).
    """
    dim = op.dim % x.dim()
    grad_x = torch.is_grad_enabled() and x.requires_grad
    plain = functorch_active()
    if plain:  # the frozen-constant products are autograd Functions: exact mode, plain ops (see functorch_active)
        constant_frozen = False
    if table.all_trainable_dense and not (constant_frozen and grad_x and _has_constant_inputs(table, x.shape[dim])):
        return op.forward(x, weight, bias)
    kernel = tuple(weight.shape[2:])
    if constant_frozen and _merge_pays(table, op, x.shape[dim]):
        return _merged_forward(x, weight, bias, frozen_weight, frozen_bias, table, op, dim, grad_x)
    if constant_frozen and _writes_pay(table, op, x):
        return _written_forward(x, weight, bias, frozen_weight, frozen_bias, table, op, grad_x)
    parts = []
    # a view (frozen blocks only) gives each product a contiguous window: GEMMs round strided and contiguous
    # operands differently, and a finished task at prefix width (EideticNetwork.forward) reads the same
    # window from a narrower tensor; copied, both give the same bits
    view = all(blk.frozen for blk in table.blocks)
    grouped = MERGE_IN_TRAINING and constant_frozen and not view and table.out_index is None  # task-major rows
    runs = _same_window_runs(table.blocks) if grouped else [[blk] for blk in table.blocks]
    reads_x, reads_weight = False, view  # a view reads no trainable row
    for run in runs:
        blk = run[0]
        if blk.frozen:
            if len(run) > 1:
                blk = _merged_block(run)
            parts.append(_frozen_block(x, frozen_weight, frozen_bias, blk, kernel, op, dim,
                                       grad_x and not constant_frozen, contiguous=view, plain=plain))
        else:
            parts.append(_trainable_block(x, weight, bias, blk, op, dim, grad_x, constant_frozen))
            reads_weight = blk.width > 0
        reads_x = reads_x or blk.width > 0
    y = _assemble(x, weight, parts, table, op, dim, plain)
    # no block reads a live input (every producer PRUNED): the twin gets gradients of 0 through the dead synapses,
    # for its weights and an input that requires grad; without this they would be cut from the graph (None, or
    # autograd.grad of the input raising)
    unread = [x] if grad_x and not reads_x else []
    if not reads_weight and weight.shape[0] and weight.requires_grad and torch.is_grad_enabled():
        unread.append(weight)
    if unread and not plain:
        y = ZeroGradients.apply(y, *unread)
    return y


class ZeroGradients(torch.autograd.Function):
    """``y`` (copied; its gradient passes through) as a function of ``tensors`` too, whose gradients are 0: what
    the twin gives a tensor it reads only through dead synapses (zero weights or inputs), without reading it
    (0 · NaN would be NaN)."""

    @staticmethod
    def forward(ctx, y, *tensors):
        ctx.metas = [(t.shape, t.dtype, t.device) for t in tensors]
        return y.clone()

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.metas)


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jacrev, functional per-sample gradients, ...).

    functorch runs an ``autograd.Function`` only when it defines ``setup_context`` and a vmap rule; this
    module's Functions keep intermediate state on ``ctx`` instead. Inside a transform the layer therefore
    runs plain differentiable torch ops: frozen blocks as ``op.forward`` on detached weights (the same
    products, so the same outputs; gradients as exact mode gives them) and outputs assembled by a gather."""
    return torch._C._are_functorch_transforms_active()


def _has_constant_inputs(table: Table, n_in: int) -> bool:
    """Some inputs of a plain layer (one trainable block over every row and input) come from frozen producers.
    A network's head reads every task's features: with frozen blocks as constants, its dX is needed for the
    FREE features only (``_TrainableBlockOp``), a fifth of the whole after 8 tasks of 10%."""
    return table.blocks[0].train_pos.numel() < n_in


def _same_window_runs(blocks: list[Block]) -> list[list[Block]]:
    """The table's blocks in order, consecutive frozen blocks that read the same slice grouped: one product
    serves them in training (frozen blocks constant). Their weights are adjacent in the compact storage (blocks
    are stored in table order, each ``rows x width``), so the group's weight is a view, and its outputs are
    the blocks' outputs in order. A network's first layer is the common case: every finished task reads the
    whole raw input, and 8 products of a tenth of the rows cost more than one of eight tenths.

    Only while training with frozen blocks as constants: their outputs then feed the task being trained, never
    a finished task's view, which always runs block by block (so no finished task's bits depend on which
    blocks are grouped)."""
    runs: list[list[Block]] = []
    for blk in blocks:
        prev = runs[-1][-1] if runs else None
        if (prev is not None and prev.frozen and blk.frozen and blk.cols is None and prev.cols is None
                and blk.col_range == prev.col_range and blk.width == prev.width and blk.width > 0
                and blk.offset == prev.offset + prev.rows.numel() * prev.width
                and blk.bias_start == prev.bias_start + prev.rows.numel()):
            runs[-1].append(blk)
        else:
            runs.append([blk])
    return runs


def _merged_block(run: list[Block]) -> Block:
    """One frozen block standing for ``run`` (``_same_window_runs``): their rows, window, storage and bias."""
    first = run[0]
    return dataclasses.replace(first, rows=torch.cat([b.rows for b in run]))


def _window(x: torch.Tensor, blk: Block, dim: int, write: torch.Tensor | None = None) -> torch.Tensor:
    """The block's inputs along ``dim`` (of the input, or of the weight's columns): a slice or a gather.
    With ``write``: copy ``write`` into those positions of ``x`` instead (in place)."""
    if blk.cols is None or blk.col_range is not None:
        a, b = blk.col_range
        view = x if (a, b) == (0, x.shape[dim]) else x.narrow(dim, a, b - a)
        return view if write is None else view.copy_(write)
    if write is not None:
        return x.index_copy_(dim, blk.cols, write)
    return x.index_select(dim, blk.cols)


def _free_inputs(blk: Block):
    """Which of the trainable block's window inputs come from FREE producers: a range, else positions."""
    return blk.train_range if blk.train_range is not None else blk.train_pos


def _columns(t: torch.Tensor, dim: int, select) -> torch.Tensor:
    """``t`` along ``dim`` at ``select``: a range ``(a, e)`` (a view), positions (a gather), or None (all)."""
    if select is None:
        return t
    if isinstance(select, tuple):
        return t.narrow(dim, select[0], select[1] - select[0])
    return t.index_select(dim, select)


def _into_window(full: torch.Tensor, blk: Block, dim: int, values: torch.Tensor) -> torch.Tensor:
    """``full`` with ``values`` written at the block's window along ``dim`` (in place); returns ``full``."""
    _window(full, blk, dim, write=values)
    return full


def _frozen_views(frozen_weight, frozen_bias, blk: Block, kernel, plain: bool):
    """(w [n, width, *kernel], b [n] | None): the block's detached views of the compact frozen storages.

    Kept on the block (a layer's tables live until one of its states changes) once the same storages came twice
    in a row, so that evaluating a task with many finished blocks does not re-slice each of them per call (the
    products dominate only where blocks are large). A storage cast per call (autocast) is never kept; nor are
    views inside torch.func transforms or torch.compile, or of inference tensors. Views kept under
    ``torch.inference_mode`` are made outside it, as ordinary tensors a later training step may save."""
    n, k = blk.rows.numel(), math.prod(kernel)
    keep = not (plain or torch.compiler.is_compiling() or frozen_weight.is_inference())
    if keep:
        key = (frozen_weight.data_ptr(), frozen_weight.dtype, frozen_weight.device, frozen_weight.numel(),
               None if frozen_bias is None else (frozen_bias.data_ptr(), frozen_bias.dtype, frozen_bias.numel()))
        kept = blk.__dict__.get("_frozen_views")
        if kept is not None and kept[0] == key:
            return kept[1]
    with torch.inference_mode(False) if keep and torch.is_inference_mode_enabled() else contextlib.nullcontext():
        w = frozen_weight.detach().narrow(0, blk.offset * k, n * blk.width * k).view((n, blk.width) + kernel)
        b = None if frozen_bias is None else frozen_bias.detach().narrow(0, blk.bias_start, n)
    if keep:
        if blk.__dict__.get("_frozen_key") == key:  # the second call with these storages: keep the views
            blk.__dict__["_frozen_views"] = (key, (w, b))
        blk.__dict__["_frozen_key"] = key
    return w, b


def _frozen_block(x, frozen_weight, frozen_bias, blk: Block, kernel, op: DenseOp, dim: int, grad_x: bool,
                  contiguous: bool = False, plain: bool = False):
    n = blk.rows.numel()
    w, b = _frozen_views(frozen_weight, frozen_bias, blk, kernel, plain)
    xw = _window(x, blk, dim)
    if contiguous:
        xw = xw.contiguous()
    if blk.width == 0:  # no live input: the outputs are the bias
        return _bias_only(x, n, kernel, b, op, dim)
    if not grad_x:
        return op.forward(xw.detach(), w, b)
    if plain:  # differentiable in x only: w and b are detached views of the frozen storage
        return op.forward(xw, w, b)
    return _ConstantWeightOp.apply(xw, w, b, op)


def _trainable_block(x, weight, bias, blk: Block, op: DenseOp, dim: int, grad_x: bool, constant_frozen: bool):
    w, b = weight, bias
    if blk.slots is not None:
        w = w.index_select(0, blk.slots)
        b = None if b is None else b.index_select(0, blk.slots)
    xw, w = _window(x, blk, dim), _window(w, blk, 1)
    if blk.dead is not None:
        # dead inputs inside the slice (PRUNED producers): zero them on the smaller tensor. The trainable
        # block's outputs are not protected, and either way dW = 0 on dead synapses and dX = 0 on dead inputs.
        if w.numel() <= xw.numel():
            w = w.index_fill(1, blk.dead, 0)
        else:
            xw = xw.index_fill(dim, blk.dead, 0)
    if xw.shape[dim] == 0:
        y = _bias_only(x, w.shape[0], tuple(w.shape[2:]), b, op, dim)
    elif constant_frozen and grad_x and _split_pays(blk, xw.shape[dim], op):
        x_train = _columns(xw, dim, _free_inputs(blk))
        y = _TrainableBlockOp.apply(xw.detach(), x_train, w, b, _free_inputs(blk), op)
    else:
        y = op.forward(xw, w, b)
    if blk.zero_rows is not None:
        # PRUNED rows of the trainable storage: exactly 0 (a select; index_fill_'s backward zeroes their
        # gradients). In place on a fresh output, which neither op saves for backward.
        # (out of place when the product returned a view, e.g. F.linear on a [B, T, in] input: autograd forbids
        # writing into a view that an autograd Function returned)
        y = y.index_fill(dim, blk.zero_rows, 0) if y._is_view() else y.index_fill_(dim, blk.zero_rows, 0)
    return y


def _split_pays(blk: Block, width: int, op: DenseOp) -> bool:
    """dX for the inputs from FREE producers only, or the plain op's backward (dX for the whole window)?
    Scattered FREE inputs must be gathered with their weight columns: that pays once they are at most half
    the window. A contiguous run is a view: it pays whenever the op's split backward does."""
    constant_share = 1 - blk.train_pos.numel() / width
    if constant_share == 0 or (blk.train_range is None and constant_share < 0.5):
        return False
    return constant_share >= op.split_backward_share


def _merge_pays(table: Table, op: DenseOp, n_in: int) -> bool:
    """One product over the whole layer instead of one per block (training, frozen blocks constant)?

    Only for the layout a network trains in (rows task-major, one trainable block after the frozen ones,
    no tail) and when the live synapses are at least ``op.merge_share`` of the layer's: a convolution
    over few output channels runs far below the efficiency of one over all of them, so past that share
    the zeros cost less than the narrow products. The frozen rows' outputs computed this way feed the
    task being trained only: a finished task's own outputs (its view) always run block by block.
    """
    if not MERGE_IN_TRAINING or not op.merge_share or table.out_index is not None or table.tail or table.n_in != n_in:
        return False
    frozen = [b for b in table.blocks if b.frozen]
    trainable = [b for b in table.blocks if not b.frozen]
    if not frozen or len(trainable) != 1 or trainable[0].slots is not None or table.blocks[-1].frozen:
        return False
    live = sum(b.rows.numel() * b.width for b in table.blocks)
    return live >= op.merge_share * table.n_out * table.n_in


def _merged_forward(x, weight, bias, frozen_weight, frozen_bias, table: Table, op: DenseOp, dim: int,
                    grad_x: bool):
    """The layer as one product (see ``_merge_pays``): a constant weight [n_out, n_in, *kernel] holding each
    frozen block's synapses and the trainable block's (dead ones 0), built per call (no weight-sized tensor
    is kept). Gradients as with ``_TrainableBlockOp``: dW/db of the trainable rows, dX of the inputs from
    FREE producers only."""
    kernel = tuple(weight.shape[2:])
    k = math.prod(kernel)
    w_full = weight.new_zeros((table.n_out, table.n_in) + kernel)
    has_bias = bias is not None or frozen_bias is not None
    b_full = weight.new_zeros(table.n_out) if has_bias else None
    fw = frozen_weight.detach()
    row = 0
    for blk in table.blocks:
        n = blk.rows.numel()
        if blk.frozen:
            if blk.width:
                w = fw.narrow(0, blk.offset * k, n * blk.width * k).view((n, blk.width) + kernel)
                _window(w_full.narrow(0, row, n), blk, 1, write=w)
            if frozen_bias is not None:
                b_full.narrow(0, row, n).copy_(frozen_bias.detach().narrow(0, blk.bias_start, n))
        else:
            trainable, row_trainable = blk, row
            if blk.width:
                w = _window(weight.detach(), blk, 1)
                if blk.dead is not None:
                    w = w.index_fill(1, blk.dead, 0)
                _window(w_full.narrow(0, row, n), blk, 1, write=w)
            if bias is not None:
                b_full.narrow(0, row, n).copy_(bias.detach())
        row += n
    # dX only where it can reach a trainable parameter: inputs from FREE producers
    need_x = grad_x and trainable.train_pos.numel() > 0
    y = _MergedOp.apply(x if need_x else x.detach(), weight, bias, w_full, b_full, trainable, row_trainable, op, dim)
    if trainable.zero_rows is not None:
        y = y.index_fill_(dim, trainable.zero_rows + row_trainable, 0)
    return y


def _writes_pay(table: Table, op: DenseOp, x: torch.Tensor) -> bool:
    """The written training product (``_WrittenOp``) instead of block outputs and a concatenation? For the layout
    a network trains in (rows task-major, frozen blocks first and reading slices, one trainable block over every
    trainable row last, no tail) when the op can write into a slice."""
    if (not MERGE_IN_TRAINING or op.forward_into is None or table.out_index is not None or table.tail
            or table.n_in != x.shape[-1] or x.dim() < 2):
        return False
    trainable = table.blocks[-1]
    if trainable.frozen or trainable.slots is not None or trainable.col_range is None:
        return False
    if any(not b.frozen or (b.width and b.col_range is None) for b in table.blocks[:-1]):  # a gathered window
        return False
    return trainable.col_range[1] > trainable.col_range[0]


def _written_forward(x, weight, bias, frozen_weight, frozen_bias, table: Table, op: DenseOp, grad_x: bool):
    """The layer's output written block by block into one tensor (see ``_writes_pay``); gradients as the
    trainable block's would be: dW/db of its rows, and dX of the inputs from FREE producers only where that split
    pays (``_split_pays``, as ``_TrainableBlockOp``), else of its whole window."""
    blk = table.blocks[-1]
    x_in, select = None, None  # the input that gets a gradient, and which columns of the window it is
    if grad_x:
        x_in = _window(x, blk, x.dim() - 1)
        if _split_pays(blk, x_in.shape[-1], op):
            select = _free_inputs(blk)
            x_in = _columns(x_in, -1, select)
    fw = frozen_weight.detach()
    fb = None if frozen_bias is None else frozen_bias.detach()
    runs = [_merged_block(run) if len(run) > 1 else run[0] for run in _same_window_runs(table.blocks[:-1])]
    x2 = x.detach().reshape(-1, x.shape[-1])
    y = _WrittenOp.apply(x2, x_in, weight, bias, fw, fb, runs, blk, select, table.n_out, op)
    return y.view(tuple(x.shape[:-1]) + (table.n_out,))


def _bias_only(x, n: int, kernel, b, op: DenseOp, dim: int):
    """Outputs of ``n`` rows with no live input: their bias (differentiable as ``b`` is)."""
    x_shape = list(x.shape)
    x_shape[dim] = 1  # a conv over 0 input channels would emit 0 channels
    meta_w = torch.empty((n, 1) + tuple(kernel), device="meta", dtype=x.dtype)
    out_shape = op.forward(torch.empty(x_shape, device="meta", dtype=x.dtype), meta_w, None).shape
    y = x.new_zeros(out_shape)
    if b is None:
        return y
    shape = [1] * y.dim()
    shape[dim] = -1
    return y + b.view(shape)


def _assemble(x, weight, parts, table: Table, op: DenseOp, dim: int, plain: bool = False):
    if not parts:  # nothing computed: every output is exactly 0
        n_kernel = tuple(weight.shape[2:])
        return _bias_only(x, table.n_out, n_kernel, None, op, dim)
    if table.out_index is None:
        if table.tail and not (torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
            # a view's outputs (a finished task's prefix, zeros after): written once into the full width
            shape = list(parts[0].shape)
            covered = sum(p.shape[dim] for p in parts)
            shape[dim] = covered + table.tail
            out = parts[0].new_empty(shape)
            start = 0
            for p in parts:
                out.narrow(dim, start, p.shape[dim]).copy_(p)
                start += p.shape[dim]
            out.narrow(dim, covered, table.tail).zero_()
            return out
        if table.tail:
            shape = list(parts[0].shape)
            shape[dim] = table.tail
            parts = parts + [parts[0].new_zeros(shape)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
    if plain:  # differentiable as it is (torch.func transforms cannot run ``_Assemble``)
        return _gather_outputs(parts, table.out_index, dim)
    return _Assemble.apply(dim, table, *parts)


def _gather_outputs(ys, out_index: torch.Tensor, dim: int) -> torch.Tensor:
    """The layer's output from its blocks' outputs: one gather (``out_index``) from their concatenation and a zero
    column, which every neuron no block computes reads."""
    shape = list(ys[0].shape)
    shape[dim] = 1
    return torch.cat(list(ys) + [ys[0].new_zeros(shape)], dim).index_select(dim, out_index)


class _ConstantWeightOp(torch.autograd.Function):
    """dense_op with weights that get no gradient: backward needs the weights only, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.op = x.shape, op
        return op.forward(x, weight, bias)

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return ctx.op.input_grad(grad, weight, ctx.x_shape), None, None, None


def _graph_through_free_inputs(grad_w, x_in, grad, weight, select, op: DenseOp):
    """``grad_w`` (computed from detached inputs), with its columns of the inputs ``x_in`` recomputed from
    ``x_in`` itself when a backward builds a graph (``create_graph=True``: a gradient penalty). Those inputs come
    from FREE producers, and a second derivative reaches earlier layers through them; the other columns read
    frozen features, constants. ``select``: which columns of the window ``x_in`` is (a range, positions, or None
    for all). Without a graph to build: ``grad_w`` as it is."""
    if not torch.is_grad_enabled() or x_in is None or not x_in.requires_grad or x_in.numel() == 0:
        return grad_w
    part = op.weight_grad(x_in, grad, _columns(weight, 1, select))[0]
    if select is None:
        return part
    if isinstance(select, tuple):
        a, e = select
        return torch.cat([grad_w.narrow(1, 0, a), part, grad_w.narrow(1, e, grad_w.shape[1] - e)], 1)
    return grad_w.index_copy(1, select, part)


class _TrainableBlockOp(torch.autograd.Function):
    """The trainable block when frozen blocks are constants: one product over the whole window ``x``
    (detached); backward gives dW, db and dX of ``x_train`` only (inputs from FREE producers, positions
    ``select`` of the window: a range or positions), the only inputs whose gradient can reach a trainable
    parameter."""

    @staticmethod
    def forward(ctx, x, x_train, weight, bias, select, op):
        ctx.save_for_backward(x, weight, x_train)  # x_train: columns of x, kept for a create_graph backward
        ctx.has_bias, ctx.select, ctx.op = bias is not None, select, op
        ctx.x_train_shape = x_train.shape
        return op.forward(x, weight, bias)

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        x, weight, x_train = ctx.saved_tensors
        op = ctx.op
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = op.input_grad(grad, _columns(weight, 1, ctx.select), ctx.x_train_shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_w, grad_b = op.weight_grad(x, grad, weight)
            grad_w = _graph_through_free_inputs(grad_w, x_train, grad, weight, ctx.select, op)
            grad_b = grad_b if ctx.has_bias else None
        return None, grad_x, grad_w, grad_b, None, None


class _MergedOp(torch.autograd.Function):
    """The whole layer as one product with a constant weight ``w_full`` (``_merged_forward``). Backward:
    dW and db of the trainable block's rows (``row0`` on) and dX through them only: a gradient of the
    input's full shape, nonzero only on the trainable block's inputs (its frozen inputs get the part of
    their gradient that flows through trainable rows, which reaches no trainable parameter either)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_full, b_full, blk, row0, op, dim):
        ctx.save_for_backward(x, weight)
        ctx.blk, ctx.row0, ctx.op, ctx.dim, ctx.has_bias = blk, row0, op, dim, bias is not None
        return op.forward(x, w_full, b_full)

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        blk, op, dim = ctx.blk, ctx.op, ctx.dim
        n_rows, n_out = blk.rows.numel(), grad.shape[dim]
        xw, w = _window(x, blk, dim), _window(weight, blk, 1)
        if blk.dead is not None:  # dead inputs are never read: no gradient on their synapses
            w = w.index_fill(1, blk.dead, 0)
        grad_x = grad_w = grad_b = None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        fused = need_x and op.fused_grad is not None and not _split_pays(blk, xw.shape[dim], op)
        # the trainable rows are most of the layer: the products run on the whole output gradient, with a weight
        # whose frozen rows are 0 (dX flows through the trainable rows only; the frozen rows' dW is dropped),
        # which costs less than copying the trainable rows' gradient out of it
        whole = (fused or (need_w and not need_x)) and n_rows >= _WHOLE_GRAD_SHARE * n_out
        if whole:
            g, w_use = grad, w.new_zeros((n_out,) + tuple(w.shape[1:]))
            w_use.narrow(0, ctx.row0, n_rows).copy_(w)
        else:
            g, w_use = grad.narrow(dim, ctx.row0, n_rows).contiguous(), w
        if fused:
            # one call: dX of the whole window (its frozen inputs' share costs less than a second call)
            gx, grad_w, grad_b = op.fused_grad(xw, g, w_use)
            grad_x = gx if gx.shape == x.shape else _into_window(x.new_zeros(x.shape), blk, dim, gx)
        else:
            if need_x:
                w_train = _columns(w, 1, _free_inputs(blk))
                shape = list(x.shape)
                shape[dim] = w_train.shape[1]
                g_train = op.input_grad(g, w_train, shape)
                gx = x.new_zeros(xw.shape)  # the window's gradient: 0 but on its inputs from FREE producers
                if blk.train_range is not None:
                    _columns(gx, dim, blk.train_range).copy_(g_train)
                else:
                    gx.index_copy_(dim, blk.train_pos, g_train)
                grad_x = gx if gx.shape == x.shape else _into_window(x.new_zeros(x.shape), blk, dim, gx)
            if need_w:
                grad_w, grad_b = op.weight_grad(xw, g, w_use)
        if whole:
            grad_w = grad_w.narrow(0, ctx.row0, n_rows)
            grad_b = None if grad_b is None else grad_b.narrow(0, ctx.row0, n_rows)
        if grad_w is not None:
            if blk.dead is not None:
                grad_w = grad_w.index_fill(1, blk.dead, 0)
            if grad_w.shape != weight.shape:  # the window's columns of the trainable storage
                grad_w = _into_window(grad_w.new_zeros(weight.shape), blk, 1, grad_w)
        grad_b = grad_b if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _Assemble(torch.autograd.Function):
    """Output [.., n_out, ..] from the blocks' outputs, each written once at its neurons; the rest 0.

    Autograd through zeros + index_copy would save every block output; this saves index vectors only.
    """

    @staticmethod
    def forward(ctx, dim, table, *ys):
        ctx.dim, ctx.neurons = dim, [b.rows for b in table.blocks]
        shape = list(ys[0].shape)
        block = 1  # contiguous elements per (sample, neuron)
        for n in shape[dim + 1:]:
            block *= n
        if block < _LONG_BLOCK:  # short blocks: one gather
            return _gather_outputs(ys, table.out_index, dim)
        shape[dim] = table.n_out
        out = ys[0].new_zeros(shape)  # long blocks: each neuron written once (exact, but -0.0 -> +0.0)
        for y, index in zip(ys, ctx.neurons):
            out.index_add_(dim, index, y)
        if table.zero_neurons is not None:
            out.index_fill_(dim, table.zero_neurons, 0)
        return out

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        return (None, None, *[grad.index_select(ctx.dim, index) for index in ctx.neurons])


def _trainable_window(weight: torch.Tensor, blk: Block) -> torch.Tensor:
    """The trainable block's weight columns, its dead inputs' columns 0 (a select: never read)."""
    w = _window(weight, blk, 1)
    return w if blk.dead is None else w.index_fill(1, blk.dead, 0)


class _WrittenOp(torch.autograd.Function):
    """A linear layer in a network's training layout as one output tensor: each frozen run of blocks (constant
    weights) and then the trainable block written into its columns (``op.forward_into``). Backward: dW and db of
    the trainable rows and dX of ``x_in``: the trainable block's window, or (``select``: a range or positions of
    the window) its inputs from FREE producers, the only ones whose gradient can reach a trainable parameter.
    PRUNED rows output exactly 0 and get no gradient."""

    @staticmethod
    def forward(ctx, x, x_in, weight, bias, frozen_weight, frozen_bias, runs, blk, select, n_out, op):
        out = x.new_empty((x.shape[0], n_out))
        row = 0
        for run in runs:
            n = run.rows.numel()
            dst = out.narrow(1, row, n)
            b = None if frozen_bias is None else frozen_bias.narrow(0, run.bias_start, n)
            if run.width == 0 and b is None:  # no live input: the outputs are the bias, or 0
                dst.zero_()
            elif run.width == 0:
                dst.copy_(b.expand_as(dst))
            else:
                w = frozen_weight.narrow(0, run.offset, n * run.width).view(n, run.width)
                op.forward_into(_window(x, run, 1), w, b, dst)
            row += n
        n = blk.rows.numel()
        dst = out.narrow(1, row, n)
        op.forward_into(_window(x, blk, 1), _trainable_window(weight, blk), bias, dst)
        if blk.zero_rows is not None:
            dst.index_fill_(1, blk.zero_rows, 0)
        # the weight itself, not a copy: under create_graph the backward below is differentiated through it
        ctx.save_for_backward(x, weight, x_in)  # x_in (attached) for a create_graph backward
        ctx.blk, ctx.row, ctx.op, ctx.has_bias, ctx.weight_shape = blk, row, op, bias is not None, weight.shape
        ctx.x_in_shape, ctx.select = None if x_in is None else x_in.shape, select
        return out

    @staticmethod
    @eager_backward
    def backward(ctx, grad):
        x, weight, x_in = ctx.saved_tensors
        blk, op = ctx.blk, ctx.op
        xw, w = _window(x, blk, 1), _trainable_window(weight, blk)
        g = grad.narrow(1, ctx.row, blk.rows.numel())
        if blk.zero_rows is not None:  # PRUNED rows: a constant 0
            g = g.index_fill(1, blk.zero_rows, 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = g.mm(_columns(w, 1, ctx.select)).view(ctx.x_in_shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_w, grad_b = op.weight_grad(xw, g, w)
            if x_in is not None:
                grad_w = _graph_through_free_inputs(grad_w, x_in.flatten(0, -2), g, w, ctx.select, op)
            if blk.dead is not None:  # dead inputs are never read: no gradient on their synapses
                grad_w = grad_w.index_fill(1, blk.dead, 0)
            if tuple(grad_w.shape) != tuple(ctx.weight_shape):  # the window's columns of the trainable storage
                grad_w = _into_window(grad_w.new_zeros(ctx.weight_shape), blk, 1, grad_w)
            grad_b = grad_b if ctx.has_bias else None
        return None, grad_x, grad_w, grad_b, None, None, None, None, None, None, None
