"""Shared test helpers: random per-neuron states and the independent dense-mask computations."""
from __future__ import annotations

import torch

from eidetic_kernels import FREE, PRUNED, backends

# fp32 / fp64 tolerances of the reference against the dense-mask computation (same math, other order)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


def random_states(n: int, generator: torch.Generator, tasks: int = 3, p_free=0.4, p_pruned=0.2) -> torch.Tensor:
    """FREE, PRUNED and frozen-by-several-tasks states mixed at random."""
    u = torch.rand(n, generator=generator)
    frozen = torch.randint(0, tasks, (n,), generator=generator)
    s = torch.where(u < p_free, torch.full_like(frozen, FREE), frozen)
    s = torch.where((u >= p_free) & (u < p_free + p_pruned), torch.full_like(frozen, PRUNED), s)
    return s.to(torch.int16)


def dense_mask(in_task, out_task, out_min_task=None):
    """Float [out, in] mask of the live-synapse rule, written independently of eidetic_kernels.state."""
    out_n, in_n = out_task.numel(), in_task.numel()
    m = torch.zeros(out_n, in_n, dtype=torch.float64)
    for i in range(out_n):
        for j in range(in_n):
            oi, ij = int(out_task[i]), int(in_task[j])
            lo = 0 if out_min_task is None else int(out_min_task[i])
            if oi != PRUNED and ij != PRUNED and lo <= ij <= oi:
                m[i, j] = 1.0
    return m


def dense_weight_for_grad(weight, out_task):
    """W whose gradient reaches FREE rows only (what the ops promise)."""
    free = (out_task == FREE).view(-1, *([1] * (weight.dim() - 1)))
    return torch.where(free, weight, weight.detach())


def gradcheck_fast(op: str, dtype: torch.dtype = torch.float64) -> bool:
    """``fast_mode`` for ``torch.autograd.gradcheck`` of ``op``: True when it runs on Triton (on the CPU, under the
    interpreter, where one kernel call takes a good part of a second and full mode, one call per input
    element, took 10 minutes for a small convolution). Fast mode checks a random projection of the Jacobian
    (torch's own); the reference and C++ backends run full mode."""
    return backends.select(op, torch.device("cpu"), dtype) == "triton"
