"""masked_conv2d, pure-PyTorch reference (NCHW): the block-triangular product (``ops/blocks.py``) with
F.conv2d; a block is one convolution over its input channels' window.

Backend signature: conv2d(x [N, C_in, H, W], weight [n_trainable, C_in, kh, kw], bias, frozen_weight (flat,
compact), frozen_bias, table, stride, padding, dilation, taylor_score float32[C_out] | None,
constant_frozen: bool) -> y [N, C_out, H', W'].
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..blocks import DenseOp, block_forward
from ..taylor import attach_taylor_hook


@lru_cache(maxsize=256)
def conv_op(stride: tuple, padding: tuple, dilation: tuple) -> DenseOp:
    def forward(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    # Contiguous operands: oneDNN's backward takes its fast path only with dense weights and inputs.
    def input_grad(grad_out, weight, x_shape):  # dX only: no activation kept for the weight gradient
        return torch.nn.grad.conv2d_input(x_shape, weight.contiguous(), grad_out, stride, padding, dilation)

    def weight_grad(x, grad_out, weight):  # dW and db of the rows in grad_out (the weight's values are not read)
        _, dw, db = torch.ops.aten.convolution_backward(
            grad_out, x.contiguous(), weight.contiguous(), [weight.shape[0]], list(stride), list(padding),
            list(dilation), False, [0, 0], 1, [False, True, True])
        return dw, db

    def fused_grad(x, grad_out, weight):  # dX, dW, db in one call
        return torch.ops.aten.convolution_backward(
            grad_out, x.contiguous(), weight.contiguous(), [weight.shape[0]], list(stride), list(padding),
            list(dilation), False, [0, 0], 1, [True, True, True])

    # merge_share: a convolution over a few output channels runs far below the efficiency of the whole
    # layer's on the CPU (oneDNN), so training merges the blocks once they hold 40% of the synapses
    return DenseOp(forward=forward, input_grad=input_grad, weight_grad=weight_grad, dim=1, split_backward_share=0.5,
                   fused_grad=fused_grad, merge_share=0.4)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(x, weight, bias, frozen_weight, frozen_bias, table, stride, padding, dilation, taylor_score=None,
           constant_frozen=False):
    op = conv_op(_pair(stride), _pair(padding), _pair(dilation))
    y = block_forward(x, weight, bias, frozen_weight, frozen_bias, table, op, constant_frozen)
    return attach_taylor_hook(y, taylor_score, 1)
