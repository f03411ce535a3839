"""The work of a layer follows its live synapses: FLOP bounds counted with FlopCounterMode.

MLP 784-1024-1024 (heads of 10 classes) inside an EideticNetwork, batch 64, each finished task keeping
10% of every layer at random positions (as pruning leaves them), forward transfer on, against the same
plain torch.nn network (``tests/flops.py``). The live work of a training step after 8 tasks is about
0.38x nn's (frozen first-layer rows still read every raw input), of evaluating task 0 about 0.05x.
Counts are deterministic: these are exact bounds, not timings.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.flops import forward_flops, make_finished_mlp, step_flops

BATCH = 64
WIDTH = 1024


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 784, generator=g), torch.randint(10, (BATCH,), generator=g)


def _ratios(tasks, share):
    torch.manual_seed(0)
    model, twin = make_finished_mlp(width=WIDTH, tasks=tasks, share=share, seed=tasks)
    x, y = _batch()
    _require_reference(model, x)
    model.train()
    step = step_flops(model, x, y) / step_flops(twin, x, y)
    model.eval()
    evaluate = forward_flops(lambda inp: model(inp, task=0), x) / forward_flops(twin, x)
    return step, evaluate


def _require_reference(model, x):
    """These counts are the reference engine's (the CPU default). On the Triton backend the same bounds are
    asserted, through its registered flop formulas, in tests/kernels/test_triton_linear_tiles.py (at a size
    the interpreter runs in seconds)."""
    with torch.no_grad():
        model(x[:2])
    backend = model.body[0].last_backend
    if backend != "reference":
        pytest.skip(f"layers ran on the {backend} backend; these counts and gradients are the reference engine's")


@pytest.fixture(scope="module")
def eight_tasks():
    return _ratios(8, 0.1)


def test_training_step_after_eight_tasks_costs_at_most_042x_nn(eight_tasks):
    step, _ = eight_tasks
    assert step <= 0.42, f"step FLOPs {step:.3f}x nn's"


def test_evaluating_task_0_costs_at_most_007x_nn(eight_tasks):
    _, evaluate = eight_tasks
    assert evaluate <= 0.07, f"task-0 evaluation FLOPs {evaluate:.3f}x nn's forward"


def test_step_flops_do_not_grow_with_the_number_of_tasks():
    """40% frozen: spread over 8 tasks (5% each) costs at most 5% more than over 2 tasks (20% each)."""
    many, _ = _ratios(8, 0.05)
    few, _ = _ratios(2, 0.2)
    assert many <= 1.05 * few, f"8 tasks: {many:.3f}x nn, 2 tasks: {few:.3f}x nn"


def test_exact_activation_grads_opt_out_gives_full_input_gradients():
    """Frozen-constant mode changes no parameter gradient; the opt-out (or an input that requires grad, or
    hooks on a module) gives the full gradient of intermediate activations too."""
    torch.manual_seed(0)
    model, _ = make_finished_mlp(width=48, tasks=2, share=0.25, seed=1)
    x, y = _batch(1)
    _require_reference(model, x)
    grads = {}
    for exact in (False, True):
        model.exact_activation_grads = exact
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads[exact] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.exact_activation_grads = False
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # input gradients: full whenever the input requires grad, in either mode
    xg = x.clone().requires_grad_()
    (g_fast,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    model.exact_activation_grads = True
    (g_exact,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    torch.testing.assert_close(g_fast, g_exact)
    # gradient of a hidden activation, caught by a forward hook: a module with hooks turns the fast mode off,
    # so both modes reach the frozen neurons (without a hook, autograd.grad on an activation would not)
    acts = {}
    hook = model.body[1].register_forward_hook(lambda m, i, o: acts.__setitem__("h", o))
    try:
        for exact in (False, True):
            model.exact_activation_grads = exact
            loss = F.cross_entropy(model(x), y)
            (g,) = torch.autograd.grad(loss, acts["h"])
            acts[exact] = g
    finally:
        hook.remove()
        model.exact_activation_grads = False
    frozen = model.body[0].task_state != 32767  # frozen neurons of the first layer (nothing is PRUNED)
    assert bool((acts[True][:, frozen] != 0).any())
    assert torch.equal(acts[False], acts[True])
