"""How low the CNN's training step can go after k finished tasks when the frozen rows' convolutions cost nothing.

    python -m benchmarks.cnn_floor [--tasks 8] [--seconds 3]

The "floor" network (``floor_network``) does, for the next task's training step of ``providers.small_cnn`` after
k finished tasks of 10% of every layer (as ``providers.finished_network`` leaves them), only:

* each convolution: the trainable rows' product over every input channel (FREE neurons read every earlier feature:
  forward transfer) written into the full-width activation, whose frozen channels are a fill of zeros (their
  product taken as free); backward: dW and db of the trainable rows, dX into the FREE input channels only;
* each batch norm: one pass of the frozen channels' affine map (constant statistics) over the activation, batch
  statistics for the trainable channels, a backward through the trainable channels only;
* the body's ReLU, pooling and head on full-width activations, as ``EideticNetwork`` runs them (activations keep
  the shapes users and hooks see).

It is timed interleaved against the plain network and against ``EideticNetwork`` itself (median of per-round
ratios, freed memory kept by the process as in ``tasks_curve``). Its ratio estimates how low a layout of the
frozen rows' products could take the step with oneDNN's convolutions for the trainable rows and the body's
elementwise passes as they are. An estimate, not a bound: the floor network pays bookkeeping of its own (copies
into the full-width activation, fills of zeros), which a tuned implementation might avoid. An experiment for the
README's performance section, not part of ``make bench``; timing only: the values are not those of a trained
network.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.conftest import cpu_model
from benchmarks.providers import TASK_MODELS, finished_network, make_optimizer, model_input, train_step
from benchmarks.tasks_curve import interleaved, keep_freed_memory

SHARE = 0.1  # of every layer, per finished task


class _TrainableRowsConv(torch.autograd.Function):
    """y [N, n_frozen + n_trainable, H', W']: zeros for the frozen rows, then the trainable rows' convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_frozen, n_free_in, stride, padding):
        y_t = F.conv2d(x, weight, bias, stride, padding)
        y = x.new_empty((y_t.shape[0], n_frozen + y_t.shape[1]) + tuple(y_t.shape[2:]))
        y[:, :n_frozen].zero_()
        y[:, n_frozen:] = y_t
        ctx.save_for_backward(x, weight)
        ctx.n_frozen, ctx.n_free_in, ctx.stride, ctx.padding = n_frozen, n_free_in, stride, padding
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad[:, ctx.n_frozen:].contiguous()
        stride, padding = [ctx.stride] * 2, [ctx.padding] * 2
        _, dw, db = torch.ops.aten.convolution_backward(g, x, weight, [weight.shape[0]], stride, padding, [1, 1],
                                                        False, [0, 0], 1, [False, True, True])
        dx = None
        if ctx.n_free_in and ctx.needs_input_grad[0]:
            c = x.shape[1] - ctx.n_free_in
            dx = torch.zeros_like(x)
            dx[:, c:] = torch.nn.grad.conv2d_input((x.shape[0], ctx.n_free_in) + tuple(x.shape[2:]),
                                                   weight[:, c:].contiguous(), g, ctx.stride, ctx.padding)
        return dx, dw, db, None, None, None, None


class FloorConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, n_frozen: int, n_free_in: int):
        super().__init__()
        self.n_frozen, self.n_free_in = n_frozen, n_free_in
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.weight = nn.Parameter(conv.weight.detach()[n_frozen:].clone())
        self.bias = nn.Parameter(conv.bias.detach()[n_frozen:].clone())

    def forward(self, x):
        return _TrainableRowsConv.apply(x, self.weight, self.bias, self.n_frozen, self.n_free_in, self.stride,
                                        self.padding)


class _FloorBatchNorm(torch.autograd.Function):
    """One affine pass over every channel (the frozen channels' map), then the trainable channels' batch norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, n_frozen):
        y = torch.addcmul(shift, x, scale)
        with torch.enable_grad():
            x_t = x[:, n_frozen:].detach().requires_grad_()
            w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            y_t = F.batch_norm(x_t, None, None, w, b, training=True)
        y[:, n_frozen:] = y_t.detach()
        ctx.graph, ctx.n_frozen = (x_t, w, b, y_t), n_frozen
        return y

    @staticmethod
    def backward(ctx, grad):
        x_t, w, b, y_t = ctx.graph
        dx_t, dw, db = torch.autograd.grad(y_t, (x_t, w, b), grad[:, ctx.n_frozen:])
        dx = grad.new_zeros(grad.shape)
        dx[:, ctx.n_frozen:] = dx_t
        return dx, dw, db, None, None, None


class FloorBatchNorm2d(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d, n_frozen: int):
        super().__init__()
        self.n_frozen = n_frozen
        self.weight = nn.Parameter(bn.weight.detach()[n_frozen:].clone())
        self.bias = nn.Parameter(bn.bias.detach()[n_frozen:].clone())
        invstd = (bn.running_var + bn.eps).rsqrt()
        self.register_buffer("scale", (bn.weight.detach() * invstd).view(1, -1, 1, 1))
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * invstd * bn.weight.detach()).view(1, -1, 1, 1))

    def forward(self, x):
        return _FloorBatchNorm.apply(x, self.weight, self.bias, self.scale, self.shift, self.n_frozen)


def floor_network(model: nn.Sequential, tasks: int, share: float = SHARE) -> nn.Sequential:
    """``model`` (a Sequential of Conv2d, BatchNorm2d, ReLU, AdaptiveAvgPool2d, Flatten and a last Linear head) as
    floor modules (module docstring) after ``tasks`` finished tasks of ``round(share * n)`` neurons per layer of
    n. The raw input is constant (no input gradient); the head is the new task's, all trainable. ValueError when
    the tasks leave a layer no trainable neuron; TypeError on a module or convolution it does not take."""
    layers, n_free_in, n_frozen = [], 0, 0
    for m in model:
        if isinstance(m, nn.Conv2d):
            n_frozen = tasks * round(share * m.out_channels)
            if n_frozen >= m.out_channels:
                raise ValueError(f"{tasks} tasks of {share:.0%} leave {m} no trainable neuron")
            if m.groups != 1 or m.dilation != (1, 1) or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1]:
                raise TypeError(f"floor_network takes ungrouped, undilated, square convolutions, got {m}")
            layers.append(FloorConv2d(m, n_frozen, n_free_in))
            n_free_in = m.out_channels - n_frozen
        elif isinstance(m, nn.BatchNorm2d):
            layers.append(FloorBatchNorm2d(m, n_frozen))
        elif isinstance(m, (nn.Linear, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten)):
            layers.append(m)
        else:
            raise TypeError(f"floor_network does not take {type(m).__name__}")
    return nn.Sequential(*layers)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8, help="finished tasks (10%% of every layer each)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per pairing")
    args = ap.parse_args(argv)
    keep_freed_memory()
    factory, in_shape, batch = TASK_MODELS["cnn"]
    x, y = model_input("cnn", batch, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = factory().train()
    torch.manual_seed(0)
    floor = floor_network(factory(), args.tasks).train()
    eidetic = finished_network(factory(), in_shape, args.tasks, SHARE, seed=args.tasks)
    opt_n, opt_f, opt_e = make_optimizer("nn", plain), make_optimizer("nn", floor), make_optimizer("eidetic", eidetic)
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; CNN batch {batch}, "
          f"{args.tasks} finished tasks of {SHARE:.0%}; freed memory kept")
    tf, tn, r_nn = interleaved(lambda: train_step(floor, opt_f, x, y), lambda: train_step(plain, opt_n, x, y),
                               args.seconds)
    print(f"floor / nn: {r_nn:.3f} ({tf:.2f} ms / {tn:.2f} ms)")
    tf, te, r_e = interleaved(lambda: train_step(floor, opt_f, x, y), lambda: train_step(eidetic, opt_e, x, y),
                              args.seconds)
    print(f"floor / eidetic: {r_e:.3f} ({tf:.2f} ms / {te:.2f} ms)")


if __name__ == "__main__":
    main()
