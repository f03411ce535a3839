"""Eidetic layers on the Triton backend under torch.compile(fullgraph=True) match eager.

The custom ops (eidetic::triton_*) declare their mutations (running statistics, Taylor score), so
AOTAutograd functionalises them. On CPU the graph is compiled with the "aot_eager" backend (dynamo +
AOTAutograd + functionalisation, no C++ build: quick); the inductor variant is slow on CPU (a C++
build, about a minute) and runs by default on a GPU only.
"""
import copy

import pytest
import torch

pytest.importorskip("triton")

import eidetic_kernels as ek  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["aot_eager", pytest.param("inductor", marks=() if DEVICE == "cuda" else pytest.mark.slow)]


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return ek.EideticLinear(13, 11), (5, 13)
    if kind == "conv":
        return ek.EideticConv2d(4, 7, 3, stride=2, padding=1), (2, 4, 7, 6)
    return ek.EideticBatchNorm2d(6), (4, 6, 5, 3)


def _step(layer, x, seed):
    """One forward/backward with a random incoming gradient drawn from ``seed``."""
    x = x.clone().requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y * g).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    return y.detach(), grads


def _buffers(layer):
    return {k: v.clone() for k, v in layer.named_buffers() if v is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv", "bn"])
def test_compiled_layer_matches_eager(monkeypatch, kind, backend):
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch._dynamo.reset()
    eager, shape = _layer(kind)
    eager = eager.to(DEVICE)
    # tasks 0 and 1 frozen, a FREE and a PRUNED neuron interleaved among them, Taylor scores on
    eager.prune_neurons([1, 3, 4])
    eager.freeze_free_neurons(0)
    eager.recycle_pruned_neurons()
    eager.prune_neurons([3, 4])
    eager.freeze_free_neurons(1)
    eager.recycle_pruned_neurons()
    eager.prune_neurons([4])  # now: task 0, task 1 (neuron 1), FREE (3), PRUNED (4)
    eager.enable_taylor()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(shape, generator=gen).to(DEVICE)
        seed = int(torch.randint(1 << 30, (1,), generator=gen))
        y_e, grads_e = _step(eager, x, seed)
        y_c, grads_c = _step(compiled, x, seed)
        torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=1e-6)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        buffers_e, buffers_c = _buffers(eager), _buffers(twin)
        assert buffers_e.keys() == buffers_c.keys()
        for name in buffers_e:  # running statistics, Taylor scores, states
            torch.testing.assert_close(buffers_c[name], buffers_e[name], atol=1e-6, rtol=1e-6, msg=name)
        if step == 0:  # a state change between steps: the compiled layer must follow it
            for layer in (eager, twin):
                layer.unprune_neurons([4])


def test_compiled_network_training_step_matches_eager(monkeypatch):
    """A whole EideticNetwork training step on this backend: the network (forward and backward, one finished
    task, a FREE/PRUNED mix in training) under torch.compile(fullgraph=True), AdamW with weight decay compiled
    as torch compiles optimizers (torch.optim graph-breaks around step by design, pytorch#104053): the same loss
    and parameters as eager within fp32 tolerance."""
    import torch.nn as nn
    import torch.nn.functional as F

    from python_layers import EideticNetwork
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
    model = EideticNetwork(body, 12).to(DEVICE)
    model.prepare_for_task(0, 3)
    x, y = torch.randn(8, 1, 4, 4, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
    model.train_task([(x, y)], torch.optim.AdamW(model.parameters(), lr=1e-2), pruning="l2", step=0.25,
                     max_epochs=1, patience=1, recovery_epochs=1, max_prune_steps=1, progress=False)
    model.prepare_for_task(1, 3)
    model.body[1].prune_neurons([int((model.body[1].neuron_task == ek.FREE).nonzero()[0])])
    eager, twin = copy.deepcopy(model), copy.deepcopy(model)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.1)
    opt_c = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    step_c = torch.compile(opt_c.step, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        xi = torch.randn(8, 1, 4, 4, generator=g).to(DEVICE)
        yi = torch.randint(0, 3, (8,), generator=g).to(DEVICE)
        opt_e.zero_grad()
        loss_e = F.cross_entropy(eager(xi), yi)
        loss_e.backward()
        opt_e.step()
        opt_c.zero_grad()
        loss_c = F.cross_entropy(compiled(xi), yi)
        loss_c.backward()
        step_c()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert eager.body[1].last_backend == "triton"
