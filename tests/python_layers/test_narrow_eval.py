"""Evaluating a finished task at prefix width (``EideticNetwork.forward`` in eval mode).

Neurons are task-major, so the neurons of tasks <= t are every layer's first ones; ``forward(x, task=t)``
then runs the body on activations that keep only them (no zero tail). Pinned on real finished tasks of every
body kind (MLP, CNN with BN, ResNet with projection and identity skips, raw-input BN, forward transfer off):

* it runs (the narrow path is taken) and gives the logits of the full-width view, ``torch.equal``;
* bodies whose code depends on the feature sizes (a concatenation, a reshape naming the feature count, a size
  read from a tensor of neurons) run at full width, with the reason; so does train mode, and a body module
  with a forward hook (which sees full-width activations, as always);
* the layers leave prefix width when the call returns, also when it raises.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from python_layers import EideticNetwork
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)
from tests.python_layers.test_export import BODIES, _trained
from tests.python_layers.test_renumbering import _finish_tasks


def _full_width(model, x, t):
    return model.logits(model.features(x, view_task=t), t)


def _count_narrow(model, monkeypatch):
    calls = []
    original = model._narrow_logits

    def spy(x, task):
        calls.append(task)
        return original(x, task)

    monkeypatch.setattr(model, "_narrow_logits", spy)
    return calls


@pytest.mark.parametrize("name", [n for n in BODIES if n != "cat"])
def test_prefix_width_gives_the_full_width_logits_bit_for_bit(name, monkeypatch):
    model, shape = _trained(name)
    model.eval()
    x = torch.randn((32,) + shape, generator=torch.Generator().manual_seed(3))
    assert model.narrow_eval_blocked_by(x) is None
    calls = _count_narrow(model, monkeypatch)
    with torch.no_grad():
        for t in range(3):
            got = model(x, task=t)
            assert torch.equal(got, _full_width(model, x, t)), (name, t)
    assert calls == [0, 1, 2]
    layers = list(model.graph.layers.values()) + list(model.heads)
    assert not any(layer.narrow or layer.view_task is not None for layer in layers)


def test_a_concatenation_of_features_runs_at_full_width():
    model, shape = _trained("cat")
    model.eval()
    why = model.narrow_eval_blocked_by()
    assert why is not None and "concatenates" in why


class _Reshaped(nn.Module):
    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 12)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = h.view(-1, 8 * 16) if self.literal else h.view(h.size(0), -1)
        return F.relu(self.fc(h))


@pytest.mark.parametrize("literal", [True, False], ids=["view(-1, C*H*W)", "view(N, -1)"])
def test_a_reshape_naming_the_feature_count_runs_at_full_width(literal, monkeypatch):
    torch.manual_seed(0)
    model = EideticNetwork(_Reshaped(literal), 12)
    _finish_tasks(model, (1, 8, 8), tasks=2)
    model.eval()
    why = model.narrow_eval_blocked_by()
    if literal:
        assert why is not None and ".view()" in why and "-1" in why
    else:
        assert why is None
    calls = _count_narrow(model, monkeypatch)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(model(x, task=t), _full_width(model, x, t))
    assert calls == ([] if literal else [0, 1])


class _SizeReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 12)

    def forward(self, x):
        h = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.relu(self.fc2(h)) * (h.shape[1] / 16)


def test_a_body_reading_its_feature_count_runs_at_full_width():
    torch.manual_seed(0)
    model = EideticNetwork(_SizeReader(), 12)
    _finish_tasks(model, (1, 8, 8), tasks=1)
    model.eval()
    assert "feature count" in model.narrow_eval_blocked_by()


def test_train_mode_and_forward_hooks_run_at_full_width(monkeypatch):
    model, shape = _trained("cnn", tasks=2)
    x = torch.randn((8,) + shape)
    model.train()
    assert "train mode" in model.narrow_eval_blocked_by(x)
    model.eval()
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) or type(m).__name__ == "EideticConv2d")
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    assert "hooks" in model.narrow_eval_blocked_by(x)
    calls = _count_narrow(model, monkeypatch)
    with torch.no_grad():
        want = model(x, task=0)
    assert seen == [conv.out_channels] and calls == []
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), want)
    assert calls == [0]


def test_layers_leave_prefix_width_when_the_body_raises(monkeypatch):
    model, shape = _trained("mlp", tasks=2)
    model.eval()
    x = torch.randn((4,) + shape)
    model.narrow_eval_blocked_by(x)

    def boom(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward_features", boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(x, task=0)
    layers = list(model.graph.layers.values()) + list(model.heads)
    assert not any(layer.narrow or layer.view_task is not None for layer in layers)
