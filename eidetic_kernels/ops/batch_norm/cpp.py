"""masked_batch_norm on the C++ CPU backend (csrc/eidetic_cpu.cpp), same semantics and signature as
reference.py: FREE channels use (and update) batch statistics while training, frozen channels their
running statistics and frozen affine rows, PRUNED channels output exactly 0.

Forward: two passes over x (statistics, then normalisation); backward: two passes (Σdy and
Σdy·(x-mean) per channel, then dx); the Taylor score comes from the same sums at no extra pass.
dtypes other than float32/float64, empty inputs, and layers whose channels are all FREE (without a
Taylor score, or with one on [N, C] inputs) take the reference path: there the layer is its torch.nn
twin, bit for bit, and ATen's batch norm is as fast or faster.
"""
from __future__ import annotations

import torch

from ... import cpp
from ...state import FREE
from ..eager import eager_backward
from . import reference


class _MaskedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, trainable_weight, trainable_bias, running_mean, running_var, frozen_weight, frozen_bias,
                channel_task, slot, use_batch_stats, momentum, eps, taylor_score, constant_frozen):
        ext = cpp.load_module()
        y, mean, invstd = ext.bn_forward(x, running_mean, running_var, trainable_weight, frozen_weight,
                                         trainable_bias, frozen_bias, channel_task, slot, use_batch_stats,
                                         momentum, eps)
        # copies of the states: finish_task rewrites the layer's in place, and a graph kept across it must
        # still backpropagate as it was built
        channel_task, slot = channel_task.clone(), slot.clone()
        ctx.save_for_backward(x, mean, invstd, trainable_weight, frozen_weight, trainable_bias, frozen_bias,
                              channel_task, slot)
        ctx.use_batch_stats = use_batch_stats
        ctx.has_running = running_mean is not None
        # frozen channels normalise with running statistics that never change: kept for a double backward
        ctx.running = None if running_mean is None else (running_mean.detach().clone(), running_var.detach().clone())
        ctx.eps = eps
        ctx.taylor_score = taylor_score
        # frozen channels as constants (a network's training): their input gradient reaches no trainable
        # parameter, so the backward treats them as PRUNED (dx = 0, no reads: a pass over 80% of x saved
        # after 8 tasks of 10%). They have no affine gradient either way; their Taylor scores are not read.
        ctx.backward_task = channel_task
        if constant_frozen:
            frozen = (channel_task >= 0) & (channel_task != FREE)
            ctx.backward_task = torch.where(frozen, torch.full_like(channel_task, -1), channel_task)
        return y

    @staticmethod
    @eager_backward
    def backward(ctx, dy):
        x, mean, invstd, tw, fw, tb, fb, channel_task, slot = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, from the reference formula
            return _differentiable_backward(ctx, dy, x, tw, fw, tb, fb, channel_task, slot)
        dx, dw, db = cpp.load_module().bn_backward(
            dy, x, mean, invstd, tw, fw, tb, fb, ctx.backward_task, slot, ctx.use_batch_stats, ctx.has_running,
            need_dx, need_dw, need_db, ctx.taylor_score)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + (None,) * 11


def _differentiable_backward(ctx, dy, x, tw, fw, tb, fb, channel_task, slot):
    """The gradients as a graph (double backward, gradient penalties): the reference forward re-run on the
    saved inputs, differentiated with ``create_graph``. Running statistics are copies: nothing is updated."""
    rm, rv = ctx.running if ctx.running is not None else (None, None)
    if rm is not None:
        rm, rv = rm.clone(), rv.clone()
    y = reference.batch_norm(x, rm, rv, tw, fw, tb, fb, channel_task, slot, ctx.use_batch_stats, 0.0, ctx.eps,
                             ctx.taylor_score)
    inputs = [t for t, need in zip((x, tw, tb), ctx.needs_input_grad[:3]) if need]
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    out = tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])
    return out + (None,) * 11


def batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias, frozen_bias,
               channel_task, slot, training, momentum, eps, taylor_score=None, constant_frozen=False,
               all_free: bool | None = None):
    """``all_free``: whether every entry of ``channel_task`` is FREE, when the caller knows it (a layer caches
    it per state); None: read from ``channel_task``."""
    if x.dtype not in (torch.float32, torch.float64) or x.numel() == 0 or x.device.type != "cpu":
        return reference.batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                    frozen_bias, channel_task, slot, training, momentum, eps, taylor_score)
    use_batch_stats = bool(training) or running_mean is None
    if all_free is None and (taylor_score is None or x.dim() == 2):
        all_free = bool((channel_task == FREE).all())
    if (taylor_score is None or x.dim() == 2) and all_free:
        # nothing frozen: the layer is its torch.nn twin, bit for bit, through ATen's batch norm as in
        # the reference (with a Taylor score on [N, C] inputs too: ATen + the hook win there on the
        # bench). With any frozen channel we always run ours, so that a frozen channel's output never
        # depends on the states of the others (or on Taylor scores): bit-stable.
        return reference.batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                    frozen_bias, channel_task, slot, training, momentum, eps, taylor_score)
    try:
        cpp.load_module()  # the first call builds (cached); a failed build has warned once
    except RuntimeError:
        return reference.batch_norm(x, running_mean, running_var, trainable_weight, frozen_weight, trainable_bias,
                                    frozen_bias, channel_task, slot, training, momentum, eps, taylor_score)
    if taylor_score is not None and not (taylor_score.dtype == torch.float32 and taylor_score.is_contiguous()):
        raise TypeError("taylor_score must be a contiguous float32 tensor (one entry per channel)")
    fw = None if frozen_weight is None else frozen_weight.detach()
    fb = None if frozen_bias is None else frozen_bias.detach()
    task, slot = channel_task.to(torch.int16).contiguous(), slot.to(torch.int32).contiguous()
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                             for t in (x, trainable_weight, trainable_bias))):
        # nothing to differentiate (evaluation): the kernel alone, without the copies kept for a backward
        return cpp.load_module().bn_forward(x.contiguous(), running_mean, running_var, trainable_weight, fw,
                                            trainable_bias, fb, task, slot, use_batch_stats, float(momentum),
                                            float(eps))[0]
    # contiguous before the Function, not inside it: a double backward differentiates the saved x, which must be
    # the tensor autograd knows (a copy made inside would be a constant: "does not require grad" on channels_last)
    return _MaskedBatchNorm.apply(x.contiguous(), trainable_weight, trainable_bias, running_mean, running_var, fw, fb,
                                  task, slot, use_batch_stats, float(momentum), float(eps), taylor_score,
                                  bool(constant_frozen))
