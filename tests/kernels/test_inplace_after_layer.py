"""In-place ops after an Eidetic layer work as after its torch.nn twin, on every backend, with and without
Taylor scoring: ``nn.ReLU(inplace=True)`` and ``out += skip`` on the layer's output give the same output,
gradients and Taylor scores as the out-of-place versions (Taylor scores of the layer's own output, before
the in-place ops) (the layer's output is a fresh tensor, and
nothing saved for backward aliases it)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import EideticBatchNorm2d, EideticConv2d, EideticLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
LAYERS = {
    "linear": (lambda: EideticLinear(7, 6), (5, 7)),
    "conv": (lambda: EideticConv2d(3, 6, 3, padding=1), (2, 3, 5, 4)),
    "bn": (lambda: EideticBatchNorm2d(6), (3, 6, 4, 4)),
}


def _mixed(layer):
    """Tasks 0 and 1 frozen, FREE and PRUNED neurons: every path of the op runs."""
    layer.prune_neurons([1, 2, 3, 4, 5])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([2, 3])
    layer.freeze_free_neurons(1)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([3])  # now: task 0 (0), task 1 (1, 4, 5), FREE (2), PRUNED (3)
    return layer


@pytest.mark.parametrize("taylor", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_ops_after_the_layer(monkeypatch, backend, kind, taylor):
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cpp":
        from eidetic_kernels import cpp
        if kind != "bn" or cpp.unavailable_reason("batch_norm") is not None:
            pytest.skip("the C++ backend implements batch norm only (and needs a compiler)")
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = _mixed(make()).to(DEVICE)
    layer.enable_taylor(taylor)
    twin = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(DEVICE)
    skip = torch.randn(layer(x).shape, generator=g).to(DEVICE)
    weight = torch.randn(skip.shape, generator=g).to(DEVICE)
    if taylor:
        layer.reset_taylor(), twin.reset_taylor()

    def step(module, in_place):
        xi = x.clone().requires_grad_()
        y = module(xi)
        if in_place:  # both modify the layer's output itself
            y += skip
            y = nn.ReLU(inplace=True)(y)
        else:
            y = F.relu(y + skip)
        (y * weight).sum().backward()
        return y.detach(), xi.grad, [p.grad for p in module.parameters()]

    got, want = step(layer, True), step(twin, False)
    assert layer.last_backend == backend
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)
    if taylor:
        torch.testing.assert_close(layer.taylor_score, twin.taylor_score)
        assert bool((layer.taylor_score > 0).any())
