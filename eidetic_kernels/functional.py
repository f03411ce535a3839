"""Functional masked ops over dense weights: validate, plan, dispatch.

These take a layer's weight as one dense tensor (``[out, in]`` for linear), so they can be
used and tested alone. Gradients reach only FREE rows: the rows of every other neuron are
read from a detached view. The Eidetic layers call the same backends with their split
storage (trainable rows in a Parameter, frozen rows in a buffer) instead.
"""
from __future__ import annotations

import torch

from . import backends
from .state import STATE_DTYPE, check_state_vector, compact_rows, is_frozen, make_table

__all__ = ["masked_linear", "masked_conv2d", "masked_batch_norm", "InputError", "InputTypeError"]


class InputError(ValueError, RuntimeError):
    """An input of the wrong shape or device. Also a RuntimeError, which torch.nn raises for the same input,
    so code written for the twins (``except RuntimeError``) catches it too."""


class InputTypeError(TypeError, RuntimeError):
    """An input of the wrong type or dtype. Also a RuntimeError, which torch.nn raises for a dtype mismatch."""


def check_input(x: torch.Tensor, name: str, like: torch.Tensor, feature_dim: int, features: int,
                min_dim: int, what: str) -> None:
    """Shape/dtype/device checks shared by the functional ops and the layers (no host sync). Raises
    InputError (a ValueError and a RuntimeError) or InputTypeError (a TypeError and a RuntimeError)."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise InputError(f"{what} expects {name} with at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.shape[feature_dim] != features:
        raise InputError(f"{what} expects {name}.shape[{feature_dim}] == {features}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise InputTypeError(f"{what} expects a floating-point {name}, got {x.dtype}")
    if x.dtype != like.dtype:
        raise InputTypeError(f"{what}: {name} is {x.dtype} but the weights are {like.dtype}; cast one to the other")
    if x.device != like.device:
        raise InputError(f"{what}: {name} is on {x.device} but the weights are on {like.device}; move one")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear or convolution in for ``x``, or None (autocast off, or
    ``x`` not eligible: autocast casts float32/float16/bfloat16 tensors, never float64)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return None
    return torch.get_autocast_dtype(device_type)


def _check_param(p: torch.Tensor | None, name: str, shape: tuple, like: torch.Tensor, what: str) -> None:
    if p is None:
        return
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    if p.dtype != like.dtype or p.device != like.device:
        raise TypeError(f"{what}: {name} is {p.dtype} on {p.device}, expected {like.dtype} on {like.device}")


def _check_taylor(score, n: int, x: torch.Tensor, what: str) -> None:
    """The score buffer backward adds into: checked here, not found wrong inside backward."""
    if score is None:
        return
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"{what}: taylor_score must be a float32 tensor of shape ({n},) that backward adds the "
                        f"scores into, or None; got {type(score).__name__}")
    if score.dtype != torch.float32 or tuple(score.shape) != (n,) or score.device != x.device:
        raise TypeError(f"{what}: taylor_score must be a float32 tensor of shape ({n},) on {x.device} (one score "
                        f"per output neuron), got {score.dtype} of shape {tuple(score.shape)} on {score.device}; "
                        f"torch.zeros({n}) starts one")


def _states(vectors: dict, expected: dict, device: torch.device) -> list[torch.Tensor]:
    out = []
    for name, v in vectors.items():
        if isinstance(v, (list, tuple)):
            v = torch.tensor(v)  # plain Python lists of states are fine too
        check_state_vector(v, name, expected[name])
        out.append(v.to(device=device, dtype=STATE_DTYPE))
    return out


def _split_call(op: str, x, weight, bias, in_task, out_task, out_min_task, taylor_score, *conv_args):
    """Run backend ``op`` on a dense weight: FREE rows are the trainable storage (gradients reach them
    through it), frozen rows are read detached, compactly (their live synapses only)."""
    n = out_task.numel()
    if out_min_task is None:
        out_min_task = torch.zeros(n, dtype=STATE_DTYPE, device=weight.device)
    _, fn = backends.get(op, x.device, x.dtype)
    table = make_table(in_task, out_task, out_min_task)
    frozen = is_frozen(out_task)
    if bool(frozen.any()):
        trainable = (~frozen).nonzero().flatten()
        blocks = table.frozen_blocks  # no view here: every frozen block
        fw = compact_rows(weight.detach(), blocks)
        rows = torch.cat([b.rows for b in blocks])
        fb = None if bias is None else bias.detach().index_select(0, rows)
        tw = weight.index_select(0, trainable)
        tb = None if bias is None else bias.index_select(0, trainable)
    else:
        fw, fb, tw, tb = weight.new_empty(0), None if bias is None else bias.new_empty(0), weight, bias
    return fn(x, tw, tb, fw, fb, table, *conv_args, taylor_score, False)


def masked_linear(x, weight, bias, in_task, out_task, out_min_task=None, taylor_score=None):
    """y = x·(W⊙M)ᵀ + b, M from the live-synapse rule (``eidetic_kernels.state``).

    x [*, in]; weight [out, in]; bias [out] or None; in_task int[in]; out_task int[out];
    out_min_task int[out] (default 0: forward transfer); taylor_score float32[out], accumulated in backward.
    x, weight and bias share one floating dtype and device (under ``torch.autocast`` they are cast as for
    ``F.linear``). Raises InputError / InputTypeError for a wrong input, ValueError / TypeError for a wrong
    weight, bias, state vector or taylor_score.
    """
    what = "masked_linear"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{what}: weight must be a 2-D tensor [out, in]")
    cast = autocast_dtype(x)
    if cast is not None:  # as F.linear under torch.autocast: input, weight and bias in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            return masked_linear(x.to(cast), weight.to(cast), None if bias is None else bias.to(cast), in_task,
                                 out_task, out_min_task, taylor_score)
    out_f, in_f = weight.shape
    check_input(x, "x", weight, -1, in_f, 1, what)
    _check_param(bias, "bias", (out_f,), weight, what)
    names = {"in_task": in_task, "out_task": out_task}
    sizes = {"in_task": in_f, "out_task": out_f, "out_min_task": out_f}
    if out_min_task is not None:
        names["out_min_task"] = out_min_task
    states = _states(names, sizes, x.device)
    _check_taylor(taylor_score, out_f, x, what)
    in_task, out_task = states[:2]
    out_min_task = states[2] if out_min_task is not None else None
    return _split_call("linear", x, weight, bias, in_task, out_task, out_min_task, taylor_score)


def conv_padding(padding, kernel_size, dilation, what: str = "masked_conv2d"):
    """'valid'/'same' as explicit per-dim padding (the backward ops take numbers)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"{what}: padding='same' with kernel size {k} and dilation {d} pads {total} "
                                 "positions, more on one side than the other, and the convolution pads both sides "
                                 "alike: use an odd kernel size")
            pads.append(total // 2)
        return tuple(pads)
    return padding


def _pair(v, name, what, least: int = 0):
    """An int or a pair of ints as a pair, each at least ``least`` (strings pass: padding modes). TypeError for
    another type (as F.conv2d), InputError (a ValueError and torch's RuntimeError) below ``least``."""
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    elif isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v):
        v = tuple(v)
    else:
        raise TypeError(f"{what}: {name} must be an int or a pair of ints, got {v!r}")
    if any(i < least for i in v):
        raise InputError(f"{what}: {name} must be {'positive' if least else 'non-negative'}, got {v}")
    return v


def masked_conv2d(x, weight, bias, in_task, out_task, stride=1, padding=0, dilation=1, out_min_task=None,
                  taylor_score=None):
    """Convolution with the live-synapse rule over (input channel → output channel).

    x [N, C_in, H, W] (or unbatched [C_in, H, W], as ``F.conv2d``); weight [C_out, C_in, kh, kw]; bias [C_out]
    or None; in_task int[C_in]; out_task int[C_out]; out_min_task int[C_out] (default 0); stride, dilation: int
    or pair; padding: int, pair, 'valid' or 'same' (stride 1 only); taylor_score float32[C_out]. Returns
    [N, C_out, H', W'] ([C_out, H', W'] for an unbatched x). Raises as ``masked_linear``; also TypeError for a
    stride, padding or dilation that is not an int or a pair of ints, InputError for a stride or dilation below
    1 or a negative padding (torch's RuntimeError), ValueError for an unknown padding string."""
    what = "masked_conv2d"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{what}: weight must be a 4-D tensor [C_out, C_in, kh, kw]")
    if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched, as F.conv2d takes it
        if x.shape[0] != weight.shape[1]:  # named in the caller's shape, not the batched one
            raise InputError(f"{what} expects an unbatched x of shape [{weight.shape[1]}, H, W], got shape "
                             f"{tuple(x.shape)}")
        return masked_conv2d(x.unsqueeze(0), weight, bias, in_task, out_task, stride, padding, dilation,
                             out_min_task, taylor_score).squeeze(0)
    if isinstance(padding, str) and padding not in ("valid", "same"):
        raise ValueError(f"{what}: invalid padding string {padding!r}: use 'valid', 'same', an int or a pair of ints")
    cast = autocast_dtype(x)
    if cast is not None:  # as F.conv2d under torch.autocast
        with torch.autocast(x.device.type, enabled=False):
            return masked_conv2d(x.to(cast), weight.to(cast), None if bias is None else bias.to(cast), in_task,
                                 out_task, stride, padding, dilation, out_min_task, taylor_score)
    out_c, in_c = weight.shape[:2]
    if isinstance(x, torch.Tensor) and x.dim() > 4:
        raise InputError(f"{what} expects x of shape [N, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    check_input(x, "x", weight, 1, in_c, 4, what)
    _check_param(bias, "bias", (out_c,), weight, what)
    names = {"in_task": in_task, "out_task": out_task}
    sizes = {"in_task": in_c, "out_task": out_c, "out_min_task": out_c}
    if out_min_task is not None:
        names["out_min_task"] = out_min_task
    states = _states(names, sizes, x.device)
    _check_taylor(taylor_score, out_c, x, what)
    in_task, out_task = states[:2]
    out_min_task = states[2] if out_min_task is not None else None
    stride, dilation = _pair(stride, "stride", what, 1), _pair(dilation, "dilation", what, 1)
    if padding == "same" and any(st != 1 for st in stride):
        raise ValueError(f"{what}: padding='same' is not supported for strided convolutions (as F.conv2d): give the "
                         "padding as numbers")
    padding = conv_padding(_pair(padding, "padding", what), tuple(weight.shape[2:]), dilation)
    return _split_call("conv2d", x, weight, bias, in_task, out_task, out_min_task, taylor_score, stride, padding,
                       dilation)


def masked_batch_norm(x, running_mean, running_var, weight, bias, channel_task, training, momentum=0.1, eps=1e-5,
                      taylor_score=None):
    """Batch norm whose frozen channels keep (and use) their running statistics; PRUNED channels output 0.

    x [N, C, *]; running_mean, running_var, weight, bias [C] or None (running statistics both or neither);
    channel_task int[C]; momentum a number (the update factor; ``nn.BatchNorm``'s momentum=None needs a batch
    count: pass 1 / batches seen); taylor_score float32[C]. Returns y, the shape of x. In training (or without
    running statistics) FREE channels normalise with the batch's statistics and their running statistics move
    (in place) by ``momentum``; frozen channels always normalise with their own. A float16/bfloat16 x with
    float32 statistics and parameters is normalised in float32 and returned in x's dtype, as ``F.batch_norm``
    does. An empty batch returns an empty y and moves no statistic. Raises InputError / InputTypeError for a
    wrong x, ValueError for one value per channel in training (as torch) and for a wrong parameter shape,
    TypeError for a wrong dtype or device, and for a momentum or eps that is not a number."""
    what = "masked_batch_norm"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{what} expects x of shape [N, C, *], got {getattr(x, 'shape', type(x))}")
    c = x.shape[1]
    ref = next((t for t in (weight, running_mean) if t is not None), x)
    if x.dtype in (torch.float16, torch.bfloat16) and ref.dtype == torch.float32:  # mixed precision, as torch
        return masked_batch_norm(x.float(), running_mean, running_var, weight, bias, channel_task, training,
                                 momentum, eps, taylor_score).to(x.dtype)
    check_input(x, "x", ref, 1, c, 2, what)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        _check_param(t, name, (c,), x, what)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{what}: pass both running_mean and running_var, or neither")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{what}: momentum must be a number, got {momentum!r}; the cumulative average that "
                        "momentum=None gives a batch-norm module needs its batch count: pass 1 / (batches seen so "
                        "far, this one included), or use EideticBatchNorm1d/2d(momentum=None)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{what}: eps must be a number, got {eps!r}")
    (channel_task,) = _states({"channel_task": channel_task}, {"channel_task": c}, x.device)
    _check_taylor(taylor_score, c, x, what)
    if training and x.numel() // c == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if x.numel() == 0:
        # no statistic moves (as F.batch_norm): the backends' statistics of zero values would be NaN in the running
        # ones. The affine parameters get zero gradients, as torch's do
        y = x.clone()
        for p in (weight, bias):
            if p is not None and p.requires_grad and torch.is_grad_enabled():
                y = y + p.sum() * 0
        return y
    slot = torch.arange(c, dtype=torch.int32, device=x.device)
    fw = None if weight is None else weight.detach()
    fb = None if bias is None else bias.detach()
    _, fn = backends.get("batch_norm", x.device)
    return fn(x, running_mean, running_var, weight, fw, bias, fb, channel_task, slot, bool(training),
              float(momentum), float(eps), taylor_score)
