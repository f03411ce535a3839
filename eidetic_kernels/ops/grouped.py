"""Shared body of the reference linear and conv: one dense op per group of output neurons.

Why groups instead of W ⊙ M: a frozen neuron must never see a later neuron's output, not even
multiplied by zero (0 · NaN = NaN). Each group reads its inputs through ``masked_fill`` (a select,
not a product), and the rows it uses come from storage that only it owns. No weight-shaped mask
is ever built; frozen rows of one task are a contiguous slice of the frozen storage, so the
common case slices without copying.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..state import Plan


def grouped_forward(x: torch.Tensor, trainable_weight: torch.Tensor, frozen_weight: torch.Tensor,
                    trainable_bias: torch.Tensor | None, frozen_bias: torch.Tensor | None, plan: Plan,
                    dense_op: Callable, channel_dim: int) -> torch.Tensor:
    """Apply ``dense_op(x, weight, bias)`` per output group and assemble the outputs.

    channel_dim: the feature dim of ``x`` and of the output (-1 for linear, 1 for conv).
    """
    if plan.all_trainable_dense:
        return dense_op(x, trainable_weight, trainable_bias)
    in_shape = [1] * x.dim()
    parts = []
    for g in plan.groups:
        xg = x
        if g.input_live is not None:
            in_shape[channel_dim] = g.input_live.numel()
            xg = x.masked_fill(~g.input_live.view(in_shape), 0)
        if g.frozen:
            w = frozen_weight[g.rows]
            b = None if frozen_bias is None else frozen_bias[g.rows]
            parts.append(dense_op(xg, w, b))
        else:
            # one GEMM over the whole trainable storage; PRUNED rows are then dropped
            y = dense_op(xg, trainable_weight, trainable_bias)
            full = isinstance(g.rows, slice) and g.rows == slice(0, trainable_weight.shape[0])
            parts.append(y if full else _take(y, g.rows, channel_dim))
    if not parts:
        # nothing live: every output is exactly 0 (shape taken from an empty dense op)
        w = trainable_weight if trainable_weight.shape[0] else frozen_weight
        out_shape = list(dense_op(x.detach().to("meta"), w.detach().to("meta"), None).shape)
        out_shape[channel_dim] = plan.n_out
        return x.new_zeros(out_shape)
    y_live = parts[0] if len(parts) == 1 else torch.cat(parts, channel_dim)
    if plan.live_is_identity:
        return y_live
    dim = channel_dim % y_live.dim()
    if plan.live_neurons.numel() < plan.n_out:  # PRUNED neurons gather from one zero column
        pad = list(y_live.shape)
        pad[dim] = 1
        y_live = torch.cat([y_live, y_live.new_zeros(pad)], dim)
    # a gather, not zeros + index_copy: autograd would save index_copy's whole source for backward
    return y_live.index_select(dim, plan.gather_index)


def _take(y: torch.Tensor, rows, dim: int) -> torch.Tensor:
    if isinstance(rows, slice):
        return y.narrow(dim, rows.start, rows.stop - rows.start)
    return y.index_select(dim % y.dim(), rows)
