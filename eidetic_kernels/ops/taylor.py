"""Taylor importance (Molchanov et al. 2017) collected in the ordinary backward pass.

score[i] += | mean over the batch of Σ_spatial a[b, i, ...] · ∂loss/∂a[b, i, ...] |   (an empty batch adds 0)

where ``a`` is the layer's output (before any nonlinearity). The reference backend attaches a
gradient hook to the output; the fused backends compute the same sum inside their backward.
"""
from __future__ import annotations

import torch

from .eager import eager_backward


def taylor_contribution(activation: torch.Tensor, grad: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Float32[C]: |mean_b Σ_spatial a·g| for one batch."""
    prod = (activation.detach().float() * grad.float()).movedim(channel_dim, -1)
    if prod.shape[0] == 0:  # an empty batch adds nothing (its mean would be NaN in every score)
        return prod.new_zeros(prod.shape[-1])
    per_sample = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1) if prod.dim() > 2 else prod
    return per_sample.mean(0).abs()


def attach_taylor_hook(output: torch.Tensor, score: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    if score is not None and output.requires_grad:
        # a detached copy: an in-place op after the layer (ReLU(inplace=True), out += skip) must not change
        # the activation the score reads; and not ``output`` itself: output -> hook -> output would be a
        # reference cycle keeping the whole autograd graph alive until the next gc
        activation = output.detach().clone()

        @eager_backward
        def hook(grad):
            score.add_(taylor_contribution(activation, grad, channel_dim).to(score.dtype))
        output.register_hook(hook)
    return output
