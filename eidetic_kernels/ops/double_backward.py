"""Gradients as a graph (``create_graph=True``: double backward, gradient penalties) for the fused ops.

The fused backward kernels (Triton, C++) are not themselves differentiable. When autograd runs a backward
with ``create_graph=True`` (grad mode is on inside the backward), the fused ops re-run a readable forward
on their saved inputs and differentiate it with ``create_graph``: exact second derivatives, for one more
forward, only in that mode. Dead synapses are selected away (``torch.where``), never multiplied by a 0/1
mask, so nothing in the free capacity reaches a gradient through them. The input gets its gradient through the
synapses the fused backward carries one through only (``graph_product``): with frozen blocks as constants, not
through frozen rows nor into inputs of frozen producers.
"""
from __future__ import annotations

import torch

from ..state import FREE, assemble_rows, live_synapses


def dense_weight(trainable, frozen, in_task, out_task, out_min_task, slot) -> torch.Tensor:
    """[out, in, *kernel]: rows from both storages (frozen read detached), zeros on dead synapses."""
    w = assemble_rows(trainable, frozen, out_task, slot)
    live = live_synapses(in_task, out_task, out_min_task)
    live = live.view(tuple(live.shape) + (1,) * (w.dim() - 2))
    return torch.where(live, w, torch.zeros((), dtype=w.dtype, device=w.device))


def trainable_bias(bias, n_frozen: int, out_task, slot) -> torch.Tensor | None:
    """[out]: the FREE rows' bias, 0 elsewhere (frozen biases are constants: they change no gradient)."""
    if bias is None:
        return None
    b = assemble_rows(bias, bias.new_zeros(n_frozen), out_task, slot)
    return torch.where(out_task == FREE, b, torch.zeros((), dtype=b.dtype, device=b.device))


def graph_grads(output: torch.Tensor, inputs, needs, grad: torch.Tensor) -> list:
    """d output / d inputs[i] · grad as differentiable tensors, for each ``needs[i]`` (else None)."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(output, wanted, grad, create_graph=True, allow_unused=True) if wanted else ())
    return [next(got) if need else None for need in needs]


def graph_product(product, x: torch.Tensor, w: torch.Tensor, b, carry: torch.Tensor) -> torch.Tensor:
    """``product(x, w, b)`` (F.linear, or F.conv2d with its geometry) as a graph whose input gradient flows
    through the synapses ``carry`` (bool [out, in] on the CPU) marks only: the others read ``x`` detached. The weights'
    gradients are those of the whole product."""
    if bool(carry.all()):  # on the host, where the tile table built it: no device read
        return product(x, w, b)
    carry = carry.to(w.device).view(tuple(carry.shape) + (1,) * (w.dim() - 2))
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return product(x, torch.where(carry, w, zero), b) + product(x.detach(), torch.where(carry, zero, w), None)

