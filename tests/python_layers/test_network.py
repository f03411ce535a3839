"""EideticNetwork without the trainer: tasks, views, freezing by hand, capacity, errors, state dicts.

Freezing is done by hand (group.prune, model.finish_task) so these tests prove the network's
promise independently of the pruning schedule: once task 0 is finished, its eval logits stay
bit-identical through training of task 1 with weight decay, and through NaN / +inf in every
parameter.
"""
import copy
import os
import warnings
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE, PRUNED, EideticLinear
from python_layers import CapacityError, CapacityWarning, EideticNetwork, GraphError

from .test_graph import ResNet, cnn


def mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 8), nn.ReLU(), nn.Dropout(0.1))


BODIES = {
    "mlp": (mlp, 8, (6,)),
    "cnn": (lambda: nn.Sequential(cnn(), nn.ReLU()), 6, (3, 6, 6)),
    "resnet": (ResNet, 5, (3, 5, 5)),
}


def make(kind, seed=0):
    torch.manual_seed(seed)
    factory, feature_dim, shape = BODIES[kind]
    return EideticNetwork(factory(), feature_dim), shape


def task_0_finished(kind="mlp"):
    """A network of ``kind`` whose task 0 finished with neurons 0 and 1 of every group pruned (free for task 1),
    and an input batch for it."""
    model, shape = make(kind)
    x = torch.randn(4, *shape)
    model.prepare_for_task(0, 2)
    model(x)
    for group in model.groups:
        group.prune([0, 1])
    model.finish_task()
    return model, x


def train_steps(model, x, y, steps, weight_decay, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def prune_share(model, share, generator):
    """Prune ``share`` of each group's FREE neurons at random (at least one, keeping at least one FREE)."""
    for g in model.groups:
        free = (g.task_state == FREE).nonzero().flatten()
        k = min(max(1, int(share * free.numel())), free.numel() - 1)
        g.prune(free[torch.randperm(free.numel(), generator=generator)[:k]])


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_finished_task_is_bit_stable_under_training_nan_and_inf(kind):
    model, shape = make(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *shape, generator=gen)
    y0 = torch.randint(3, (16,), generator=gen)
    y1 = torch.randint(4, (16,), generator=gen)

    model.prepare_for_task(0, 3)
    train_steps(model, x, y0, 4, weight_decay=0.1)
    prune_share(model, 0.5, gen)
    train_steps(model, x, y0, 2, weight_decay=0.1)
    model.finish_task()
    model.eval()
    with torch.no_grad():
        snap0 = model(x, task=0).clone()
        feat0 = model.features(x, view_task=0).clone()
    assert torch.isfinite(snap0).all()

    model.prepare_for_task(1, 4)
    train_steps(model, x, y1, 6, weight_decay=0.1)  # BN running stats of FREE channels move too
    prune_share(model, 0.3, gen)
    model.finish_task()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), snap0)
        assert torch.equal(model.features(x, view_task=0), feat0)
        snap1 = model(x, task=1).clone()
    assert not torch.equal(model(x, task=1)[:, :3], snap0)  # task 1 did learn something of its own
    # view mode: evaluating task 0 computes only task-0 neurons; the others output exactly 0
    feature_task = model.graph.feature_task()
    assert bool((feature_task == 1).any())
    assert bool((feat0[:, feature_task != 0] == 0).all())
    for layer in model.graph.layers.values():
        table = layer._plans.get(0)
        if table is not None and hasattr(table, "blocks"):
            assert all(block.task == 0 for block in table.blocks)

    # the free capacity of task 2 can do anything: task 0 and 1 do not see it
    model.prepare_for_task(2, 2)
    train_steps(model, x, y1 % 2, 3, weight_decay=0.1)
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x, task=0), snap0)
            assert torch.equal(model(x, task=1), snap1)
        model.train()
        with torch.no_grad():  # training mode too (BN of frozen channels uses running stats, dropout off in eval)
            assert torch.equal(model.features(x, view_task=0).isfinite(), torch.ones_like(feat0, dtype=torch.bool))


def test_frozen_values_are_out_of_parameters():
    model, shape = make("cnn")
    x = torch.randn(4, *shape)
    model.prepare_for_task(0, 3)
    model(x)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    prune_share(model, 0.5, gen)
    pruned = {g.name: int((g.task_state == PRUNED).sum()) for g in model.groups}
    model.finish_task()
    # only recycled rows stay trainable; head 0 is frozen by construction
    assert sum(p.numel() for p in model.heads[0].parameters()) == 0
    assert sum(p.numel() for p in model.parameters()) < n_params
    for g in model.groups:
        for layer in g.weight_members():
            assert layer.weight.shape[0] == pruned[g.name]


def test_capacity_counts():
    model, shape = make("resnet")
    x = torch.randn(4, *shape)
    model.prepare_for_task(0, 2)
    assert model(x).shape == (4, 2)
    cap = model.capacity()
    assert set(cap) == {g.name for g in model.groups}
    assert all(row == {"free": g.size, "pruned": 0} for g, row in zip(model.groups, cap.values()))
    g = model.groups[1]
    g.prune([0, 1])
    assert model.capacity()[g.name] == {"free": g.size - 2, "pruned": 2}
    model.finish_task()
    assert model.capacity()[g.name] == {"task 0": g.size - 2, "free": 2, "pruned": 0}
    other = model.groups[0]
    assert model.capacity()[other.name] == {"task 0": other.size, "free": 0, "pruned": 0}


def test_capacity_error_names_the_layer():
    model, shape = make("mlp")
    x = torch.randn(4, *shape)
    model.prepare_for_task(0, 2)
    model(x)
    model.groups[0].prune([0, 1])  # group "body.3" keeps no free neuron after task 0
    with pytest.warns(CapacityWarning, match=r"task 0 kept every neuron left in body\.3 \(8\): no free neuron remains there for a next task\. A task can "
                                             r"keep fewer.*at most W tasks") as record:  # at once
        model.finish_task()
    assert record[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper
    with pytest.raises(CapacityError) as info:
        model.prepare_for_task(1, 2)
    msg = str(info.value)
    assert "body.3" in msg and "body.0" not in msg and "start a network with more neurons there" in msg
    assert "Nothing changed: the finished tasks evaluate" in msg
    assert model.current_task is None and len(model.heads) == 1  # nothing was taken


class _RawBNSkip(nn.Module):
    """A batch norm of the raw input added to a conv of it: one group, the batch norm traced first."""

    def __init__(self):
        super().__init__()
        self.bn, self.c, self.fc = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 6)

    def forward(self, x):
        return torch.relu(self.fc(torch.relu(self.bn(x) + self.c(x)).mean((2, 3))))


def test_a_group_is_named_after_its_layer_with_weights_not_a_raw_input_batch_norm():
    """A user widens the conv, not the batch norm: the group, its capacity and the CapacityError name the conv."""
    model = EideticNetwork(_RawBNSkip(), 6)
    model.prepare_for_task(0, 2)
    model(torch.randn(4, 3, 5, 5))
    group = model.graph.group_of("body.bn")
    assert [n for n, _ in group.members] == ["body.bn", "body.c"] and group.name == "body.c"
    model.graph.group_of("body.fc").prune([0])
    with pytest.warns(CapacityWarning, match=r"every neuron left in body\.c \(3\):"):
        model.finish_task()
    with pytest.raises(CapacityError, match=r"no free neuron left in body\.c \("):
        model.prepare_for_task(1, 2)


def test_finish_task_refuses_a_state_changed_on_one_coupled_member_and_changes_nothing():
    """A conv pruned by hand, not its batch norm: finish_task says so before freezing anything, and once the
    group makes the same change the task finishes and the next one starts."""
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 6), nn.ReLU())
    model = EideticNetwork(body, 6)
    x = torch.randn(4, 3, 5, 5)
    model.prepare_for_task(0, 3)
    model(x)
    model.body[0].prune_neurons(torch.tensor([0, 1, 2]))
    states = {name: layer.task_state.clone() for name, layer in model.body_layers().items()}
    with pytest.raises(GraphError, match=r"finish_task changed nothing: coupled layers .* neurons 0, 1, 2;.*group"):
        model.finish_task()
    assert model.current_task == 0 and model.num_finished_tasks == 0
    assert all(torch.equal(layer.task_state, states[name]) for name, layer in model.body_layers().items())
    group = next(g for g in model.groups if g.name == "body.0")
    model.body[1].prune_neurons(torch.tensor([0, 1, 2]))  # the batch norm now agrees
    group.check_consistent()
    next(g for g in model.groups if g.name == "body.5").prune([0, 1])  # capacity for task 1
    model.finish_task()
    model.prepare_for_task(1, 3)
    assert model(x).shape == (4, 3)


def test_task_id_errors():
    model, shape = make("mlp")
    x = torch.randn(4, *shape)
    with pytest.raises(RuntimeError, match="prepare_for_task"):
        model(x)
    with pytest.raises(ValueError, match="next task is 0"):
        model.prepare_for_task(1, 2)
    with pytest.raises(ValueError, match="task ids are 0, 1, 2, ... in order: got -1; the next task is 0"):
        model.prepare_for_task(-1, 2)
    model.prepare_for_task(0, 2)
    with pytest.raises(RuntimeError, match="not finished"):
        model.prepare_for_task(1, 2)
    with pytest.raises(RuntimeError, match="task 0 is already prepared"):
        model.prepare_for_task(0, 2)
    with pytest.raises(ValueError, match="unknown task 3"):
        model(x, task=3)
    with pytest.raises(ValueError, match="not finished"):
        model.features(x, view_task=0)
    with pytest.raises(TypeError, match="predict"):
        model(x, task=torch.tensor([0, 1]))
    model(x, task=0)
    model.groups[0].prune([0])
    model.finish_task()
    with pytest.raises(RuntimeError, match="already finished"):
        model.prepare_for_task(0, 2)
    with pytest.raises(RuntimeError, match="no task to finish"):
        model.finish_task()
    with pytest.raises(RuntimeError, match="pass task=t"):
        model(x)
    assert model(x, task=0).shape == (4, 2)


def test_forward_transfer_off_reads_only_own_task():
    model, x = task_0_finished()
    model.prepare_for_task(1, 2, forward_transfer=False)
    layers = model.graph.layers
    assert bool((layers["body.0"].min_input_task == 0).all())  # reads the raw input: stays 0
    fc = layers["body.3"]
    assert fc.min_input_task[fc.task_state == FREE].tolist() == [1, 1]
    assert bool((fc.min_input_task[fc.task_state == 0] == 0).all())
    assert model.heads[1].min_input_task.tolist() == [1, 1]
    # task 1 logits do not depend on task-0 neurons of body.0: changing those inputs' producers is invisible
    model.eval()
    with torch.no_grad():
        before = model(x, task=1).clone()
        body0 = layers["body.0"]
        body0.frozen_weight.add_(1.0)  # task-0 rows of the first layer
        after = model(x, task=1)
    assert torch.equal(before, after)


def test_a_state_dict_of_another_body_is_refused_before_anything_loads():
    """A checkpoint of another width or kernel: torch's kind of size-mismatch error, naming the layer, raised before
    any tensor, head or counter of the network changes (not an error from a half-loaded network)."""
    def body(width, kernel=3):
        return nn.Sequential(nn.Conv2d(3, width, kernel, padding=kernel // 2), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 6), nn.ReLU())

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 6, generator=gen)
    model = EideticNetwork(body(8), 6)
    model.prepare_for_task(0, 3)
    train_steps(model, x, torch.randint(3, (8,), generator=gen), 2, weight_decay=0.01)
    prune_share(model, 0.3, gen)
    model.finish_task()
    saved = model.state_dict()
    for other, match in ((body(4), r"size mismatch for body\.0: neurons \(8,\) in the state dict, \(4,\)"),
                         (body(8, kernel=5), r"size mismatch for body\.0: inputs and kernel \(weight.shape\[1:\]\) "
                                            r"\(3, 3, 3\) in the state dict, \(3, 5, 5\)")):
        net = EideticNetwork(other, 6)
        net.prepare_for_task(0, 3)
        net(x)
        before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(RuntimeError, match=match + r".*nothing of this network was loaded"):
            net.load_state_dict(saved)
        assert (net.num_finished_tasks, net.current_task, len(net.heads)) == (0, 0, 1)
        after = net.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
    fresh = EideticNetwork(body(8), 6)  # the right body still loads it
    fresh.load_state_dict(saved)
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, task=0), model(x, task=0))


def test_shared_layers_and_parametrized_weights_are_refused_before_anything_changes():
    lin = nn.Linear(4, 4)
    tied = EideticNetwork(nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU()), 4)  # one module at two places
    assert tied.body[0] is tied.body[2]
    tied.prepare_for_task(0, 2)
    with pytest.raises(GraphError, match="body.0 is called twice in the body"):
        tied(torch.randn(2, 4))

    class TwoTwins(EideticNetwork):  # two layers holding one Parameter
        def __init__(self):
            super().__init__(None, 4)
            self.enc, self.dec = EideticLinear(4, 4), EideticLinear(4, 4)
            self.dec.weight = self.enc.weight

        def forward_features(self, x):
            return self.dec(torch.relu(self.enc(x)))

    with pytest.raises(GraphError, match="layers enc and dec share a Parameter"):
        TwoTwins().prepare_for_task(0, 2)

    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU()), 4)
    model.prepare_for_task(0, 2)
    x = torch.randn(3, 4)
    model(x)
    nn.utils.parametrizations.weight_norm(model.body[2])
    model.groups[0].prune([0, 1])
    states = [layer.task_state.clone() for layer in model.body_layers().values()]
    with torch.no_grad():
        want = model(x)
    with pytest.raises(TypeError, match=r"'body.2': finish_task cannot run on a layer whose weight is computed by"):
        model.finish_task()
    assert all(torch.equal(s, layer.task_state) for s, layer in zip(states, model.body_layers().values()))
    assert model.current_task == 0 and model.num_finished_tasks == 0
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_a_subclass_with_its_own_plain_layers_reloads_its_checkpoint():
    """Layers a subclass adds after __init__ are converted at its first forward; a fresh instance loading the
    checkpoint converts them first, so the saved Eidetic keys fit."""
    class Own(EideticNetwork):
        def __init__(self):
            super().__init__(None, 4)
            self.enc, self.dec = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward_features(self, x):
            return torch.relu(self.dec(torch.relu(self.enc(x))))

    torch.manual_seed(0)
    model = Own()
    model.prepare_for_task(0, 2)
    x = torch.randn(3, 4)
    model(x)
    for g in model.groups:
        g.prune([0])
    model.finish_task()
    fresh = Own()
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, task=0), model(x, task=0))


def test_state_dict_round_trip_recreates_heads():
    model, shape = make("cnn")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=gen)
    model.prepare_for_task(0, 3)
    train_steps(model, x, torch.randint(3, (8,), generator=gen), 2, weight_decay=0.01)
    prune_share(model, 0.3, gen)
    model.finish_task()
    model.prepare_for_task(1, 5, forward_transfer=False)
    train_steps(model, x, torch.randint(5, (8,), generator=gen), 2, weight_decay=0.01)
    prune_share(model, 0.3, gen)
    model.eval()
    with torch.no_grad():
        want0, want1 = model(x, task=0).clone(), model(x, task=1).clone()

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = make("cnn", seed=123)
    fresh.load_state_dict(torch.load(buffer))
    assert len(fresh.heads) == 2 and fresh.heads[1].out_features == 5
    assert (fresh.num_finished_tasks, fresh.current_task, fresh.forward_transfer) == (1, 1, {0: True, 1: False})
    # the graph travels with the state dict: known before any batch
    assert fresh.graph is not None and fresh.capacity() == model.capacity()
    assert [[n for n, _ in g.members] for g in fresh.groups] == [[n for n, _ in g.members] for g in model.groups]
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, task=0), want0)
        assert torch.equal(fresh(x, task=1), want1)
    assert fresh.capacity() == model.capacity()
    for name, layer in fresh.graph.layers.items():
        other = model.graph.layers[name]
        assert torch.equal(layer.task_state, other.task_state)
        if hasattr(layer, "input_task"):
            assert torch.equal(layer.input_task, other.input_task)
            assert torch.equal(layer.min_input_task, other.min_input_task)

    # restoring a snapshot in place keeps every Parameter object (an optimizer holding them stays valid)
    snapshot = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    model.groups[0].unprune((model.groups[0].task_state == PRUNED).nonzero().flatten())
    model.load_state_dict(snapshot)
    assert all(a is b for a, b in zip(params, model.parameters()))
    with torch.no_grad():
        assert torch.equal(model(x, task=1), want1)


class OwnLayers(EideticNetwork):
    """Subclass defining its layers itself, with its own forward."""

    def __init__(self):
        super().__init__(None, 6)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)

    def forward_features(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return F.gelu(self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)))

    def forward(self, x, task=None):
        return super().forward(x, task) / 2.0  # e.g. a temperature


def test_subclass_with_own_layers_and_forward():
    torch.manual_seed(0)
    model = OwnLayers()
    x = torch.randn(8, 2, 5, 5)
    model.prepare_for_task(0, 3)
    assert isinstance(model.fc, EideticLinear)  # converted before the optimizer sees the parameters
    train_steps(model, x, torch.randint(3, (8,)), 2, weight_decay=0.1)
    assert [sorted(n for n, _ in g.members) for g in model.groups] == [["bn", "conv"], ["fc"]]
    for g in model.groups:
        g.prune([0])
    model.finish_task()
    model.eval()
    with torch.no_grad():
        snap = model(x, task=0).clone()
    model.prepare_for_task(1, 2)
    train_steps(model, x, torch.randint(2, (8,)), 3, weight_decay=0.1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), snap)


def test_stray_parameters_are_rejected():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4))
    model = EideticNetwork(body, 4)
    with pytest.raises(GraphError, match=r"parameters outside Eidetic layers: .* \(in PReLU, which"):
        model.prepare_for_task(0, 2)
    # a norm over the features is refused for what it is, before its parameters
    model = EideticNetwork(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 4)
    with pytest.raises(GraphError, match=r"body.1 \(LayerNorm\) is a norm over the features, which EideticNetwork.*"
                                         r"if the forward never calls body.1, delete it from the body"):
        model.prepare_for_task(0, 2)


def test_batch_norm_on_the_raw_input_is_read_like_the_raw_input():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 8), nn.ReLU())
    model = EideticNetwork(body, 8)
    x = torch.randn(16, 3, 2, 2)
    model.prepare_for_task(0, 3)
    train_steps(model, x, torch.randint(3, (16,)), 3, weight_decay=0.1)
    bn_group = model.graph.group_of("body.1")
    assert bn_group.input_normalizer and model.graph.raw_input_layers == {"body.2"}
    model.graph.group_of("body.2").prune([0, 1, 2])  # no BN channel pruned: all freeze for task 0
    model.finish_task()
    model.eval()
    with torch.no_grad():
        snap = model(x, task=0).clone()
    model.prepare_for_task(1, 2, forward_transfer=False)  # allowed: the normalised input stays readable
    assert bool((model.graph.layers["body.2"].min_input_task == 0).all())
    train_steps(model, x, torch.randint(2, (16,)), 3, weight_decay=0.1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), snap)
        assert model(x, task=1).isfinite().all()


def test_router_travels_with_the_state_dict():
    from python_layers.routing import TaskRouter
    model, shape = make("mlp")
    x = torch.randn(4, *shape)
    model.prepare_for_task(0, 2)
    model(x)
    model.groups[0].prune([0])
    model.groups[1].prune([0])
    model.finish_task()
    model.router = TaskRouter(8, 1)
    fresh, _ = make("mlp", seed=1)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.router.linear.weight, model.router.linear.weight)
    del model.router
    fresh.load_state_dict(model.state_dict())
    assert getattr(fresh, "router", None) is None



def test_forward_hooks_fire_once_per_forward_including_the_first():
    """The first forward traces the body on its batch: the user's hooks fire for the real forward only, as
    with torch.nn."""
    body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    calls = []
    body[0].register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    body[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model = EideticNetwork(body, 6)
    model.prepare_for_task(0, 2)
    model(torch.randn(3, 4))
    assert calls == ["pre", (3, 6)]
    model(torch.randn(5, 4))
    assert calls == ["pre", (3, 6), "pre", (5, 6)]


# ----- callers that would run another function than the one they record ------------------------------------------

class _CheckpointedBody(nn.Module):
    def __init__(self, inside: bool):
        super().__init__()
        self.a, self.b, self.inside = nn.Linear(16, 32), nn.Linear(32, 32), inside

    def forward(self, x):
        h = torch.relu(self.a(x))
        from torch.utils.checkpoint import checkpoint
        return torch.relu(checkpoint(self.b, h, use_reentrant=False) if self.inside else self.b(h))


def _one_finished_task(make_body, seed=0, shape=(24, 16), feature_dim=32, classes=3):
    """A network of ``make_body()`` (seeded) with task 0 finished (half of each layer kept), task 1 prepared; and
    the batch ``x`` of ``shape`` it saw."""
    torch.manual_seed(seed)
    x = torch.randn(shape)
    model = EideticNetwork(make_body(), feature_dim)
    model.prepare_for_task(0, classes)
    model(x)
    for group in model.groups:
        group.prune(list(range(int(group.size) // 2)))
    model.finish_task()
    model.prepare_for_task(1, classes)
    return model, x


@pytest.mark.parametrize("task", [0, None], ids=["finished task", "training"])
def test_checkpointing_inside_the_body_is_refused_and_the_whole_call_works(task):
    """torch.utils.checkpoint inside the body recomputes a layer in backward without the network's mode (another
    view, frozen blocks no longer constant): wrong gradients, so a clear error; checkpointing the whole network
    call gives the gradients of no checkpointing."""
    from torch.utils.checkpoint import checkpoint
    model, x = _one_finished_task(lambda: _CheckpointedBody(inside=True))
    with pytest.raises(RuntimeError, match=r"Checkpoint the whole network call instead"):
        model(x.clone().requires_grad_(), task=task).sum().backward()
    plain, _ = _one_finished_task(lambda: _CheckpointedBody(inside=False))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa, task=task).sum().backward()
    checkpoint(plain, xb, task, use_reentrant=False).sum().backward()
    assert xa.grad.abs().sum() > 0 and torch.equal(xa.grad, xb.grad)


def test_jit_trace_is_refused_before_anything_is_cached():
    model, x = _one_finished_task(lambda: _CheckpointedBody(inside=False))
    model.eval()
    before = model(x, task=0)
    fresh, _ = _one_finished_task(lambda: _CheckpointedBody(inside=False))
    fresh.eval()
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record an EideticNetwork.*export"):
        torch.jit.trace(lambda t: fresh(t, task=0), x)
    assert torch.equal(fresh(x, task=0), before)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record EideticLinear"):
        torch.jit.trace(fresh.body.a, x)
    with pytest.raises(RuntimeError, match=r"torch.jit.script\) cannot compile an EideticNetwork.*export"):
        torch.jit.script(fresh)
    with pytest.raises(RuntimeError, match=r"torch.jit.script\) cannot compile EideticLinear"):
        torch.jit.script(fresh.body.a)
    torch.jit.script(fresh.export(0))  # the plain module of a finished task scripts


# ----- load_state_dict never changes a finished task --------------------------------------------------------------

class _BnBody(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_an_averaged_state_dict_is_refused_and_other_runs_still_load():
    """An EMA of the whole state dict (AveragedModel with use_buffers=True) rounds the frozen weights and
    statistics (0.999 w + 0.001 w != w) and, with a stronger decay, turns FREE into a task id that does not
    exist: both are refused before anything loads (the frozen values no longer match the fingerprint
    finish_task recorded). The network's own state dict, one of another run (same neuron states, other frozen
    values) and a float64 copy load as before."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
    model, x = _one_finished_task(_BnBody)
    model(x)
    model.eval()
    before, state = model(x, task=0), copy.deepcopy(model.state_dict())
    model.train()
    for decay, says in ((0.999, r"are not those its finished tasks were frozen with.*average only the trainable"),
                        (0.9, r"body\.0\.task_state holds \[32766\], which are neither FREE, PRUNED")):
        ema = AveragedModel(model, avg_fn=get_ema_avg_fn(decay), use_buffers=True)
        for _ in range(2):
            model.zero_grad()
            model(x).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
            ema.update_parameters(model)
        trained = _snapshot(model)
        with pytest.raises(RuntimeError, match=says):
            model.load_state_dict(ema.module.state_dict())
        assert all(torch.equal(v, trained[k]) for k, v in _snapshot(model).items()), "something was loaded"
    model.eval()
    assert torch.equal(model(x, task=0), before)
    model.load_state_dict(state)  # its own state dict
    other, _ = _one_finished_task(_BnBody, seed=1)
    other.load_state_dict(model.state_dict())  # same body, replacing its finished task
    other.eval()
    assert torch.equal(other(x, task=0), before)
    wide = copy.deepcopy(model).double()
    model.load_state_dict(wide.state_dict())  # a lossless dtype round trip keeps the record
    assert torch.equal(model(x, task=0), before)
    # one ulp of float64 in a frozen weight is an edit too (the record is of float64 values)
    edited = copy.deepcopy(wide.state_dict())
    w = edited["body.0.frozen_weight"]
    edited["body.0.frozen_weight"] = torch.nextafter(w, w + 1)
    with pytest.raises(RuntimeError, match="are not those its finished tasks were frozen with"):
        wide.load_state_dict(edited)
    # a lossy cast of the network records its new frozen values: its own state dict keeps loading
    narrow = copy.deepcopy(model).to(torch.bfloat16)
    narrow.load_state_dict(copy.deepcopy(narrow.state_dict()))


def test_partial_tensor_only_and_layer_level_loads():
    """strict=False loads of part of a network are checked on the layers they hold (the body without its heads
    loads; an edited frozen layer is refused); a state dict without the network's record (a tensors-only
    format) is refused before anything loads; a layer of the network loaded alone (or its body) may change
    trainable weights but never a frozen neuron."""
    model, x = _one_finished_task(_BnBody)
    model.eval()
    before = model(x, task=0)
    state = copy.deepcopy(model.state_dict())
    other, _ = _one_finished_task(_BnBody, seed=1)
    trained = _snapshot(other)
    body_only = {k: v for k, v in state.items() if not k.startswith("heads.")}
    heads = [h for h in model.heads]
    model.load_state_dict(body_only, strict=False)  # a partial load: its layers only, its heads stay
    assert list(model.heads) == heads and torch.equal(model(x, task=0), before)
    # another network's body with its record: the record would become this network's, which its own heads (left
    # out) do not match, and its finished tasks' heads would read another body's features
    other.eval()
    kept = other(x, task=0)
    with pytest.raises(RuntimeError, match=r"it is partial, and this network's heads.0 \(frozen values\), which "
                                           r"it leaves out, do not match its record"):
        other.load_state_dict(body_only, strict=False)
    assert torch.equal(other(x, task=0), kept)
    # into a fresh network, which has no heads for the record's tasks: said so, not "do not match"
    fresh = EideticNetwork(_BnBody(), model.feature_dim)
    without_head_0 = {k: v for k, v in state.items() if not k.startswith("heads.0.")}
    with pytest.raises(RuntimeError, match=r"it is partial, and it leaves out heads\.0 \(frozen values\), which "
                                           r"its record .* this network does not have.*Nothing of this network was "
                                           r"loaded"):
        fresh.load_state_dict(without_head_0, strict=False)
    other.load_state_dict(copy.deepcopy(other.state_dict()))  # and its own state dict still loads
    other.train()
    # frozen storage without its states is read with the layer's own: an edit is refused, whichever load
    w = model.body[3].frozen_weight
    for load in (lambda: model.load_state_dict({"body.3.frozen_weight": w + 1}, strict=False),
                 lambda: model.body.load_state_dict({"3.frozen_weight": w + 1}, strict=False),
                 lambda: model.body[3].load_state_dict({"frozen_weight": w + 1}, strict=False),
                 lambda: model.body[3].load_state_dict({"input_task": model.body[3].input_task.flip(0)},
                                                       strict=False)):
        with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
            load()
    # a network load that raises halfway leaves no way around the guard, not even with its own tensors
    broken = copy.deepcopy(state)
    del broken["_extra_state"]["current_task"]
    with pytest.raises(KeyError):
        model.load_state_dict(broken)
    with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
        model.body[3].load_state_dict({"frozen_weight": w + 1}, strict=False)
    again = {k[len("body."):]: v for k, v in broken.items() if k.startswith("body.")}
    again["3.frozen_weight"] = w + 1
    with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
        model.body.load_state_dict(again, strict=False)
    # a partial state dict with the network's record: layers whose frozen storage does not come along are checked
    # against their own (states changed at frozen neurons are refused)
    unfrozen = model.body[0].task_state.clone()
    unfrozen[model.body[0].task_state == 0] = FREE
    with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
        model.load_state_dict({"body.0.task_state": unfrozen, "_extra_state": state["_extra_state"]}, strict=False)
    # a whole state dict whose layer comes from a fresh network (all FREE, nothing frozen): refused before
    # anything loads (its record holds frozen values of that layer)
    swapped = copy.deepcopy(state)
    fresh_layer = EideticNetwork(_BnBody(), 32)
    fresh_layer.ensure_graph(x)
    swapped.update({k: v for k, v in fresh_layer.state_dict().items() if k.startswith("body.3.")})
    with pytest.raises(RuntimeError, match=r"not those its finished tasks were frozen with \(body.3 \(frozen"):
        model.load_state_dict(swapped)
    assert torch.equal(model(x, task=0), before)
    # the heads and the record without the body: partial, so nothing is dropped (the router stays)
    from python_layers.routing import TaskRouter
    model.router = router = TaskRouter(32, 2)
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("heads.") or k == "_extra_state"},
                          strict=False)
    assert model.router is router
    del model.router
    # inputs from FREE neurons may change (a snapshot of the body from before a pruning step loads back)
    snapshot = copy.deepcopy(model.body.state_dict())
    model.groups[0].prune([int((model.groups[0].task_state == FREE).nonzero()[0])])
    model.body.load_state_dict(snapshot)
    model.sync()
    # a body without its heads needs a network whose heads are those tasks'; a state dict without the record
    # that would unfreeze this network's neurons (a fresh network's, tensors only) is refused
    headless = EideticNetwork(_BnBody(), 32)
    with pytest.raises(RuntimeError, match=r"records 2 task\(s\) but holds no head"):
        headless.load_state_dict(body_only, strict=False)
    # the same for a router with the record (the message names both kinds of partial state dict)
    model.router = TaskRouter(32, 2)
    routed = {k: v for k, v in model.state_dict().items() if k.startswith("router.") or k == "_extra_state"}
    del model.router
    with pytest.raises(RuntimeError, match=r"holds no head.*a body's or a router's entries"):
        headless.load_state_dict(routed, strict=False)
    assert len(headless.heads) == 0 and getattr(headless, "router", None) is None
    # a record whose counters this library did not write is refused before anything loads
    counters = (model.num_finished_tasks, model.current_task)
    for key, value in (("num_finished_tasks", "two"), ("num_finished_tasks", None), ("num_finished_tasks", -1),
                       ("num_finished_tasks", 2.0), ("current_task", 0)):
        forged = copy.deepcopy(state)
        forged["_extra_state"][key] = value
        with pytest.raises(RuntimeError, match=rf"record \(_extra_state\) is not one this library wrote: {key}"):
            model.load_state_dict(forged)
        assert (model.num_finished_tasks, model.current_task) == counters
        assert torch.equal(model(x, task=0), before)
    blank = EideticNetwork(_BnBody(), 32)
    blank.ensure_graph(x)
    blank_state = {k: v for k, v in blank.state_dict().items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="would unfreeze this network's"):
        model.load_state_dict(blank_state, strict=False)
    model.eval()
    assert torch.equal(model(x, task=0), before)
    edited = copy.deepcopy(body_only)
    edited["body.3.frozen_weight"] += 1
    with pytest.raises(RuntimeError, match="are not those its finished tasks were frozen with"):
        model.load_state_dict(edited, strict=False)
    # no _extra_state (safetensors keeps tensors only): refused, nothing loaded
    fresh, _ = _one_finished_task(_BnBody, seed=2)
    kept = _snapshot(fresh)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"_extra_state.*torch.save/torch.load.*Nothing .* was loaded"):
            fresh.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"}, strict=strict)
        assert all(torch.equal(v, kept[k]) for k, v in _snapshot(fresh).items())
    # below the network: trainable weights may change, frozen neurons never
    layer = model.body[0]
    free_only = copy.deepcopy(layer.state_dict())
    free_only["weight"] += 1
    layer.load_state_dict(free_only)
    assert torch.equal(model(x, task=0), before)
    for target, source in ((layer, other.body[0]), (model.body, other.body), (model.body[1], other.body[1])):
        source_state = copy.deepcopy(source.state_dict())
        for k in source_state:
            if k.startswith(("frozen_", "running_")) or ".frozen_" in k or ".running_" in k:
                source_state[k] = source_state[k] + 1
        with pytest.raises(RuntimeError, match="belongs to an EideticNetwork.*model.load_state_dict"):
            target.load_state_dict(source_state)
    assert torch.equal(model(x, task=0), before)
    model.load_state_dict(state)  # the network's own load keeps working
    assert torch.equal(model(x, task=0), before)
    # a checkpoint of the first record format (one digest of the whole state dict) is checked with it, then
    # recorded per layer
    from python_layers.network import _first_format_fingerprint
    old_format = copy.deepcopy(state)
    old_format["_extra_state"]["frozen_fingerprint"] = _first_format_fingerprint(old_format, "")
    edited = copy.deepcopy(old_format)
    edited["body.0.frozen_weight"] *= 1.001
    with pytest.raises(RuntimeError, match="are not those its finished tasks were frozen with"):
        model.load_state_dict(edited)
    model.load_state_dict(old_format)
    assert isinstance(model.state_dict()["_extra_state"]["frozen_fingerprint"], dict)
    assert torch.equal(model(x, task=0), before)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
def test_the_input_gradient_through_a_layer_pruned_whole_is_zero(conv):
    """Every neuron of the last body layer PRUNED (by hand): the head reads no live feature, as the twin's zero
    rows give it none. autograd.grad of the network's input is 0 there, as the twin's is, not an error saying the
    input was not used in the graph."""
    torch.manual_seed(0)
    if conv:
        body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
        x = torch.randn(6, 2, 4, 4)
    else:
        body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        x = torch.randn(6, 4)
    model = EideticNetwork(body, 5)
    model.prepare_for_task(0, 3)
    model.ensure_graph(x)
    model.groups[1].prune(list(range(5)))
    model.train()
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), torch.randint(3, (6,)))
    (g,) = torch.autograd.grad(loss, xr)
    assert torch.equal(g, torch.zeros_like(x))
    # the weights get the twin's gradients: zero for the head's (its features are 0) and the first layer's
    # (nothing reads its outputs), not None; the head's bias still learns
    loss = F.cross_entropy(model(x), torch.randint(3, (6,)))
    loss.backward()
    first = next(iter(model.graph.layers.values()))
    for w in (model.heads[0].weight, first.weight):
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    assert model.heads[0].bias.grad.abs().sum() > 0


def test_hooks_on_the_body_see_full_gradients():
    """While a task trains, frozen blocks are constants to autograd, so activation gradients miss the paths
    through frozen neurons; a module with a backward hook (or a forward hook, which may hook its output) turns
    that off: the hook sees the gradients of exact_activation_grads=True."""
    import warnings
    from python_layers import HookedTrainingWarning
    seen = {}
    for exact in (True, False):
        model, x = _one_finished_task(lambda: _CheckpointedBody(inside=False))
        model.exact_activation_grads = exact
        handle = model.body.a.register_full_backward_hook(lambda m, gin, gout: seen.__setitem__(exact, gout[0]))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model(x).sum().backward()
            model(x).sum().backward()
        handle.remove()
        # the slower steps are said once, with the way to silence it; not when full gradients were asked for
        hooked = [w for w in said if issubclass(w.category, HookedTrainingWarning)]
        assert len(hooked) == (0 if exact else 1), [str(w.message) for w in said]
        if hooked:
            assert "'body.a'" in str(hooked[0].message) and "exact_activation_grads=True" in str(hooked[0].message)
            assert hooked[0].filename == __file__
    assert seen[True].abs().sum() > 0 and torch.equal(seen[True], seen[False])
    model, x = _one_finished_task(lambda: _CheckpointedBody(inside=False))
    grads = []
    model.body.a.register_forward_hook(lambda m, i, out: out.register_hook(grads.append) and None)
    model(x).sum().backward()
    assert torch.equal(grads[0], seen[True])


def test_torch_compile_fullgraph_says_why_it_stops():
    """fullgraph=True on the CPU engine stops where the network cannot be one graph; torch's error carries the
    reason: the first batch's graph tracing (ensure_graph first), then the layers (the Triton backend)."""
    import inspect
    import warnings
    if "reason" not in inspect.signature(torch.compiler.disable).parameters:
        pytest.skip("this torch shows no reason for torch.compiler.disable")
    if os.environ.get("EIDETIC_BACKEND") == "triton":
        pytest.skip("the Triton backend compiles whole")
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = EideticNetwork(nn.Sequential(nn.Linear(16, 32), nn.ReLU()), 32)
    model.prepare_for_task(0, 3)
    for says in (r"call model.ensure_graph\(x\)", r"fullgraph=True needs the Triton backend"):
        torch._dynamo.reset()
        with warnings.catch_warnings(), pytest.raises(Exception, match=says):
            warnings.simplefilter("ignore")
            torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        model.ensure_graph(x)


def test_a_compiled_network_keeps_compiling_task_after_task():
    """finish_task replaces the Parameters every cached graph of the network guards on: those graphs are dropped,
    so a network compiled once keeps compiling task after task instead of reaching torch's recompile_limit
    (then it ran eagerly; with fullgraph=True it failed) a few tasks in. Here the limit is 3 graphs per function
    and hitting it is an error; six tasks train compiled, each finished one evaluated compiled (as eager)."""
    import torch._dynamo
    import torch.nn.functional as F
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU()), 24)
    x, y = torch.randn(8, 16), torch.randint(0, 2, (8,))
    # the Triton backend compiles the network whole (its layers' frames are not graphs of their own)
    triton = os.environ.get("EIDETIC_BACKEND") == "triton"
    if triton:
        model.ensure_graph(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=triton)
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(6):
            model.prepare_for_task(t, 2)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(compiled(x), y).backward()
                optimizer.step()
            for group in model.groups:
                group.prune((group.task_state == FREE).nonzero().flatten()[1:].tolist())
            model.finish_task()
            model.eval()
            with torch.no_grad():
                assert torch.equal(compiled(x, task=t), model(x, task=t))
    torch._dynamo.reset()


def test_a_compiled_step_leaves_the_cpu_engines_backward_eager():
    """A whole compiled training step (forward, backward, AdamW) on a CNN with frozen batch-norm channels: autograd
    runs the CPU engine's backward passes inside the compiled step's eager part, where torch.compile compiles every
    Python frame; those frames are kept eager, so it does not try the batch norm's C++ backward (it warned that
    it cannot trace the extension) and the step still matches eager."""
    import torch._dynamo
    import torch.nn.functional as F
    if os.environ.get("EIDETIC_BACKEND") == "triton":
        pytest.skip("the CPU engine's backward")
    torch._dynamo.reset()
    torch.manual_seed(0)
    # no conv bias: before a batch norm its gradient is ~0, and AdamW turns rounding there into visible steps
    model, x = _one_finished_task(lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        shape=(6, 1, 5, 5), feature_dim=8, classes=2)
    y = torch.randint(0, 2, (6,))
    twin = copy.deepcopy(model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, twin)]

    def step(network, optimizer):
        optimizer.zero_grad()
        loss = F.cross_entropy(network(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    compiled = torch.compile(step, backend="aot_eager")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(compiled(model, optimizers[0]), step(twin, optimizers[1]))
    assert not [w for w in said if "does not know how to trace" in str(w.message)], [str(w.message) for w in said]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_a_forward_nested_in_another_keeps_the_outer_modes():
    """A hook that calls the network (a probe, a teacher) inside its forward: the rest of the outer forward
    runs in the outer's modes (view, frozen blocks as constants), and whole-network checkpointing still
    recomputes it (the nested call used to leave every layer idle, so the recomputation was refused)."""
    from torch.utils.checkpoint import checkpoint
    model, x = _one_finished_task(lambda: _CheckpointedBody(inside=False))
    busy, seen = [], []

    def probe(module, inputs, output):
        if not busy:
            busy.append(1)
            model(x, task=0)
            busy.pop()

    model.body.a.register_forward_hook(probe)
    model.body.b.register_forward_pre_hook(
        lambda m, i: seen.append((m.view_task, m.constant_frozen, m._network_forward)) if not busy else None)
    model(x)
    assert seen[-1] == (None, False, True)  # hooks give full gradients: frozen blocks are not constants
    model.eval()
    with torch.no_grad():
        model(x, task=0)
    assert seen[-1] == (0, True, True)
    model.train()
    checkpoint(model, x.clone().requires_grad_(), use_reentrant=False).sum().backward()
    assert all(not lay._network_forward and lay.view_task is None for lay in model.body_layers().values())


class _NormalisedBody(nn.Module):
    """The input normalised by constants of the body (buffers every task reads), then two layers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, 16))
        self.register_buffer("std", torch.full((16,), 2.0))
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, x):
        return self.layers((x - self.mean) / self.std)


def test_the_body_constants_are_kept_by_loads_as_the_frozen_values():
    """Buffers of the body outside Eidetic layers are recorded with the frozen values at finish_task: a partial
    state dict changing one (with or without the network's record) and a whole one whose constant was edited
    are refused before anything loads; a whole state dict of another run (its own constants and record), a
    float64 copy and a record from before constants were recorded still load."""
    model, x = _one_finished_task(_NormalisedBody)
    model.eval()
    before = model(x, task=0)
    state = copy.deepcopy(model.state_dict())
    other = state["body.mean"] + 0.5
    for partial in ({"body.mean": other}, {"body.mean": other, "_extra_state": state["_extra_state"]}):
        with pytest.raises(RuntimeError, match=r"body.mean|frozen values .* are not those"):
            model.load_state_dict(partial, strict=False)
        assert torch.equal(model.body.mean, state["body.mean"]) and torch.equal(model(x, task=0), before)
    edited = copy.deepcopy(state)
    edited["body.std"] *= 2
    with pytest.raises(RuntimeError, match=r"are not those its finished tasks were frozen with \(body.std\)"):
        model.load_state_dict(edited)
    assert torch.equal(model(x, task=0), before)
    # the same constant again (a partial state dict of this very network) loads
    model.load_state_dict({"body.mean": state["body.mean"].clone()}, strict=False)
    # another run of the same body, whose constants differ, replaces this network's as a load should
    def shifted():
        body = _NormalisedBody()
        body.mean += 1.0
        return body

    run, _ = _one_finished_task(shifted, seed=3)
    run.eval()
    want = run(x, task=0)
    state_of_run = copy.deepcopy(run.state_dict())
    model.load_state_dict(copy.deepcopy(run.state_dict()))
    assert torch.equal(model(x, task=0), want) and torch.equal(model.body.mean, run.body.mean)
    # a float64 copy of the network loads its own state dict; a record without constants (older) still loads
    wide = copy.deepcopy(model).double()
    wide.load_state_dict(copy.deepcopy(wide.state_dict()))
    # a half copy loads a float32 state dict (cast as it loads), then its own
    half = copy.deepcopy(model).half()
    half.load_state_dict(copy.deepcopy(model.state_dict()))
    half.load_state_dict(copy.deepcopy(half.state_dict()))
    older = copy.deepcopy(run.state_dict())
    older["_extra_state"]["frozen_fingerprint"] = {k: v for k, v in older["_extra_state"]["frozen_fingerprint"].items()
                                                   if not k.startswith("buffer ")}
    model.load_state_dict(older)
    assert torch.equal(model(x, task=0), want)
    # ... and records the constants from then on: its own state dict with an edited constant is refused
    resaved = copy.deepcopy(model.state_dict())
    resaved["body.std"] += 1
    with pytest.raises(RuntimeError, match=r"\(body.std\)"):
        model.load_state_dict(resaved)
    # another network's constant with its record, the rest left out: refused (the record would not match this
    # network's layers), nothing loaded
    first, _ = _one_finished_task(_NormalisedBody)
    first.eval()
    kept = first(x, task=0)
    with pytest.raises(RuntimeError, match=r"it is partial, and this network's .* do not match its record"):
        first.load_state_dict({"body.mean": state_of_run["body.mean"], "_extra_state": state_of_run["_extra_state"]},
                              strict=False)
    assert torch.equal(first(x, task=0), kept)


class _RaisingOnLoad(nn.Module):
    """A module of the body whose extra state refuses to load (a custom check of the user's)."""

    def get_extra_state(self):
        return {"kind": "custom"}

    def set_extra_state(self, state):
        raise RuntimeError("this module refuses to load")

    def forward(self, x):
        return x


def test_a_load_stopped_by_a_module_of_the_body_vouches_for_no_later_load():
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(16, 32), _RaisingOnLoad(), nn.ReLU(), nn.Linear(32, 32),
                                         nn.ReLU()), 32)
    x = torch.randn(24, 16)
    model.prepare_for_task(0, 3)
    model(x)
    for group in model.groups:
        group.prune(list(range(16)))
    model.finish_task()
    model.eval()
    before = model(x, task=0)
    state = model.state_dict()
    with pytest.raises(RuntimeError, match="this module refuses to load"):
        model.load_state_dict(state)  # stops at body.1, before body.3 loads
    layer_state = {k[len("body.3."):]: v for k, v in state.items() if k.startswith("body.3.")}
    layer_state["frozen_weight"] = layer_state["frozen_weight"] + 1
    with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
        model.body[3].load_state_dict(layer_state)
    assert torch.equal(model(x, task=0), before)
    # the same through a module holding the network (its load never calls the network's load_state_dict)
    outer = nn.ModuleDict({"net": model})
    with pytest.raises(RuntimeError, match="this module refuses to load"):
        outer.load_state_dict({f"net.{k}": v for k, v in state.items()})
    with pytest.raises(RuntimeError, match="belongs to an EideticNetwork"):
        model.body[3].load_state_dict(layer_state)
    assert torch.equal(model(x, task=0), before)


def test_casting_back_up_after_a_cast_that_rounded_finished_tasks_warns():
    """``model.half().float()`` rounds finished tasks' frozen weights for good: the cast back up warns (the cast
    down is what was asked for, so a half copy for inference does not), a lossless round trip does not, and
    loading a state dict saved before the cast gives the finished tasks' bits back."""
    from python_layers import LossyCastWarning

    model, x = _one_finished_task(lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU()))
    model.eval()
    with torch.no_grad():
        want = model(x, task=0)
    saved = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyCastWarning)
        half = copy.deepcopy(model).half()
        assert half(x.half(), task=0).dtype == torch.float16
        model.double().float()  # float32 -> float64 -> float32 changes no value
        assert torch.equal(model(x, task=0), want)
    model.half()
    with pytest.warns(LossyCastWarning, match=r"an earlier cast \(float32 -> float16\) rounded the frozen weights "
                                              r"of finished tasks 0..0, and casting back does not restore them"):
        model.float()
    assert not torch.equal(model(x, task=0), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyCastWarning)
        model.double().float()  # said once; the rounded values are the network's from here on
    model.load_state_dict(saved)
    assert torch.equal(model(x, task=0), want)
    model.to(torch.bfloat16)
    with pytest.warns(LossyCastWarning, match=r"\(float32 -> bfloat16\)"):
        model.to(torch.float32)


def test_a_body_of_a_live_network_is_refused_by_a_second_network():
    """Two networks on one body would keep their tasks in the same neurons and prune, freeze and recycle each
    other's (a trial: the second network's train_task failed and left the first with PRUNED neurons)."""
    import gc
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    first = EideticNetwork(body, 32)
    first.prepare_for_task(0, 2)
    first(torch.randn(4, 20))
    states = [layer.task_state.clone() for layer in first.body_layers().values()]
    with pytest.raises(GraphError, match=r"body\.0 is a layer of another EideticNetwork.*copy\.deepcopy\(body\).*"
                                         r"Nothing was changed"):
        EideticNetwork(body, 32)

    class Late(EideticNetwork):  # a subclass that adds the layers after __init__
        def __init__(self):
            super().__init__(None, 32)
            self.enc = body

        def forward_features(self, x):
            return self.enc(x)

    with pytest.raises(GraphError, match="is a layer of another EideticNetwork"):
        Late().prepare_for_task(0, 2)
    assert all(torch.equal(layer.task_state, s) for layer, s in zip(first.body_layers().values(), states))
    # copies make new layers: a deep copy of the network or of its body is a network of its own
    twin = copy.deepcopy(first)
    for group in twin.groups:
        group.prune([0])
    twin.finish_task()
    twin.prepare_for_task(1, 2)
    EideticNetwork(copy.deepcopy(body), 32).prepare_for_task(0, 2)
    del first, twin
    gc.collect()
    EideticNetwork(body, 32).prepare_for_task(0, 2)  # the body's network is gone: the body is free to take


class _Scaled(nn.Module):
    def __init__(self, scale, act=nn.ReLU, extra=False, p=0.1):
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(20, 16), act(), nn.Dropout(p), nn.Linear(16, 16)
        self.scale = scale
        self.extra = nn.Hardtanh() if extra else None

    def forward(self, x):
        h = self.fc2(self.drop(self.act(self.fc1(x)) * self.scale))
        return h if self.extra is None else self.extra(h)


@pytest.mark.parametrize("change", ["none", "activation", "constant", "added module"])
def test_loading_into_a_body_that_computes_otherwise_warns(change):
    """The state dict records what its body computed, op by op; a load with finished tasks into a body whose code
    differs (same shapes, so torch loads it) warns, naming the first op that differs (a trial: silent). Another
    dropout rate changes no finished task's outputs: no warning."""
    from python_layers import BodyChangedWarning
    from tests.python_layers.test_renumbering import _finish_tasks

    torch.manual_seed(0)
    model = EideticNetwork(_Scaled(0.5), 16)
    _finish_tasks(model, (20,), tasks=1)
    other = {"none": _Scaled(0.5, p=0.3), "activation": _Scaled(0.5, nn.LeakyReLU), "constant": _Scaled(0.25),
             "added module": _Scaled(0.5, extra=True)}[change]
    loaded = EideticNetwork(other, 16)
    if change == "none":
        with warnings.catch_warnings():
            warnings.simplefilter("error", BodyChangedWarning)
            loaded.load_state_dict(model.state_dict())
        model.eval(), loaded.eval()
        x = torch.randn(5, 20)
        with torch.no_grad():
            assert torch.equal(loaded(x, task=0), model(x, task=0))
        return
    says = {"activation": r"ReLU\(\).*LeakyReLU\(negative_slope=0\.01\)", "constant": r"0\.5.*0\.25",
            "added module": r"output.*Hardtanh"}[change]
    with pytest.warns(BodyChangedWarning, match=rf"computes otherwise than the body the state dict's 1 finished "
                                                rf"task\(s\) were trained with .*{says}.*Load into the body") as record:
        loaded.load_state_dict(model.state_dict())
    assert record[0].filename == __file__


def test_finishing_untrained_neurons_of_a_body_frozen_after_task_0_warns_in_a_loop_of_ones_own():
    """A linear probe in a later task (body frozen, head trained), in one's own loop: finish_task freezes the
    body's FREE neurons untrained, which no later task can use: said at the finish (train_task says it before
    training)."""
    model, _ = task_0_finished()
    model.prepare_for_task(1, 2)
    model.body.requires_grad_(False)
    with pytest.warns(CapacityWarning, match=r"finish_task: body\.0, body\.3 have FREE neurons but no parameter "
                                             r"that requires grad: they freeze for task 1 untrained") as record:
        model.finish_task()
    assert record[0].filename == __file__


def test_capacity_lost_to_a_batch_norm_frozen_by_the_user_names_it():
    """requires_grad_(False) on the batch norms only (a common trick) keeps their conv's group from being pruned:
    the CapacityWarning at the finish and the CapacityError of the next task name the batch norm as the cause."""
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 6), nn.ReLU())
    model = EideticNetwork(body, 6)
    model.body[1].requires_grad_(False)
    model.prepare_for_task(0, 2)
    model(torch.randn(2, 3, 5, 5))
    model.graph.group_of("body.5").prune([0])
    hint = r"body\.1 has no parameter that requires grad, so train_task never prunes its neuron group"
    with pytest.warns(CapacityWarning, match=r"every neuron left in body\.0 \(4\): no free neuron remains there for "
                                             r"a next task\. Each task keeps.*" + hint):
        model.finish_task()
    with pytest.raises(CapacityError, match=r"no free neuron left in body\.0 .*" + hint):
        model.prepare_for_task(1, 2)


class _FrozenStemResidual(nn.Module):
    """A stem, a residual block coupled with it by the add, and a layer after them."""

    def __init__(self):
        super().__init__()
        self.stem, self.f, self.out = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.f(h))
        return torch.relu(self.out(h))


def test_a_layer_coupled_by_a_residual_add_with_a_layer_the_user_froze_lets_later_tasks_start():
    """A stem the user froze (requires_grad=False) freezes with task 0 and later tasks read it, also when a residual
    add couples a trainable layer with it (their neurons are one group, never pruned, so it freezes whole with task
    0): task 1 starts, trains the layers after it, and task 0's outputs stay bit-identical. A batch norm the user
    froze does not exempt its layer (the test above)."""
    torch.manual_seed(0)
    body = _FrozenStemResidual()
    body.stem.requires_grad_(False)
    model = EideticNetwork(body, 6)
    x, y = torch.randn(16, 12), torch.randint(0, 2, (16,))
    model.prepare_for_task(0, 2)
    model(x)
    assert model.graph.group_of("body.f").name == model.graph.group_of("body.stem").name
    train_steps(model, x, y, 3, weight_decay=0.1)
    model.graph.group_of("body.out").prune([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)  # the coupled group is exempt: nothing lost to warn of
        model.finish_task()
    model.eval()
    with torch.no_grad():
        before = model(x, task=0)
    model.prepare_for_task(1, 2)
    opt = train_steps(model, x, 1 - y, 5, weight_decay=0.1)
    assert opt.param_groups and model.body.out.weight.grad is not None and model.body.out.weight.grad.abs().sum() > 0
    out = model.graph.group_of("body.out")
    out.prune((out.task_state == FREE).nonzero().flatten()[:1])
    model.finish_task()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), before)
    # without forward transfer the next task could read none of the frozen group: still refused
    with pytest.raises(CapacityError, match=r"no free neuron left in body\.stem"):
        model.prepare_for_task(2, 2, forward_transfer=False)


def test_state_calls_before_the_graph_and_task_ids_as_the_layers_take_them():
    """finish_task before the graph is built is refused with nothing changed (frozen unwired, the network would fail
    on every later forward); prepare_for_task takes integer scalars as the layers do, and no bool as a width."""
    model, shape = make("mlp")
    model.prepare_for_task(np.int64(0), 2)  # an integer scalar is a task id, as for the layers and forward
    model.body[0].prune_neurons([0])
    states = {name: layer.task_state.clone() for name, layer in model.body_layers().items()}
    with pytest.raises(RuntimeError, match=r"finish_task changed nothing: the layer graph is not built yet.*"
                                           r"model.ensure_graph\(x\)"):
        model.finish_task()
    assert model.current_task == 0
    for name, layer in model.body_layers().items():
        assert torch.equal(layer.task_state, states[name])
    x = torch.randn(4, *shape)
    model.ensure_graph(x)
    for group in model.groups:
        group.prune([1, 2])
    model.finish_task()
    model.eval()
    before = model(x, task=0)
    model.prepare_for_task(1, 2)
    model.train()
    model(x).sum().backward()
    model.eval()
    assert torch.equal(model(x, task=0), before)
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        EideticNetwork(nn.Linear(3, 4), True)


def test_a_partial_load_without_a_layers_storage_names_it():
    model, x = task_0_finished()
    state = copy.deepcopy(model.state_dict())
    del state["body.0.frozen_weight"]
    fresh, _ = make("mlp", seed=1)
    with pytest.raises(RuntimeError, match=r"it holds body.0.task_state, which freezes neurons, but not "
                                           r"body.0.frozen_weight: a layer's neuron states and its storages load "
                                           r"together.*Nothing of this network was loaded"):
        fresh.load_state_dict(state, strict=False)
    assert fresh.num_finished_tasks == 0 and bool((fresh.body[0].task_state == FREE).all())


def test_num_classes_takes_integer_scalars_of_numpy_and_torch():
    """``y.max() + 1`` gives a numpy or torch integer scalar: taken as its int, as the task id is; bools and
    floats stay errors."""
    import numpy as np

    model = EideticNetwork(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 4)
    model.prepare_for_task(0, np.int64(3))
    assert model.heads[0].out_features == 3 and type(model.heads[0].out_features) is int
    for bad in (True, 2.0, torch.tensor(2.0), 0, "2"):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            EideticNetwork(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 4).prepare_for_task(0, bad)
    model = EideticNetwork(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 4)
    model.prepare_for_task(0, torch.tensor(2))
    assert model.heads[0].out_features == 2
