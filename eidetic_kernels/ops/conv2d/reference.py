"""masked_conv2d, pure-PyTorch reference (NCHW): one conv per input window or group of output channels.

Backend signature: conv2d(x [N, C_in, H, W], trainable_weight [n_trainable, C_in, kh, kw],
frozen_weight [n_frozen, C_in, kh, kw], trainable_bias, frozen_bias, in_task int16[C_in],
out_task int16[C_out], out_min_task int16[C_out], slot int32[C_out], stride, padding, dilation,
plan, taylor_score float32[C_out] | None) -> y [N, C_out, H', W'].
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..grouped import grouped_forward
from ..taylor import attach_taylor_hook


def conv2d(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task,
           slot, stride, padding, dilation, plan, taylor_score=None):
    op = partial(F.conv2d, stride=stride, padding=padding, dilation=dilation)

    def input_grad(grad_out, weight, x_shape):  # dX only: no activation kept for the weight gradient
        return torch.nn.grad.conv2d_input(x_shape, weight, grad_out, stride, padding, dilation)

    def weight_grad(x, grad_out, weight_shape):  # dW and db of the rows in grad_out (the weights are not read)
        _, dw, db = torch.ops.aten.convolution_backward(
            grad_out, x, x.new_empty(1).expand(weight_shape), [weight_shape[0]], _pair(stride), _pair(padding),
            _pair(dilation), False, [0, 0], 1, [False, True, True])
        return dw, db

    y = grouped_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, op, 1, input_grad,
                        weight_grad)
    return attach_taylor_hook(y, taylor_score, 1)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]
