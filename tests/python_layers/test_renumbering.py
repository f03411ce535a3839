"""Task-major renumbering inside ``finish_task``: each task's neurons contiguous, every window a slice.

Pinned: after tasks finish, every neuron group is laid out [task 0 | task 1 | ... | trainable]; the range
tables of an MLP and a CNN (flatten included) read contiguous windows and need no output gather; the
neurons a task kept are the ones it froze (``neuron_positions`` follows them); finished neurons never
move; a body that ties a constant to feature positions, and a hand-declared graph, keep their positions
and stay exact. The bit-stability of finished tasks under renumbering is pinned by test_finish_rules.py
and test_no_forgetting.py, which run through the same finish_task.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE, PRUNED, EideticLinear
from python_layers import EideticNetwork, declare_graph


def _finish_tasks(model, shape, tasks=3, seed=0):
    """Train a little, prune a random half of every group's FREE neurons, finish; returns what was kept."""
    g = torch.Generator().manual_seed(seed)
    kept, snapshots = [], {}
    probe = torch.randn((6,) + shape, generator=g)
    for t in range(tasks):
        model.prepare_for_task(t, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn((8,) + shape, generator=g)), torch.randint(3, (8,), generator=g)).backward()
            opt.step()
        chosen = {}
        for grp in model.groups:
            free = (grp.task_state == FREE).nonzero().flatten()
            if free.numel() > 1:
                grp.prune(free[torch.randperm(free.numel(), generator=g)[: free.numel() // 2]])
            # the first indices of the neurons that survive
            survivors = (grp.task_state == FREE).nonzero().flatten()
            chosen[grp.name] = torch.argsort(model.neuron_positions(grp.name))[survivors]
        model.finish_task()
        kept.append(chosen)
        model.eval()
        with torch.no_grad():
            for s in list(snapshots):
                assert torch.equal(model(probe, task=s), snapshots[s]), f"task {s} changed when task {t} finished"
            snapshots[t] = model(probe, task=t).clone()
        model.train()
    return kept


def _assert_task_major(model, tasks):
    for grp in model.groups:
        state = grp.task_state.long()
        frozen = (state >= 0) & (state != FREE)
        n = int(frozen.sum())
        assert bool(frozen[:n].all()), f"{grp.name}: frozen neurons are not a prefix"
        assert bool((state[:n][1:] >= state[:n][:-1]).all()), f"{grp.name}: frozen blocks out of task order"
        assert set(state[:n].tolist()) <= set(range(tasks))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU()), 12, (1, 8, 8)


def cnn():
    body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU())
    return body, 12, (1, 8, 8)


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_finished_tasks_are_contiguous_blocks_and_windows_are_slices(make):
    torch.manual_seed(0)
    body, feature_dim, shape = make()
    model = EideticNetwork(body, feature_dim)
    kept = _finish_tasks(model, shape)
    _assert_task_major(model, 3)
    # the neurons each task kept are the ones frozen for it, wherever they now are
    for t, chosen in enumerate(kept):
        for name, first in chosen.items():
            now = model.neuron_positions(name)[first]
            assert bool((model.graph.group_of(name).task_state[now] == t).all()), (name, t)
    # every frozen window a slice and every output in order: no gather, in training and in every view
    model.prepare_for_task(3, 3)
    layers = list(model.graph.layers.values()) + list(model.heads)
    for layer in layers:
        if not hasattr(layer, "input_task"):
            continue
        for view in (None, 0, 1, 2):
            if layer in model.heads[:3] and view is None:
                continue
            layer.view_task = view
            try:
                table = layer._table()
            finally:
                layer.view_task = None
            assert table.out_index is None, (type(layer).__name__, view)
            assert all(b.col_range is not None for b in table.blocks), (type(layer).__name__, view)


@pytest.mark.filterwarnings("ignore::eidetic_kernels.FreeInputsWarning")  # states built by hand
def test_renumbering_moves_only_trainable_neurons():
    layer = EideticLinear(4, 5)
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    with pytest.raises(ValueError, match="frozen neurons never move"):
        layer.permute_neurons(torch.tensor([1, 0, 2, 3, 4]))
    with pytest.raises(ValueError, match="permutation"):
        layer.permute_neurons(torch.tensor([0, 0, 2, 3, 4]))
    reader = EideticLinear(5, 2)
    reader.set_input_task(layer.task_state)
    reader.prune_neurons([0])
    reader.freeze_free_neurons(0)
    with pytest.raises(ValueError, match="inputs from frozen neurons never move"):
        reader.permute_inputs(torch.tensor([1, 0, 2, 3, 4]))


class Scaled(nn.Module):
    """Multiplies hidden features by a fixed per-feature buffer: positions matter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 12)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16))

    def forward(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))) * self.scale))


def test_a_per_feature_constant_keeps_positions_and_stays_exact():
    torch.manual_seed(0)
    model = EideticNetwork(Scaled(), 12)
    model.ensure_graph(torch.zeros(2, 1, 8, 8))
    assert model.graph.renumber_blocked_by is not None and "one value per feature" in model.graph.renumber_blocked_by
    kept = _finish_tasks(model, (1, 8, 8))  # asserts finished tasks bit-stable
    for t, chosen in enumerate(kept):  # nothing moved: first index == position
        for name, first in chosen.items():
            assert bool((model.graph.group_of(name).task_state[first] == t).all())


def test_declared_graphs_renumber_only_when_they_say_so():
    for renumber in (False, True):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        graph = declare_graph(body, inputs={"1": [("raw", 64)], "3": ["1"]}, features=["3"], renumber=renumber)
        model = EideticNetwork(body, 12)
        model.set_graph(declare_graph(model, inputs={"body.1": [("raw", 64)], "body.3": ["body.1"]},
                                      features=["body.3"], renumber=renumber))
        assert (graph.renumber_blocked_by is None) == renumber
        _finish_tasks(model, (1, 8, 8), tasks=2)
        if renumber:
            _assert_task_major(model, 2)
        else:
            assert all(torch.equal(model.neuron_positions(g.name), torch.arange(g.size)) for g in model.groups)


def test_neuron_order_travels_with_the_state_dict():
    torch.manual_seed(0)
    body, feature_dim, shape = mlp()
    model = EideticNetwork(body, feature_dim)
    _finish_tasks(model, shape, tasks=2)
    fresh = EideticNetwork(mlp()[0], feature_dim)
    fresh.load_state_dict(model.state_dict())
    for g in model.groups:
        assert torch.equal(fresh.neuron_positions(g.name), model.neuron_positions(g.name))
    x = torch.randn(4, *shape)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, task=1), model(x, task=1))


def test_neuron_positions_of_an_unknown_layer_names_the_layers():
    model = EideticNetwork(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 4)
    model.ensure_graph(torch.randn(2, 4))
    with pytest.raises(KeyError, match=r"'nope' is no layer of the layer graph: name one of \['body.0'\]"):
        model.neuron_positions("nope")
