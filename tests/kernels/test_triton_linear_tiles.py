"""The Triton linear on the range table: one launch per pass over a host-built tile table, work that follows
the live synapses, and the same layer as the reference backend.

Every comparison runs both backends on the same layer (or a deep copy) with fresh random inputs and incoming
gradients. Tolerances: fp32 ``atol=rtol=1e-5`` (both sides use exact fp32 products; only the summation order
differs), fp64 ``atol=rtol=1e-11``; Taylor scores (sums of products over the batch) 4x those. Bit-level claims
(frozen outputs under NaN in free capacity, finished tasks across later training) use ``torch.equal``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from eidetic_kernels import FREE, PRUNED, EideticLinear  # noqa: E402
from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.linear import triton as tri  # noqa: E402
from eidetic_kernels.state import is_frozen, live_synapses, view_states  # noqa: E402
from tests.flops import forward_flops, make_finished_mlp, step_flops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(DEVICE == "cpu" and not triton_common.interpreting(),
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-11, rtol=1e-11)}
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """Run the kernels even where the dense shortcut would call torch's GEMM."""
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)


def _close(a, b, dtype, name, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


# ----- standalone layers with scattered states ----------------------------------------------------------

def scattered_layer(n_in, n_out, kind, seed, dtype=torch.float32, bias=True):
    """An EideticLinear whose states are in no particular order (as a standalone layer may hold them):

    * "scattered": inputs of tasks 0..2, FREE and PRUNED at random positions; three finished tasks keeping a
      random quarter of the FREE neurons each (task 1 without forward transfer); PRUNED rows in the trainable
      block. Windows are gathers, dX columns maps.
    * "split_free": the same, and the FREE neurons read from two different oldest tasks (two trainable blocks).
    * "task_major_dead": inputs task-major ([task 0 | task 1 | FREE with a few PRUNED]): every window a slice,
      the trainable block's slice with dead columns.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = EideticLinear(n_in, n_out, bias=bias, dtype=dtype).to(DEVICE)
    if kind == "task_major_dead":
        a, b = n_in // 3, n_in // 3
        in_task = torch.tensor([0] * a + [1] * b + [FREE] * (n_in - a - b), dtype=torch.int16)
        tail = torch.arange(a + b, n_in)
        in_task[tail[torch.randperm(tail.numel(), generator=g)[: max(1, tail.numel() // 6)]]] = PRUNED
        tasks = 2
    else:
        vals = torch.tensor([0, 1, 2, FREE, PRUNED], dtype=torch.int16)
        in_task = vals[torch.randint(len(vals), (n_in,), generator=g)]
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


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("constant_frozen", [False, True])
@pytest.mark.parametrize("kind", ["scattered", "split_free", "task_major_dead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standalone_layer_matches_reference(monkeypatch, dtype, kind, constant_frozen, tiles):
    layer = scattered_layer(45, 53, kind, seed=sum(map(ord, kind)) + int(constant_frozen), dtype=dtype)
    layer.constant_frozen = constant_frozen
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 45, generator=gen, dtype=dtype).to(DEVICE)
    g = torch.randn(37, 53, generator=gen, dtype=dtype).to(DEVICE)
    want = run_layer(copy.deepcopy(layer), "reference", x, g, monkeypatch)
    if tiles == "small":
        with triton_common.override_blocks("fwd", **SMALL_TILES), triton_common.override_blocks("dx", **SMALL_TILES), \
                triton_common.override_blocks("dw", **SMALL_TILES):
            got = run_layer(layer, "triton", x, g, monkeypatch)
    else:
        got = run_layer(layer, "triton", x, g, monkeypatch)
    for name, a, b in zip(("y", "dW", "db"), (got[0], got[2], got[3]), (want[0], want[2], want[3])):
        _close(a, b, dtype, name)
    _close(got[4], want[4], torch.float32, "taylor", 4)  # float32 buffers whatever the layer dtype
    if constant_frozen:
        # dX for inputs from FREE producers only (the only ones that can reach a trainable parameter); the
        # reference may give more where its split does not pay, never different values on these
        free_in = layer.input_task == FREE
        _close(got[1][:, free_in], want[1][:, free_in], dtype, "dx")
        assert torch.equal(got[1][:, ~free_in], torch.zeros_like(got[1][:, ~free_in]))
    else:
        _close(got[1], want[1], dtype, "dx")
    assert layer.dense("weight").shape == (53, 45)


@pytest.mark.parametrize("view", [0, 1, 2])
def test_views_of_a_standalone_layer(monkeypatch, view):
    """Evaluating finished task t: blocks <= t only; everything the view cannot see is exactly 0; gradients
    through the view's live synapses as the reference gives them."""
    layer = scattered_layer(41, 47, "scattered", seed=11 + view)
    layer.view_task = view
    gen = torch.Generator().manual_seed(view)
    x = torch.randn(19, 41, generator=gen).to(DEVICE)
    g = torch.randn(19, 47, generator=gen).to(DEVICE)
    want = run_layer(copy.deepcopy(layer), "reference", x, g, monkeypatch)
    got = run_layer(layer, "triton", x, g, monkeypatch)
    for name, a, b in zip(("y", "dx"), got[:2], want[:2]):
        _close(a, b, torch.float32, name)
    _close(got[4], want[4], torch.float32, "taylor", 4)
    unseen = ~((layer.task_state >= 0) & (layer.task_state <= view))
    assert torch.equal(got[0][:, unseen], torch.zeros_like(got[0][:, unseen]))
    assert got[2] is None and got[3] is None and want[2] is None  # no trainable row in a view


def test_tiles_follow_the_live_synapses():
    """The tables schedule exactly the live synapses of the rows they compute (PRUNED rows and rows a view
    cannot see are written 0, not computed), and a view launches only blocks <= t."""
    layer = scattered_layer(37, 61, "split_free", seed=3)
    for view in (None, 0, 1, 2):
        layer.view_task = view
        tiles = layer._linear_tiles(torch.float32)
        prog, rows, work = (tiles.tensors[tri.TILE_NAMES.index(name)].cpu() for name in ("prog", "rows", "work"))
        out_task = view_states(layer.task_state, view).cpu()
        in_task = view_states(layer.input_task, view).cpu()
        live = live_synapses(in_task, out_task, layer.min_input_task.cpu())
        assert int(work[0]) == int(live.sum())
        computed = torch.cat([rows[r0:r0 + n, 0] for kind, r0, n, *_ in prog.tolist() if kind != tri.KIND_ZERO])
        assert sorted(computed.tolist()) == (out_task != PRUNED).nonzero().flatten().tolist()
        every = torch.cat([rows[r0:r0 + n, 0] for _, r0, n, *_ in prog.tolist()])
        assert sorted(every.tolist()) == list(range(61))  # each neuron written once
        if view is not None:
            assert all(kind != tri.KIND_TRAINABLE for kind, *_ in prog.tolist())
    layer.view_task = None


def test_nan_and_inf_in_free_capacity_never_reach_a_frozen_output(monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    layer = scattered_layer(43, 59, "scattered", seed=5)
    x = torch.randn(23, 43, generator=torch.Generator().manual_seed(1)).to(DEVICE)
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
    eager = scattered_layer(29, 31, "split_free", seed=21)
    eager.constant_frozen = True
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(21)
    for change in range(2):
        for view in (None, 0, 2, None):
            eager.view_task = twin.view_task = view
            x = torch.randn(7, 29, generator=gen).to(DEVICE)
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
            layer.prune_neurons((layer.task_state == FREE).nonzero().flatten()[:2])


# ----- layers inside an EideticNetwork (task-major) -----------------------------------------------------

def _network(tasks, width=96, share=0.1, seed=0):
    torch.manual_seed(seed)
    model, _ = make_finished_mlp(width=width, tasks=tasks, share=share, seed=seed, device=DEVICE)
    return model


def _eidetic_layers(model):
    return [m for m in model.modules() if isinstance(m, EideticLinear)]


def _step(model, backend, x, y, monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    for layer in _eidetic_layers(model):
        layer.reset_taylor()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert model.body[0].last_backend == backend
    return (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            [layer.taylor_score.clone() for layer in _eidetic_layers(model) if layer.taylor_score is not None])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tasks", [1, 2, 8])
def test_network_step_and_views_match_reference(monkeypatch, tasks, exact):
    """A training step (loss, every parameter gradient, Taylor scores) with frozen blocks as constants
    (``exact_activation_grads=False``) or exact activation gradients, and every finished task's view."""
    model = _network(tasks, seed=tasks)
    model.exact_activation_grads = exact
    for layer in model.body.modules():
        if isinstance(layer, EideticLinear):
            layer.enable_taylor()
    for group in model.groups:  # PRUNED rows and inputs in the trainable blocks, as during a pruning round
        if not group.input_normalizer:
            free = (group.task_state == FREE).nonzero().flatten()
            group.prune(free[::3])
    gen = torch.Generator().manual_seed(tasks)
    x = torch.randn(32, 784, generator=gen).to(DEVICE)
    y = torch.randint(10, (32,), generator=gen).to(DEVICE)
    ref = copy.deepcopy(model)
    loss_w, grads_w, taylor_w = _step(ref, "reference", x, y, monkeypatch)
    loss_g, grads_g, taylor_g = _step(model, "triton", x, y, monkeypatch)
    _close(loss_g, loss_w, torch.float32, "loss")
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        _close(grads_g[name], grads_w[name], torch.float32, name)
    for a, b in zip(taylor_g, taylor_w):
        _close(a, b, torch.float32, "taylor", 4)
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
    x = torch.randn(16, 784, generator=gen).to(DEVICE)
    y = torch.randint(10, (16,), generator=gen).to(DEVICE)

    def finished_logits():
        model.eval()
        with torch.no_grad():
            out = [model(x, task=t).clone() for t in (0, 1)]
        model.train()
        return out

    before = finished_logits()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
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


def test_nan_in_a_networks_trainable_storage_never_reaches_a_finished_task(monkeypatch):
    """Inside a network (task-major, slices only): every trainable storage (body layers and the new task's
    head) poisoned with NaN and inf leaves every finished task's logits bit-identical."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    model = _network(3, seed=4).eval()
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        clean = [model(x, task=t).clone() for t in range(3)]
        for layer in _eidetic_layers(model):
            layer.weight.view(-1)[::2] = float("nan")
            layer.weight.view(-1)[1::2] = float("inf")
            if layer.bias is not None:
                layer.bias.fill_(float("nan"))
        for t in range(3):
            assert torch.equal(model(x, task=t), clean[t])
        assert torch.isnan(model(x, task=3)).any()  # the poisoned trainable task does see it


# ----- work accounting ----------------------------------------------------------------------------------

def _eidetic_flops(counter):
    ops = (torch.ops.eidetic.triton_linear, torch.ops.eidetic.triton_linear_backward)
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if op in ops)


@pytest.mark.parametrize("constant_frozen", [False, True])
def test_flop_formula_equals_work_counter(monkeypatch, constant_frozen):
    """The registered formulas count 2x the multiply-adds the kernels issue (counted by the kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    layer = scattered_layer(45, 53, "split_free", seed=9)
    layer.constant_frozen = constant_frozen
    model = _network(2, seed=2)
    model.exact_activation_grads = not constant_frozen
    gen = torch.Generator().manual_seed(2)
    cases = [(lambda: (layer(torch.randn(29, 45, generator=gen).to(DEVICE).requires_grad_()) ** 2).sum()),
             (lambda: F.cross_entropy(model(torch.randn(12, 784, generator=gen).to(DEVICE)),
                                      torch.randint(10, (12,), generator=gen).to(DEVICE)))]
    for loss_fn in cases:
        work = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        counter = FlopCounterMode(display=False)
        with counter, tri.count_work(work):
            loss_fn().backward()
        assert int(work) > 0
        assert _eidetic_flops(counter) == 2 * int(work)
    model.eval()
    work = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    counter = FlopCounterMode(display=False)
    with counter, tri.count_work(work), torch.no_grad():
        model(torch.randn(12, 784, generator=gen).to(DEVICE), task=0)
    assert _eidetic_flops(counter) == 2 * int(work) > 0


def _ratios(tasks, share):
    torch.manual_seed(0)
    model, twin = make_finished_mlp(width=1024, tasks=tasks, share=share, seed=tasks)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 784, generator=g), torch.randint(10, (64,), generator=g)
    model.train()
    step = step_flops(model, x, y) / step_flops(twin, x, y)
    assert model.body[0].last_backend == "triton"
    model.eval()
    evaluate = forward_flops(lambda inp: model(inp, task=0), x) / forward_flops(twin, x)
    return step, evaluate


@pytest.mark.skipif(DEVICE != "cpu", reason="counts on CPU tensors (the FLOP harness's baseline runs there)")
def test_flop_bounds_hold_on_the_triton_backend(monkeypatch):
    """tests/python_layers/test_flop_bounds.py's bounds, counted from the registered formulas: MLP
    784-1024-1024, batch 64, 10% frozen per task; step <= 0.42x nn at 8 tasks, task-0 evaluation <= 0.07x,
    and at 40% frozen, 8 tasks cost at most 5% more than 2."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", True)
    step, evaluate = _ratios(8, 0.1)
    assert step <= 0.42, f"step FLOPs {step:.3f}x nn's"
    assert evaluate <= 0.07, f"task-0 evaluation FLOPs {evaluate:.3f}x nn's forward"
    many, _ = _ratios(8, 0.05)
    few, _ = _ratios(2, 0.2)
    assert many <= 1.05 * few, f"8 tasks: {many:.3f}x nn, 2 tasks: {few:.3f}x nn"


def test_output_is_a_fresh_tensor(monkeypatch):
    """Not a view, and nothing saved for backward aliases it: in-place ops after the layer work."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    layer = scattered_layer(13, 11, "scattered", seed=1)
    layer.enable_taylor()
    y = layer(torch.randn(2, 3, 13, device=DEVICE, requires_grad=True))
    assert y.shape == (2, 3, 11) and y._base is None and layer.last_backend == "triton"
    y.add_(1).relu_().sum().backward()
    assert bool((layer.taylor_score > 0).any())
