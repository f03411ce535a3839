"""``model.export(task=t)`` and ``eidetic export``: a plain torch.nn module of compact layers per finished task.

Pinned on real finished tasks of every body kind (MLP, CNN with BN, ResNet with projection and identity
skips, cat, raw-input BN, forward transfer off): the module gives task t's logits within fp32 tolerance
and the same argmax; its weights are exactly the synapses task t uses (counted independently from the
layers' states); it holds no eidetic class and loads with torch alone in a fresh interpreter; torch.export
accepts it. Bodies that tie a constant to feature positions are a clear error.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE, EideticConv2d, EideticLinear
from eidetic_kernels.state import live_synapses
from python_layers import EideticNetwork, GraphError
from tests.python_layers.test_finish_rules import CatBody, InputBN1dBody, ResNetBody
from tests.python_layers.test_renumbering import Scaled, _finish_tasks, cnn, mlp

BODIES = {
    "mlp": (lambda: mlp()[:2], (1, 8, 8), True),
    "mlp_no_transfer": (lambda: mlp()[:2], (1, 8, 8), False),
    "cnn": (lambda: cnn()[:2], (1, 8, 8), True),
    "resnet": (lambda: (ResNetBody(), 16), (1, 8, 8), True),
    "cat": (lambda: (CatBody(), 16), (1, 8, 8), True),
    "input_bn": (lambda: (InputBN1dBody(), 16), (16,), True),
}


def _trained(name, tasks=3):
    make, shape, transfer = BODIES[name]
    torch.manual_seed(0)
    body, feature_dim = make()
    model = EideticNetwork(body, feature_dim)
    if not transfer:
        original = model.prepare_for_task
        model.prepare_for_task = lambda t, c, forward_transfer=True: original(t, c, forward_transfer=False)
    _finish_tasks(model, shape, tasks=tasks)
    return model, shape


def _synapses_used(model, task, transfer):
    """Weights task ``task`` reads, from the states alone: neurons of tasks <= t (of t only without forward
    transfer; raw-input BN channels all), each with its live inputs."""
    def used(states):
        return (states <= task) & (states >= 0) if transfer else states == task
    total = 0
    layers = [m for name, m in model.named_modules() if isinstance(m, (EideticLinear, EideticConv2d))
              and not name.startswith("heads.")] + [model.heads[task]]
    for layer in layers:
        rows = used(layer.task_state.long()) if layer is not model.heads[task] else torch.ones(
            layer.num_neurons, dtype=torch.bool)
        mask = live_synapses(layer.input_task, layer.task_state, layer.min_input_task)[rows]
        total += int(mask.sum()) * (layer.weight[0, 0].numel() if layer.weight.dim() > 2 else 1)
    return total


@pytest.mark.parametrize("name", list(BODIES))
def test_export_gives_the_task_logits_with_exactly_its_synapses(name):
    model, shape = _trained(name)
    x = torch.randn((32,) + shape, generator=torch.Generator().manual_seed(5))
    model.eval()
    for t in range(3):
        exported = model.export(t)
        assert all(type(m).__module__.startswith("torch") for m in exported.modules()), name
        with torch.no_grad():
            want, got = model(x, task=t), exported(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        weights = sum(m.weight.numel() for m in exported.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        assert weights == _synapses_used(model, t, BODIES[name][2]), (name, t)


def test_exported_module_loads_with_torch_alone_and_torch_export_accepts_it(tmp_path):
    model, shape = _trained("cnn", tasks=2)
    exported = model.export(1)
    x = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(6))
    path = tmp_path / "task1.pt"
    torch.save(exported, path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(exported(x), tmp_path / "want.pt")
    code = ("import sys; sys.modules['eidetic_kernels'] = None; sys.modules['python_layers'] = None\n"
            "import torch\n"
            f"m = torch.load({str(path)!r}, weights_only=False)\n"
            f"x, want = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'want.pt')!r})\n"
            "with torch.no_grad():\n    assert torch.equal(m(x), want)\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    program = torch.export.export(exported, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), exported(x))


def test_export_errors_are_clear(capfd):
    model, _ = _trained("mlp", tasks=1)
    with pytest.raises(ValueError, match="finished task"):
        model.export(1)
    with pytest.raises(TypeError, match="task must be an int"):
        model.export(True)
    with pytest.raises(ValueError, match="example must be a batch of at least one sample"):
        model.export(0, example=torch.randn(0, 1, 8, 8))  # checked nothing before
    for task in (np.int64(0), torch.tensor(0)):  # integer scalars, as model(x, task=...) takes them
        assert sum(p.numel() for p in model.export(task).parameters()) == \
            sum(p.numel() for p in model.export(0).parameters())
    torch.manual_seed(0)
    scaled = EideticNetwork(Scaled(), 12)
    _finish_tasks(scaled, (1, 8, 8), tasks=1)
    with pytest.raises(GraphError, match="one value per feature"):
        scaled.export(0)
    torch.manual_seed(0)
    fixed = EideticNetwork(FixedView(), 12)
    _finish_tasks(fixed, (1, 8, 8), tasks=1)
    # the op that names a layer width, as README promises (and no traceback of fx's generated code printed)
    with pytest.raises(GraphError, match=r"fails on a batch.*tensor method \.view\(\) \(node 'view'\) names the "
                                         r"feature count \(write -1 for the feature dim\)"):
        fixed.export(0)
    assert "Traceback" not in capfd.readouterr().err


class FixedView(nn.Module):
    """The LeNet habit: a reshape naming the feature count (4 channels x 4 x 4)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 12)

    def forward(self, x):
        return F.relu(self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).view(-1, 4 * 4 * 4)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_body_with_batch_norm_exports(dtype):
    """The check's default tolerance follows the logits' dtype (a few roundings of it), and the frozen batch-norm
    channels normalise in float32 as the twin does: the export matches in bf16/fp16 too."""
    torch.manual_seed(0)
    body, feature_dim, shape = cnn()
    model = EideticNetwork(body.to(dtype), feature_dim)
    g = torch.Generator().manual_seed(1)
    model.prepare_for_task(0, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # (AdamW's eps underflows in fp16)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn((8,) + shape, generator=g).to(dtype)).float(),
                        torch.randint(3, (8,), generator=g)).backward()
        opt.step()
    grp = model.groups[0]
    grp.prune((grp.task_state == FREE).nonzero().flatten()[:3])
    model.finish_task()
    model.eval()
    x = torch.randn((16,) + shape, generator=g).to(dtype)
    exported = model.export(0, example=x)
    with torch.no_grad():
        got, want = exported(x), model(x, task=0)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2)


class _DropoutByMode(nn.Module):
    """Reads ``self.training`` in forward, as F.dropout(h, training=self.training) does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 12)

    def forward(self, x):
        h = F.dropout(torch.relu(self.a(x.flatten(1))), 0.5, training=self.training)
        return torch.relu(self.b(h))


def test_export_traces_in_eval_mode_and_leaves_the_random_stream_alone():
    """A network left in train mode (as train_task leaves it): the export is traced in eval mode, whatever the
    network's (the check failed with 'logits differ' and advised looser tolerances), the network keeps its mode,
    and the global RNG draws as if nothing was exported (the compact layers' initialisation drew from it)."""
    torch.manual_seed(0)
    model = EideticNetwork(_DropoutByMode(), 12)
    _finish_tasks(model, (1, 8, 8), tasks=1)
    model.train()
    state = torch.get_rng_state()
    exported = model.export(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(m.training for m in model.modules())
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, task=0), rtol=1e-4, atol=1e-4)
    assert "training = False" in exported.code


def test_export_of_a_task_with_an_empty_layer_says_what_holds():
    """Task 1 without forward transfer keeps no neuron of a layer on the only path: its logits are the head's
    biases, said as such (the error named another layer, whose neurons task 1 does hold); and export of a task
    that is prepared but not finished says so."""
    torch.manual_seed(0)
    body, feature_dim = mlp()[:2]
    model = EideticNetwork(body, feature_dim)
    _finish_tasks(model, (1, 8, 8), tasks=1)
    model.prepare_for_task(1, 3, forward_transfer=False)
    with pytest.raises(ValueError, match="task 1 is prepared and not finished yet"):
        model.export(1)
    last = model.groups[-1]
    last.prune((last.task_state == FREE).nonzero().flatten())
    with pytest.warns(UserWarning, match=f"task 1 kept no neuron of {last.name} and trained without forward"):
        model.finish_task()
    with pytest.raises(GraphError, match="task 1's logits read no neuron of the body, so they are its head's biases"):
        model.export(1)
    model.export(0)
