"""masked_linear, pure-PyTorch reference: the block-triangular product (``ops/blocks.py``) with F.linear.

Backend signature of the reference engine:
    linear(x [*, in], weight [n_trainable, in], bias [n_trainable] | None,
           frozen_weight [frozen synapses] (flat, compact), frozen_bias [n_frozen] | None,
           table (state.Table), taylor_score float32[out] | None, constant_frozen: bool) -> y [*, out]
Gradients reach the trainable storage only; dX flows through live synapses only (inputs are selected,
never multiplied by a mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import DenseOp, block_forward
from ..taylor import attach_taylor_hook


def _input_grad(grad_out, weight, x_shape):
    return grad_out.matmul(weight).reshape(x_shape)


def _weight_grad(x, grad_out, weight):
    g = grad_out.reshape(-1, grad_out.shape[-1])
    return g.t().mm(x.reshape(-1, x.shape[-1])), g.sum(0)


def _forward_into(x, weight, bias, out):  # x [M, in], out [M, rows]: a column slice (BLAS writes it in place)
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


LINEAR = DenseOp(forward=F.linear, input_grad=_input_grad, weight_grad=_weight_grad, dim=-1,
                 forward_into=_forward_into)


def linear(x, weight, bias, frozen_weight, frozen_bias, table, taylor_score=None, constant_frozen=False):
    y = block_forward(x, weight, bias, frozen_weight, frozen_bias, table, LINEAR, constant_frozen)
    return attach_taylor_hook(y, taylor_score, -1)
