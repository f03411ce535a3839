"""A small FLOP harness for tests and benchmarks (helpers only, no tests here).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions (2 FLOPs per
multiply-add), nothing for elementwise ops, selects (``masked_fill``), reductions or the loss. So the counts
measure the GEMM/conv work a model asks for, whatever backend (reference PyTorch ops) computes it; a custom
kernel that FlopCounterMode does not know (a Triton or C++ op) counts 0.

* ``step_flops(model_fn, x, y)``: one training step's forward + backward (cross entropy, no optimizer step).
* ``forward_flops(fn, x)``: ``fn(x)`` under ``torch.no_grad``.
* ``mlp_twin(sizes)``: the plain ``nn.Sequential`` MLP baseline.
* ``make_finished_mlp(width, tasks, share, seed)``: an ``EideticNetwork`` over a 784-W-W MLP body with
  ``tasks`` finished tasks, each keeping ``round(share * W)`` randomly chosen neurons of every layer, built without
  training, and prepared for the next task; with its plain twin 784-W-W-10.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["step_flops", "forward_flops", "mlp_twin", "make_finished_mlp", "INPUT_DIM", "CLASSES"]

INPUT_DIM = 784
CLASSES = 10


def step_flops(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of ``loss = cross_entropy(model_fn(x), y); loss.backward()`` (no optimizer step).

    The parameters' ``.grad`` are restored afterwards, so counting does not leak gradients into a later
    step. Other side effects of a training forward (batch-norm running statistics in train mode) remain.
    """
    params = _parameters_of(model_fn)
    saved = [(p, p.grad) for p in params]
    for p, _ in saved:
        p.grad = None
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            loss = F.cross_entropy(model_fn(x), y)
            loss.backward()
    finally:
        for p, grad in saved:
            p.grad = grad
    return int(counter.get_total_flops())


def forward_flops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """FLOPs of ``fn(x)`` under ``torch.no_grad``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(x)
    return int(counter.get_total_flops())


def _parameters_of(fn) -> list[torch.nn.Parameter]:
    """Parameters of ``fn`` when it is a module or a bound method of one (else none are restored)."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return list(owner.parameters()) if isinstance(owner, nn.Module) else []


def mlp_twin(sizes) -> nn.Sequential:
    """Plain MLP: Linear(sizes[0], sizes[1]), ReLU, ..., Linear(sizes[-2], sizes[-1]) (no ReLU after the last)."""
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_finished_mlp(width: int = 1024, tasks: int = 8, share: float = 0.1, seed: int = 0, device=None):
    """(EideticNetwork over a 784-W-W MLP body with ``tasks`` finished tasks, plain twin 784-W-W-10).

    No training: for each task t, ``prepare_for_task(t, 10)``, then in every neuron group prune FREE neurons
    chosen at random (a ``torch.Generator`` seeded with ``seed``) until exactly ``round(share * width)`` stay
    FREE, then ``finish_task()`` (which freezes them for t, recycles the pruned and lays each task's neurons
    out task-major; ``model.neuron_positions`` maps their first, scattered indices). Built by
    ``benchmarks.providers.finished_network``. Finally ``prepare_for_task(tasks,
    10)``, so a training step of task ``tasks`` can be counted (``model(x)`` trains the new task).
    ``device``: where the network is built and lives (default CPU; the twin stays on the CPU).
    """
    from benchmarks.providers import finished_network

    if not isinstance(tasks, int) or tasks < 0:
        raise ValueError(f"tasks must be a non-negative int, got {tasks!r}")
    keep = round(share * width)
    if keep < 1:
        raise ValueError(f"share={share} of width={width} keeps no neuron per task")
    if tasks * keep >= width:
        raise ValueError(f"{tasks} tasks keeping {keep} of {width} neurons each leave no free neuron for task "
                         f"{tasks}; use a smaller share or more width")
    torch.manual_seed(seed)  # the body's initial weights
    model = finished_network(mlp_twin([INPUT_DIM, width, width, CLASSES]).to(device), (INPUT_DIM,), tasks, share,
                             seed)
    twin = mlp_twin([INPUT_DIM, width, width, CLASSES])
    return model, twin
