"""Shared body of the reference linear and conv: one dense op per input window or per group of outputs.

Why groups instead of W ⊙ M: a frozen neuron must never see a later neuron's output, not even
multiplied by zero (0 · NaN = NaN). An op that serves a frozen neuron reads only its live inputs
(``index_select``, a copy of the live part, never a product) and only its live weight columns, from
storage that only frozen neurons own. No weight-shaped mask is ever built and nothing weight-sized is
cached: the plan holds index vectors only.

Per call (every choice below is a function of the plan and the tensor shapes only, so a finished task
evaluated in view mode always runs the same ops on the same values):

* groups reading the same inputs (one ``InputWindow``) run as one op over their rows gathered from both
  storages when those rows are cheaper to gather than the outputs are to assemble (convolutions: the
  weights are small, the activations are not). When the window is the layer's only one the rows are
  in output order (PRUNED ones a zero row) and nothing is assembled;
* otherwise each group runs its own op: frozen rows are a slice of the frozen storage (one task's rows
  are contiguous); the FREE group runs over the whole trainable storage, and its dead inputs (PRUNED,
  or older than its min_input_task: its outputs are not protected) are removed by zeroing the weight
  columns or the input features, whichever is smaller;
* ops with constant weights (only frozen rows) keep no activation for backward: they need dX only;
  an op serving FREE and frozen rows computes the weight gradient of its FREE rows only;
* the outputs are written once into the output tensor (``_Assemble``), PRUNED neurons filled with 0.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..state import InputWindow, OutputGroup, Plan

# A GEMM multiply-add costs about this fraction of an element copied by a gather (CPU, fp32): used to
# decide whether selecting the live inputs of a frozen group (copies, fewer FLOPs) beats zeroing them.
_MAC_PER_COPY = 1 / 16
# Output assembly (measured on CPU): with at least this many contiguous elements per (sample, neuron),
# scattering each op's output (index_add_) beats gathering from their concatenation, below it loses.
_LONG_BLOCK = 256
# One op per input window (rows gathered from both storages) measured as fast or faster than one op per
# group plus output assembly while a weight row is up to this many times longer than an output row.
_ROW_GATHER_ADVANTAGE = 4


def grouped_forward(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
                    trainable_bias: torch.Tensor | None, frozen_bias: torch.Tensor | None, plan: Plan,
                    dense_op: Callable, channel_dim: int, input_grad: Callable | None = None,
                    weight_grad: Callable | None = None) -> torch.Tensor:
    """Apply ``dense_op(x, weight, bias)`` per input window or output group and assemble the outputs.

    channel_dim: the feature dim of ``x`` and of the output (-1 for linear, 1 for conv).
    input_grad(grad_out, weight, x_shape): dX of ``dense_op`` (lets frozen-only ops skip saving x);
    weight_grad(x, grad_out, weight_shape) -> (dW, db): lets an op serving FREE and frozen rows compute
    the FREE rows' gradients only. Without them autograd differentiates ``dense_op`` as usual.
    """
    if plan.all_trainable_dense:
        return dense_op(x, trainable_weight, trainable_bias)
    if not plan.groups:
        # nothing live: every output is exactly 0 (shape taken from an empty dense op)
        w = trainable_weight if trainable_weight.shape[0] else frozen_weight
        out_shape = list(dense_op(x.detach().to("meta"), w.detach().to("meta"), None).shape)
        out_shape[channel_dim] = plan.n_out
        return x.new_zeros(out_shape)
    dim = channel_dim % x.dim()
    ctx = _Call(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, dense_op, dim, input_grad,
                weight_grad)
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []  # (y, neurons, rows to zero)
    for w, window in enumerate(plan.windows):
        # one op for the window when it serves several groups, or puts a frozen group's outputs in order
        one_op = len(window.groups) > 1 or (window.covers_all and plan.pruned_neurons is not None
                                             and plan.groups[window.groups[0]].frozen)
        if one_op and ctx.gather_rows_is_cheaper(window):
            parts.append(ctx.window_op(w))
        else:
            parts.extend(ctx.group_op(plan.groups[i]) for i in window.groups)
    if len(parts) == 1 and parts[0][1] is None:  # one op emitted every output in order
        y, _, zero_rows = parts[0]
        # in place: neither conv nor linear saves its output for backward; index_fill_'s backward
        # zeroes these neurons' gradients
        return y if zero_rows is None else y.index_fill_(dim, zero_rows, 0)
    ys, neurons, zero_rows = zip(*parts)
    return _Assemble.apply(dim, plan.n_out, plan.pruned_neurons, neurons, zero_rows, *ys)


class _Call:
    """The tensors of one call and the ops that serve its windows and groups."""

    def __init__(self, x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, dense_op, dim,
                 input_grad, weight_grad):
        self.x, self.tw, self.fw, self.tb, self.fb = x, trainable_weight, frozen_weight, trainable_bias, frozen_bias
        self.plan, self.dense_op, self.dim, self.input_grad = plan, dense_op, dim, input_grad
        self.weight_grad = weight_grad if input_grad is not None else None
        w = trainable_weight if trainable_weight.shape[0] else frozen_weight
        self.kernel = w[0, 0].numel() if w.dim() > 2 else 1  # weights per (output, input) pair
        self.positions = x.numel() // max(x.shape[dim], 1)  # places each input feature is read at

    # ----- one op per input window ------------------------------------------------------------
    def gather_rows_is_cheaper(self, window: InputWindow) -> bool:
        """Gathering a weight row (window width x kernel, contiguous) beats assembling an output row
        (~ positions, scattered; and split ops run odd-sized GEMMs/convs) up to rows ~4x longer."""
        width = self.x.shape[self.dim] if window.input_index is None else window.input_index.numel()
        return width * self.kernel <= _ROW_GATHER_ADVANTAGE * self.positions

    def window_op(self, w: int):
        plan, x = self.plan, self.x
        window = plan.windows[w]
        neurons, source = plan.window_rows(w)
        # rows from [trainable storage | frozen storage | one zero row]; the frozen storage is read detached
        sources = ([self.tw] if window.has_free else []) + [self.fw.detach()]
        n_tr = self.tw.shape[0] if window.has_free else 0
        zero_row = n_tr + self.fw.shape[0]
        index = torch.where(source >= 0, source, torch.where(source == -1, zero_row, n_tr - 2 - source))
        # the trainable rows' gradients come from _WindowOp (FREE rows only), so the rows are gathered detached
        reads = window.input_index is None or window.input_index.numel() > 0
        custom = window.has_free and reads and self.weight_grad is not None and torch.is_grad_enabled()
        sources = [s.detach() for s in sources] if custom else sources

        def gather_weight():
            weight = torch.cat(sources + [self.fw.new_zeros((1,) + tuple(self.fw.shape[1:]))]).index_select(0, index)
            return weight if window.input_index is None else weight.index_select(1, window.input_index)
        weight = gather_weight()
        b = None
        if self.tb is not None or self.fb is not None:
            tb = self.tb if self.tb is not None else self.tw.new_zeros(self.tw.shape[0])
            fb = self.fb if self.fb is not None else self.fw.new_zeros(self.fw.shape[0])
            bias_sources = ([tb.detach() if custom else tb] if window.has_free else []) + [fb.detach()]
            b = torch.cat(bias_sources + [fb.new_zeros(1)]).index_select(0, index)
        xw = x if window.input_index is None else x.index_select(self.dim, window.input_index)
        if not window.has_free:
            y = self._constant_weight_op(xw, weight, b)
        elif xw.shape[self.dim] == 0:
            y = self._bias_only(xw, weight, b)
        elif custom:
            free_pos, free_slots = plan.window_free_rows(w)
            y = _WindowOp.apply(xw, self.tw, self.tb, weight, b, free_pos, free_slots, window.input_index, self.dim,
                                self.dense_op, self.input_grad, self.weight_grad, gather_weight)
        else:
            y = self.dense_op(xw, weight, b)
        if neurons is None:  # every output in order
            return y, None, plan.pruned_neurons
        return y, neurons, None

    # ----- one op per group -------------------------------------------------------------------
    def group_op(self, g: OutputGroup):
        return self._frozen_group(g) if g.frozen else self._free_group(g)

    def _frozen_group(self, g: OutputGroup):
        x, dim = self.x, self.dim
        w = self.fw[g.rows]
        b = None if self.fb is None else self.fb[g.rows]
        if g.input_index is not None:
            rows, width, live = w.shape[0], x.shape[dim], g.input_index.numel()
            select_cost = rows * live * self.kernel + self.positions * live
            mask_cost = self.positions * width + _MAC_PER_COPY * self.positions * rows * (width - live) * self.kernel
            if select_cost <= mask_cost:  # copy the live inputs and weight columns: fewer FLOPs too
                if live and rows * self.kernel > self.positions and self._needs_input_grad():
                    # the copied weight columns outweigh the copied inputs: keep nothing but the storage's view
                    y = _SelectedInputsOp.apply(x, w, b, g.input_index, g.input_live, dim, self.dense_op,
                                                self.input_grad)
                    return y, g.neurons, None
                x = x.index_select(dim, g.input_index)
                w = w.index_select(1, g.input_index)
            else:  # zero the dead inputs (a select, not a product): large weights, few positions
                x = x.masked_fill(~g.input_live.view(self._feature_shape(x.dim(), dim)), 0)
        y = self._constant_weight_op(x, w, b)
        if self.plan.live_is_identity and len(self.plan.groups) == 1 and isinstance(g.rows, slice):
            return y, None, None  # every output, in order
        return y, g.neurons, None

    def _free_group(self, g: OutputGroup):
        x, w, plan = self.x, self.tw, self.plan
        if g.input_live is not None:
            # FREE outputs are not protected, so their dead inputs may be read times 0; either way autograd
            # gives dW = 0 on dead synapses and dX = 0 on dead inputs
            if w.numel() <= x.numel():
                w = torch.where(g.input_live.view(self._feature_shape(w.dim(), 1)), w, 0)
            else:
                x = x.masked_fill(~g.input_live.view(self._feature_shape(x.dim(), self.dim)), 0)
        # one op over the whole trainable storage; its PRUNED rows are zeroed or dropped
        y = self.dense_op(x, w, self.tb)
        if plan.trainable_row_neuron is not None and plan.trainable_row_neuron.numel() == self.tw.shape[0]:
            if plan.trainable_rows_are_outputs and len(plan.groups) == 1:
                return y, None, plan.trainable_pruned_rows  # already in output order
            return y, plan.trainable_row_neuron, plan.trainable_pruned_rows
        full = isinstance(g.rows, slice) and g.rows == slice(0, self.tw.shape[0])
        return (y if full else _take(y, g.rows, self.dim)), g.neurons, None

    # ----- helpers ----------------------------------------------------------------------------
    def _needs_input_grad(self) -> bool:
        return self.input_grad is not None and torch.is_grad_enabled() and self.x.requires_grad

    def _constant_weight_op(self, x, w, b):
        if x.shape[self.dim] == 0:  # every input dead: the outputs are the bias (x is not read at all)
            return self._bias_only(x, w, None if b is None else b.detach())
        if self.input_grad is None or not torch.is_grad_enabled() or not x.requires_grad:
            return self.dense_op(x, w.detach(), None if b is None else b.detach())
        return _ConstantWeightOp.apply(x, w.detach(), None if b is None else b.detach(), self.dense_op,
                                       self.input_grad)

    def _bias_only(self, x, w, b):
        """Outputs of rows with no live input: their bias (trainable or not, as ``b`` is)."""
        x_shape, w_shape = list(x.shape), list(w.shape)
        x_shape[self.dim] = w_shape[1] = 1  # a conv over 0 input channels would emit 0 channels
        out_shape = self.dense_op(x.new_empty(x_shape, device="meta"), w.new_empty(w_shape, device="meta"),
                                  None).shape
        y = x.new_zeros(out_shape)
        return y if b is None else y + b.view(self._feature_shape(y.dim(), self.dim))

    @staticmethod
    def _feature_shape(ndim: int, dim: int) -> list[int]:
        shape = [1] * ndim
        shape[dim] = -1
        return shape


class _ConstantWeightOp(torch.autograd.Function):
    """dense_op with weights that get no gradient: backward needs the weights only, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, dense_op, input_grad):
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.input_grad = x.shape, input_grad
        return dense_op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return ctx.input_grad(grad, weight, ctx.x_shape), None, None, None, None


class _WindowOp(torch.autograd.Function):
    """dense_op over rows gathered from both storages (detached); backward gives dX and the gradients of
    the FREE rows only (``free_pos`` in the op's rows, ``free_slots`` in the trainable storage), not the
    frozen rows' gradients autograd would compute and throw away."""

    @staticmethod
    def forward(ctx, x, trainable_weight, trainable_bias, weight, bias, free_pos, free_slots, columns, dim,
                dense_op, input_grad, weight_grad, gather_weight):
        # the gathered weight is gathered again for backward rather than kept: a step then holds no more
        # than a plain layer's (the trainable storage is saved: changing it in place before backward fails)
        ctx.save_for_backward(x, trainable_weight)
        ctx.tw_shape, ctx.has_bias = trainable_weight.shape, trainable_bias is not None
        ctx.free_pos, ctx.free_slots, ctx.columns, ctx.dim = free_pos, free_slots, columns, dim
        ctx.input_grad, ctx.weight_grad, ctx.gather_weight = input_grad, weight_grad, gather_weight
        return dense_op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, _ = ctx.saved_tensors
        weight = ctx.gather_weight()
        grad_x = ctx.input_grad(grad, weight, x.shape) if ctx.needs_input_grad[0] else None
        grad_tw = grad_tb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_free = grad.index_select(ctx.dim, ctx.free_pos)
            dw, db = ctx.weight_grad(x, grad_free, (ctx.free_pos.numel(),) + tuple(weight.shape[1:]))
            if ctx.columns is not None:  # the window reads some inputs only: the others' gradients are 0
                full = dw.new_zeros((dw.shape[0], ctx.tw_shape[1]) + tuple(dw.shape[2:]))
                dw = full.index_add_(1, ctx.columns, dw)
            grad_tw = dw.new_zeros(ctx.tw_shape).index_add_(0, ctx.free_slots, dw)
            if ctx.has_bias:
                grad_tb = db.new_zeros(ctx.tw_shape[0]).index_add_(0, ctx.free_slots, db)
        return grad_x, grad_tw, grad_tb, None, None, None, None, None, None, None, None, None, None


class _SelectedInputsOp(torch.autograd.Function):
    """dense_op(x[live], weight[:, live]) with constant weights, keeping only ``weight`` (a view of the frozen
    storage) for backward: dX is computed over every input column and the dead ones are set to 0 (their
    weights, never used for a live column, may be anything)."""

    @staticmethod
    def forward(ctx, x, weight, bias, live_index, live_mask, dim, dense_op, input_grad):
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.live_mask, ctx.dim, ctx.input_grad = x.shape, live_mask, dim, input_grad
        return dense_op(x.index_select(dim, live_index), weight.index_select(1, live_index), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = ctx.input_grad(grad, weight, ctx.x_shape)
        shape = [1] * grad_x.dim()
        shape[ctx.dim] = -1
        return grad_x.masked_fill_(~ctx.live_mask.view(shape), 0), None, None, None, None, None, None, None


class _Assemble(torch.autograd.Function):
    """Output [.., n_out, ..] from the ops' outputs, each written once at its neurons; ``fill`` set to 0.

    Autograd through zeros + index_copy would save every source; this saves index vectors only.
    """

    @staticmethod
    def forward(ctx, dim, n_out, fill, neurons, zero_rows, *ys):
        ctx.dim, ctx.neurons, ctx.zero_rows = dim, neurons, zero_rows
        shape = list(ys[0].shape)
        block = 1  # contiguous elements per (sample, neuron)
        for n in shape[dim + 1:]:
            block *= n
        if block < _LONG_BLOCK:
            # short blocks: one gather from the concatenation (PRUNED neurons read an appended zero slice)
            index = torch.empty(n_out, dtype=torch.long, device=ys[0].device)
            pieces, start = list(ys), 0
            for y, neurons_of_y in zip(ys, neurons):
                index[neurons_of_y] = torch.arange(start, start + y.shape[dim], device=index.device)
                start += y.shape[dim]
            if fill is not None:
                index[fill] = start
                shape[dim] = 1
                pieces.append(ys[0].new_zeros(shape))
            return torch.cat(pieces, dim).index_select(dim, index)
        # long blocks: zeros + index_add_ (each neuron written once: exact, but for -0.0 becoming +0.0) is
        # faster than the concatenation, and several times faster on CPU than index_copy_
        shape[dim] = n_out
        out = ys[0].new_zeros(shape)
        for y, index in zip(ys, neurons):
            out.index_add_(dim, index, y)
        if fill is not None:  # PRUNED neurons: not written, or written by an op over the trainable storage
            out.index_fill_(dim, fill, 0)
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for index, zero_rows in zip(ctx.neurons, ctx.zero_rows):
            g = grad.index_select(ctx.dim, index)
            if zero_rows is not None:
                g.index_fill_(ctx.dim, zero_rows, 0)
            grads.append(g)
        return (None, None, None, None, None, *grads)


def _take(y: torch.Tensor, rows, dim: int) -> torch.Tensor:
    if isinstance(rows, slice):
        return y.narrow(dim, rows.start, rows.stop - rows.start)
    return y.index_select(dim % y.dim(), rows)
