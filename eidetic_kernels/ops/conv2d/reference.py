"""masked_conv2d, pure-PyTorch reference (NCHW): one conv per group of output channels.

Backend signature: conv2d(x [N, C_in, H, W], trainable_weight [n_trainable, C_in, kh, kw],
frozen_weight [n_frozen, C_in, kh, kw], trainable_bias, frozen_bias, in_task int16[C_in],
out_task int16[C_out], out_min_task int16[C_out], slot int32[C_out], stride, padding, dilation,
plan, taylor_score float32[C_out] | None) -> y [N, C_out, H', W'].
"""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F

from ..grouped import grouped_forward
from ..taylor import attach_taylor_hook


def conv2d(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task,
           slot, stride, padding, dilation, plan, taylor_score=None):
    op = partial(F.conv2d, stride=stride, padding=padding, dilation=dilation)
    y = grouped_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, op, 1)
    return attach_taylor_hook(y, taylor_score, 1)
