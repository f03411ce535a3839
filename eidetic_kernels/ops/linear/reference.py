"""masked_linear, pure-PyTorch reference: y = x·(W⊙M)ᵀ + b without building M.

Backend signature shared by every backend of this op (see ``eidetic_kernels.backends``):
    linear(x [*, in], trainable_weight [n_trainable, in], frozen_weight [n_frozen, in],
           trainable_bias [n_trainable] | None, frozen_bias [n_frozen] | None,
           in_task int16[in], out_task int16[out], out_min_task int16[out], slot int32[out],
           plan, taylor_score float32[out] | None) -> y [*, out]
Autograd gives dX through live synapses only (inputs are selected, not multiplied) and
gradients to the trainable storage only; frozen storage is a buffer and gets none.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..grouped import grouped_forward
from ..taylor import attach_taylor_hook


def _input_grad(grad_out, weight, x_shape):
    return grad_out.matmul(weight)


def _weight_grad(x, grad_out, weight_shape):
    g = grad_out.reshape(-1, grad_out.shape[-1])
    return g.t().mm(x.reshape(-1, x.shape[-1])), g.sum(0)


def linear(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task,
           slot, plan, taylor_score=None):
    y = grouped_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, F.linear, -1,
                        _input_grad, _weight_grad)
    return attach_taylor_hook(y, taylor_score, -1)
