"""masked_conv2d, the readable spec: a dense 0/1 mask over (output channel, input channel).

For tests only (see ``ops/linear/naive.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...state import FREE, PRUNED, live_synapses
from ..taylor import attach_taylor_hook


def masked_conv2d(x, weight, bias, in_task, out_task, stride=1, padding=0, dilation=1, out_min_task=None,
                  taylor_score=None):
    """y [N, C_out, H', W'] = conv2d(x, W ⊙ M, b on live channels); gradients reach FREE rows only."""
    free = (out_task == FREE).view(-1, 1, 1, 1)
    mask = live_synapses(in_task, out_task, out_min_task).to(weight.dtype)[:, :, None, None]
    w = torch.where(free, weight, weight.detach()) * mask
    b = None
    if bias is not None:
        b = torch.where(free.flatten(), bias, bias.detach()) * (out_task != PRUNED).to(bias.dtype)
    return attach_taylor_hook(F.conv2d(x, w, b, stride, padding, dilation), taylor_score, 1)
