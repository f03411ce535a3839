"""masked_batch_norm, pure-PyTorch reference.

Per channel c (x is [N, C, *]):
* FREE, training: batch statistics; running statistics updated as torch does
  (unbiased variance, ``momentum`` already resolved by the caller, as in torch's _BatchNorm).
* frozen: running statistics in training and eval; they never change, and the affine
  parameters come from the frozen storage (no gradient). The input still gets its gradient.
* PRUNED: exactly 0.
* eval: every live channel uses running statistics.
Without running statistics (track_running_stats=False) every live channel uses batch statistics.

Backend signature: batch_norm(x, running_mean [C] | None, running_var [C] | None,
trainable_weight [n_trainable] | None, frozen_weight [n_frozen] | None, trainable_bias, frozen_bias,
channel_task int16[C], slot int32[C], training: bool, momentum: float, eps: float,
taylor_score float32[C] | None, constant_frozen: bool) -> y, same shape as x. Mutates running_mean/var
(FREE channels only). ``constant_frozen`` (a network training with frozen blocks as constants, see
``ops/blocks.py``) allows a backend to give frozen channels no input gradient: none of it can reach a
trainable parameter then. This reference computes it anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...state import FREE, PRUNED, assemble_rows
from ..taylor import attach_taylor_hook


def gather_affine(trainable, frozen, channel_task, slot):
    """Per-channel affine parameter [C] from the two storages (None when not affine)."""
    if trainable is None:
        return None
    return assemble_rows(trainable, frozen if frozen is not None else trainable[:0], channel_task, slot)


def batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias, frozen_bias,
               channel_task, slot, training, momentum, eps, taylor_score=None, constant_frozen=False):
    weight = gather_affine(trainable_weight, frozen_weight, channel_task, slot)
    bias = gather_affine(trainable_bias, frozen_bias, channel_task, slot)
    has_stats = running_mean is not None
    use_batch_stats = training or not has_stats
    free = channel_task == FREE
    live = channel_task != PRUNED
    all_free = bool(free.all())
    all_live = all_free or bool(live.all())
    # ATen only when nothing is frozen: a frozen channel must always take the same formula below, or its
    # output would change bits when another channel is pruned (ATen's eval formula rounds differently)
    if all_free:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)
    else:
        shape = [1, -1] + [1] * (x.dim() - 2)
        # float16/bfloat16 normalised in float32 and rounded once, as ATen's batch norm does (its opmath type)
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
            weight, bias = (None if t is None else t.float() for t in (weight, bias))
        if use_batch_stats:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            if has_stats:
                # frozen channels normalise with running statistics that never change
                mean = torch.where(free, mean, running_mean)
                var_used = torch.where(free, var, running_var)
                with torch.no_grad():
                    n = x.numel() // x.shape[1]
                    unbiased = var.detach() * (n / max(n - 1, 1))
                    running_mean.copy_(torch.where(free, torch.lerp(running_mean.to(mean.dtype), mean.detach(),
                                                                    momentum), running_mean))
                    running_var.copy_(torch.where(free, torch.lerp(running_var.to(unbiased.dtype), unbiased,
                                                                   momentum), running_var))
                var = var_used
        else:
            mean, var = running_mean, running_var
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + eps).view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        if not all_live:
            y = y.masked_fill(~live.view(shape), 0)
        y = y.to(out_dtype)
    return attach_taylor_hook(y, taylor_score, 1)
