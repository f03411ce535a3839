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


def linear(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, in_task, out_task, out_min_task,
           slot, plan, taylor_score=None):
    y = grouped_forward(x, trainable_weight, frozen_weight, trainable_bias, frozen_bias, plan, F.linear, -1)
    return attach_taylor_hook(y, taylor_score, -1)
