"""CPU suite: nn vs torch-prune vs eidetic, layer level and end to end, time and memory.

Run everything (what ``make bench`` does, 2-4 minutes on 2 cores):
    .venv/bin/python -m pytest -q benchmarks/test_cpu_bench.py --benchmark-only \
        --benchmark-json=benchmarks/results/last-cpu.json
    .venv/bin/python -m benchmarks.cpu_report benchmarks/results/last-cpu.json
A smoke run with tiny shapes: EIDETIC_BENCH_QUICK=1 (same command).

What is timed (fp32, training mode, autograd on, median of the rounds; EIDETIC_BENCH_THREADS=N sets torch threads):
* layer: Linear, Conv2d (3x3, padding 1), BatchNorm2d; passes ``forward``, ``backward`` (the
  forward runs untimed in the setup) and ``forward_backward``; 0, 50 and 90% of the neurons frozen.
  ``nn`` has no frozen neurons: its one row per case is the denominator of every ratio.
* e2e: one training step (zero_grad, forward, cross entropy, backward, AdamW) of the MLP
  784-2000-2000-10 (batch 256) and of a small CNN with batch norm (batch 64, 3x32x32).
The curve over finished tasks (suite "tasks") is timed interleaved by ``benchmarks/tasks_curve.py``.
Memory (in ``extra_info`` of the forward_backward and train_step rows): see
``providers.training_step_bytes``.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from benchmarks.providers import (LayerCase, backend_of, make_layer, make_model, make_optimizer, model_input,
                                  train_step, training_step_bytes)

QUICK = os.environ.get("EIDETIC_BENCH_QUICK", "") not in ("", "0")
# Each benchmark runs for about TARGET_S seconds, with at least MIN_ROUNDS and at most MAX_ROUNDS rounds.
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = (0.02, 2, 3) if QUICK else (1.0, 7, 60)
SHARES = (0.0, 0.5, 0.9)
PASSES = ("forward", "backward", "forward_backward")

if QUICK:
    LAYER_CASES = [LayerCase("linear", 64, 16), LayerCase("conv2d", 8, 2, 8), LayerCase("batchnorm2d", 16, 4, 8)]
    E2E_BATCH = {"mlp": 8, "cnn": 4}
else:
    LAYER_CASES = [
        LayerCase("linear", 512, 256), LayerCase("linear", 2048, 256),
        LayerCase("conv2d", 64, 16, 32), LayerCase("conv2d", 256, 16, 8),
        LayerCase("batchnorm2d", 64, 32, 32), LayerCase("batchnorm2d", 2048, 32, 8),
    ]
    E2E_BATCH = {"mlp": 256, "cnn": 64}

# nn once per case (share is meaningless for it); the masked providers at every share
PROVIDER_SHARES = [("nn", 0.0)] + [(p, s) for p in ("torch-prune", "eidetic") for s in SHARES]


def _ids(value):
    if isinstance(value, LayerCase):
        return f"{value.kind}-{value.size}"
    if isinstance(value, tuple):
        return f"{value[0]}-{int(round(100 * value[1]))}"
    return str(value)


def _timed(benchmark, fn, setup=None):
    """pedantic run: rounds chosen from one untimed calibration call, so every case lasts ~TARGET_S."""
    args = setup()[0] if setup else ()
    start = time.perf_counter()
    fn(*args)
    elapsed = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / elapsed))))
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)


def _clear_grads(module):
    for p in module.parameters():
        p.grad = None


@pytest.mark.parametrize("provider_share", PROVIDER_SHARES, ids=_ids)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=_ids)
def test_layer(benchmark, case, pass_name, provider_share):
    provider, share = provider_share
    g = torch.Generator().manual_seed(0)
    layer = make_layer(provider, case, share)
    x = case.make_input(g).requires_grad_()  # a hidden layer computes dX too
    y0 = layer(x)
    grad_out = torch.randn(y0.shape, generator=g)
    del y0
    benchmark.group = f"{case.kind}-{case.size}-{pass_name}"
    benchmark.extra_info.update(suite="layer", layer=case.kind, size=case.size, shape=case.shape,
                                pass_name=pass_name, provider=provider, frozen_share=share, dtype="float32",
                                device="cpu", backend=backend_of(layer))

    if pass_name == "forward":
        _timed(benchmark, lambda: layer(x))
    elif pass_name == "backward":
        def setup():
            _clear_grads(layer)
            x.grad = None
            return (layer(x),), {}
        _timed(benchmark, lambda y: y.backward(grad_out), setup)
    else:
        def forward_backward():
            _clear_grads(layer)
            x.grad = None
            layer(x).backward(grad_out)
        _timed(benchmark, forward_backward)
        opt = make_optimizer(provider, layer)
        benchmark.extra_info.update(training_step_bytes(layer, opt, lambda: layer(x), lambda y: y.backward(grad_out)))


@pytest.mark.parametrize("provider_share", PROVIDER_SHARES, ids=_ids)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_train_step(benchmark, model_name, provider_share):
    provider, share = provider_share
    model = make_model(provider, model_name, share)
    opt = make_optimizer(provider, model)
    x, y = model_input(model_name, E2E_BATCH[model_name], torch.Generator().manual_seed(0))
    train_step(model, opt, x, y)  # AdamW state exists before timing, as in the middle of training
    benchmark.group = f"{model_name}-train_step"
    benchmark.extra_info.update(suite="e2e", layer=model_name, size=E2E_BATCH[model_name],
                                shape=f"batch {E2E_BATCH[model_name]}", pass_name="train_step",
                                provider=provider, frozen_share=share, dtype="float32", device="cpu",
                                backend=backend_of(model))
    _timed(benchmark, lambda: train_step(model, opt, x, y))
    benchmark.extra_info.update(training_step_bytes(
        model, opt, lambda: model(x), lambda out: torch.nn.functional.cross_entropy(out, y).backward()))

