"""Issue 7's promise: once task t is finished its eval logits never change, bit for bit.

Three tasks in a row (fresh AdamW(weight_decay=0.05) per task) on small synthetic data, for an MLP with
dropout, a CNN with BatchNorm and a small ResNet with a projection skip, with l2, l1 and Taylor pruning.
After every task, the eval logits of every finished task on one fixed batch must be ``torch.equal`` to
their values right after that task finished; so must they after NaN and then +inf are written into every
tensor of ``model.parameters()``. Also: forward transfer off, plain torch.nn layers converted, a save/load
round trip, a later task that diverges, and the capacity error.

Accuracy bar: every task's held-out accuracy must be at least chance + 0.4 (chance = 1/3 with 3 classes,
so >= 0.733); the synthetic tasks reach ~0.9-1.0.
"""
import io
import warnings

import pytest
import torch

from python_layers import EideticNetwork
from python_layers.network import CapacityError
from tests.python_layers.synthetic import BODIES, CHANCE, CLASSES, accuracy, make_tasks, mlp_body
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)

MARGIN = 0.4
MIN_ACCURACY = CHANCE + MARGIN
LR = 5e-3
TRAIN = dict(step=0.25, stop_threshold=0.1, max_epochs=8, patience=2, recovery_epochs=2, progress=False)


def probe_batch(tasks):
    """One fixed batch mixing every task's held-out inputs and plain noise."""
    g = torch.Generator().manual_seed(7)
    return torch.cat([x[::6] for _, x, _ in tasks] + [3 * torch.randn((5,) + tuple(tasks[0][1].shape[1:]),
                                                                      generator=g)])


def eval_logits(model, x, task):
    model.eval()
    with torch.no_grad():
        return model(x, task=task).clone()


def assert_finished_tasks_unchanged(model, probe, snapshots, when):
    for t, expected in snapshots.items():
        got = eval_logits(model, probe, t)
        assert torch.equal(got, expected), f"task {t}'s logits changed {when}"


def train_tasks(model, tasks, pruning, probe, snapshots, first=0, forward_transfer=True, train=TRAIN):
    for t in range(first, len(tasks)):
        loader, x_test, y_test = tasks[t]
        model.prepare_for_task(t, CLASSES, forward_transfer=forward_transfer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        model.train_task(loader, optimizer, pruning=pruning, **train)
        acc = accuracy(model, x_test, y_test, t)
        assert acc >= MIN_ACCURACY, f"task {t} reached accuracy {acc:.3f} < {MIN_ACCURACY:.3f}"
        snapshots[t] = eval_logits(model, probe, t)
        assert_finished_tasks_unchanged(model, probe, snapshots, f"after task {t} finished")


def fill_parameters(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


@pytest.mark.parametrize("pruning", ["l2", "l1", "taylor"])
@pytest.mark.parametrize("arch", ["mlp", pytest.param("cnn", marks=pytest.mark.trains_conv_body),
                                  pytest.param("resnet", marks=pytest.mark.trains_conv_body)])
def test_finished_tasks_are_bit_stable(arch, pruning):
    torch.manual_seed(0)
    tasks = make_tasks(seed=1)
    probe = probe_batch(tasks)
    body, feature_dim = BODIES[arch]()
    model = EideticNetwork(body, feature_dim)
    snapshots = {}
    train_tasks(model, tasks, pruning, probe, snapshots)
    assert model.num_finished_tasks == 3
    # the free capacity cannot reach a finished task, not even as 0 * NaN
    for value in (float("nan"), float("inf")):
        fill_parameters(model, value)
        assert_finished_tasks_unchanged(model, probe, snapshots, f"after filling the parameters with {value}")


def test_forward_transfer_off_gives_disjoint_subnetworks():
    torch.manual_seed(0)
    tasks = make_tasks(seed=2)
    probe = probe_batch(tasks)
    model = EideticNetwork(*mlp_body())
    snapshots = {}
    train_tasks(model, tasks, "l2", probe, snapshots, forward_transfer=False)
    # a task's neurons read only their own task's neurons (raw inputs excepted: they are task 0 for everyone)
    raw = model.graph.raw_input_layers
    checked = 0
    for group in model.groups:
        for name, layer in group.members:
            if not hasattr(layer, "min_input_task") or name in raw:
                continue
            for t in range(3):
                own = layer.task_state == t
                assert bool((layer.min_input_task[own] == t).all()), f"{name}: task {t} reads older tasks"
                checked += int(own.sum())
    assert checked > 0
    fill_parameters(model, float("nan"))
    assert_finished_tasks_unchanged(model, probe, snapshots, "after a NaN fill")


def test_plain_torch_nn_layers_are_converted():
    torch.manual_seed(0)
    tasks = make_tasks(seed=3)
    probe = probe_batch(tasks)
    body, feature_dim = mlp_body(eidetic=False)
    model = EideticNetwork(body, feature_dim)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm2d) for m in model.modules()
                   if m not in list(model.heads.modules())), "plain layers left unconverted"
    snapshots = {}
    train_tasks(model, tasks, "l2", probe, snapshots)


@pytest.mark.trains_conv_body
def test_save_load_round_trip_then_keep_training():
    torch.manual_seed(0)
    tasks = make_tasks(seed=4)
    probe = probe_batch(tasks)
    model = EideticNetwork(*BODIES["cnn"]())
    snapshots = {}
    train_tasks(model, tasks[:2], "l2", probe, snapshots)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different init: everything must come from the file
    loaded = EideticNetwork(*BODIES["cnn"]())
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.num_finished_tasks == 2
    assert_finished_tasks_unchanged(loaded, probe, snapshots, "after the round trip")
    assert loaded.capacity() == model.capacity()  # per group, now that the first forward traced the graph
    train_tasks(loaded, tasks, "l2", probe, snapshots, first=2)


def test_a_later_task_that_diverges_cannot_reach_a_finished_one():
    torch.manual_seed(0)
    tasks = make_tasks(seed=5)
    probe = probe_batch(tasks)
    model = EideticNetwork(*mlp_body())
    snapshots = {}
    train_tasks(model, tasks[:1], "l2", probe, snapshots)
    model.prepare_for_task(1, CLASSES)
    fill_parameters(model, float("nan"))  # every FREE neuron and the new head are NaN: the task diverges
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train_task(tasks[1][0], optimizer, pruning="l2", **TRAIN)
    assert model.num_finished_tasks == 2
    assert_finished_tasks_unchanged(model, probe, snapshots, "after a diverging task")


def test_no_free_neuron_left_is_a_clear_error_and_takes_nothing():
    torch.manual_seed(0)
    tasks = make_tasks(num_tasks=2, seed=6)
    model = EideticNetwork(*mlp_body(width=6))
    model.prepare_for_task(0, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    model.train_task(tasks[0][0], optimizer, pruning=None, max_epochs=2, patience=1, progress=False)
    capacity = model.capacity()
    assert all(c.get("free", 0) == 0 for c in capacity.values())  # no pruning: every neuron went to task 0
    states = {name: layer.task_state.clone() for name, layer in model.named_modules() if hasattr(layer, "task_state")}
    with pytest.raises(CapacityError, match=r"a layer of W neurons holds at most W tasks; to learn more, start a "
                                            r"network with more neurons there") as info:
        model.prepare_for_task(1, CLASSES)
    assert any(name in str(info.value) for name in capacity), "the error must name the layer"
    for name, layer in model.named_modules():
        if name in states:
            assert torch.equal(layer.task_state, states[name]), f"{name}: a failed prepare changed states"
    assert model.capacity() == capacity


@pytest.mark.parametrize("arch", [pytest.param("cnn", marks=pytest.mark.trains_conv_body),
                                  pytest.param("resnet", marks=pytest.mark.trains_conv_body)])
def test_a_task_that_takes_the_last_free_neurons(arch):
    """When a task freezes every remaining neuron the trainable storage becomes empty ([0, ...]); finished
    tasks (BatchNorm affine rows included) must still read their own frozen rows."""
    torch.manual_seed(0)
    tasks = make_tasks(num_tasks=2, seed=7)
    probe = probe_batch(tasks)
    model = EideticNetwork(*BODIES[arch]())
    snapshots = {}
    train_tasks(model, tasks[:1], "l2", probe, snapshots)
    model.prepare_for_task(1, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    model.train_task(tasks[1][0], optimizer, pruning=None, max_epochs=2, patience=1, progress=False)
    assert all(c["free"] == 0 and c["pruned"] == 0 for c in model.capacity().values())
    assert_finished_tasks_unchanged(model, probe, snapshots, "after task 1 took the last free neurons")
