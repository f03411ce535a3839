"""The Triton conv2d on the range table: one launch per pass over the layer's tile table (shared with linear),
work that follows the live synapses, and the same layer as the reference backend.

Every comparison runs both backends on the same layer (or a deep copy) with fresh random inputs and incoming
gradients. Tolerances: fp32 ``atol=rtol=1e-5`` (both sides use exact fp32 products; only the summation order
differs), fp64 ``atol=rtol=1e-10``; Taylor scores (sums of products over the batch and positions) 4x those.
Bit-level claims (frozen outputs under NaN in free capacity, finished tasks across later training) use
``torch.equal``.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from eidetic_kernels import FREE, PRUNED, EideticConv2d  # noqa: E402
from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.conv2d import triton as tri  # noqa: E402
from eidetic_kernels.state import is_frozen  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(DEVICE == "cpu" and not triton_common.interpreting(),
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
GEOMETRIES = {  # kernel, stride, padding, dilation
    "3x3_p1": ((3, 3), 1, 1, 1),
    "3x2_s21_p12_d12": ((3, 2), (2, 1), (1, 2), (1, 2)),
    "1x1_s2": ((1, 1), 2, 0, 1),
}


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """Run the kernels even where the dense shortcut would call torch's conv."""
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)


def _close(a, b, dtype, name, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


# ----- standalone layers with scattered states ----------------------------------------------------------

def scattered_layer(c_in, c_out, kind, seed, geometry="3x3_p1", dtype=torch.float32, bias=True):
    """An EideticConv2d whose states are in no particular order (as a standalone layer may hold them):

    * "scattered": input channels of tasks 0..2, FREE and PRUNED at random positions; three finished tasks
      keeping a random quarter of the FREE channels each (task 1 without forward transfer); PRUNED rows in
      the trainable block. Windows are gathers, dX channels maps.
    * "split_free": the same, and the FREE channels read from two different oldest tasks (two trainable
      blocks).
    * "task_major_dead": inputs task-major ([task 0 | task 1 | FREE with a few PRUNED]): every window a
      slice, the trainable block's slice with dead channels.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kernel, stride, padding, dilation = GEOMETRIES[geometry]
    layer = EideticConv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias, dtype=dtype).to(DEVICE)
    if kind == "task_major_dead":
        a = b = c_in // 3
        in_task = torch.tensor([0] * a + [1] * b + [FREE] * (c_in - a - b), dtype=torch.int16)
        tail = torch.arange(a + b, c_in)
        in_task[tail[torch.randperm(tail.numel(), generator=g)[: max(1, tail.numel() // 4)]]] = PRUNED
        tasks = 2
    else:
        vals = torch.tensor([0, 1, 2, FREE, PRUNED], dtype=torch.int16)
        in_task = vals[torch.randint(len(vals), (c_in,), generator=g)]
        tasks = 3
    layer.set_input_task(in_task)
    for t in range(tasks):
        free = (layer.task_state == FREE).nonzero().flatten().cpu()
        order = torch.randperm(free.numel(), generator=g)
        keep = max(1, free.numel() // 4)
        layer.set_min_input_task(1 if (t == 1 and kind != "task_major_dead") else 0)
        layer.prune_neurons(free[order[keep:]])
        layer.freeze_free_neurons(t)
        layer.recycle_pruned_neurons()
    layer.set_min_input_task(0)
    free = (layer.task_state == FREE).nonzero().flatten().cpu()
    order = torch.randperm(free.numel(), generator=g)
    layer.prune_neurons(free[order[: free.numel() // 4]])
    if kind == "split_free":
        free = (layer.task_state == FREE).nonzero().flatten()
        with torch.no_grad():
            layer.min_input_task[free[::2]] = 1
        layer._state_changed()
    return layer


def run_layer(layer, backend, x, g, monkeypatch, taylor=True):
    """(y, dx, dW, db, Taylor score) of one forward/backward on ``backend``."""
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    layer.enable_taylor(taylor)
    layer.reset_taylor()
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    assert layer.last_backend == backend
    (y * g).sum().backward()
    return (y.detach(), xi.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad,
            None if not taylor else layer.taylor_score.clone())


def _inputs(layer, n, hw, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.in_channels, *hw, generator=gen, dtype=dtype).to(DEVICE)
    with torch.no_grad():
        shape = F.conv2d(x, torch.zeros(layer.out_channels, layer.in_channels, *layer.kernel_size, dtype=dtype,
                                        device=DEVICE), None, layer.stride, layer.padding, layer.dilation).shape
    return x, torch.randn(shape, generator=gen, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("constant_frozen", [False, True])
@pytest.mark.parametrize("kind,geometry", [("scattered", "3x2_s21_p12_d12"), ("split_free", "3x3_p1"),
                                           ("task_major_dead", "1x1_s2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standalone_layer_matches_reference(monkeypatch, dtype, kind, geometry, constant_frozen):
    layer = scattered_layer(11, 13, kind, seed=sum(map(ord, kind)) + int(constant_frozen), geometry=geometry,
                            dtype=dtype)
    layer.constant_frozen = constant_frozen
    x, g = _inputs(layer, 2, (7, 6), seed=7, dtype=dtype)
    want = run_layer(copy.deepcopy(layer), "reference", x, g, monkeypatch)
    got = run_layer(layer, "triton", x, g, monkeypatch)
    for name, a, b in zip(("y", "dW", "db"), (got[0], got[2], got[3]), (want[0], want[2], want[3])):
        _close(a, b, dtype, name)
    _close(got[4], want[4], torch.float32, "taylor", 4)  # float32 buffers whatever the layer dtype
    if constant_frozen:
        # dX for inputs from FREE producers only (the only ones that can reach a trainable parameter)
        free_in = layer.input_task == FREE
        _close(got[1][:, free_in], want[1][:, free_in], dtype, "dx")
        assert torch.equal(got[1][:, ~free_in], torch.zeros_like(got[1][:, ~free_in]))
    else:
        _close(got[1], want[1], dtype, "dx")


def test_small_tiles_channels_last_input_no_bias(monkeypatch):
    """16-wide tiles (several programs per block, several channel tiles, rows in chunks), a channels-last
    input and a layer without bias."""
    layer = scattered_layer(37, 41, "scattered", seed=5, geometry="3x2_s21_p12_d12", bias=False)
    x, g = _inputs(layer, 2, (6, 5), seed=5)
    x = x.contiguous(memory_format=torch.channels_last)
    want = run_layer(copy.deepcopy(layer), "reference", x, g, monkeypatch)
    with triton_common.override_blocks("fwd", **SMALL_TILES), triton_common.override_blocks("dx", **SMALL_TILES), \
            triton_common.override_blocks("dw", **SMALL_TILES):
        got = run_layer(layer, "triton", x, g, monkeypatch)
    for name, a, b in zip(("y", "dx", "dW"), got[:3], want[:3]):
        _close(a, b, torch.float32, name)
    _close(got[4], want[4], torch.float32, "taylor", 4)


@pytest.mark.parametrize("view", [0, 2])
def test_views_of_a_standalone_layer(monkeypatch, view):
    """Evaluating finished task t: blocks <= t only; everything the view cannot see is exactly 0; gradients
    through the view's live synapses as the reference gives them; no gradient for the trainable storage."""
    layer = scattered_layer(9, 17, "scattered", seed=11 + view, geometry="3x3_p1")
    layer.view_task = view
    x, g = _inputs(layer, 2, (5, 6), seed=view)
    want = run_layer(copy.deepcopy(layer), "reference", x, g, monkeypatch)
    got = run_layer(layer, "triton", x, g, monkeypatch)
    for name, a, b in zip(("y", "dx"), got[:2], want[:2]):
        _close(a, b, torch.float32, name)
    _close(got[4], want[4], torch.float32, "taylor", 4)
    unseen = ~((layer.task_state >= 0) & (layer.task_state <= view))
    assert torch.equal(got[0][:, unseen], torch.zeros_like(got[0][:, unseen]))
    assert got[2] is None and got[3] is None and want[2] is None


def test_nan_and_inf_in_free_capacity_never_reach_a_frozen_output(monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    layer = scattered_layer(10, 15, "scattered", seed=5, geometry="3x2_s21_p12_d12")
    x, _ = _inputs(layer, 2, (6, 7), seed=1)
    clean = layer(x).detach()
    frozen = is_frozen(layer.task_state)
    poisoned = x.clone()
    poisoned[:, (layer.input_task == FREE) | (layer.input_task == PRUNED)] = float("nan")
    with torch.no_grad():
        layer.weight[::2] = float("nan")
        layer.weight[1::2] = float("inf")
        layer.bias.fill_(float("nan"))
    y = layer(poisoned)
    assert torch.equal(y[:, frozen], clean[:, frozen])
    pruned = layer.task_state == PRUNED
    assert torch.equal(y[:, pruned], torch.zeros_like(y[:, pruned]))
    for view in (0, 1, 2):  # a view of a finished task, with the trainable storage poisoned
        layer.view_task = view
        seen = (layer.task_state >= 0) & (layer.task_state <= view)
        assert torch.equal(layer(poisoned)[:, seen], clean[:, seen])
    layer.view_task = None


def test_compiled_views_and_state_changes_match_eager(monkeypatch):
    """torch.compile(fullgraph=True): tables missing from the cache are built inside the graph (the tiles
    op), cached ones are graph inputs; views, frozen-constant mode and a state change between calls give
    eager's outputs and gradients."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch._dynamo.reset()
    eager = scattered_layer(7, 9, "split_free", seed=21, geometry="3x2_s21_p12_d12")
    eager.constant_frozen = True
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(21)
    for change in range(2):
        for view in (None, 0, 2):
            eager.view_task = twin.view_task = view
            x = torch.randn(2, 7, 5, 6, generator=gen).to(DEVICE)
            outs = []
            for module, layer in ((eager, eager), (compiled, twin)):
                xi = x.clone().requires_grad_()
                y = module(xi)
                y.square().sum().backward()
                outs.append((y.detach(), xi.grad, None if layer.weight.grad is None else layer.weight.grad.clone()))
                layer.zero_grad(set_to_none=True)
            (y_e, dx_e, dw_e), (y_c, dx_c, dw_c) = outs
            assert torch.equal(y_c, y_e)
            torch.testing.assert_close(dx_c, dx_e, atol=1e-6, rtol=1e-6)
            if dw_e is not None:
                torch.testing.assert_close(dw_c, dw_e, atol=1e-6, rtol=1e-6)
        for layer in (eager, twin):  # a state change: cached tables are dropped, the graph must follow
            layer.view_task = None
            layer.prune_neurons((layer.task_state == FREE).nonzero().flatten()[:1])


# ----- layers inside an EideticNetwork (task-major) -----------------------------------------------------

def _network(tasks, seed=0, share=0.2):
    """A small CNN body (conv 3->12, conv 12->12 stride 2, flatten; 8x8 images) with ``tasks`` finished
    tasks keeping ``share`` of each group, prepared for the next task."""
    from benchmarks.providers import finished_network

    torch.manual_seed(seed)
    twin = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))
    return finished_network(twin.to(DEVICE), (3, 8, 8), tasks, share, seed)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, EideticConv2d)]


def _step(model, backend, x, y, monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    for layer in _convs(model):
        layer.reset_taylor()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert _convs(model)[0].last_backend == backend
    return (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            [layer.taylor_score.clone() for layer in _convs(model)])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tasks", [1, 3])
def test_network_step_and_views_match_reference(monkeypatch, tasks, exact):
    """A training step (loss, every parameter gradient, Taylor scores) with frozen blocks as constants
    (``exact_activation_grads=False``) or exact activation gradients, and every finished task's view."""
    model = _network(tasks, seed=tasks)
    model.exact_activation_grads = exact
    for layer in _convs(model):
        layer.enable_taylor()
        # task-major: every window a slice, the kernels without their gather paths
        assert not layer._conv_tiles(torch.float32).scattered
    for group in model.groups:  # PRUNED rows and inputs in the trainable blocks, as during a pruning round
        if not group.input_normalizer:
            free = (group.task_state == FREE).nonzero().flatten()
            group.prune(free[::3])
    gen = torch.Generator().manual_seed(tasks)
    x = torch.randn(4, 3, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(5, (4,), generator=gen).to(DEVICE)
    ref = copy.deepcopy(model)
    loss_w, grads_w, taylor_w = _step(ref, "reference", x, y, monkeypatch)
    loss_g, grads_g, taylor_g = _step(model, "triton", x, y, monkeypatch)
    _close(loss_g, loss_w, torch.float32, "loss")
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        _close(grads_g[name], grads_w[name], torch.float32, name)
    for layer, a, b in zip(_convs(model), taylor_g, taylor_w):
        # frozen blocks as constants: the gradient at a frozen channel's output is not computed (the reference
        # may give it where it merges its blocks into one product); the scores that pruning reads must agree
        keep = torch.ones_like(a, dtype=torch.bool) if exact else ~is_frozen(layer.task_state)
        _close(a[keep], b[keep], torch.float32, "taylor", 4)
    model.eval(), ref.eval()
    for t in range(tasks):
        xi = x.clone().requires_grad_()
        monkeypatch.setenv("EIDETIC_BACKEND", "triton")
        out = model(xi, task=t)
        (dx,) = torch.autograd.grad(out.square().sum(), xi)
        monkeypatch.setenv("EIDETIC_BACKEND", "reference")
        xr = x.clone().requires_grad_()
        out_r = ref(xr, task=t)
        (dx_r,) = torch.autograd.grad(out_r.square().sum(), xr)
        _close(out, out_r, torch.float32, f"view {t}")
        _close(dx, dx_r, torch.float32, f"view {t} dx")


def test_finished_tasks_are_bit_stable_across_later_training(monkeypatch):
    """Two finished tasks; task 2 trains on the Triton backend (AdamW, weight decay) and finishes: tasks 0
    and 1 give bit-identical logits throughout."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    model = _network(2, seed=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(5, (4,), generator=gen).to(DEVICE)

    def finished_logits():
        model.eval()
        with torch.no_grad():
            out = [model(x, task=t).clone() for t in (0, 1)]
        model.train()
        return out

    before = finished_logits()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for a, b in zip(finished_logits(), before):
            assert torch.equal(a, b)
    for group in model.groups:
        if not group.input_normalizer:
            free = (group.task_state == FREE).nonzero().flatten()
            group.prune(free[: free.numel() // 2])
    model.finish_task()
    for a, b in zip(finished_logits(), before):
        assert torch.equal(a, b)


# ----- work accounting ----------------------------------------------------------------------------------

def _kernel_flops(counter):
    """FLOPs of the Triton GEMM-like ops (the work counter sums the kernels of all of them: a network's
    heads are linear layers)."""
    ops = (torch.ops.eidetic.triton_conv2d, torch.ops.eidetic.triton_conv2d_backward,
           torch.ops.eidetic.triton_linear, torch.ops.eidetic.triton_linear_backward)
    counts = counter.get_flop_counts()["Global"]
    assert any(op in counts for op in ops[:2])
    return sum(n for op, n in counts.items() if op in ops)


@pytest.mark.parametrize("constant_frozen", [False, True])
def test_flop_formula_equals_work_counter(monkeypatch, constant_frozen):
    """The registered formulas count 2x the multiply-adds the kernels issue (counted by the kernels): a
    scattered standalone layer, a network's training step and a finished task's evaluation."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    layer = scattered_layer(9, 14, "split_free", seed=9, geometry="3x2_s21_p12_d12")
    layer.constant_frozen = constant_frozen
    model = _network(2, seed=2)
    model.exact_activation_grads = not constant_frozen
    gen = torch.Generator().manual_seed(2)
    x_layer = _inputs(layer, 2, (6, 5), seed=2)[0].requires_grad_()
    x_net = torch.randn(3, 3, 8, 8, generator=gen).to(DEVICE)
    y_net = torch.randint(5, (3,), generator=gen).to(DEVICE)
    cases = [lambda: (layer(x_layer) ** 2).sum(), lambda: F.cross_entropy(model(x_net), y_net)]
    for loss_fn in cases:
        work = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        counter = FlopCounterMode(display=False)
        with counter, triton_common.count_work(work):
            loss_fn().backward()
        assert int(work) > 0
        assert _kernel_flops(counter) == 2 * int(work)
    model.eval()
    work = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    counter = FlopCounterMode(display=False)
    with counter, triton_common.count_work(work), torch.no_grad():
        model(x_net, task=0)
    assert _kernel_flops(counter) == 2 * int(work) > 0
