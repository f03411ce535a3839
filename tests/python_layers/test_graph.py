"""The traced layer graph: groups, couplings, what every layer reads, and clear errors.

The provenance the tracer finds is checked against the forward pass itself: pruning one neuron
must turn exactly the consumer inputs marked PRUNED into zeros (an independent computation).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import FREE, PRUNED, EideticLayer, EideticLinear
from python_layers import EideticNetwork, GraphError, declare_graph, trace_body


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.2), nn.Linear(7, 6), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(6, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 6))


class Block(nn.Module):
    """Basic residual block; a projection skip when the width changes, identity otherwise."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj = None
        if c_in != c_out:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.proj is None else self.proj(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = Block(4, 6)
        self.block2 = Block(6, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)
        self.out = nn.Linear(7, 4)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), self.b(x).tanh()], dim=1))


class FunctionalCNN(nn.Module):
    """Flatten written as view(size(0), -1), functional pooling and activations, a scalar op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        x = F.avg_pool2d(F.leaky_relu(self.conv(x)) * 2.0, 2)
        return self.fc(x.view(x.size(0), -1))


def names(group):
    return [n for n, _ in group.members]


def check_provenance_by_forward(body, x, graph):
    """For every group: prune one neuron; the consumer inputs that become exactly 0 are the ones marked PRUNED."""
    body.eval()
    layers = graph.layers
    consumers = {name: layers[name] for name in graph.inputs}

    def capture(model):
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, inp[0].detach()))
                 for n, layer in ((n, dict(model.named_modules())[n]) for n in consumers)]
        out = model(x).detach()
        for h in hooks:
            h.remove()
        return seen, out

    before, out_before = capture(body)
    gen = torch.Generator().manual_seed(1)
    for gi in range(len(graph.groups)):
        pruned_body = copy.deepcopy(body)
        pruned_graph = copy.deepcopy(graph)  # same structure; re-point to the copy's layers
        memo_layers = dict(pruned_body.named_modules())
        for g in pruned_graph.groups:
            g.members = [(n, memo_layers[n]) for n, _ in g.members]
        pruned_graph.inputs = {n: (memo_layers[n], segs) for n, (_, segs) in pruned_graph.inputs.items()}
        group = pruned_graph.groups[gi]
        neuron = int(torch.randint(group.size, (1,), generator=gen))
        group.prune([neuron])
        after, out_after = capture(pruned_body)
        for name in consumers:
            marked = memo_layers[name].input_task == PRUNED
            dims = [0] + list(range(2, after[name].dim()))
            zero_now = (after[name] == 0).all(dim=tuple(dims)) if after[name].dim() > 1 else after[name] == 0
            nonzero_before = (before[name] != 0).any(dim=tuple(dims)) if before[name].dim() > 1 else before[name] != 0
            assert bool(nonzero_before[marked].all()), "test set-up: a marked feature was already all zero"
            assert torch.equal(marked, zero_now & nonzero_before), (group.name, neuron, name)
        feat_marked = pruned_graph.feature_task() == PRUNED
        zero_feat = (out_after == 0).all(0) & (out_before != 0).any(0)
        assert torch.equal(feat_marked, zero_feat)


def test_mlp_with_dropout():
    torch.manual_seed(0)
    body = mlp()
    graph = trace_body(body, torch.randn(8, 5))
    assert [names(g) for g in graph.groups] == [["0"], ["3"], ["6"]]
    assert graph.raw_input_layers == {"0"}
    assert graph.feature_dim == 4
    reads = {n: [(s.source.name if s.source else None, s.count, s.repeat) for s in segs]
             for n, (_, segs) in graph.inputs.items()}
    assert reads == {"0": [(None, 5, 1)], "3": [("0", 7, 1)], "6": [("3", 6, 1)]}
    check_provenance_by_forward(body, torch.randn(16, 5), graph)


def test_cnn_conv_bn_relu_conv_pool_flatten_linear():
    torch.manual_seed(0)
    body = cnn()
    x = torch.randn(8, 3, 6, 6)
    graph = trace_body(body, x)
    assert [names(g) for g in graph.groups] == [["0", "1"], ["3"], ["6"]]  # BN joins its conv
    (_, segs) = graph.inputs["6"]
    assert [(s.source.name, s.count, s.repeat) for s in segs] == [("3", 4, 9)]  # each channel covers 3x3 inputs
    check_provenance_by_forward(body, x, graph)


def test_sync_inputs_after_pruning_a_conv_channel():
    torch.manual_seed(0)
    body = cnn()
    graph = trace_body(body, torch.randn(2, 3, 6, 6))
    graph.groups[1].prune([2])  # conv "3", channel 2
    fc = graph.layers["6"]
    expected = torch.full((36,), FREE, dtype=torch.int16)
    expected[2 * 9:3 * 9] = PRUNED  # channel-major flatten: channel 2 covers inputs 18..26
    assert torch.equal(fc.input_task, expected)
    graph.groups[1].unprune([2])
    assert bool((fc.input_task == FREE).all())
    # freezing the first group for task 0 shows up in the second conv's inputs
    graph.groups[0].freeze(0)
    assert bool((graph.layers["3"].input_task == 0).all())


def test_functional_ops_view_flatten():
    torch.manual_seed(0)
    body = FunctionalCNN()
    x = torch.randn(8, 2, 6, 6)
    graph = trace_body(body, x)
    (_, segs) = graph.inputs["fc"]
    assert [(s.source.name, s.count, s.repeat) for s in segs] == [("conv", 3, 4)]
    check_provenance_by_forward(body, x, graph)


def test_resnet_projection_and_identity_skips_are_coupled():
    torch.manual_seed(0)
    body = ResNet()
    x = torch.randn(8, 3, 5, 5)
    graph = trace_body(body, x)
    groups = {g.name: set(names(g)) for g in graph.groups}
    # block1: conv2/bn2 and the projection conv/bn are added -> one group; block2's identity skip couples its
    # input (block1's output group) with its output (block2.conv2/bn2)
    residual = {"block1.conv2", "block1.bn2", "block1.proj.0", "block1.proj.1", "block2.conv2", "block2.bn2"}
    assert residual in groups.values()
    assert {"block1.conv1", "block1.bn1"} in groups.values()
    assert {"block2.conv1", "block2.bn1"} in groups.values()
    assert {"stem"} in groups.values() and {"fc"} in groups.values()
    assert len(graph.groups) == 5
    assert graph.raw_input_layers == {"stem"}
    check_provenance_by_forward(body, x, graph)


def test_cat_concatenates_segments():
    torch.manual_seed(0)
    body = Cat()
    x = torch.randn(16, 5)
    graph = trace_body(body, x)
    (_, segs) = graph.inputs["out"]
    assert [(s.source.name, s.count) for s in segs] == [("a", 4), ("b", 3)]
    assert graph.raw_input_layers == {"a", "b"}
    graph.group_of("b").prune([1])
    assert graph.layers["out"].input_task.tolist() == [FREE] * 5 + [PRUNED] + [FREE]
    graph.group_of("b").unprune([1])
    check_provenance_by_forward(body, x, graph)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4, elementwise_affine=False)

    def forward(self, x):
        return self.norm(self.fc(x))


class WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.fc2(h)


@pytest.mark.parametrize("body, fragment", [
    (WithLayerNorm(), "norm (LayerNorm) is a norm over the features, which EideticNetwork cannot support"),
    (WithSoftmax(), "softmax"),
    (DataDependent(), "control flow"),
])
def test_untraceable_body_is_a_clear_error(body, fragment):
    with pytest.raises(GraphError) as info:
        trace_body(body, torch.randn(3, 4))
    assert fragment in str(info.value)
    # a norm across neurons cannot be declared safe; the others may be right as written
    assert ("declare_graph" in str(info.value)) == (not isinstance(body, WithLayerNorm))


def test_a_bad_first_batch_raises_what_the_layer_raises(capfd):
    """The batch that traces the graph gets the same error as any later batch: the layer's own TypeError /
    ValueError (what to cast, which size), not a tracing error, and no traceback printed on the way."""
    model = EideticNetwork(nn.Sequential(nn.Linear(8, 32), nn.ReLU()), 32)
    model.prepare_for_task(0, 2)
    with pytest.raises(TypeError, match="float64 but the weights are torch.float32"):
        model(torch.randn(4, 8, dtype=torch.float64), task=0)
    with pytest.raises(ValueError, match=r"EideticLinear 'body.0' expects input.shape\[-1\] == 8, got shape \(4, 9\)"):
        model(torch.randn(4, 9), task=0)
    assert "Traceback" not in capfd.readouterr().err
    assert model(torch.randn(4, 8), task=0).shape == (4, 2)


def test_an_unbatched_first_input_is_a_clear_error():
    """The graph is traced on the first batch: one sample there (which a conv body runs, as nn.Conv2d takes
    [C, H, W]) is named as such with the fix, for conv and MLP bodies; traced on a batch, the body then takes
    unbatched inputs as its torch twin does."""
    def conv_body():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(-3),
                             nn.Linear(8, 16), nn.ReLU())

    conv = EideticNetwork(conv_body(), 16)
    conv.prepare_for_task(0, 2)
    with pytest.raises(GraphError, match=r"body.0 \(EideticConv2d\) reads an unbatched input \(3, 8, 8\).*"
                                         r"batched \[N, C, H, W\].*x.unsqueeze\(0\)"):
        conv(torch.randn(3, 8, 8))
    mlp = EideticNetwork(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), 16)
    mlp.prepare_for_task(0, 2)
    with pytest.raises(GraphError, match=r"shape \(64,\); expected a batch \[N, features, \.\.\.\].*unsqueeze"):
        mlp(torch.randn(64))
    traced = EideticNetwork(conv_body(), 16)
    traced.prepare_for_task(0, 2)
    traced(torch.randn(2, 3, 8, 8))
    assert traced(torch.randn(3, 8, 8)).shape == (2,)


def test_raw_input_residual_and_misaligned_add_are_errors():
    class RawSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + x

    with pytest.raises(GraphError, match="raw network input"):
        trace_body(RawSkip(), torch.randn(2, 4))

    class Mismatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 2), nn.Linear(4, 3), nn.Linear(4, 5)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1) + self.c(x)

    with pytest.raises(GraphError, match="do not line up"):
        trace_body(Mismatch(), torch.randn(2, 4))


def test_declare_graph_by_hand():
    torch.manual_seed(0)
    body = DataDependent()
    graph = declare_graph(body, inputs={"fc1": "raw", "fc2": ["fc1"]}, features=["fc2"])
    assert [names(g) for g in graph.groups] == [["fc1"], ["fc2"]]
    assert graph.raw_input_layers == {"fc1"}
    assert isinstance(body.fc1, EideticLinear)  # converted in place
    graph.groups[0].prune([3])
    assert graph.layers["fc2"].input_task.tolist() == [FREE] * 3 + [PRUNED] + [FREE] * 2

    # the CNN declared by hand equals the traced graph
    body = cnn()
    declared = declare_graph(body, inputs={"0": "raw", "3": ["0"], "6": [("3", 9)]}, features=["6"],
                             couple=[["0", "1"]])
    traced = trace_body(copy.deepcopy(body), torch.randn(2, 3, 6, 6))
    assert [names(g) for g in declared.groups] == [names(g) for g in traced.groups]
    for n in traced.inputs:
        a = [(s.source.name if s.source else None, s.count, s.repeat) for s in declared.inputs[n][1]]
        b = [(s.source.name if s.source else None, s.count, s.repeat) for s in traced.inputs[n][1]]
        assert a == b

    with pytest.raises(GraphError, match="no inputs given"):
        declare_graph(mlp(), inputs={"0": "raw"}, features=["6"])
    with pytest.raises(GraphError, match="reads 36 features"):
        declare_graph(cnn(), inputs={"0": "raw", "3": ["0"], "6": ["3"]}, features=["6"], couple=[["0", "1"]])
    with pytest.raises(GraphError, match="same number of neurons"):
        declare_graph(cnn(), inputs={"0": "raw", "3": ["0"], "6": [("3", 9)]}, features=["6"], couple=[["0", "3"]])


def test_a_graph_declared_on_the_body_exports():
    """declare_graph on the body names its layers without the network's "body." prefix (its docstring's example):
    export finds them by layer, not by name."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
    model = EideticNetwork(body, 8, graph=declare_graph(body, inputs={"0": "raw", "2": ["0"]}, features=["2"]))
    x = torch.randn(4, 8)
    model.prepare_for_task(0, 2)
    model.graph.groups[0].prune([1, 5])
    model.finish_task()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.export(0, example=x)(x), model(x, task=0))


def test_declared_graph_in_a_network():
    torch.manual_seed(0)
    body = DataDependent()
    # names relative to the network ("body.fc1"): declare on a wrapper holding the body
    holder = nn.Module()
    holder.body = body
    graph = declare_graph(holder, inputs={"body.fc1": ("raw", 4), "body.fc2": ["body.fc1"]}, features=["body.fc2"])
    model = EideticNetwork(body, 3, graph=graph)
    model.prepare_for_task(0, 2)
    assert model.graph is graph
    assert model(torch.randn(5, 4)).shape == (5, 2)
    assert set(model.capacity()) == {"body.fc1", "body.fc2"}


@pytest.mark.filterwarnings("ignore::eidetic_kernels.FreeInputsWarning")  # states built by hand
def test_group_state_changes_reach_every_member():
    torch.manual_seed(0)
    body = ResNet()
    graph = trace_body(body, torch.randn(2, 3, 5, 5))
    g = graph.group_of("block1.proj.1")
    g.prune([0, 3])
    for _, layer in g.members:
        assert isinstance(layer, EideticLayer)
        assert layer.task_state.tolist() == [PRUNED, FREE, FREE, PRUNED, FREE, FREE]
    assert g.freeze(0) == 4
    assert g.recycle() == 2
    for _, layer in g.members:
        assert layer.task_state.tolist() == [FREE, 0, 0, FREE, 0, 0]
    assert len(g.weight_members()) == 3  # block1.conv2, block1.proj.0, block2.conv2
    with pytest.raises(ValueError, match="only FREE neurons"):
        g.prune([1])


class LayerScale(nn.Module):
    """A residual branch scaled by a [C] buffer written on the left (gamma * h: torch.fx records gamma.mul(h))."""

    def __init__(self, left: bool):
        super().__init__()
        self.left = left
        self.c = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 6)
        self.register_buffer("gamma", torch.full((6,), 0.5))

    def forward(self, x):
        h = torch.relu(self.c(x))
        branch = self.gamma * self.fc(h) if self.left else self.fc(h) * self.gamma
        return h + branch


def test_a_constant_on_the_left_of_an_op_is_followed():
    """gamma * h couples as h * gamma does (it was taken for a constant: the branch's layer was left out of the
    residual coupling, and gamma * h fed to a layer was 'not computed from the input')."""
    x = torch.randn(8, 5)
    graphs = {left: trace_body(LayerScale(left), x) for left in (True, False)}
    for graph in graphs.values():
        assert [sorted(names(g)) for g in graph.groups] == [["c", "fc"]]
        assert graph.renumber_blocked_by is not None  # a per-feature constant ties values to positions

    class Fed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Linear(5, 6), nn.Linear(6, 3)
            self.register_buffer("gamma", torch.full((), 2.0))

        def forward(self, x):
            return self.fc(self.gamma * torch.relu(self.c(x)))

    graph = trace_body(Fed(), x)
    assert [s.source.name for s in graph.inputs["fc"][1]] == ["c"]


class StepCounter(nn.Module):
    """A warm-up factor kept in a buffer that the forward advances while training."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.step += 1
        return torch.relu(self.fc(x)) * torch.clamp(self.step / 50, max=1.0)


def test_a_body_that_writes_its_buffers_is_refused():
    """Such a buffer changes every task's outputs as training goes on: refused when the graph is traced in
    training mode (the buffer set back), and found at the next task's start when it was traced in eval mode."""
    x = torch.randn(8, 5)
    body = StepCounter()
    with pytest.raises(GraphError, match=r"writes its buffer\(s\) step .*belongs in the training loop"):
        trace_body(body, x)
    assert body.step.item() == 0  # the trace left no trace
    torch.manual_seed(0)
    model = EideticNetwork(StepCounter(), 6)
    model.prepare_for_task(0, 2)
    model.eval()
    model(x)  # traced in eval mode: the branch that writes is not seen
    model.train()
    model(x)
    model.groups[0].prune([0, 1, 2])
    model.finish_task()
    model.eval()
    before = model(x, task=0)
    model.train()
    model.prepare_for_task(1, 2)
    model(x)  # task 0's outputs would change with the buffer now
    model.eval()
    assert not torch.equal(model(x, task=0), before)
    with pytest.raises(RuntimeError, match=r"buffer\(s\) body.step of the body changed after task 0 finished "
                                           r"\(task 1 trained\).*set back"):
        model.finish_task()
    assert torch.equal(model(x, task=0), before)  # set back
    model.body.step = torch.zeros(2)  # re-registered with another shape
    with pytest.raises(RuntimeError, match="body.step"):
        model.finish_task()
    assert model.body.step.shape == () and torch.equal(model(x, task=0), before)


class _Normalised(nn.Module):
    """An input normalisation with its constants in buffers (as the CLI's bodies have)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((5,), 0.1307))
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        return torch.relu(self.fc(x - self.mean))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_body_buffer_re_registered_in_another_dtype_is_set_back_with_its_dtype(dtype):
    """Rounded to float16, the buffer equals the recorded values cast to it; in float64 it holds them exactly but
    changes the dtype of what it computes: both are found, and go back as float32, bit for bit. A cast of the whole
    network is no change: it casts the record too."""
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    model = EideticNetwork(_Normalised(), 6)
    model.prepare_for_task(0, 2)
    model(x)
    model.groups[0].prune([0, 1, 2])
    model.finish_task()
    model.eval()
    before = model(x, task=0)
    model.body.mean = model.body.mean.to(dtype)
    with pytest.raises(RuntimeError, match=r"body.mean of the body changed after task 0 finished.*and dtype"):
        model.prepare_for_task(1, 2)
    assert model.body.mean.dtype == torch.float32 and torch.equal(model(x, task=0), before)
    model.double()  # the network's own cast: recorded again, nothing refused
    model.prepare_for_task(1, 2)
    assert model.body.mean.dtype == torch.float64
    assert torch.allclose(model(x.double(), task=0), before.double(), atol=1e-6)


class LayerDrop(nn.Module):
    """Blocks skipped while training as LayerDrop does (here: the second one, as a random draw may)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.c = nn.Linear(5, 6)
        self.skip = 1

    def forward(self, x):
        h = torch.relu(self.c(x))
        for i, block in enumerate(self.blocks):
            if self.training and i == self.skip:
                continue
            h = h + torch.relu(block(h))
        return h


def test_a_layer_the_traced_batch_did_not_run_refuses_to_run():
    """It belongs to no group, so nothing would freeze it: running it later (another batch's draw, eval mode)
    would let weights later tasks train reach finished tasks. It is a clear error instead."""
    x = torch.randn(8, 5)
    torch.manual_seed(0)
    model = EideticNetwork(LayerDrop(), 6)
    model.prepare_for_task(0, 2)
    model(x)
    assert "body.blocks.1" not in model.body_layers()
    model.body.skip = 0  # the next draw skips the other block
    with pytest.raises(RuntimeError, match=r"'body.blocks.1' is in an EideticNetwork but not in its layer graph "
                                           r"\(it did not run when the graph was traced, in training mode"):
        model(x)
    model.eval()
    with pytest.raises(RuntimeError, match="LayerDrop"):
        model(x)
    # a layer never called stays harmless
    model = EideticNetwork(LayerDrop(), 6)
    model.body.unused = nn.Linear(3, 3)
    model.prepare_for_task(0, 2)
    model(x)
    model.groups[0].prune([0])
    model.finish_task()


def test_a_body_that_cannot_convert_is_left_as_it_was():
    """A grouped convolution after convertible layers: the error comes before any layer is replaced, through
    EideticNetwork and through eidetic_kernels.convert."""
    from eidetic_kernels import convert
    for make in (lambda body: EideticNetwork(body, 4), convert):
        body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
        kinds = [type(m) for m in body]
        with pytest.raises(ValueError, match=r"cannot convert .*3.*Nothing was converted"):
            make(body)
        assert [type(m) for m in body] == kinds


class Spatial(nn.Module):
    """Resizing, padding and instance normalisation between layers: each channel's values from its own."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3)
        self.norm = nn.InstanceNorm2d(5)
        self.pad = nn.ZeroPad2d(1)
        self.wrap = nn.CircularPad2d((0, 0, 1, 1))
        self.up = nn.Upsample(scale_factor=2)
        self.c2 = nn.Conv2d(5, 4, 3)

    def forward(self, x):
        h = self.up(self.wrap(self.pad(F.relu(self.norm(self.c1(x))))))
        h = F.interpolate(F.pad(h, (1, 1, 1, 1)), size=(9, 9), mode="bilinear")
        return F.relu(self.c2(h)).mean((2, 3))


def test_resizing_padding_and_instance_norm_are_followed():
    torch.manual_seed(0)
    body, x = Spatial(), torch.randn(4, 3, 6, 6)
    graph = trace_body(body, x)
    assert [s.source.name for s in graph.inputs["c2"][1]] == ["c1"]
    check_provenance_by_forward(body, x, graph)
    # a finished task keeps its outputs through the next task's training, and exports exactly
    model = EideticNetwork(Spatial(), 4)
    model.prepare_for_task(0, 2)
    model(x)
    for group in model.groups:
        group.prune([0, 2])
    model.finish_task()
    model.eval()
    before = model(x, task=0)
    model.prepare_for_task(1, 2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    model.eval()
    assert torch.equal(model(x, task=0), before)
    torch.testing.assert_close(model.export(0, example=x)(x), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(GraphError, match="track_running_stats=False"):
        trace_body(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True),
                                 nn.Flatten()), x)


class _Glu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(5, 8)

    def forward(self, x):
        a, b = self.c(x).chunk(2, 1)
        return a * torch.sigmoid(b)


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(5, 4)

    def forward(self, x):
        h = self.c(x)
        return h, h.detach()


class _BnAfterCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(5, 3), nn.Linear(5, 3), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class _Stacked(nn.Module):
    """Features inside a list argument (torch.stack([h, h])): read as a constant before, so the residual add
    coupled nothing and a finished task's full-width view moved when later tasks trained."""

    def __init__(self, stack):
        super().__init__()
        self.a, self.b, self.stack = nn.Linear(5, 4), nn.Linear(4, 4), stack

    def forward(self, x):
        h = torch.relu(self.a(x))
        return torch.relu(self.b(h)) + self.stack([h, h]).mean(0)


@pytest.mark.parametrize("body, shape, says", [
    (_Glu(), (3, 5), "splits, indexes or slices a tensor of features.*use two layers"),
    (_Stacked(torch.stack), (3, 5), r"torch.stack .*stacks tensors of features.*torch.cat along the channel dim"),
    (_Stacked(torch.vstack), (3, 5), r"torch.vstack .*stacks tensors of features"),
    (_Stacked(lambda hs: torch.einsum("nc,nc->nc", hs)[None]), (3, 5), "einsum .*may mix features"),
    (_TupleOut(), (3, 5), "return the features alone"),
    (_BnAfterCat(), (3, 5), "put one batch norm on each branch before torch.cat"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, return_indices=True)), (3, 3, 6, 6), "return_indices=False"),
])
def test_errors_say_what_to_change(body, shape, says):
    with pytest.raises(GraphError, match=says):
        trace_body(body, torch.randn(shape))


class _Norm(nn.Module):
    """A conv, then a norm given as ``norm(h)``, then a head-ready flatten."""

    def __init__(self, norm):
        super().__init__()
        self.c, self.norm = nn.Conv2d(1, 4, 3), norm

    def forward(self, x):
        return self.norm(torch.relu(self.c(x))).flatten(1)


@pytest.mark.parametrize("norm", [
    nn.LayerNorm((4, 4, 4)), nn.LayerNorm((4, 4, 4), elementwise_affine=False), nn.GroupNorm(2, 4),
    nn.GroupNorm(2, 4, affine=False), nn.LocalResponseNorm(2), lambda h: F.layer_norm(h, h.shape[1:]),
    lambda h: F.group_norm(h, 2), lambda h: F.rms_norm(h, h.shape[1:]),
], ids=["LayerNorm", "LayerNorm_no_affine", "GroupNorm", "GroupNorm_no_affine", "LocalResponseNorm", "F.layer_norm",
        "F.group_norm", "F.rms_norm"])
def test_a_norm_across_neurons_is_refused_as_unsupportable(norm):
    """A norm whose statistics run over the channels is refused first for what it is (no per-neuron state
    can make it safe), with or without parameters, and the error points to BatchNorm, not to declare_graph."""
    body = _Norm(norm) if isinstance(norm, nn.Module) else _Norm(_Call(norm))
    with pytest.raises(GraphError, match="which EideticNetwork cannot support: it normalises across the neurons") as e:
        model = EideticNetwork(body, 64)
        model.prepare_for_task(0, 3)
        model(torch.randn(2, 1, 6, 6))  # the graph is traced on the first batch
    assert "BatchNorm1d/2d" in str(e.value) and "declare_graph" not in str(e.value)


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 4, affine=False), lambda h: F.group_norm(h, 4)],
                         ids=["GroupNorm", "F.group_norm"])
def test_a_group_norm_with_one_channel_per_group_points_to_instance_norm(norm):
    body = _Norm(norm) if isinstance(norm, nn.Module) else _Norm(_Call(norm))
    with pytest.raises(GraphError, match="one channel per group, which is an instance norm: use nn.InstanceNorm"):
        trace_body(body, torch.randn(2, 1, 6, 6))


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


@pytest.mark.parametrize("norm", [
    nn.LayerNorm((4, 4), elementwise_affine=False), nn.RMSNorm(4, elementwise_affine=False),
    lambda h: F.layer_norm(h, (4, 4)), lambda h: F.layer_norm(h, h.shape[2:]), lambda h: F.instance_norm(h),
], ids=["LayerNorm_spatial", "RMSNorm_last_dim", "F.layer_norm_spatial", "F.layer_norm_shape_2", "F.instance_norm"])
def test_a_norm_over_each_channel_alone_is_followed_and_keeps_the_promise(norm):
    """A layer norm over the spatial dims only reads each channel alone: it is followed like InstanceNorm2d,
    and finished tasks keep their bits (narrow evaluation of earlier tasks included)."""
    from tests.python_layers.test_renumbering import _finish_tasks

    body = _Norm(norm) if isinstance(norm, nn.Module) else _Norm(_Call(norm))
    assert [names(g) for g in trace_body(copy.deepcopy(body), torch.randn(2, 1, 6, 6)).groups] == [["c"]]
    torch.manual_seed(0)
    _finish_tasks(EideticNetwork(body, 64), (1, 6, 6), tasks=2)  # asserts each finished task's bits


class _Writes(nn.Module):
    """Buffer writes in forward: ``how`` says which."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Linear(5, 6)
        self.register_buffer("buf", torch.zeros(6))
        self.register_buffer("built", torch.zeros((), dtype=torch.bool))
        self.register_buffer("memory", torch.zeros(3, 6))  # one row per sample of a batch of 3

    def forward(self, x):
        h = torch.relu(self.c(x))
        if self.how == "rebind":
            self.buf = self.buf + 1  # a new tensor under the buffer's name
        elif self.how == "in place":
            self.memory.add_(h)  # torch.fx records it (its operand is traced), and the shape pass would run it
        elif self.how == "once" and not self.built:  # a table filled on the first call, then fixed
            self.buf.copy_(torch.arange(6.0))
            self.built.fill_(True)
        return h * self.buf


@pytest.mark.parametrize("how, says", [("rebind", r"writes its buffer\(s\) buf on every call"),
                                       ("in place", "writes features into a buffer or constant in place")])
def test_buffer_writes_are_refused_and_leave_the_body_as_it_was(how, says):
    body = _Writes(how)
    kept = body.buf
    with pytest.raises(GraphError, match=says):
        trace_body(body, torch.randn(3, 5))
    assert body.buf is kept and torch.equal(body.buf, torch.zeros(6)) and not body.memory.any()


def test_a_buffer_filled_once_on_the_first_call_is_accepted():
    body = _Writes("once")
    graph = trace_body(body, torch.randn(3, 5))
    assert [names(g) for g in graph.groups] == [["c"]]
    assert torch.equal(body.buf, torch.arange(6.0)) and body.built  # filled, as the first real call would

    class Lazy(nn.Module):  # the same with a Python flag: a failed trace must not undo the fill behind it
        def __init__(self):
            super().__init__()
            self.c, self.ready = nn.Linear(5, 6), False
            self.register_buffer("scale", torch.zeros(6))

        def forward(self, x):
            if not self.ready:
                self.scale.fill_(1.0)
                self.ready = True
            return torch.relu(self.c(x)) * self.scale

    lazy = Lazy()
    with pytest.raises(ValueError, match="expects input.shape"):
        trace_body(lazy, torch.randn(3, 4))
    trace_body(lazy, torch.randn(3, 5))
    assert lazy.ready and torch.equal(lazy.scale, torch.ones(6))


@pytest.mark.filterwarnings("ignore:input's size at dim")
def test_more_ops_of_the_tracer():
    """Spatial crops, maximum as a method, a keyword operand, an InstanceNorm on a tensor torch reads as
    unbatched (refused), and NaN in a complex buffer (equal to itself)."""
    from python_layers.graph import same_values

    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.register_buffer("floor", torch.zeros(4, 1, 1))

        def forward(self, x):
            h = torch.relu(self.c1(x))[:, :, 1:-1, 1:]
            h = h[..., :-1]
            h = self.floor.maximum(h).add(other=self.c2(h))
            return h.mean((2, 3))

    graph = trace_body(Ops(), torch.randn(2, 3, 6, 6))
    assert [sorted(names(g)) for g in graph.groups] == [["c1", "c2"]]
    with pytest.raises(GraphError, match="splits, indexes or slices"):
        trace_body(nn.Sequential(nn.Linear(5, 4), _Index()), torch.randn(3, 5))
    with pytest.raises(GraphError, match=r"normalises a 3-D tensor .*unbatched"):
        trace_body(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(2), nn.InstanceNorm2d(4)), torch.randn(2, 3, 6, 6))
    z = torch.tensor([complex(float("nan"), 0.0), 1j])
    assert same_values(z, z.clone()) and not same_values(z, z.conj())


def _saved(model):
    import io
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


class _SEGate(nn.Module):
    """A conv block with a squeeze-and-excitation gate whose [N, C] gate gets its unit dims by indexing."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        g = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3))))))
        return (h * self.index(g)).mean((2, 3))


_GATE_INDEX = {"spelled": lambda g: g[:, :, None, None], "ellipsis": lambda g: g[..., None, None]}


@pytest.mark.parametrize("spell", ["spelled", "ellipsis"])
def test_unit_dims_added_by_indexing_are_followed_and_keep_the_promise(spell):
    """``g[:, :, None, None]`` (an SE gate) keeps the channel dim: it couples the excitation with the conv it
    gates, and finished tasks keep their bits while later tasks train, NaN in free capacity included."""
    from tests.python_layers.test_renumbering import _finish_tasks

    graph = trace_body(_SEGate(_GATE_INDEX[spell]), torch.randn(2, 1, 6, 6))
    assert sorted(sorted(names(g)) for g in graph.groups) == [["bn", "conv", "excite"], ["squeeze"]]
    torch.manual_seed(0)
    model = EideticNetwork(_SEGate(_GATE_INDEX[spell]), 8)
    _finish_tasks(model, (1, 6, 6), tasks=2)
    probe = torch.randn(5, 1, 6, 6)
    model.eval()
    with torch.no_grad():
        before = [model(probe, task=t).clone() for t in range(2)]
    model.prepare_for_task(2, 3)
    with torch.no_grad():
        for p in model.parameters():  # the trainable storage only: every FREE neuron and the new head
            p.fill_(float("nan"))
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(model(probe, task=t), before[t]), (spell, t)
    # an index that moves or cuts the channel dim, or moves the batch dim, is still refused
    for bad in (lambda g: g[:, None], lambda g: g[:, :2, None], lambda g: g[None], lambda g: g[..., None, :]):
        with pytest.raises(GraphError, match="splits, indexes or slices"):
            trace_body(_IndexThenFlatten(bad), torch.randn(3, 5))


class _GateOnConcat(nn.Module):
    """Two conv branches concatenated, then gated (or added to) by one layer's outputs."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 5, 3, padding=1)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.skip = nn.Conv2d(1, 8, 1)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        if self.op == "gate":
            g = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3))))))
            h = h * g[:, :, None, None]
        else:
            h = h + self.skip(x)
        return h.mean((2, 3))


@pytest.mark.parametrize("op", ["gate", "add"])
def test_one_layer_combined_with_a_concatenation_says_to_combine_per_branch(op):
    with pytest.raises(GraphError, match=r"combines features from .*cannot be coupled with a concatenation of "
                                         r"several layers.*to each branch before the concatenation"):
        trace_body(_GateOnConcat(op), torch.randn(2, 1, 6, 6))


class _IndexThenFlatten(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.fc, self.index = nn.Linear(5, 4), index

    def forward(self, x):
        return self.index(self.fc(x)).flatten(1)


class _Index(nn.Module):
    def forward(self, h):
        return h[:, :2]


def test_a_layer_added_after_the_graph_was_traced_refuses_to_run():
    x = torch.randn(8, 5)
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(5, 6), nn.ReLU()), 6)
    model.prepare_for_task(0, 2)
    model(x)
    model.groups[0].prune([0, 1])
    model.finish_task()
    with pytest.raises(GraphError, match="cannot add module '2' .* whose layer graph is traced"):
        model.body.append(nn.Linear(6, 6))
    assert len(model.body) == 2
    with pytest.raises(GraphError, match="cannot add module"):
        model.extra = nn.Linear(6, 6)  # the network's own modules are its body too, heads and router aside
    with pytest.raises(GraphError, match="cannot remove module '1' from the body"):
        setattr(model.body, "1", None)
    model.criterion = nn.CrossEntropyLoss()  # a new name, no parameter, no layer: not part of the body's work
    with pytest.raises(GraphError, match="cannot add module 'body'"):
        model.body = nn.Identity()  # replacing what the traced forward runs, parameters or not
    model.adapters = nn.ModuleList()
    with pytest.raises(GraphError, match="cannot add module"):
        model.adapters.append(nn.Linear(6, 6))  # guarded like the body from then on
    shallow = copy.copy(model)  # shares the containers: the original keeps its guard after the copy is gone
    del shallow
    import gc
    gc.collect()
    with pytest.raises(GraphError, match="cannot add module"):
        model.body.append(nn.Linear(6, 6))
    copied = copy.deepcopy(model.body)
    copied.append(nn.Linear(6, 6))  # a copy is no longer that network's body
    for again in (torch.load(_saved(model), weights_only=False), copy.deepcopy(model)):  # copies keep the guard
        with pytest.raises(GraphError, match="cannot add module"):
            again.body.append(nn.Linear(6, 6))
    # one slipped in past torch's registration hook is refused before anything changes; undone, all runs again
    model.body._modules["2"] = EideticLinear(6, 6)
    with pytest.raises(GraphError, match=r"body \(Sequential\) was edited .*EideticLinear '2' added"):
        model.prepare_for_task(1, 2)
    assert model.current_task is None and len(model.heads) == 1
    del model.body._modules["2"]
    model.prepare_for_task(1, 2)
    model(x)


def _edits():
    """(name, edit, undo) of a traced body ``Sequential(Linear, ReLU, Sequential(Linear, ReLU))`` that bypass
    torch's module-registration hook."""
    kept = {}  # what an edit took out, per network
    def insert(model):
        model.body.insert(1, nn.Dropout(0.5))

    def undo_insert(model):
        del model.body[1]

    def delete(model):
        kept[id(model)] = model.body[1]
        del model.body[1]

    def undo_delete(model):
        model.body._modules = dict(zip(map(str, range(4)), [model.body[0], kept[id(model)], model.body[1],
                                                              model.body[2]]))

    def pop_inner(model):
        kept[id(model)] = model.body[2].pop(1)

    def undo_pop_inner(model):
        model.body[2]._modules["1"] = kept[id(model)]

    def swap(model):
        m = model.body._modules
        m["1"], m["3"] = m["3"], m["1"]

    def drop_body(model):
        kept[id(model)] = model.body
        del model.body

    def undo_drop_body(model):
        model._modules["body"] = kept[id(model)]

    return [("insert", insert, undo_insert, "Dropout '1' added"), ("del", delete, undo_delete, "ReLU '1' removed"),
            ("pop", pop_inner, undo_pop_inner, "ReLU '1' removed"), ("swap", swap, swap, "reordered"),
            ("del body", drop_body, undo_drop_body, "Sequential 'body' removed")]


@pytest.mark.parametrize("case", _edits(), ids=lambda c: c[0])
def test_editing_a_traced_body_past_the_registration_hook_is_refused_and_undone_runs_again(case):
    """A container's insert/del/pop (or a hand edit of its _modules) bypasses torch's registration hook: the next
    forward refuses it (every view, narrow or not, and a new task), nothing is changed, and undoing the edit makes
    the network compute what it did before, bit for bit."""
    _, edit, undo, what = case
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    body = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Identity())
    model = EideticNetwork(body, 6)
    model.prepare_for_task(0, 2)
    model(x)
    for group in model.groups:
        group.prune([0, 1])
    model.finish_task()
    model.prepare_for_task(1, 2)
    model.eval()
    before = model(x, task=0)
    hooked = copy.deepcopy(model)
    hooked.body[0].register_forward_hook(lambda *a: None)  # hooks: full width, through features()
    assert hooked.narrow_eval_blocked_by(x) is not None and model.narrow_eval_blocked_by(x) is None
    for net in (model, hooked):
        edit(net)
        for call in (lambda: net(x, task=0), lambda: net(x), lambda: net.features(x, view_task=0)):
            with pytest.raises(GraphError, match=f"edited after the layer graph was traced .*{what}.*undo the edit"):
                call()
        undo(net)
        assert torch.equal(net(x, task=0), before)
        net.train()
        net(x).sum().backward()
    for group in model.groups:
        group.prune((group.task_state == FREE).nonzero().flatten()[:2])
    model.finish_task()
    edit(model)
    with pytest.raises(GraphError, match="edited after the layer graph was traced"):
        model.prepare_for_task(2, 2)
    assert model.current_task is None
    undo(model)
    model.prepare_for_task(2, 2)
    assert torch.equal(model.eval()(x, task=0), before)


class _Masked(nn.Module):
    """Comparisons, torch.where and masked_fill between layers: elementwise, so they couple what they combine."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 12), nn.Linear(12, 12), nn.Linear(10, 12)

    def forward(self, x):
        h = self.a(x)
        h = torch.where(h > 0, h, 0.1 * h)  # a leaky ReLU written by hand
        g = self.b(h).masked_fill(h < -0.5, 0.0)
        return torch.where(g >= 0, g, self.c(x)) + (h != 0) * h


def test_comparisons_where_and_masked_fill_are_followed_and_keep_the_promise():
    """Refused before as ops that "may mix features". Each feature operand is coupled with the others (as by an
    add): one group here. Finished tasks keep their bits through later finishes (_finish_tasks checks), and
    prefix width gives the full-width view's bits."""
    from tests.python_layers.test_renumbering import _finish_tasks

    torch.manual_seed(0)
    model = EideticNetwork(_Masked(), 12)
    _finish_tasks(model, (10,), tasks=3)
    assert [g.name for g in model.groups] == ["body.a"]
    assert sorted(name for name, _ in model.groups[0].members) == ["body.a", "body.b", "body.c"]
    model.eval()
    x = torch.randn(7, 10)
    assert model.narrow_eval_blocked_by(x) is None
    with torch.no_grad():
        for t in range(3):
            assert torch.equal(model(x, task=t), model.logits(model.features(x, view_task=t), t))


class _RawInputOps(nn.Module):
    """Ops on the raw input alone, which belongs to no neuron: split into the inputs of two branches, halves
    swapped by a cat of a split, a softmax over the input features."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 12), nn.Linear(4, 12), nn.Linear(12, 12)

    def forward(self, x):
        u, v = x.split(4, dim=1)
        swapped = torch.cat(x.chunk(2, 1)[::-1], 1)
        h = torch.relu(self.a(u)) + torch.relu(self.b(swapped[:, :4].softmax(1) + v))
        return torch.relu(self.c(h))


class _ChannelsLastInput(nn.Module):
    """Channels-last images made [N, C, H, W] in forward; features rolled and flipped along spatial dims."""

    def __init__(self, channels=3):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x.permute(0, 3, 1, 2)))
        h = torch.roll(h, 1, dims=2).flip(-1)
        return torch.relu(self.c2(h)).mean((2, 3))


def _unshuffled():
    """A stateless module on the raw input: PixelUnshuffle makes 12 channels of 3."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def _channels_last_gray():
    """One channel permuted from [N, H, W, 1]: contiguous as well, yet torch's convolutions return channels_last."""
    return _ChannelsLastInput(channels=1)


@pytest.mark.parametrize("body, shape", [(_RawInputOps, (8,)), (_ChannelsLastInput, (6, 6, 3)),
                                         (_channels_last_gray, (6, 6, 1)), (_unshuffled, (3, 6, 6))],
                         ids=["raw_split", "channels_last_input", "channels_last_one_channel", "pixel_unshuffle"])
def test_ops_on_the_raw_input_and_spatial_rolls_are_followed_and_keep_the_promise(body, shape):
    """Refused before ("splits, indexes or slices a tensor of features", "may mix features"). Finished tasks keep
    their bits through later finishes (_finish_tasks checks) and with NaN in every trainable parameter, and
    forward(x, task=t) gives the full-width view's bits (prefix width where it is on)."""
    from tests.python_layers.test_renumbering import _finish_tasks

    torch.manual_seed(0)
    model = EideticNetwork(body(), 12 if body is _RawInputOps else 8)
    _finish_tasks(model, shape, tasks=2)
    model.eval()
    x = torch.randn(5, *shape)
    blocked = model.narrow_eval_blocked_by(x)
    if body in (_ChannelsLastInput, _channels_last_gray):  # channels innermost: evaluated at full width
        assert blocked is not None and "channels_last" in blocked, blocked
    else:
        assert blocked is None, blocked
    with torch.no_grad():
        before = [model(x, task=t).clone() for t in range(2)]
        for t in range(2):
            assert torch.equal(before[t], model.logits(model.features(x, view_task=t), t))
        # a hook on a body layer runs the full-width view: the same bits
        handle = next(iter(model.graph.layers.values())).register_forward_hook(lambda m, i, o: None)
        try:
            for t in range(2):
                assert torch.equal(model(x, task=t), before[t])
        finally:
            handle.remove()
    model.prepare_for_task(2, 3)
    with torch.no_grad():
        for p in model.parameters():  # the trainable storage only: every FREE neuron and the new head
            p.fill_(float("nan"))
        for t in range(2):
            assert torch.equal(model(x, task=t), before[t])


class _Moved(nn.Module):
    def __init__(self, move):
        super().__init__()
        self.move = move
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c2(self.move(torch.relu(self.c1(x))))).mean((2, 3))


@pytest.mark.parametrize("move", [lambda h: h.roll(1, 1), lambda h: h.roll(1), lambda h: torch.flip(h, (1, 2)),
                                  lambda h: h.flip(0)], ids=["roll_channels", "roll_flat", "flip_channels",
                                                             "flip_batch"])
def test_rolls_and_flips_that_move_values_across_neurons_are_refused(move):
    with pytest.raises(GraphError, match="may mix features"):
        trace_body(_Moved(move), torch.randn(2, 3, 6, 6))


def test_an_op_on_the_raw_input_that_writes_a_buffer_is_refused():
    """F.batch_norm of the raw input with the body's own buffers as running statistics: the op writes them
    in training, and every task reads them. Not taken for a raw-input op."""
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(6))
            self.register_buffer("var", torch.ones(6))
            self.a = nn.Linear(6, 4)

        def forward(self, x):
            return self.a(F.batch_norm(x, self.mean, self.var, training=self.training))

    with pytest.raises(GraphError, match="batch_norm"):
        trace_body(Body(), torch.randn(3, 6))
