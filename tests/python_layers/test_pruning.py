"""Pruning scores and selection on bare layers, checked against independent loops over dense weights."""
import math

import pytest
import torch

from eidetic_kernels import FREE, PRUNED, EideticBatchNorm1d, EideticConv2d, EideticLinear
from python_layers import pruning


class LayerGroup:
    """Minimal stand-in for graph.NeuronGroup: coupled layers pruned together."""

    def __init__(self, *layers):
        self.members = [(f"layer{i}", layer) for i, layer in enumerate(layers)]
        self.name = "layer0"
        self.size = layers[0].num_neurons

    @property
    def task_state(self):
        return self.members[0][1].task_state

    def prune(self, neurons):
        for _, layer in self.members:
            layer.prune_neurons(neurons)

    def weight_members(self):
        return [layer for _, layer in self.members if hasattr(layer, "input_task")]


def mixed_layer(layer, frozen_neurons, pruned_neurons, input_task=None, min_input_task=None):
    """Freeze ``frozen_neurons`` for task 0 (the others are recycled to FREE), then prune ``pruned_neurons``."""
    others = [i for i in range(layer.num_neurons) if i not in frozen_neurons]
    if input_task is not None:  # before freezing: the inputs of frozen neurons never change afterwards
        layer.set_input_task(input_task)
    layer.prune_neurons(others)
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    if pruned_neurons:
        layer.prune_neurons(pruned_neurons)
    if min_input_task is not None:
        layer.set_min_input_task(min_input_task)
    return layer


def loop_norm(layer, i, p):
    """Independent: Lp norm of neuron i's live incoming weights by the rule, one input at a time."""
    w = layer.dense("weight")[i]
    total = 0.0
    for j in range(w.shape[0]):
        tj = int(layer.input_task[j])
        if tj != PRUNED and int(layer.min_input_task[i]) <= tj <= int(layer.task_state[i]):
            total += float(w[j].abs().sum()) if p == 1 else float(w[j].pow(2).sum())
    return total if p == 1 else math.sqrt(total)


@pytest.mark.filterwarnings("ignore::eidetic_kernels.FreeInputsWarning")  # states built by hand
@pytest.mark.parametrize("p, method", [(1, "l1"), (2, "l2")])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_norm_scores_match_a_loop_over_live_synapses(p, method, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = EideticLinear(13, 11)
    else:
        layer = EideticConv2d(7, 11, kernel_size=3)
    n_in = layer.input_task.numel()
    in_task = torch.full((n_in,), FREE, dtype=torch.int16)
    in_task[::3] = 0
    in_task[1::4] = PRUNED
    in_task[2::5] = 1
    mixed_layer(layer, frozen_neurons=[0, 3, 4, 9], pruned_neurons=[5], input_task=in_task, min_input_task=1)
    raw = pruning.member_norms(layer, p)
    for i in range(layer.num_neurons):
        if int(layer.task_state[i]) == FREE:
            assert raw[i].item() == pytest.approx(loop_norm(layer, i, p), rel=1e-5, abs=1e-7)
        else:
            assert torch.isnan(raw[i])
    # a single member: the group score is the raw score divided by its mean over the FREE neurons
    scores = pruning.group_scores(LayerGroup(layer), method)
    free = layer.task_state == FREE
    torch.testing.assert_close(scores[free], raw[free] / raw[free].mean(), rtol=1e-5, atol=1e-7)
    assert bool(torch.isnan(scores[~free]).all())


def test_members_are_normalised_before_they_are_summed():
    torch.manual_seed(1)
    wide, narrow = EideticLinear(40, 9), EideticLinear(3, 9)
    with torch.no_grad():
        wide.weight.mul_(50.0)  # a big member must not drown the small one
    for layer in (wide, narrow):
        mixed_layer(layer, frozen_neurons=[2, 7], pruned_neurons=[])
    group = LayerGroup(wide, narrow)
    scores = pruning.group_scores(group, "l2")
    free = wide.task_state == FREE
    expect = torch.zeros(9)
    for layer in (wide, narrow):
        raw = torch.tensor([loop_norm(layer, i, 2) if free[i] else 0.0 for i in range(9)])
        expect += raw / raw[free].mean()
    torch.testing.assert_close(scores[free], expect[free], rtol=1e-5, atol=1e-6)
    assert scores[free].mean().item() == pytest.approx(2.0, rel=1e-5)  # mean 1 per member


def test_taylor_score_sums_normalised_member_scores():
    torch.manual_seed(2)
    lin, bn = EideticLinear(6, 10), EideticBatchNorm1d(10)
    mixed_layer(lin, frozen_neurons=[1, 8], pruned_neurons=[4])
    mixed_layer(bn, frozen_neurons=[1, 8], pruned_neurons=[4])
    for layer in (lin, bn):
        layer.enable_taylor()
    x = torch.randn(17, 6)
    a = lin(x)
    a.retain_grad()
    b = bn(a)
    b.retain_grad()
    loss = torch.relu(b).pow(2).sum()
    loss.backward()
    # independent: |mean over the batch of a·dL/da| per neuron, per member
    raw_lin = (a.detach() * a.grad).mean(0).abs()
    raw_bn = (b.detach() * b.grad).mean(0).abs()
    free = lin.task_state == FREE
    expect = raw_lin / raw_lin[free].mean() + raw_bn / raw_bn[free].mean()
    scores = pruning.group_scores(LayerGroup(lin, bn), "taylor")
    # fp32 sums of a·g in another order (fused backends): rtol 1e-3
    torch.testing.assert_close(scores[free], expect[free], rtol=1e-3, atol=1e-5)
    assert bool(torch.isnan(scores[~free]).all())


def test_taylor_without_collected_scores_is_a_clear_error():
    with pytest.raises(RuntimeError, match="enable_taylor"):
        pruning.group_scores(LayerGroup(EideticLinear(3, 4)), "taylor")
    with pytest.raises(ValueError, match="l1"):
        pruning.group_scores(LayerGroup(EideticLinear(3, 4)), "l3")


def test_selection_takes_the_lowest_free_scores_and_never_a_frozen_neuron():
    state = torch.tensor([0, FREE, FREE, PRUNED, FREE, 1, FREE, FREE], dtype=torch.int16)
    scores = torch.tensor([-9.0, 5.0, 1.0, -9.0, 3.0, -9.0, float("nan"), 1.0])
    chosen = pruning.select_neurons(scores, state, 3)
    # nan (non-finite weights) first, then the tie 1.0 / 1.0 broken towards the lower index
    assert chosen.tolist() == [6, 2, 7]
    assert pruning.select_neurons(scores, state, 99).tolist() == [6, 2, 7, 4, 1]


@pytest.mark.parametrize("step, task_free, n_free, expect", [
    (0.05, 100, 100, 5), (0.05, 10, 10, 1), (0.25, 10, 10, 2), (0.5, 10, 3, 2), (0.5, 10, 1, 0), (1.0, 4, 4, 3)])
def test_prune_counts(step, task_free, n_free, expect):
    layer = EideticLinear(2, task_free)
    if n_free < task_free:
        layer.prune_neurons(list(range(task_free - n_free)))
    assert pruning.prune_counts(LayerGroup(layer), step, task_free) == expect


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_steps_keep_one_free_neuron_leave_frozen_ones_alone_and_end(method):
    torch.manual_seed(3)
    conv, bn = EideticConv2d(3, 9, 3), torch.nn.Identity()
    lin = EideticLinear(5, 12)
    mixed_layer(conv, frozen_neurons=[0, 4], pruned_neurons=[])
    mixed_layer(lin, frozen_neurons=[3], pruned_neurons=[])
    frozen_before = (conv.frozen_weight.clone(), lin.frozen_weight.clone())
    groups = [LayerGroup(conv), LayerGroup(lin)]
    groups[1].name = "layer1"
    task_free = {g.name: int((g.task_state == FREE).sum()) for g in groups}
    assert task_free == {"layer0": 7, "layer1": 11}
    steps = 0
    for _ in range(100):  # capped: must end long before
        done = pruning.prune_step(groups, method, 0.25, task_free)
        if not done:
            break
        steps += 1
        for g, n in zip(groups, (2, 3)):  # round(0.25 * 7) = 2, round(0.25 * 11) = 3, until one is left
            if g.name in done:
                assert done[g.name].numel() <= n
    assert steps == 4
    for g, frozen in zip(groups, ([0, 4], [3])):
        s = g.task_state
        assert int((s == FREE).sum()) == 1
        assert [i for i in range(g.size) if int(s[i]) == 0] == frozen
    assert torch.equal(conv.frozen_weight, frozen_before[0]) and torch.equal(lin.frozen_weight, frozen_before[1])
    assert pruning.pruned_share(groups[1]) == pytest.approx(10 / 12)
    assert pruning.frozen_share(groups[1]) == pytest.approx(1 / 12)


def test_a_step_prunes_the_weakest_neurons():
    torch.manual_seed(4)
    layer = EideticLinear(8, 10)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 11, dtype=torch.float32).flip(0)[:, None])  # neuron 9 weakest
        layer.weight[9].zero_()
        layer.weight[8].mul_(0.01)
    g = LayerGroup(layer)
    done = pruning.prune_step([g], "l1", 0.2, {"layer0": 10})
    assert sorted(done["layer0"].tolist()) == [8, 9]
    assert g.task_state[8] == PRUNED and g.task_state[9] == PRUNED
    with pytest.raises(ValueError, match=r"task_free has no count for group\(s\) layer0 \(it has: body.0\)"):
        pruning.prune_step([g], "l1", 0.2, {"body.0": 10})
    assert int((g.task_state == PRUNED).sum()) == 2  # nothing pruned


def test_a_residual_group_sums_both_branches_normalised():
    """conv2 and the projection conv feed one residual sum: one group, scored by both weight members."""
    from python_layers import EideticNetwork
    from tests.python_layers.synthetic import resnet_body

    torch.manual_seed(5)
    model = EideticNetwork(*resnet_body())
    model.ensure_graph(torch.randn(2, 1, 8, 8))
    group = next(g for g in model.groups if len(g.weight_members()) == 2)
    names = sorted(name for name, _ in group.members)
    assert names == ["body.block.bn2", "body.block.conv2", "body.block.proj", "body.block.proj_bn"]
    group.prune([0, 5])
    expect = torch.zeros(group.size)
    free = group.task_state == FREE
    for layer in group.weight_members():
        raw = torch.tensor([loop_norm(layer, i, 1) if free[i] else 0.0 for i in range(group.size)])
        expect += raw / raw[free].mean()
    scores = pruning.group_scores(group, "l1")
    torch.testing.assert_close(scores[free], expect[free], rtol=1e-5, atol=1e-6)
    assert bool(torch.isnan(scores[~free]).all())


@pytest.mark.parametrize("method", ["l2", "taylor"])
def test_a_batch_norm_of_the_raw_input_is_never_pruned(method):
    """Its channels are input features, which every task reads as task 0's: train_task's pruning steps leave
    them FREE, task 0 freezes them all and later tasks read every input (before: task 0 kept 5 of 20 inputs and
    its frozen neurons lost the others for good)."""
    import torch.nn as nn

    from python_layers import EideticNetwork

    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                                         nn.ReLU()), 16)
    x = torch.randn(64, 12)
    y = (x[:, 3] > 0).long()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    for task in range(2):
        model.prepare_for_task(task, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = model.train_task(batches, optimizer, pruning=method, step=0.5, stop_threshold=1.0,
                                   max_epochs=2, patience=1, recovery_epochs=1, max_prune_steps=3, progress=False)
        assert any(r["phase"] == "recover" for r in history)  # the other groups were pruned
        assert model.body[0].neuron_task.tolist() == [0] * 12
        assert bool((model.body[1].neuron_task == PRUNED).sum() == 0)  # finished: recycled
    assert bool((model.body[1].input_task == 0).all())
