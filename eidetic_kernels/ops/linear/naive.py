"""masked_linear, the readable spec: a dense 0/1 mask of the live-synapse rule, in a few lines.

For tests only (every backend is compared with it on finite inputs): it multiplies by the mask, so a
NaN on a dead synapse would leak (0 · NaN = NaN); the backends select instead.
"""
from __future__ import annotations

import torch

from ...state import FREE, PRUNED, live_synapses
from ..taylor import attach_taylor_hook


def masked_linear(x, weight, bias, in_task, out_task, out_min_task=None, taylor_score=None):
    """y [*, out] = x · (W ⊙ M)ᵀ + b on live neurons; gradients reach FREE rows only."""
    free = (out_task == FREE)[:, None]
    w = torch.where(free, weight, weight.detach()) * live_synapses(in_task, out_task, out_min_task).to(weight.dtype)
    y = x.matmul(w.t())
    if bias is not None:
        y = y + torch.where(free[:, 0], bias, bias.detach()) * (out_task != PRUNED).to(bias.dtype)
    return attach_taylor_hook(y, taylor_score, -1)
