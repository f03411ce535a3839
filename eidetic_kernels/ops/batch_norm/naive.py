"""masked_batch_norm, the readable spec: the per-channel rule with a 0/1 mask on the output, in a few lines.

For tests only (see ``ops/linear/naive.py``): the mask multiplies, so a NaN in a PRUNED channel's input would
leak into it; the backends select instead.
"""
from __future__ import annotations

import torch

from ...state import FREE, PRUNED
from ..taylor import attach_taylor_hook


def masked_batch_norm(x, running_mean, running_var, weight, bias, channel_task, training, momentum=0.1, eps=1e-5,
                      taylor_score=None):
    """y [N, C, *]: FREE channels in training normalise with batch statistics and update their running
    statistics as torch does (unbiased variance); frozen channels always use their running statistics, which
    never change; without running statistics every channel uses batch statistics; PRUNED channels are 0.
    Affine gradients reach FREE channels only."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    free = channel_task == FREE
    mean, var = running_mean, running_var
    if training or running_mean is None:
        batch_var, batch_mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
        mean, var = batch_mean, batch_var
        if running_mean is not None:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.copy_(torch.where(free, (1 - momentum) * running_mean + momentum * batch_mean,
                                               running_mean))
                running_var.copy_(torch.where(free, (1 - momentum) * running_var
                                              + momentum * batch_var * n / max(n - 1, 1), running_var))
            mean = torch.where(free, batch_mean, running_mean)  # frozen entries: unchanged by the update
            var = torch.where(free, batch_var, running_var)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * torch.where(free, weight, weight.detach()).view(shape)
    if bias is not None:
        y = y + torch.where(free, bias, bias.detach()).view(shape)
    return attach_taylor_hook(y * (channel_task != PRUNED).to(y.dtype).view(shape), taylor_score, 1)
