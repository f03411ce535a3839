"""State transitions install new Parameters; optimizers are re-bound or fail clearly.

Pinned: a graph kept alive across freeze/recycle does not break the next backward (the issue's
reproduction); a stale optimizer stepping after ``finish_task`` raises StaleOptimizerError naming
the fix; ``rebind_optimizer`` keeps param groups and hyperparameters and drops replaced state;
loading a state dict keeps the Parameter objects whose shapes match.
"""
import pytest
import torch
import torch.nn as nn

import eidetic_kernels as ek
from python_layers import EideticNetwork


def test_graph_kept_alive_across_freeze_does_not_break_backward():
    layer = ek.EideticLinear(3, 2)
    kept = layer(torch.randn(1, 3))  # evaluation logits kept with their graph (for a plot, say)
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer(torch.randn(1, 3)).sum().backward()
    assert layer.weight.grad.shape == (1, 3)
    kept.sum().backward()  # the old graph still runs on the old Parameter's values


def test_graph_kept_across_finish_task_with_frozen_batch_norm_channels():
    """A loss computed before ``finish_task`` backpropagates after it: batch norm keeps its own copies of the
    neuron states its backward reads (finish_task rewrites the layer's states in place)."""
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 6)
    x, y = torch.randn(4, 3, 5, 5), torch.randint(3, (4,))
    for task in range(2):  # the second task trains with frozen channels: the masked batch norm runs
        model.prepare_for_task(task, 3)
        loss = nn.functional.cross_entropy(model(x), y)
        for g in model.groups:
            g.prune([i for i in range(6) if int(g.task_state[i]) == ek.FREE][:2])
        model.finish_task()
        loss.backward()
        assert model.body[0].weight.grad is None  # the kept graph fed the replaced Parameter, not the new one


def _network():
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()), 5)
    model.prepare_for_task(0, 3)
    return model


def test_stale_optimizer_is_a_clear_error_and_rebind_fixes_it():
    model = _network()
    x = torch.randn(8, 4)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 0.1}])
    model(x).sum().backward()
    opt.step()
    for g in model.groups:
        g.prune([1, 2])
    model.finish_task()
    model.prepare_for_task(1, 3)
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(ek.StaleOptimizerError, match="rebind_optimizer"):
        opt.step()
    swapped = ek.rebind_optimizer(opt)
    assert swapped > 0
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    body = [p for name, p in model.named_parameters() if not name.startswith("heads.1")]
    assert all(id(p) in held for p in body)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.1
    assert not any(id(p) in held for p in model.heads[1].parameters())  # new head: the user adds it
    assert all(p not in opt.state for g in opt.param_groups for p in g["params"])  # replaced: state dropped
    opt.add_param_group({"params": list(model.heads[1].parameters())})
    before = model.body[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.body[0].weight)  # the re-bound optimizer trains the new Parameters


def test_train_task_reuses_one_optimizer_across_tasks():
    from tests.python_layers.synthetic import make_tasks
    tasks = make_tasks(num_tasks=2, train_per_class=16, test_per_class=4)
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU()), 12)
    model.prepare_for_task(0, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train_task(tasks[0][0], opt, pruning="l2", step=0.25, max_epochs=2, patience=1, recovery_epochs=1,
                     progress=False)
    model.prepare_for_task(1, 3)
    opt.add_param_group({"params": list(model.heads[1].parameters())})
    model.train_task(tasks[1][0], opt, pruning="l2", step=0.25, max_epochs=2, patience=1, recovery_epochs=1,
                     progress=False)
    assert model.num_finished_tasks == 2


def test_load_keeps_parameter_objects_when_shapes_match():
    model = _network()
    model(torch.randn(2, 4))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    model.load_state_dict(state)
    assert {name: id(p) for name, p in model.named_parameters()} == ids
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name])


def test_hooks_and_attributes_of_a_parameter_follow_its_replacements():
    """A gradient hook (clipping), a post-accumulate hook (an optimizer stepped in backward) and an attribute set on
    a body Parameter keep working on the Parameters that finish_task installs; a handle kept removes its hook."""
    model = _network()
    x = torch.randn(8, 4)
    weight = model.body[0].weight
    clipped, accumulated = [], []
    handle = weight.register_hook(lambda g: clipped.append(1) or g.clamp(-1e-3, 1e-3))
    weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    weight.lr_scale = 0.5
    model(x)  # traces the layer graph
    for task in range(2):
        if task:
            model.prepare_for_task(task, 3)
        for g in model.groups:
            g.prune([i for i in range(g.size) if int(g.task_state[i]) == ek.FREE][:2])
        model.finish_task()
    model.prepare_for_task(2, 3)
    new = model.body[0].weight
    assert new is not weight and new.lr_scale == 0.5
    clipped.clear()
    model(x).pow(2).sum().mul(1e3).backward()
    assert clipped == [1] and accumulated[-1] is new
    assert new.grad.abs().max() <= 1e-3  # the clipping hook ran on the gradient of the new Parameter
    handle.remove()
    new.grad = None
    model(x).pow(2).sum().mul(1e3).backward()
    assert clipped == [1] and new.grad.abs().max() > 1e-3
