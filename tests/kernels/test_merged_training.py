"""Training merges a convolution's blocks into one product (``ops/blocks.py``, ``DenseOp.merge_share``), and runs
consecutive frozen blocks that read the same slice as one product (``_same_window_runs``, linear and conv).

The merged product computes the same function as the block-by-block one: on networks with finished tasks
(task-major layout, forward transfer on and off), mid-task with PRUNED neurons (dead inputs, zeroed rows)
and with Taylor scores, the outputs, every parameter gradient and the Taylor scores of FREE neurons
must match the block-by-block product (fp32: atol = rtol = 1e-5; fp64: 1e-10). Finished tasks never run
it: their views are checked bit for bit in ``tests/python_layers/test_finish_rules.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE, PRUNED, EideticLinear, backends
from eidetic_kernels.ops import blocks
from python_layers import EideticNetwork
from tests.python_layers.synthetic import TinyResNet, single_thread  # noqa: F401  (autouse fixture)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def cnn():
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16, (3, 8, 8)


def mlp():
    return nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU()), 16, (6,)


def resnet():
    return TinyResNet(stem=10, width=12), 12, (1, 8, 8)


def _require_reference_conv(net):
    """The merged product is the reference engine's (the CPU default); other backends schedule convolutions
    their own way."""
    convs = [layer for layer in net.body_layers().values() if type(layer).__name__ == "EideticConv2d"]
    if any(layer.last_backend != "reference" for layer in convs):
        pytest.skip(f"convolutions ran on {convs[0].last_backend}: the merged product is the reference engine's")


def _skip_unless_reference(op, dtype):
    """Skip before building a network when ``op`` will not run on the reference engine (EIDETIC_BACKEND):
    building one under the Triton interpreter costs seconds, and the test would skip after it anyway."""
    name = backends.select(op, torch.device("cpu"), dtype)
    if name != "reference":
        pytest.skip(f"{op} runs on {name}: merged and grouped products are the reference engine's")


def finished(body_fn, tasks, share, forward_transfer, dtype, seed):
    """A network with ``tasks`` finished tasks, each keeping ``share`` of every group at random positions,
    then some FREE neurons of the next task pruned (so the trainable blocks have dead inputs and zero rows)."""
    torch.manual_seed(seed)
    body, dim, in_shape = body_fn()
    net = EideticNetwork(body.to(dtype), dim)
    net.ensure_graph(torch.zeros((2,) + in_shape, dtype=dtype))
    g = torch.Generator().manual_seed(seed)
    for t in range(tasks + 1):
        net.prepare_for_task(t, 4, forward_transfer=forward_transfer)
        net.to(dtype)
        for group in net.groups:
            if group.input_normalizer:
                continue
            free = (group.task_state == FREE).nonzero().flatten()
            keep = max(1, round(share * group.size))
            drop = free[torch.randperm(free.numel(), generator=g)[keep:]]
            if t == tasks:  # the task being trained: a few PRUNED neurons, most stay FREE
                drop = drop[: drop.numel() // 3]
            group.prune(drop)
        if t < tasks:
            net.finish_task(generator=g)
    return net, in_shape


def run(net, x, y, taylor):
    for layer in net.body_layers().values():
        if hasattr(layer, "enable_taylor"):
            layer.enable_taylor(False)  # scores accumulate: start each run from zero
            layer.enable_taylor(taylor)
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(False)
    out = net(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # Taylor scores of the neurons being trained (frozen neurons are never pruned: their scores are not
    # read, and block by block they are a side effect of dX into frozen features)
    scores = {n: l.taylor_score[l.task_state == FREE].clone() for n, l in net.body_layers().items()
              if getattr(l, "taylor_score", None) is not None}
    return out.detach(), grads, scores


def counted(monkeypatch, name: str) -> list:
    """Calls of ``blocks.<name>`` from now on, one entry each (the function still runs)."""
    calls, fn = [], getattr(blocks, name)
    monkeypatch.setattr(blocks, name, lambda *a: calls.append(1) or fn(*a))
    return calls


def batch(in_shape, dtype, seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + in_shape, generator=g, dtype=dtype), torch.randint(4, (n,), generator=g)


def assert_same_run(got, want, tol):
    """Two ``run`` results (outputs, parameter gradients, Taylor scores) equal within ``tol``."""
    for part, a, b in zip(("outputs", "gradients", "scores"), got, want):
        if part == "outputs":
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            continue
        assert a.keys() == b.keys(), part
        for name in b:
            torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("taylor", [False, True])
@pytest.mark.parametrize("forward_transfer", [True, False])
@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("body", [cnn, resnet], ids=["cnn", "resnet"])
def test_merged_training_product_matches_blocks(body, tasks, forward_transfer, taylor, dtype, monkeypatch):
    _skip_unless_reference("conv2d", dtype)
    net, in_shape = finished(body, tasks, 0.2, forward_transfer, dtype, seed=tasks)
    net.train()
    x, y = batch(in_shape, dtype, seed=1)
    calls = counted(monkeypatch, "_merged_forward")
    state = copy.deepcopy(net.state_dict())
    merged = run(net, x, y, taylor)
    _require_reference_conv(net)
    net.load_state_dict(state)  # running statistics as before
    monkeypatch.setattr(blocks, "MERGE_IN_TRAINING", False)
    n_merged = len(calls)
    by_blocks = run(net, x, y, taylor)
    assert len(calls) == n_merged
    if forward_transfer:
        assert n_merged > 0, "the merged product never ran: the test compares nothing"
    assert_same_run(merged, by_blocks, TOL[dtype])


def test_merged_training_keeps_finished_tasks_and_free_capacity_apart():
    """NaN in the trainable storage reaches no frozen row of the merged product's output (the zeros on
    synapses that do not exist multiply frozen features only)."""
    _skip_unless_reference("conv2d", torch.float32)
    net, in_shape = finished(cnn, 3, 0.2, True, torch.float32, seed=0)
    net.train()
    x = torch.randn((4,) + in_shape)
    conv = net.body[0]
    with torch.no_grad():
        conv.weight.fill_(float("nan"))
        conv.bias.fill_(float("nan"))
    out = conv(x)
    _require_reference_conv(net)
    frozen = (conv.task_state != FREE) & (conv.task_state >= 0)
    assert bool(frozen.any())
    assert torch.isfinite(out[:, frozen]).all()


@pytest.mark.parametrize("body", [mlp, cnn, resnet], ids=["mlp", "cnn", "resnet"])
def test_constant_frozen_training_gives_the_exact_parameter_gradients(body):
    """The whole frozen-constant mode (merged convolutions, batch norms giving frozen channels no input
    gradient, heads giving frozen features none) against ``exact_activation_grads=True`` (every block computed with its full input gradient):
    the same loss and every parameter gradient (fp64)."""
    net, in_shape = finished(body, 3, 0.2, True, torch.float64, seed=5)
    net.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn((6,) + in_shape, generator=g, dtype=torch.float64)
    y = torch.randint(4, (6,), generator=g)
    state = copy.deepcopy(net.state_dict())
    results = {}
    for exact in (False, True):
        net.load_state_dict(state)
        net.exact_activation_grads = exact
        results[exact] = run(net, x, y, taylor=True)
    out_c, grads_c, scores_c = results[False]
    out_e, grads_e, scores_e = results[True]
    torch.testing.assert_close(out_c, out_e, atol=1e-10, rtol=1e-10)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-10, rtol=1e-10, msg=name)
    for name in scores_e:
        torch.testing.assert_close(scores_c[name], scores_e[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("forward_transfer", [True, False])
@pytest.mark.parametrize("body", [mlp, cnn], ids=["mlp", "cnn"])
def test_grouped_frozen_blocks_match_blocks(body, forward_transfer, dtype, monkeypatch):
    """Finished tasks' blocks of a first layer all read the raw input: training runs them as one product (their
    storage is adjacent), with the block-by-block product's outputs and gradients; views never group them."""
    _skip_unless_reference("linear" if body is mlp else "conv2d", dtype)
    net, in_shape = finished(body, 3, 0.2, forward_transfer, dtype, seed=7)
    net.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn((6,) + in_shape, generator=g, dtype=dtype)
    y = torch.randint(4, (6,), generator=g)
    groups = []
    runs = blocks._same_window_runs
    monkeypatch.setattr(blocks, "_same_window_runs",
                        lambda bl: groups.extend(len(r) for r in runs(bl) if len(r) > 1) or runs(bl))
    monkeypatch.setattr(blocks, "_merge_pays", lambda *a: False)  # convolutions block by block, then grouped
    state = copy.deepcopy(net.state_dict())
    grouped = run(net, x, y, taylor=False)
    layers = [layer for layer in net.body_layers().values() if type(layer).__name__ in ("EideticLinear",
                                                                                         "EideticConv2d")]
    if any(layer.last_backend != "reference" for layer in layers):
        pytest.skip(f"the layers ran on {layers[0].last_backend}: grouping is the reference engine's")
    assert 3 in groups, f"the three finished tasks' first-layer blocks were not grouped: {groups}"
    net.load_state_dict(state)
    monkeypatch.setattr(blocks, "MERGE_IN_TRAINING", False)
    n_grouped = len(groups)
    by_blocks = run(net, x, y, taylor=False)
    assert len(groups) == n_grouped
    assert_same_run(grouped, by_blocks, TOL[dtype])
    monkeypatch.setattr(blocks, "MERGE_IN_TRAINING", True)
    net.eval()
    with torch.no_grad():
        for t in range(3):  # a finished task's view: block by block
            net(x, task=t)
    assert len(groups) == n_grouped


def deep_mlp():
    return nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU()), 16, (6,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("taylor", [False, True])
@pytest.mark.parametrize("forward_transfer", [True, False])
@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("body", [mlp, deep_mlp], ids=["mlp", "deep_mlp"])
def test_written_linear_product_matches_blocks(body, tasks, forward_transfer, taylor, dtype, monkeypatch):
    """A linear layer in training writes its blocks into one output (``_WrittenOp``) instead of concatenating
    them: the same outputs, parameter gradients and Taylor scores of FREE neurons as block by block, with
    PRUNED neurons of the task being trained (zero rows, dead inputs)."""
    _skip_unless_reference("linear", dtype)
    net, in_shape = finished(body, tasks, 0.2, forward_transfer, dtype, seed=tasks + 10)
    net.train()
    x, y = batch(in_shape, dtype, seed=3, n=7)
    calls = counted(monkeypatch, "_written_forward")
    state = copy.deepcopy(net.state_dict())
    got = run(net, x, y, taylor)
    layers = [layer for layer in net.body_layers().values() if type(layer).__name__ == "EideticLinear"]
    if any(layer.last_backend != "reference" for layer in layers):
        pytest.skip(f"the layers ran on {layers[0].last_backend}: the written product is the reference engine's")
    n_layers = len(layers) + 1  # and the head
    assert len(calls) >= n_layers - 1, f"the written product ran {len(calls)} times: the test compares too little"
    net.load_state_dict(state)
    monkeypatch.setattr(blocks, "MERGE_IN_TRAINING", False)
    n_written = len(calls)
    by_blocks = run(net, x, y, taylor)
    assert len(calls) == n_written
    assert_same_run(got, by_blocks, TOL[dtype])


def test_written_linear_product_keeps_finished_tasks_and_free_capacity_apart():
    """NaN and inf in the trainable storage reach no frozen column of the written output, and a finished task's
    view (block by block) keeps its bits while the written product trains the next task."""
    _skip_unless_reference("linear", torch.float32)
    net, in_shape = finished(deep_mlp, 3, 0.2, True, torch.float32, seed=1)
    x = torch.randn((5,) + in_shape)
    net.eval()
    with torch.no_grad():
        before = [net(x, task=t) for t in range(3)]
    net.train()
    lin = net.body[2]
    with torch.no_grad():
        lin.weight.fill_(float("nan"))
        lin.bias.fill_(float("inf"))
    calls, outs = [], []
    written = blocks._written_forward
    # a global hook: a hook on the module would make the network compute exact activation gradients instead
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: outs.append(output.detach()) if module is lin else None)
    try:
        blocks._written_forward = lambda *a: calls.append(1) or written(*a)
        net(x)
    finally:
        blocks._written_forward = written
        handle.remove()
    assert calls, "the written product did not run"
    (out,) = outs
    frozen = (lin.task_state != FREE) & (lin.task_state >= 0)
    assert bool(frozen.any()) and torch.isfinite(out[:, frozen]).all()
    assert torch.isnan(out[:, lin.task_state == FREE]).all()
    pruned = lin.task_state == PRUNED  # the task being trained has some: exactly 0, NaN weights or not
    assert bool(pruned.any()) and bool((out[:, pruned] == 0).all())
    net.eval()
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(net(x, task=t), before[t])


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("body", [mlp, deep_mlp, cnn], ids=["mlp", "deep_mlp", "cnn"])
def test_a_gradient_penalty_gets_the_exact_second_order_gradients(body, tasks, monkeypatch):
    """A gradient penalty (``create_graph=True``) through a network's training forward (frozen blocks constant;
    written, merged and split products): every parameter's gradient as with ``exact_activation_grads=True``
    (fp64). With one task finished some layers' input gradients are not split (PRUNED inputs among few frozen
    ones), with three they are."""
    net, in_shape = finished(body, tasks, 0.2, True, torch.float64, seed=4)
    net.train()
    x, y = batch(in_shape, torch.float64, seed=5)
    state = copy.deepcopy(net.state_dict())
    calls = counted(monkeypatch, "_written_forward" if body is not cnn else "_merged_forward")
    results = {}
    for exact in (False, True):
        net.load_state_dict(state)  # running statistics as before
        net.exact_activation_grads = exact
        net.zero_grad(set_to_none=True)
        params = [p for p in net.parameters() if p.requires_grad]
        loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        penalty = sum((gr ** 2).sum() for gr in grads if gr is not None)
        penalty.backward()
        results[exact] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    if backends.select("linear", torch.device("cpu"), torch.float64) == "reference":
        assert calls, "the product under test never ran"
    assert results[True].keys() == results[False].keys() and results[True]
    for name in results[True]:
        torch.testing.assert_close(results[False][name], results[True][name], atol=1e-10, rtol=1e-10, msg=name)


def test_written_linear_product_of_frozen_rows_without_inputs(monkeypatch):
    """Frozen rows frozen while every input was FREE keep no synapse (width 0): the written product gives them
    their bias, and the trainable rows' outputs and gradients are those of the block-by-block product."""
    _skip_unless_reference("linear", torch.float64)
    torch.manual_seed(0)
    layer = EideticLinear(5, 6, dtype=torch.float64)
    layer.set_input_task(torch.full((5,), FREE, dtype=torch.int16))  # a producer with every neuron FREE
    layer.prune_neurons([3, 4, 5])
    layer.freeze_free_neurons(0)  # its inputs are FREE: the frozen rows read none of them
    layer.recycle_pruned_neurons()
    layer.__dict__["constant_frozen"] = True  # as a network's training sets it
    x = torch.randn(4, 5, dtype=torch.float64)
    calls = counted(monkeypatch, "_written_forward")
    results = {}
    for merge in (True, False):
        monkeypatch.setattr(blocks, "MERGE_IN_TRAINING", merge)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
        results[merge] = (y.detach(), layer.weight.grad.clone(), layer.bias.grad.clone())
    if layer.last_backend != "reference":
        pytest.skip(f"the layer ran on {layer.last_backend}: the written product is the reference engine's")
    assert len(calls) == 1, "the written product ran when asked and only then"
    frozen_bias = layer.frozen_bias.detach()
    assert torch.equal(results[True][0][:, :3], frozen_bias.expand(4, 3))
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_a_sequence_input_with_pruned_rows_runs_with_frozen_blocks_constant():
    """A [B, T, in] input (F.linear returns a view there) to a layer with PRUNED trainable rows and frozen rows
    reading a gathered window (no written product): the outputs and the input's gradient of exact mode. It used to
    raise (PRUNED rows zeroed in place on the view an autograd Function returned)."""
    torch.manual_seed(0)
    layer = EideticLinear(6, 8, dtype=torch.float64)
    layer.set_input_task(torch.tensor([0, 0, FREE, 0, FREE, FREE], dtype=torch.int16))
    layer.prune_neurons([3, 4, 5, 6, 7])
    layer.freeze_free_neurons(0)  # rows 0-2 read inputs 0, 1 and 3: a gathered window
    layer.recycle_pruned_neurons()
    layer.prune_neurons([6])
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    results = {}
    for constant in (True, False):
        layer.__dict__["constant_frozen"] = constant
        scale = torch.ones(6, dtype=torch.float64, requires_grad=True)
        y = layer(x * scale)
        (y * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward()
        # the inputs from FREE producers get their whole gradient either way (frozen ones only in exact mode)
        results[constant] = (y.detach(), scale.grad[[2, 4, 5]].clone(), layer.weight.grad.clone())
        layer.weight.grad = None
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert bool((results[True][0][..., 6] == 0).all())
