"""Rules of ``finish_task`` that a redesign of the layers, the network or the trainer must keep.

Pinned here, on real forward passes of small bodies built from plain ``torch.nn`` layers (which
``EideticNetwork`` converts), without going through ``train_task`` (so the trainer's own logic cannot hide
a regression of the network):

1. **Finishing a task does not change it.** A task is trained a few AdamW steps, some FREE neurons of every
   neuron group are pruned (at least one FREE is left), it is trained a few more steps; its eval logits on a
   fixed probe batch are taken; ``finish_task()`` freezes the survivors, recycles the pruned neurons and
   switches the task to view mode. Its logits must then be ``assert_close`` (atol = rtol = 1e-5) to those
   before: freezing moves rows between storages and view mode skips the other tasks' neurons, but computes
   the same function (only the summation order may differ).
2. **Finished tasks are bit-identical afterwards.** Tasks 1 and 2 are run the same way (a new AdamW built
   after ``prepare_for_task``). Every finished task's eval logits must be ``torch.equal`` to their value
   right after it finished: while the next task trains, after each later ``finish_task``, and after every
   tensor of ``model.parameters()`` is filled with NaN and then +inf (the free capacity cannot reach a
   finished task, not even as ``0 * NaN``).
3. **The tracer couples what the body couples.** The neuron groups and what every layer reads are checked
   against the body as written (a BN joins its conv; a projection skip, its block's output conv and the next
   identity block's output conv are one group; ``torch.cat([h, h], 1)`` reads the same group twice; a BN on
   the raw input is its own input-normalizer group), so rules 1 and 2 cannot pass on a wrongly traced body.

Bodies: (a) MLP, (b) CNN with BatchNorm2d and MaxPool2d, (c) ResNet-like (projection block + identity
block, global average pool), (d) ``torch.cat([h, h], 1)`` before the last Linear, (e) BatchNorm1d over the
raw features / (e2) BatchNorm2d over a 3-channel raw image, (f) the MLP with forward transfer off for every
task. Each body is trained once per session (``_scenario`` is cached); the rule tests read its record.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE
from python_layers import EideticNetwork
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)

BATCH = 16
CLASSES = 3
TASKS = 3
STEPS_BEFORE_PRUNE = 3
STEPS_AFTER_PRUNE = 3
LR = 1e-2
WEIGHT_DECAY = 0.05


# ------------------------------------------------------------------------------------------------
# bodies (plain torch.nn; EideticNetwork converts them)
# ------------------------------------------------------------------------------------------------
def mlp_body():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())


def cnn_body():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU())


class ResBlock(nn.Module):
    """conv-BN-relu-conv-BN added to a skip: a 1x1 conv projection + BN when ``project``, else identity."""

    def __init__(self, c_in, c_out, project):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.project = project
        if project:
            self.proj = nn.Conv2d(c_in, c_out, 1, bias=False)
            self.proj_bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.proj_bn(self.proj(x)) if self.project else x
        return F.relu(out + skip)


class ResNetBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1 = ResBlock(8, 16, project=True)
        self.block2 = ResBlock(16, 16, project=False)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return torch.flatten(x.mean((2, 3)), 1)


class CatBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 12)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x):
        h = F.relu(self.fc1(torch.flatten(x, 1)))
        h = torch.cat([h, h], 1)
        return F.relu(self.fc2(h))


class InputBN1dBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(self.bn(x)))))


class InputBN2dBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(self.bn(x))), 2)
        return F.relu(self.fc(torch.flatten(h, 1)))


# ------------------------------------------------------------------------------------------------
# the coupling each body must be traced with
# ------------------------------------------------------------------------------------------------
def groups_of(model):
    return {frozenset(name for name, _ in g.members) for g in model.groups}


def reads(model, name):
    """What layer ``name`` reads: [(frozenset of the source group's members or None for raw input, count, repeat)]."""
    _, segments = model.graph.inputs[name]
    return [(None if s.source is None else frozenset(n for n, _ in s.source.members), s.count, s.repeat)
            for s in segments]


def features_of(model):
    return [(None if s.source is None else frozenset(n for n, _ in s.source.members), s.count, s.repeat)
            for s in model.graph.features]


def fs(*names):
    return frozenset(f"body.{n}" for n in names)


def expect_mlp(model):
    assert groups_of(model) == {fs("1"), fs("3")}
    assert reads(model, "body.1") == [(None, 64, 1)]
    assert reads(model, "body.3") == [(fs("1"), 16, 1)]
    assert features_of(model) == [(fs("3"), 16, 1)]


def expect_cnn(model):
    assert groups_of(model) == {fs("0", "1"), fs("5")}  # the BN's channels are the conv's neurons
    assert reads(model, "body.0") == [(None, 1, 1)]
    assert reads(model, "body.5") == [(fs("0", "1"), 8, 16)]  # each channel covers its 4x4 pooled positions
    assert features_of(model) == [(fs("5"), 16, 1)]


def expect_resnet(model):
    out = fs("block1.conv2", "block1.bn2", "block1.proj", "block1.proj_bn", "block2.conv2", "block2.bn2")
    assert groups_of(model) == {fs("stem", "stem_bn"), fs("block1.conv1", "block1.bn1"), out,
                                fs("block2.conv1", "block2.bn1")}
    assert reads(model, "body.block1.conv1") == [(fs("stem", "stem_bn"), 8, 1)]
    assert reads(model, "body.block1.proj") == [(fs("stem", "stem_bn"), 8, 1)]
    assert reads(model, "body.block1.conv2") == [(fs("block1.conv1", "block1.bn1"), 16, 1)]
    assert reads(model, "body.block2.conv1") == [(out, 16, 1)]
    assert reads(model, "body.block2.conv2") == [(fs("block2.conv1", "block2.bn1"), 16, 1)]
    assert features_of(model) == [(out, 16, 1)]


class BottleneckBody(nn.Module):
    """A stem and one bottleneck block of python_layers.models (1x1 -> 3x3 -> 1x1, projection skip)."""

    def __init__(self):
        super().__init__()
        from python_layers.models import BottleneckBlock
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = BottleneckBlock(8, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.block(torch.relu(self.stem_bn(self.stem(x))))).flatten(1)


def expect_bottleneck(model):
    out = fs("block.conv3", "block.bn3", "block.shortcut_conv", "block.shortcut_bn")
    assert groups_of(model) == {fs("stem", "stem_bn"), fs("block.conv1", "block.bn1"),
                                fs("block.conv2", "block.bn2"), out}
    assert reads(model, "body.block.shortcut_conv") == [(fs("stem", "stem_bn"), 8, 1)]
    assert reads(model, "body.block.conv3") == [(fs("block.conv2", "block.bn2"), 4, 1)]
    assert features_of(model) == [(out, 16, 1)]


def expect_cat(model):
    assert groups_of(model) == {fs("fc1"), fs("fc2")}
    assert reads(model, "body.fc2") == [(fs("fc1"), 12, 1), (fs("fc1"), 12, 1)]
    assert features_of(model) == [(fs("fc2"), 16, 1)]


def expect_input_bn1d(model):
    assert groups_of(model) == {fs("bn"), fs("fc1"), fs("fc2")}
    assert model.graph.group_of("body.bn").input_normalizer
    assert not model.graph.group_of("body.fc1").input_normalizer
    assert reads(model, "body.fc1") == [(fs("bn"), 16, 1)]
    assert model.graph.raw_input_layers == {"body.fc1"}  # reads the raw input through its BN: always task 0
    assert features_of(model) == [(fs("fc2"), 16, 1)]


def expect_input_bn2d(model):
    assert groups_of(model) == {fs("bn"), fs("conv"), fs("fc")}
    assert model.graph.group_of("body.bn").input_normalizer
    assert reads(model, "body.conv") == [(fs("bn"), 3, 1)]
    assert reads(model, "body.fc") == [(fs("conv"), 8, 16)]
    assert model.graph.raw_input_layers == {"body.conv"}
    assert features_of(model) == [(fs("fc"), 16, 1)]


# name: (body factory, input shape, feature_dim, forward_transfer, graph expectation, marks)
CASES = {
    "mlp": (mlp_body, (1, 8, 8), 16, True, expect_mlp, ()),
    "cnn_bn_pool": (cnn_body, (1, 8, 8), 16, True, expect_cnn, ()),
    "resnet": (ResNetBody, (1, 8, 8), 16, True, expect_resnet, ()),
    "bottleneck": (BottleneckBody, (1, 8, 8), 16, True, expect_bottleneck, ()),
    "cat": (CatBody, (1, 8, 8), 16, True, expect_cat, ()),
    "input_bn1d": (InputBN1dBody, (16,), 16, True, expect_input_bn1d, ()),
    "input_bn2d": (InputBN2dBody, (3, 8, 8), 16, True, expect_input_bn2d, ()),
    "mlp_no_forward_transfer": (mlp_body, (1, 8, 8), 16, False, expect_mlp, ()),
}


def cases():
    return [pytest.param(name, marks=list(CASES[name][5]), id=name) for name in CASES]


# ------------------------------------------------------------------------------------------------
# the scenario: three tasks by hand (train, prune, train, finish), recorded once per body
# ------------------------------------------------------------------------------------------------
def random_inputs(shape, n, generator):
    # per-feature offsets and scales: batch norms (the raw-input ones especially) have something to normalise
    x = torch.randn((n,) + shape, generator=generator)
    return 1.5 * x + 0.5 * torch.randn((1,) + shape, generator=generator)


def eval_logits(model, x, task):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x, task=task).clone()
    finally:
        model.train(was_training)


def train_steps(model, optimizer, shape, steps, generator):
    model.train()
    losses = []
    for _ in range(steps):
        x = random_inputs(shape, BATCH, generator)
        y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def prune_some_free(model, generator):
    """Prune about half of every group's FREE neurons, chosen at random; at least one FREE stays."""
    pruned = {}
    for g in model.groups:
        free = (g.task_state == FREE).nonzero().flatten()
        n = min(max(1, free.numel() // 2), free.numel() - 1)
        if n <= 0:
            continue
        chosen = free[torch.randperm(free.numel(), generator=generator)[:n]]
        g.prune(chosen)
        pruned[g.name] = n
    return pruned


def flat_parameters(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@functools.lru_cache(maxsize=None)
def _scenario(name):
    factory, shape, feature_dim, forward_transfer, _, _ = CASES[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = EideticNetwork(factory(), feature_dim)
    probe = random_inputs(shape, BATCH, torch.Generator().manual_seed(2))
    probe = torch.cat([probe, 4 * torch.randn((4,) + shape, generator=g)])  # and some far-out inputs
    rec = dict(finish=[], later=[], pruned=[], moved=[], losses=[], poisoned_features=[], min_input=[])
    snapshots = {}

    def check_finished(when):
        for t, expected in snapshots.items():
            rec["later"].append((when, t, eval_logits(model, probe, t), expected))

    for t in range(TASKS):
        model.prepare_for_task(t, CLASSES, forward_transfer=forward_transfer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        losses = train_steps(model, optimizer, shape, STEPS_BEFORE_PRUNE, g)  # the first forward traces the graph
        params = flat_parameters(model)
        rec["pruned"].append(prune_some_free(model, g))
        losses += train_steps(model, optimizer, shape, STEPS_AFTER_PRUNE, g)
        rec["losses"].append(losses)
        rec["moved"].append(not torch.equal(params, flat_parameters(model)))
        check_finished(f"while task {t} trains")
        before = eval_logits(model, probe, t)
        model.finish_task()
        after = eval_logits(model, probe, t)
        rec["finish"].append((t, before, after))
        snapshots[t] = after
        check_finished(f"after task {t} finished")
        if not forward_transfer:
            for gr in model.groups:
                for member, layer in gr.members:
                    if hasattr(layer, "min_input_task") and member not in model.graph.raw_input_layers:
                        own = layer.task_state == t
                        ok = bool((layer.min_input_task[own] == t).all())
                        rec["min_input"].append((member, t, int(own.sum()), ok))

    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        model.eval()
        with torch.no_grad():
            # the poison is live: the whole body (no view) does compute with it
            rec["poisoned_features"].append((str(value), bool(torch.isfinite(model.features(probe)).all())))
        check_finished(f"after filling model.parameters() with {value}")
    rec["capacity"] = model.capacity()
    rec["model"] = model
    return rec


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in CASES])
def test_tracer_builds_the_expected_coupling(name):
    factory, shape, feature_dim, _, expect, _ = CASES[name]
    torch.manual_seed(0)
    model = EideticNetwork(factory(), feature_dim)
    model.ensure_graph(torch.randn((BATCH,) + shape))
    expect(model)
    for g in model.groups:
        g.check_consistent()
        assert all(layer.num_neurons == g.size for layer in g.layers)


@pytest.mark.parametrize("name", cases())
def test_finish_task_keeps_the_task_logits(name):
    rec = _scenario(name)
    assert [t for t, _, _ in rec["finish"]] == list(range(TASKS))
    for t, before, after in rec["finish"]:
        assert torch.isfinite(before).all(), f"task {t}: non-finite logits before finish"
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, t=t: f"task {t}'s logits changed across its finish_task: {m}")


@pytest.mark.parametrize("name", cases())
def test_finished_tasks_are_bit_identical_afterwards(name):
    rec = _scenario(name)
    expect = CASES[name][4]
    expect(rec["model"])  # the network that was trained is the one traced as expected
    # the scenario is not vacuous: every task pruned every group once, trained, and moved its parameters
    assert all(rec["pruned"][0].get(g.name, 0) > 0 for g in rec["model"].groups), rec["pruned"][0]
    assert all(rec["moved"]), "some task's optimizer steps did not change model.parameters()"
    assert all(torch.isfinite(torch.tensor(losses)).all() for losses in rec["losses"]), "a task's loss was not finite"
    # the NaN/inf fill reaches the free capacity: the whole body (no view) is no longer finite
    assert rec["poisoned_features"] == [("nan", False), ("inf", False)]
    whens = {when for when, _, _, _ in rec["later"]}
    assert len(whens) == 2 * TASKS - 1 + 2  # while tasks 1, 2 train; after 3 finishes; after 2 fills
    for t, _, after in rec["finish"]:  # what is kept is a real function of the input (finite, not constant)
        assert torch.isfinite(after).all() and (after - after[:1]).abs().amax() > 1e-3, f"task {t}: degenerate logits"
    for when, t, got, expected in rec["later"]:
        assert torch.equal(got, expected), f"task {t}'s logits changed {when}"
    for name_, row in rec["capacity"].items():  # finish_task recycled every pruned neuron; each task kept some
        assert row["pruned"] == 0, f"{name_}: {row}"
    for t in range(TASKS):
        assert sum(row[f"task {t}"] for row in rec["capacity"].values()) > 0
    if not CASES[name][3]:  # forward transfer off: a task's neurons read only their own task's neurons
        assert rec["min_input"] and all(n > 0 for _, _, n, _ in rec["min_input"])
        bad = [(m, t) for m, t, _, ok in rec["min_input"] if not ok]
        assert not bad, f"neurons read older tasks with forward transfer off: {bad}"
