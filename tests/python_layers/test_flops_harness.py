"""The FLOP harness of tests/flops.py counts what it claims to.

* ``step_flops`` of a plain MLP is the analytic count: forward 2*B*sum(in*out); backward twice that (input
  and weight gradients of every Linear) minus the first layer's input gradient, which nothing asks for
  (and plus it again when the input requires grad). It neither steps nor leaks gradients.
* ``forward_flops`` is the analytic forward count.
* ``make_finished_mlp`` leaves exactly the per-group counts asked for (``model.capacity()``), with each
  task's neurons scattered over the layer, prepared for the next task; too many tasks is a clear error.
* On the reference backend the harness sees the Eidetic ops: with every neuron FREE the network is its
  plain twin, FLOP for FLOP.
"""
import pytest
import torch

from eidetic_kernels import FREE
from tests.flops import CLASSES, INPUT_DIM, forward_flops, make_finished_mlp, mlp_twin, step_flops
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)

WIDTH = 64
BATCH = 16
SIZES = [INPUT_DIM, WIDTH, WIDTH, CLASSES]


def analytic_forward(sizes, batch):
    return 2 * batch * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))


def batch(seed=0, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, INPUT_DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


@pytest.mark.parametrize("input_grad", [False, True], ids=["input_no_grad", "input_requires_grad"])
def test_step_flops_of_a_plain_mlp_is_analytic(input_grad):
    torch.manual_seed(0)
    twin = mlp_twin(SIZES)
    x, y = batch()
    x.requires_grad_(input_grad)
    fwd = analytic_forward(SIZES, BATCH)
    first_input_grad = 0 if input_grad else 2 * BATCH * SIZES[0] * SIZES[1]
    got = step_flops(twin, x, y)
    assert isinstance(got, int)
    assert got == fwd + 2 * fwd - first_input_grad


def test_step_flops_takes_no_step_and_leaves_gradients_as_they_were():
    torch.manual_seed(0)
    twin = mlp_twin(SIZES)
    x, y = batch()
    before = [p.detach().clone() for p in twin.parameters()]
    marker = torch.full_like(twin[0].weight, 3.0)
    twin[0].weight.grad = marker
    step_flops(twin, x, y)
    assert all(torch.equal(p, b) for p, b in zip(twin.parameters(), before))
    assert twin[0].weight.grad is marker
    assert all(p.grad is None for p in list(twin.parameters())[1:])


def test_forward_flops_of_a_plain_mlp_is_analytic():
    torch.manual_seed(0)
    twin = mlp_twin(SIZES)
    x, _ = batch()
    assert forward_flops(twin, x) == analytic_forward(SIZES, BATCH)
    assert forward_flops(twin, x[:3]) == analytic_forward(SIZES, 3)


def test_mlp_twin_shape():
    twin = mlp_twin([5, 7, 3])
    assert [type(m).__name__ for m in twin] == ["Linear", "ReLU", "Linear"]
    assert twin(torch.zeros(2, 5)).shape == (2, 3)


def test_make_finished_mlp_leaves_the_expected_counts():
    tasks, share = 3, 0.25
    keep = round(share * WIDTH)
    model, twin = make_finished_mlp(width=WIDTH, tasks=tasks, share=share, seed=0)
    expected = {f"task {t}": keep for t in range(tasks)}
    expected.update(free=WIDTH - tasks * keep, pruned=0)
    capacity = model.capacity()
    assert len(capacity) == 2, capacity  # the two hidden layers of 784-W-W
    assert all(row == expected for row in capacity.values()), capacity
    assert model.num_finished_tasks == tasks and model.current_task == tasks and len(model.heads) == tasks + 1
    # chosen scattered (by their first indices), laid out task-major by finish_task
    for g in model.groups:
        first = model.neuron_positions(g.name)
        own_first = (g.task_state[first] == 0).nonzero().flatten()
        assert int(own_first.max() - own_first.min()) + 1 > own_first.numel(), f"{g.name}: chosen contiguous"
        assert torch.equal((g.task_state == 0).nonzero().flatten(), torch.arange(keep)), g.name
    assert [tuple(m.weight.shape) for m in twin if hasattr(m, "weight")] == [(WIDTH, INPUT_DIM), (WIDTH, WIDTH),
                                                                               (CLASSES, WIDTH)]
    # a training step of the prepared task can be counted, and finished tasks still evaluate
    x, y = batch()
    assert step_flops(model, x, y) > 0
    assert model(x, task=0).shape == (BATCH, CLASSES)
    # the same seed gives the same network
    again, _ = make_finished_mlp(width=WIDTH, tasks=tasks, share=share, seed=0)
    assert all(torch.equal(a.task_state, b.task_state) for a, b in zip(model.groups, again.groups))


def test_make_finished_mlp_with_no_task_is_all_free():
    model, _ = make_finished_mlp(width=WIDTH, tasks=0, share=0.25)
    assert all(row == {"free": WIDTH, "pruned": 0} for row in model.capacity().values())
    assert model.current_task == 0


def test_make_finished_mlp_refuses_more_tasks_than_the_width_holds():
    with pytest.raises(ValueError, match="free neuron"):
        make_finished_mlp(width=WIDTH, tasks=4, share=0.25)  # 4 * 16 = 64: nothing left for task 4


def test_the_harness_sees_the_eidetic_ops_all_free_network_is_its_twin():
    model, twin = make_finished_mlp(width=WIDTH, tasks=0, share=0.25)
    x, y = batch()
    step = step_flops(model, x, y)
    backends = {layer.last_backend for layer in list(model.body_layers().values()) + list(model.heads)}
    if backends != {"reference"}:
        pytest.skip(f"backends {backends}: this harness compares the reference engine with its twin (the Triton "
                    f"ops' flop formulas are checked in tests/kernels/test_triton_linear_tiles.py)")
    assert step == step_flops(twin, x, y)
    assert forward_flops(model, x) == forward_flops(twin, x)
    assert all(bool((g.task_state == FREE).all()) for g in model.groups)
