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

from eidetic_kernels import FREE
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


def _finished_mlp(width_in=20, tasks=1):
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(width_in, 16), nn.ReLU(), nn.Linear(16, 8)), 8)
    _finish_tasks(model, (width_in,), tasks=tasks)
    return model.eval()


def test_an_input_of_the_wrong_size_gets_the_full_width_error():
    """A layer at prefix width checks the width it reads: too wide or too narrow an input, or a wrong image
    size behind a flatten, raises what a full-width forward raises (it never gives logits)."""
    model = _finished_mlp()
    for bad in (torch.randn(2, 25), torch.randn(2, 12)):
        with pytest.raises(ValueError, match=r"shape\[-1\] == 20"), torch.no_grad():
            model(bad, task=0)
    torch.manual_seed(0)
    cnn = EideticNetwork(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 10)), 10)
    _finish_tasks(cnn, (3, 7, 7), tasks=1)
    cnn.eval()
    with pytest.raises(ValueError), torch.no_grad():
        cnn(torch.randn(2, 3, 9, 9), task=0)
    with pytest.raises(ValueError), torch.no_grad():
        cnn(torch.randn(2, 4, 7, 7), task=0)
    with torch.no_grad():
        x = torch.randn(2, 3, 7, 7)
        assert torch.equal(cnn(x, task=0), _full_width(cnn, x, 0))
    # an unbatched image reaching a batch norm: the full-width shape in the error, and the layer's name
    torch.manual_seed(0)
    bn = EideticNetwork(nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(6 * 4 * 4, 12)), 12)
    _finish_tasks(bn, (2, 4, 4), tasks=1)
    bn.eval()
    with pytest.raises(ValueError, match=r"EideticBatchNorm2d 'body.1' expects 4-D input \[N, C, H, W\], got shape "
                                         r"\(6, 4, 4\)"), torch.no_grad():
        bn(torch.randn(2, 4, 4), task=0)


class _PoolsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(10, 16), nn.Linear(16, 8)

    def forward(self, x):  # [N, 16] is an unbatched [C, L] to max_pool1d: it pools across the neurons
        return self.l2(F.max_pool1d(self.l1(x), 3, stride=1, padding=1))


class _DataMean(nn.Module):
    def __init__(self, attr):
        super().__init__()
        self.attr = attr
        self.l1, self.l2 = nn.Linear(10, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return self.l2(h - getattr(h, self.attr).mean())


@pytest.mark.parametrize("body", [_PoolsFeatures, lambda: _DataMean("data"), lambda: _DataMean("T")],
                         ids=["pool over features", ".data.mean()", ".T.mean()"])
def test_ops_that_mix_neurons_through_unbatched_pooling_or_tensor_attributes_are_refused(body):
    """At any width these would let later tasks' neurons reach a finished task's output."""
    from python_layers import GraphError
    model = EideticNetwork(body(), 8)
    with pytest.raises(GraphError):
        model.ensure_graph(torch.randn(4, 10))


def test_a_batch_norm_of_the_raw_input_with_pruned_channels_keeps_prefix_width(monkeypatch):
    """Its channels are input positions (never renumbered): it runs its full-width view, the layers after it
    still run at prefix width."""
    model, shape = _trained("input_bn")
    bn = next(g for g in model.graph.groups if g.input_normalizer)
    assert bn.raw_positions and bool((bn.task_state == -1).any() | (bn.task_state > 0).any())
    model.eval()
    x = torch.randn((16,) + shape)
    calls = _count_narrow(model, monkeypatch)
    with torch.no_grad():
        for t in range(3):
            assert model.narrow_eval_blocked_by(x, task=t) is None
            assert torch.equal(model(x, task=t), _full_width(model, x, t))
    assert calls == [0, 1, 2]


class _InputSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0, self.l1, self.l2 = nn.BatchNorm1d(12), nn.Linear(12, 12), nn.Linear(12, 8)

    def forward(self, x):
        h = self.bn0(x)
        return F.relu(self.l2(F.relu(self.l1(h)) + h))


def test_a_layer_coupled_with_the_raw_inputs_batch_norm_keeps_its_positions():
    """A residual add couples l1's neurons with raw input positions: finish_task must not renumber them (the
    input cannot move), so the finished task computes what it trained; prefix width is off for such a body."""
    torch.manual_seed(0)
    model = EideticNetwork(_InputSkip(), 8)
    model.prepare_for_task(0, 3)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(16, 12, generator=g) + torch.arange(12.0)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(3, (16,), generator=g)).backward()
        opt.step()
    for grp in model.groups:
        free = (grp.task_state == FREE).nonzero().flatten()
        grp.prune(free[::2])
    probe = torch.randn(8, 12, generator=g) + torch.arange(12.0)
    model.eval()
    with torch.no_grad():
        before = model(probe)
    model.finish_task()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(probe, task=0), before, rtol=1e-5, atol=1e-5)
    assert "coupled with a batch norm of the raw input" in model.narrow_eval_blocked_by(probe)


def test_backward_hooks_and_overridden_logits_run_at_full_width(monkeypatch):
    model, shape = _trained("mlp", tasks=2)
    model.eval()
    x = torch.randn((4,) + shape)
    layer = next(iter(model.graph.layers.values()))
    handle = layer.register_full_backward_hook(lambda m, gi, go: None)
    assert "hooks" in model.narrow_eval_blocked_by(x)
    handle.remove()
    assert model.narrow_eval_blocked_by(x) is None

    class Scaled(EideticNetwork):
        def logits(self, features, task=None):
            return super().logits(features, task) / 10

    model.__class__ = Scaled
    assert "overrides" in model.narrow_eval_blocked_by(x)
    with torch.no_grad():
        assert torch.equal(model(x, task=0), _full_width(model, x, 0))


class _Apply(nn.Module):
    """A function or tensor method between layers (traced as a call, not as a module)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


# CPU kernels of these round an element differently in their vectorised loop and in its scalar remainder, so its
# bits depend on the tensor's width (measured: Mish and Softplus differ from full width at prefix width)
_ROUNDED_BY_WIDTH = {
    "SiLU": nn.SiLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "ELU": nn.ELU, "Mish": nn.Mish,
    "Softplus": nn.Softplus, "F.silu": lambda: _Apply(F.silu), "torch.sigmoid": lambda: _Apply(torch.sigmoid),
    ".exp()": lambda: _Apply(lambda h: (-h.abs()).exp()), "** 1.5": lambda: _Apply(lambda h: torch.relu(h) ** 1.5),
}
# exactly rounded: the same bits on either path
_EXACT = {
    "ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "Hardswish": nn.Hardswish, "ReLU6": nn.ReLU6,
    "Hardtanh": nn.Hardtanh, "Softsign": nn.Softsign, "** 2": lambda: _Apply(lambda h: h ** 2),
}


@pytest.mark.parametrize("name", list(_ROUNDED_BY_WIDTH) + list(_EXACT))
def test_activations_whose_rounding_depends_on_width_run_at_full_width(name, monkeypatch):
    """A finished task keeps its bits whichever path evaluates it: at prefix width only when every op between
    the layers rounds the same at any width; the network's eval mode carries over to the next task's head."""
    act = {**_ROUNDED_BY_WIDTH, **_EXACT}[name]
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(20, 37), act(), nn.Linear(37, 29), act()), 29)
    _finish_tasks(model, (20,), tasks=2)
    x = torch.randn(13, 20, generator=torch.Generator().manual_seed(1))
    model.eval()
    blocked = model.narrow_eval_blocked_by(x)
    calls = _count_narrow(model, monkeypatch)
    with torch.no_grad():
        before = [model(x, task=t) for t in range(2)]
        for t in range(2):
            assert torch.equal(before[t], _full_width(model, x, t)), (name, t)
        model.prepare_for_task(2, 3)  # in eval mode, as the network is: the same path as before
        assert not model.heads[2].training
        for t in range(2):
            assert torch.equal(model(x, task=t), before[t]), (name, t)
    if name in _ROUNDED_BY_WIDTH:
        assert blocked is not None and "rounding depends on the tensor's width" in blocked, blocked
        assert calls == []
    else:
        assert blocked is None and calls == [0, 1, 0, 1]


@pytest.mark.parametrize("name", ["SiLU", "ReLU"])
def test_a_graph_saved_before_the_rounding_check_is_checked_on_load(name):
    """A state dict whose layer graph was recorded before ops that round by width were looked for: the body's
    code is looked at on load, so a SiLU body runs at full width and a ReLU body keeps prefix width."""
    act = {**_ROUNDED_BY_WIDTH, **_EXACT}[name]
    body = lambda: nn.Sequential(nn.Linear(20, 37), act(), nn.Linear(37, 29), act())
    torch.manual_seed(0)
    model = EideticNetwork(body(), 29)
    _finish_tasks(model, (20,), tasks=2)
    state = model.state_dict()
    spec = state["_extra_state"]["graph"]
    assert spec.pop("rounding_checked") is True
    spec["narrow_blocked_by"] = None  # as recorded then
    loaded = EideticNetwork(body(), 29)
    loaded.load_state_dict(state)
    loaded.eval()
    x = torch.randn(13, 20)
    blocked = loaded.narrow_eval_blocked_by(x)
    if name == "SiLU":
        assert blocked is not None and "module body.1" in blocked and "rounding depends" in blocked, blocked
    else:
        assert blocked is None
    model.eval()
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(loaded(x, task=t), _full_width(model, x, t))


def _upsampling_cnn(middle):
    """Conv -> ReLU -> ``middle`` -> Conv -> ReLU -> global average pool: 12 channels, so the finished tasks'
    prefixes (6 and 9 channels) are narrower than a vector of floats."""
    return nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU(), middle, nn.Conv2d(12, 12, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


_CHANNELS_LAST = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
# body, input transform, network transform, a word of the reason (None: prefix width is kept)
_WIDTH_CASES = {
    "bilinear Upsample": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), None, None, "bilinear"),
    "F.interpolate bicubic": (lambda: _Apply(lambda h: F.interpolate(h, scale_factor=2, mode="bicubic")), None,
                              None, "bicubic"),
    ".contiguous(channels_last)": (lambda: _Apply(_CHANNELS_LAST), None, None, "memory format"),
    "channels_last input": (nn.Identity, _CHANNELS_LAST, None, "input is channels_last"),
    "channels_last network": (nn.Identity, None, lambda m: m.to(memory_format=torch.channels_last),
                              "is channels_last"),
    "nearest Upsample": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), None, None, None),
}


@pytest.mark.parametrize("name", list(_WIDTH_CASES))
def test_interpolation_and_channels_last_run_at_full_width(name, monkeypatch):
    """Interpolation that weighs neighbours is vectorised by channel count, and so are pooling and means over
    channels_last activations (measured: adaptive average pooling of 6 channels_last channels differs from the
    first 6 of 12 in the last bit): such a finished task runs at full width, so forward(x, task=t) and the
    full-width view that predict reads give the same bits. Nearest upsampling copies values: prefix width."""
    middle, on_input, on_model, reason = _WIDTH_CASES[name]
    torch.manual_seed(0)
    model = EideticNetwork(_upsampling_cnn(middle()), 12)
    if on_model is not None:
        model = on_model(model)
    _finish_tasks(model, (3, 8, 8), tasks=2)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if on_input is not None:
        x = on_input(x)
    model.eval()
    blocked = model.narrow_eval_blocked_by(x)
    calls = _count_narrow(model, monkeypatch)
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(model(x, task=t), _full_width(model, x, t)), (name, t)
    if reason is None:
        assert blocked is None and calls == [0, 1]
    else:
        assert blocked is not None and reason in blocked, blocked
        assert calls == []


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn_maxpool"])
def test_a_first_task_that_keeps_no_neuron_of_a_layer_is_said_and_still_evaluates(conv):
    """Task 0 pruned by hand to no neuron of a layer: finish_task says its outputs no longer depend on the input,
    forward(x, task=0) gives the full-width view (the head's biases; prefix width 0 raised IndexError, or the
    pooling's error on 0 channels), and export names the empty layer."""
    import warnings

    from python_layers import CapacityWarning, GraphError

    torch.manual_seed(0)
    if conv:
        body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten())
        x, dim = torch.randn(4, 3, 4, 4), 32
    else:
        body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 12))
        x, dim = torch.randn(4, 5), 12
    model = EideticNetwork(body, dim)
    model.prepare_for_task(0, 2)
    model.ensure_graph(x)
    first, second = model.groups
    first.prune(torch.arange(2, first.size))
    second.prune(torch.arange(second.size))
    with pytest.warns(CapacityWarning, match=r"task 0 kept no neuron of body.2 \(nor does an earlier task\)"):
        model.finish_task()
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(x, task=0)
        assert torch.equal(got, _full_width(model, x, 0))
        assert torch.equal(got, model.heads[0].frozen_bias.expand(4, -1))
    assert "keeps no neuron of tasks <= 0" in model.narrow_eval_blocked_by(x, task=0)
    with pytest.raises(GraphError, match="export: task 0's logits read no neuron of the body, so they are its "
                                         "head's biases whatever the input"):
        model.export(0)


def test_kept_block_views_follow_the_storages():
    """Frozen blocks keep their views of the compact storage between calls: the storages autocast casts per call
    are read instead of them, a load_state_dict (in place) is read by the next call, and so is a frozen storage
    replaced by another tensor; under inference_mode the views kept are ordinary tensors that a later training
    step may save for backward."""
    def finished(seed):
        torch.manual_seed(seed)
        model = EideticNetwork(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()), 16)
        _finish_tasks(model, (8,), tasks=3)
        return model.eval()

    model, other = finished(0), finished(1)
    x = torch.randn(6, 8)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):  # storages cast per call: never kept
            low = [model(x, task=t) for t in range(3)]
        for _ in range(3):  # kept from the second call on
            mine = [model(x, task=t) for t in range(3)]
        with torch.autocast("cpu", torch.bfloat16):  # the casts are read, not the kept float32 views
            assert all(torch.equal(model(x, task=t), low[t]) for t in range(3))
        model.load_state_dict(other.state_dict())
        for t in range(3):
            assert torch.equal(model(x, task=t), other(x, task=t))
        layer = model.body[2]
        layer.frozen_weight = layer.frozen_weight * 2  # another tensor: read, not the kept views
        assert not torch.equal(model(x, task=2), other(x, task=2))
        layer.frozen_weight = other.body[2].frozen_weight.clone()
        assert torch.equal(model(x, task=2), other(x, task=2))
    with torch.inference_mode():
        for _ in range(2):
            kept = [model(x, task=t) for t in range(3)]
    model.prepare_for_task(3, 3)
    model.train()
    xi = x.clone().requires_grad_()
    model(xi, task=3).sum().backward()  # saves frozen blocks' views for the input gradient
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(model(x, task=t), kept[t]) for t in range(3))
    assert mine[0].shape == kept[0].shape


def _finish_keeping(model, shape, keep: float, tasks: int = 2):
    """Finish ``tasks`` tasks, each keeping the first ``keep`` share of every group's FREE neurons."""
    for t in range(tasks):
        model.prepare_for_task(t, 3)
        for grp in model.groups:
            free = (grp.task_state == FREE).nonzero().flatten()
            grp.prune(free[max(1, int(keep * free.numel())):])
        model.finish_task()


def test_prefix_widths_follow_the_states_of_a_loaded_checkpoint(monkeypatch):
    """Prefix widths are cached per task until a layer's states change: after loading a checkpoint whose task 0
    kept other neurons, task 0 runs at that checkpoint's widths and gives its logits, bit for bit."""
    shape = BODIES["cnn"][1]
    models = []
    for keep in (0.5, 0.25):
        torch.manual_seed(0)
        body, feature_dim = BODIES["cnn"][0]()
        model = EideticNetwork(body, feature_dim)
        model.ensure_graph(torch.zeros((2,) + shape))
        _finish_keeping(model, shape, keep)
        models.append(model.eval())
    a, b = models
    x = torch.randn((8,) + shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a(x, task=0)  # caches a's widths
        before = dict(a._narrow_widths(0))
        a.load_state_dict(b.state_dict())
        calls = _count_narrow(a, monkeypatch)
        got = a(x, task=0)
    widths = a._narrow_widths(0)
    assert widths == a._compute_narrow_widths(0, a.heads[0], a._graph_layers + [a.heads[0]]) != before
    assert calls == [0] and torch.equal(got, _full_width(a, x, 0))
    with torch.no_grad():
        assert torch.equal(got, b(x, task=0))
