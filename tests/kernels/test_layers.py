"""Drop-in layers: twin equivalence, freezing by construction, memory, state_dict, errors, dispatch."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import eidetic_kernels as ek
from eidetic_kernels import FREE, PRUNED, EideticBatchNorm1d, EideticBatchNorm2d, EideticConv2d, EideticLinear
from eidetic_kernels import backends
from tests.helpers import gradcheck_fast


def _twins():
    torch.manual_seed(0)
    return [
        (nn.Linear(13, 7), torch.randn(5, 13)),
        (nn.Linear(13, 7, bias=False), torch.randn(2, 3, 13)),
        (nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.randn(2, 3, 9, 7)),
        (nn.Conv2d(3, 5, (3, 2), dilation=2, bias=False), torch.randn(2, 3, 9, 8)),
        (nn.Conv2d(3, 5, 3, padding="same"), torch.randn(2, 3, 6, 6)),
        (nn.BatchNorm1d(6), torch.randn(8, 6)),
        (nn.BatchNorm1d(6, momentum=None), torch.randn(8, 6, 4)),
        (nn.BatchNorm2d(5), torch.randn(4, 5, 3, 3)),
        (nn.BatchNorm2d(5, affine=False), torch.randn(4, 5, 3, 3)),
        (nn.BatchNorm2d(5, track_running_stats=False), torch.randn(4, 5, 3, 3)),
    ]


@pytest.mark.parametrize("index", range(10))
@pytest.mark.parametrize("training", [True, False])
def test_same_output_and_grads_as_twin_while_free(index, training):
    twin, x = _twins()[index]
    twin.train(training)
    layer = ek.convert(copy.deepcopy(twin))
    assert type(layer).__name__.startswith("Eidetic")
    layer.train(training)
    for _ in range(2):  # twice: running statistics must evolve the same way
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = twin(xa), layer(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        # fp32 gradients: BN's dx cancels terms, so a fused backend may differ by ~1e-6 absolute
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(getattr(layer, name).grad, p.grad, rtol=1e-4, atol=1e-5)
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buf)
    op = {"EideticLinear": "linear", "EideticConv2d": "conv2d"}.get(type(layer).__name__, "batch_norm")
    assert layer.last_backend == backends.select(op, x.device)  # whichever backend the dispatch chose ran


def test_constructor_defaults_match_twins():
    assert EideticLinear(3, 4).bias is not None
    c = EideticConv2d(3, 4, 3)
    assert (c.stride, c.padding, c.dilation, c.groups) == ((1, 1), (0, 0), (1, 1), 1)
    bn = EideticBatchNorm2d(4)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)


def test_convert_replaces_every_supported_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Sequential(nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8)), nn.Linear(8, 2))
    x = torch.randn(3, 3, 6, 6)
    model.eval()
    before = model(x)
    converted = ek.convert(model)
    kinds = [type(m).__name__ for m in converted.modules()]
    assert not any(k in ("Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d") for k in kinds)
    assert kinds.count("EideticLinear") == 2
    torch.testing.assert_close(converted(x), before)


def test_grouped_conv_is_a_clear_error():
    with pytest.raises(ValueError, match="groups=1 only"):
        EideticConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="cannot convert 0.*groups=1"):
        ek.convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)))


@pytest.mark.parametrize("mode, pad_class", [("reflect", "ReflectionPad2d"), ("replicate", "ReplicationPad2d"),
                                             ("circular", "CircularPad2d")])
@pytest.mark.parametrize("padding", [1, (1, 2)])
def test_a_padding_mode_other_than_zeros_names_the_pad_module_that_computes_the_same(mode, pad_class, padding):
    """The error gives the pad module and its arguments; running that pad before a padding=0 conv gives the
    padded conv's output."""
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
    with pytest.raises(ValueError, match=rf"cannot convert 0.*padding_mode='zeros' only.*nn\.{pad_class}") as caught:
        ek.convert(nn.Sequential(conv))
    message = str(caught.value)
    pad = eval(message[message.index("nn." + pad_class):message.index(" and give the conv padding=0")], {"nn": nn})
    unpadded = nn.Conv2d(2, 3, 3, padding=0)
    unpadded.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 7, 9)
    torch.testing.assert_close(unpadded(pad(x)), conv(x), rtol=1e-5, atol=1e-6)


def _freeze_some(layer, generator):
    """Prune, freeze (task 0), recycle, then freeze some of the recycled as task 1: a realistic mix."""
    n = layer.num_neurons
    perm = torch.randperm(n, generator=generator)
    layer.prune_neurons(perm[: n // 2])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons(generator)
    free = (layer.task_state == FREE).nonzero().flatten()
    layer.prune_neurons(free[: len(free) // 2])
    layer.freeze_free_neurons(1)
    layer.recycle_pruned_neurons(generator)
    layer.prune_neurons((layer.task_state == FREE).nonzero().flatten()[:1])
    return layer


def _frozen_values(layer):
    frozen = (layer.task_state >= 0) & (layer.task_state != FREE)
    vals = {"task_state": layer.task_state.clone()}
    for name in ("weight", "bias"):
        if getattr(layer, name, None) is not None:
            vals[name] = layer.dense(name)[frozen].clone()
    for name in ("running_mean", "running_var"):
        if getattr(layer, name, None) is not None:
            vals[name] = getattr(layer, name)[frozen].clone()
    return vals


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
], ids=["adamw", "sgd"])
def test_frozen_neurons_never_change_under_any_optimizer(make_optimizer):
    g = torch.Generator().manual_seed(0)
    conv, bn = EideticConv2d(3, 8, 3, padding=1), EideticBatchNorm2d(8)
    lin = EideticLinear(8 * 5 * 5, 6)
    for layer in (conv, lin):
        _freeze_some(layer, g)
    _freeze_some(bn, torch.Generator().manual_seed(0))
    before = [_frozen_values(m) for m in (conv, bn, lin)]
    params = [p for m in (conv, bn, lin) for p in m.parameters()]
    frozen_ptrs = {b.data_ptr() for m in (conv, bn, lin) for n, b in m.named_buffers() if n.startswith("frozen_")}
    assert not frozen_ptrs & {p.data_ptr() for p in params}
    opt = make_optimizer(params)
    for step in range(50):
        x = torch.randn(4, 3, 5, 5) * 3 + 1
        y = lin(torch.relu(bn(conv(x))).flatten(1))
        # a loss that pushes every weight (and every output) away from where it is
        loss = (y - 10).square().mean() + sum((p - 5).square().sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [_frozen_values(m) for m in (conv, bn, lin)]
    for b, a in zip(before, after):
        for k in b:
            assert torch.equal(b[k], a[k]), k


@pytest.mark.parametrize("make", [lambda: (EideticLinear(256, 384), nn.Linear(256, 384)),
                                  lambda: (EideticConv2d(64, 96, 3), nn.Conv2d(64, 96, 3))])
def test_layer_bytes_within_two_percent_of_twin_at_any_freezing_state(make):
    layer, twin = make()

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    limit = 1.02 * nbytes(twin)
    g = torch.Generator().manual_seed(1)
    assert nbytes(layer) <= limit
    layer.prune_neurons(torch.arange(0, layer.num_neurons, 3))
    assert nbytes(layer) <= limit
    layer.freeze_free_neurons(0)
    assert nbytes(layer) <= limit
    layer.recycle_pruned_neurons(g)
    layer.freeze_free_neurons(1)
    assert nbytes(layer) <= limit
    # no buffer is weight-shaped except the frozen rows themselves
    for name, b in layer.named_buffers():
        assert b.dim() == 1 or name == "frozen_weight"


def test_batch_norm_state_is_six_bytes_per_channel():
    """int16 task state + int32 batch count at the last recycling (the cumulative average restarts per channel);
    without running statistics only the task state."""
    for kwargs, per_channel in (({}, 6), ({"track_running_stats": False}, 2)):
        bn, twin = EideticBatchNorm2d(64, **kwargs), nn.BatchNorm2d(64, **kwargs)
        extra = sum(t.numel() * t.element_size() for t in list(bn.parameters()) + list(bn.buffers())) - \
            sum(t.numel() * t.element_size() for t in list(twin.parameters()) + list(twin.buffers()))
        assert extra == per_channel * 64


def test_state_dict_round_trip_is_exact():
    g = torch.Generator().manual_seed(2)
    for make in (lambda: EideticLinear(9, 12), lambda: EideticConv2d(3, 10, 3), lambda: EideticBatchNorm2d(10)):
        a = make()
        if hasattr(a, "input_task"):  # inputs from earlier tasks, PRUNED and FREE ones: compact frozen rows
            a.set_input_task(torch.tensor([-1, 0, 1, FREE])[torch.randint(4, a.input_task.shape, generator=g)]
                             .to(torch.int16))
        a = _freeze_some(a, g)
        b = make()
        b.load_state_dict(a.state_dict())
        assert torch.equal(a.task_state, b.task_state)
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
        x = torch.randn((4, 9) if isinstance(a, EideticLinear) else (4, 3 if isinstance(a, EideticConv2d) else 10, 6, 6))
        a.eval(), b.eval()
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("index", range(10))
def test_a_twins_state_dict_loads_strictly_where_no_neuron_is_frozen(index):
    """A torch.nn state dict (pretrained weights, say) loads into the converted layer as into the twin: strict,
    no eidetic key asked for, the same function afterwards; the neuron states stay (here: all FREE)."""
    twin, x = _twins()[index]
    twin.train()
    twin(x)  # batch norms: running statistics that are not the defaults
    twin.eval()
    layer = ek.convert(copy.deepcopy(twin))
    with torch.no_grad():  # the layer's own values, which the load must replace
        for t in list(layer.parameters()) + [b for b in layer.buffers() if b.is_floating_point()]:
            t.uniform_(-1, 1)
    assert not layer.load_state_dict(twin.state_dict()).missing_keys
    layer.eval()
    assert torch.equal(layer(x), twin(x))
    assert bool((layer.task_state == FREE).all())
    # inside a module: the same, and a partial (strict=False) load reports only the twin's own missing keys
    net = ek.convert(nn.Sequential(copy.deepcopy(twin), nn.ReLU()))
    assert not net.load_state_dict(nn.Sequential(twin, nn.ReLU()).state_dict()).missing_keys
    first = next(iter(twin.state_dict()))
    result = net.load_state_dict({"0." + first: twin.state_dict()[first]}, strict=False)
    assert sorted(result.missing_keys) == sorted("0." + k for k in twin.state_dict() if k != first)


@pytest.mark.parametrize("strict", [True, False])
def test_a_twins_state_dict_is_refused_where_neurons_are_frozen(strict):
    g = torch.Generator().manual_seed(4)
    for twin, layer in ((nn.Linear(9, 12), _freeze_some(EideticLinear(9, 12), g)),
                        (nn.Conv2d(3, 10, 3), _freeze_some(EideticConv2d(3, 10, 3), g)),
                        (nn.BatchNorm2d(10), _freeze_some(EideticBatchNorm2d(10), g))):
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        net = nn.Sequential(layer)
        with pytest.raises(RuntimeError, match=r"0: this looks like a torch.nn \w+ state dict .* frozen neurons "
                                                r"whose weights it would overwrite; nothing was loaded"):
            net.load_state_dict(nn.Sequential(twin).state_dict(), strict=strict)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_a_meta_layer_takes_a_state_dict_with_assign():
    """Built on the meta device, a layer takes an eidetic state dict with ``assign=True`` (the states and the
    storages of the dict, frozen ones included); a torch.nn twin's dict, which has no states, is a clear error."""
    g = torch.Generator().manual_seed(5)
    for make, x in ((lambda: EideticLinear(9, 12), torch.randn(4, 9)),
                    (lambda: EideticConv2d(3, 10, 3), torch.randn(2, 3, 6, 6)),
                    (lambda: EideticBatchNorm2d(10), torch.randn(4, 10, 3, 3))):
        source = _freeze_some(make(), g).eval()
        with torch.device("meta"):
            layer = make()
        layer.load_state_dict(source.state_dict(), assign=True)
        assert torch.equal(layer.eval()(x), source(x))
        with torch.device("meta"):
            layer = make()
        twin = {k: v for k, v in source.state_dict().items() if not k.startswith(("frozen_", "task_state",
                                                                                   "min_input", "input_task"))}
        with pytest.raises(RuntimeError, match=r"meta device.*to_empty\(device=\.\.\.\) and reset_parameters"):
            layer.load_state_dict(twin, assign=True)


def test_on_the_meta_device_a_layer_infers_shapes_as_its_twin_and_refuses_state_changes():
    for make, twin, shape in ((lambda **k: EideticLinear(6, 5, **k), lambda **k: nn.Linear(6, 5, **k), (3, 6)),
                              (lambda **k: EideticConv2d(3, 4, 3, stride=2, **k),
                               lambda **k: nn.Conv2d(3, 4, 3, stride=2, **k), (2, 3, 7, 7)),
                              (lambda **k: EideticBatchNorm2d(3, **k), lambda **k: nn.BatchNorm2d(3, **k),
                               (2, 3, 5, 5))):
        x = torch.randn(*shape, device="meta")
        want = twin(device="meta")(x)
        for layer in (make(device="meta"), make().to("meta"), make(device="meta").eval()):
            got = layer(x)
            assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
        layer = make(device="meta")
        for call, name in ((lambda: layer.prune_neurons([0]), "prune_neurons"),
                           (lambda: layer.freeze_free_neurons(0), "freeze_free_neurons"),
                           (lambda: layer.recycle_pruned_neurons(), "recycle_pruned_neurons")):
            with pytest.raises(RuntimeError, match=rf"{name} changes neuron states, which a layer on the meta device "
                                                   r"does not hold: call to_empty\(device=\.\.\.\) and "
                                                   r"reset_parameters\(\)"):
                call()
    with pytest.raises(IndexError, match=r"neuron index out of range \[0, 5\) \(indices count from 0"):
        EideticLinear(6, 5).prune_neurons([-1])


def test_inputs_of_frozen_neurons_cannot_change():
    layer = EideticLinear(6, 4)
    layer.set_input_task(torch.tensor([0, 0, 1, FREE, PRUNED, 2], dtype=torch.int16))
    layer.prune_neurons([3])
    layer.freeze_free_neurons(1)  # reads inputs of tasks 0 and 1
    x = torch.randn(3, 6)
    before = layer(x)
    ok_before = layer.input_task.clone()
    for j, state in ((0, PRUNED), (2, FREE), (3, 1), (4, 0)):
        bad = layer.input_task.clone()
        bad[j] = state
        with pytest.raises(ValueError, match=rf"input {j} cannot change from .*: neurons frozen for task 1 read "
                                             r"inputs of tasks 0\.\.1.*Nothing was changed"):
            layer.set_input_task(bad)
        assert torch.equal(layer.input_task, ok_before)
    ok = layer.input_task.clone()
    ok[3], ok[4], ok[5] = PRUNED, FREE, 3  # FREE/PRUNED producers and later tasks: no frozen neuron reads them
    layer.set_input_task(ok)
    assert torch.equal(layer(x)[:, :3], before[:, :3])


def test_state_dict_mismatch_is_a_clear_error():
    a = _freeze_some(EideticLinear(9, 12), torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="task_state has 12 entries, expected 13"):
        EideticLinear(9, 13).load_state_dict(a.state_dict())
    sd = a.state_dict()
    sd["task_state"] = torch.full((12,), FREE, dtype=torch.int16)  # states disagree with the storage
    with pytest.raises(RuntimeError, match="frozen of 12 neurons"):
        EideticLinear(9, 12).load_state_dict(sd)
    sd["task_state"] = torch.full((12,), 40000, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside"):
        EideticLinear(9, 12).load_state_dict(sd)


@pytest.mark.parametrize("make", [lambda: EideticLinear(6, 5), lambda: EideticConv2d(3, 5, 3),
                                  lambda: EideticBatchNorm2d(5)])
def test_a_partial_load_never_leaves_storage_unwritten(make):
    """strict=False without a storage of the layer: refused where the incoming states freeze other neurons than the
    layer's (its storage would be memory nothing wrote); where they freeze the same ones, the missing storage keeps
    its values, as torch leaves a missing key."""
    torch.manual_seed(0)
    src = make()
    src.prune_neurons([1, 3]); src.freeze_free_neurons(0); src.recycle_pruned_neurons()
    for drop in [k for k in src.state_dict() if k in ("weight", "bias", "frozen_weight", "frozen_bias")]:
        sd = {k: v for k, v in src.state_dict().items() if k != drop}
        dst = make()
        before = copy.deepcopy(dst.state_dict())
        with pytest.raises(RuntimeError, match=rf"{drop} is missing, and the neuron states in task_state \(3 frozen "
                                               rf"of 5\) are not this layer's.*nothing was loaded into it"):
            dst.load_state_dict(sd, strict=False)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, before[k]), k
        same = make()  # the same neurons frozen, values of its own
        same.prune_neurons([1, 3]); same.freeze_free_neurons(0); same.recycle_pruned_neurons()
        kept = getattr(same, drop).clone()
        result = same.load_state_dict(sd, strict=False)
        assert result.missing_keys == [drop]
        assert torch.equal(getattr(same, drop), kept)
        for k, v in sd.items():
            assert torch.equal(same.state_dict()[k], v), k
    # nothing frozen: the empty frozen storage holds no value that could be missing (also into a meta layer)
    fresh = {k: v for k, v in make().state_dict().items() if not k.startswith("frozen_")}
    with torch.device("meta"):
        meta = make()
    assert sorted(meta.load_state_dict(fresh, strict=False, assign=True).missing_keys) == sorted(
        k for k in make().state_dict() if k.startswith("frozen_"))
    assert not meta.task_state.is_meta


def test_bad_inputs_are_clear_errors():
    lin = EideticLinear(5, 3)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] == 5"):
        lin(torch.randn(2, 4))
    with pytest.raises(TypeError, match="float64 but the weights are torch.float32"):
        lin(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta but the weights are on cpu"):
        lin(torch.randn(2, 5, device="meta"))
    with pytest.raises(ValueError, match="expected 5"):
        lin.set_input_task(torch.zeros(4, dtype=torch.int16))
    with pytest.raises(ValueError, match="outside"):
        lin.set_input_task(torch.tensor([0, 1, 2, 3, -7]))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[C, H, W\]"):
        EideticConv2d(3, 4, 3)(torch.randn(8, 8))  # [C, H, W] is an unbatched input, as for nn.Conv2d
    with pytest.raises(RuntimeError, match=r"unbatched input of shape \[3, H, W\], got shape \(2, 8, 8\)"):
        EideticConv2d(3, 4, 3)(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="4-D input"):
        EideticBatchNorm2d(3)(torch.randn(3, 3))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        EideticBatchNorm1d(3)(torch.randn(3, 3, 2, 2))


@pytest.mark.parametrize("make,twin,bad", [
    (lambda: EideticLinear(5, 3), lambda: nn.Linear(5, 3), torch.randn(2, 4)),
    (lambda: EideticLinear(5, 3), lambda: nn.Linear(5, 3), torch.randn(2, 5, dtype=torch.float64)),
    (lambda: EideticConv2d(3, 4, 3), lambda: nn.Conv2d(3, 4, 3), torch.randn(2, 2, 8, 8)),
    (lambda: EideticConv2d(3, 4, 3), lambda: nn.Conv2d(3, 4, 3), torch.randn(8, 8)),
    (lambda: EideticConv2d(3, 4, 3), lambda: nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8, dtype=torch.float64)),
])
def test_bad_inputs_raise_what_the_twin_raises(make, twin, bad):
    """Code written for the torch.nn twin catches the layer's error with the same except clause."""
    with pytest.raises(Exception) as twin_error:
        twin()(bad)
    with pytest.raises(type(twin_error.value)):
        make()(bad)


def test_frozen_neurons_are_never_pruned_and_tasks_freeze_in_order():
    lin = EideticLinear(4, 6)
    lin.prune_neurons([0, 1])
    lin.freeze_free_neurons(2)
    before = lin.task_state.clone()
    with pytest.raises(ValueError, match="neuron 3 is frozen for task 2; only FREE"):
        lin.prune_neurons([3])
    with pytest.raises(ValueError, match="increasing order"):
        lin.freeze_free_neurons(1)
    assert torch.equal(lin.task_state, before)
    with pytest.raises(IndexError, match="out of range"):
        lin.prune_neurons([6])


@pytest.mark.filterwarnings("error::eidetic_kernels.FreeInputsWarning")
def test_the_manual_state_changes_in_their_order_keep_a_task_and_out_of_order_are_flagged():
    """By hand (no network): producer frozen, consumer wired, consumer frozen keeps task 0's outputs bit for bit.
    Freezing the consumer while its input states still say FREE cuts those synapses: a FreeInputsWarning says
    what to do. A FREE neuron whose min_input_task is above the task it freezes for would read nothing: refused."""
    torch.manual_seed(0)
    l1, l2 = EideticLinear(5, 6), EideticLinear(6, 3)
    x = torch.randn(4, 5)
    l1.prune_neurons([0, 1])
    l2.set_input_task(l1.neuron_task)
    want = l2(torch.relu(l1(x))).detach()
    l1.freeze_free_neurons(0)
    l2.set_input_task(l1.neuron_task)
    l2.freeze_free_neurons(0)
    # a task's own freeze drops its PRUNED columns from the product: its outputs change once, by rounding only
    # (the GEMM's K is 4 instead of 6 with two zero columns; AVX-512 kernels sum those in another order)
    got = l2(torch.relu(l1(x))).detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ... and then never again: recycled neurons, even holding NaN, leave the frozen outputs' bits alone
    l1.recycle_pruned_neurons()
    l2.set_input_task(l1.neuron_task)
    with torch.no_grad():
        l1.weight.fill_(float("nan"))  # the trainable storage: the two recycled neurons only
    assert torch.equal(l2(torch.relu(l1(x))), got)

    a, b = EideticLinear(5, 6), EideticLinear(6, 3)
    a.prune_neurons([0])
    b.set_input_task(a.neuron_task)  # wired before the producer froze: its survivors still FREE here
    a.freeze_free_neurons(0)
    with pytest.warns(ek.FreeInputsWarning, match=r"5 inputs are FREE \(input 1 first\).*freeze their layer "
                                                   r"first, pass its states with set_input_task"):
        warnings.simplefilter("always", ek.FreeInputsWarning)
        b.freeze_free_neurons(0)

    late = EideticLinear(5, 3)
    with pytest.warns(ek.FreeInputsWarning, match=r"set_min_input_task\(1\) leaves its FREE neurons no input to "
                                                   r"read: every input is task 0's.*Keep 0 on a layer reading"):
        warnings.simplefilter("always", ek.FreeInputsWarning)
        late.set_min_input_task(1)
    wired = EideticLinear(5, 3)  # inputs PRUNED now (a producer to recycle) or of the task itself: no warning
    for states in ([0, 0, 0, 0, PRUNED], [0, 1, 1, 0, 0]):
        wired.set_input_task(torch.tensor(states, dtype=torch.int16))
        with warnings.catch_warnings():
            warnings.simplefilter("error", ek.FreeInputsWarning)
            wired.set_min_input_task(1)
    with pytest.raises(ValueError, match=r"FREE neuron 0 has min_input_task 1 > 0.*Nothing was changed"):
        late.freeze_free_neurons(0)
    assert bool((late.task_state == FREE).all())
    for bad in (True, torch.tensor(True), 1.0):
        with pytest.raises(ValueError, match="task must be an int"):
            late.freeze_free_neurons(bad)
    assert late.freeze_free_neurons(np.int64(1)) == 3  # integer scalars are task ids


def test_bad_neuron_indices_and_views_are_clear_errors():
    lin = EideticLinear(4, 5)
    for bad in (torch.tensor([1.7]), [2.9], 0.5):
        with pytest.raises(TypeError, match="neuron indices must be integers or a boolean mask"):
            lin.prune_neurons(bad)
    assert bool((lin.task_state == FREE).all())
    for nothing in ([], ()):  # nothing to prune: no change, no error
        lin.prune_neurons(nothing)
    assert bool((lin.task_state == FREE).all())
    x = torch.randn(2, 4)
    for bad, err, match in ((-1, ValueError, "view_task must be a task id >= 0"),
                            (2.5, TypeError, "view_task must be None or an int task id"),
                            ("0", TypeError, "view_task must be None or an int task id"),
                            (True, TypeError, "view_task must be None or an int task id"),
                            (torch.tensor(True), TypeError, "view_task must be None or an int task id")):
        lin.view_task = bad
        with pytest.raises(err, match=match):
            lin(x)
    lin.view_task = np.int64(0)  # an integer scalar: taken as its int
    assert torch.equal(lin(x), torch.zeros(2, 5))  # nothing is frozen for task 0


def test_convert_keeps_a_shared_layer_one_layer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.enc = nn.Sequential(self.shared, nn.ReLU())

    model = ek.convert(Tied())
    assert model.enc[0] is model.shared and isinstance(model.shared, EideticLinear)
    lin = nn.Linear(4, 4)
    seq = ek.convert(nn.Sequential(lin, nn.ReLU(), lin))  # twice under one parent
    assert isinstance(seq[2], EideticLinear) and seq[0] is seq[2]
    model.shared.prune_neurons([0])
    model.shared.freeze_free_neurons(0)
    assert torch.equal(model.enc[0].neuron_task, model.shared.neuron_task)


@pytest.mark.parametrize("tie", ["embedding", "two linears", "bias"])
def test_convert_refuses_tied_weights_and_leaves_the_model_as_it_was(tie):
    """A tie cannot survive a freeze (the frozen rows move to their own storage), and the other module would go
    on training the frozen rows: refused at convert, before anything is replaced, with the untie to run."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4) if tie == "embedding" else nn.Linear(4, 7)
            self.mid = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.out = nn.Linear(4, 7)
            if tie == "bias":
                self.out.bias = self.emb.bias
            else:
                self.out.weight = self.emb.weight

    model = Tied()
    children = dict(model.named_modules())
    name = "bias" if tie == "bias" else "weight"
    untie = f"model.out.{name} = nn.Parameter(model.emb.{name}.detach().clone())"
    with pytest.raises(ValueError, match=rf"cannot convert (emb|out) \(Linear\): its {name} is tied to "
                                         rf"(emb|out)\.{name}.*Untie them first.*Nothing was converted"):
        ek.convert(model)
    assert dict(model.named_modules()) == children  # nothing was replaced
    message = ""
    try:
        ek.convert(model)
    except ValueError as exc:
        message = str(exc)
    if tie == "embedding":  # the fix the message gives, run as written
        assert f"`{untie}`" in message
        exec(untie, {"nn": nn, "model": model})
        ek.convert(model)
        assert isinstance(model.out, EideticLinear) and model.out.weight is not model.emb.weight
        # a numbered child is indexed, as a user writes it: the line runs as given
        seq = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
        seq[1].weight = seq[0].weight
        with pytest.raises(ValueError) as info:
            ek.convert(seq)
        assert "`model[1].weight = nn.Parameter(model[0].weight.detach().clone())`" in str(info.value)
        exec("model[1].weight = nn.Parameter(model[0].weight.detach().clone())", {"nn": nn, "model": seq})
        assert isinstance(ek.convert(seq)[1], EideticLinear)
    # the same module under two names is one layer, not a tie
    shared = nn.Linear(4, 4)
    assert isinstance(ek.convert(nn.Sequential(shared, nn.ReLU(), shared))[2], EideticLinear)


def _compute_weight(module: nn.Module, kind: str) -> None:
    """Make ``module``'s weight computed: a parametrization, an older norm hook or torch's unstructured pruning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the older hooks are deprecated for the parametrizations
        if kind in ("weight_norm", "spectral_norm"):
            getattr(nn.utils.parametrizations, kind)(module)
        elif kind == "old weight_norm":
            nn.utils.weight_norm(module)
        elif kind == "old spectral_norm":
            nn.utils.spectral_norm(module)
        else:
            nn.utils.prune.l1_unstructured(module, "weight", amount=0.4)


COMPUTED = ["weight_norm", "spectral_norm", "old weight_norm", "old spectral_norm", "prune"]
REMEDY = {"weight_norm": r"torch.nn.utils.parametrize.remove_parametrizations\(layer, 'weight'\)",
          "spectral_norm": r"torch.nn.utils.parametrize.remove_parametrizations\(layer, 'weight'\)",
          "old weight_norm": r"torch.nn.utils.remove_weight_norm\(layer\)",
          "old spectral_norm": r"torch.nn.utils.remove_spectral_norm\(layer\)",
          "prune": r"torch.nn.utils.prune.remove\(layer, 'weight'\)"}


def _remove(module: nn.Module, kind: str) -> None:
    """The remedy the error messages give (REMEDY), run as written."""
    remedy = REMEDY[kind].replace("\\", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        eval(remedy, {"torch": torch}, {"layer": module})


@pytest.mark.parametrize("kind", COMPUTED)
def test_a_parametrized_weight_is_refused_before_any_state_changes(kind):
    lin = EideticLinear(4, 5)
    _compute_weight(lin, kind)
    lin.prune_neurons([0])
    before = lin.task_state.clone()
    with pytest.raises(TypeError, match="freeze_free_neurons cannot run on a layer whose weight is computed by.*"
                                        + REMEDY[kind]):
        lin.freeze_free_neurons(0)
    assert torch.equal(lin.task_state, before)
    x = torch.randn(2, 4)
    lin.eval()  # spectral norm's power iteration moves the weight at every forward in train mode
    want = lin(x).detach()  # still runs as it did
    _remove(lin, kind)  # the remedy given: the same outputs, and states change again
    torch.testing.assert_close(lin(x), want)
    assert lin.freeze_free_neurons(0) == 4


@pytest.mark.parametrize("kind", COMPUTED)
def test_converting_a_layer_whose_weight_is_computed_is_a_clear_error(kind):
    """Before: a raw TypeError from torch (hooks), or the layer left out without a word (parametrizations)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    _compute_weight(model[2], kind)
    x = torch.randn(2, 4)
    want = model(x).detach()
    with pytest.raises(ValueError, match=r"cannot convert 2 \(Linear\): its weight is computed by .*"
                                         + REMEDY[kind] + ".*Nothing was converted"):
        ek.convert(model)
    assert type(model[0]) is nn.Linear  # nothing converted
    _remove(model[2], kind)
    ek.convert(model)
    assert isinstance(model[0], EideticLinear) and isinstance(model[2], EideticLinear)
    torch.testing.assert_close(model(x), want)


def test_recycled_neurons_get_a_fresh_default_init():
    lin = EideticLinear(50, 8)
    with torch.no_grad():
        lin.weight.fill_(7.0)
        lin.bias.fill_(7.0)
    lin.prune_neurons([1, 4])
    lin.freeze_free_neurons(0)
    assert lin.recycle_pruned_neurons() == 2
    assert lin.weight.shape == (2, 50)
    bound = 1 / 50 ** 0.5
    assert bool((lin.weight.abs() <= bound).all()) and bool((lin.bias.abs() <= bound).all())
    assert lin.task_state.tolist() == [0, FREE, 0, 0, FREE, 0, 0, 0]
    bn = EideticBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0), bn.running_mean.fill_(3.0), bn.running_var.fill_(3.0)
    bn.prune_neurons([2])
    bn.freeze_free_neurons(0)
    bn.recycle_pruned_neurons()
    assert bn.dense("weight").tolist() == [3.0, 3.0, 1.0, 3.0]
    assert bn.running_mean.tolist() == [3.0, 3.0, 0.0, 3.0] and bn.running_var.tolist() == [3.0, 3.0, 1.0, 3.0]


def test_view_of_a_finished_task_is_immune_to_nan_in_free_capacity():
    torch.manual_seed(0)
    l1, bn, l2 = EideticLinear(6, 8), EideticBatchNorm1d(8), EideticLinear(8, 4)
    for layer in (l1, bn):
        layer.prune_neurons([0, 1])
        layer.freeze_free_neurons(0)
        layer.recycle_pruned_neurons()
    l2.set_input_task(l1.task_state)
    l2.freeze_free_neurons(0)
    x = torch.randn(5, 6)
    model = nn.Sequential(l1, bn, nn.GELU(), l2).eval()
    for m in (l1, bn, l2):
        m.view_task = 0
    before = model(x)
    for fill in (float("nan"), float("inf")):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
        assert torch.equal(model(x), before)


def test_taylor_scores_are_collected_switched_off_and_reset():
    lin = EideticLinear(5, 4)
    lin.enable_taylor()
    x = torch.randn(6, 5)
    lin(x).square().sum().backward()
    assert lin.taylor_enabled and bool((lin.taylor_score > 0).all())
    lin.reset_taylor()
    assert bool((lin.taylor_score == 0).all())
    lin.enable_taylor(False)
    lin(x).sum().backward()
    assert lin.taylor_score is None and not lin.taylor_enabled


def test_backend_selection_and_clear_errors(monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", "bogus")
    with pytest.raises(backends.BackendUnavailable, match="one of reference, triton, cpp"):
        EideticLinear(3, 2)(torch.randn(1, 3))
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.select("linear", torch.device("cpu"))
    # set only after this package was imported: too late for Triton's interpreter, said instead of a kernel error
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_INTERPRET_AT_IMPORT", False)
    with pytest.raises(backends.BackendUnavailable, match="set after eidetic_kernels was imported"):
        backends.select("linear", torch.device("cpu"))
    monkeypatch.setenv("EIDETIC_BACKEND", "reference")
    lin = EideticLinear(3, 2)
    lin(torch.randn(1, 3))
    assert lin.last_backend == "reference"


@pytest.mark.parametrize("forced", ["", "triton"])
def test_float64_products_on_a_gpu_run_on_the_reference_backend(monkeypatch, forced):
    """Triton's fp64 dot does not compile on every release (3.6 rejects it): float64 linear and conv2d on a
    GPU run on cuBLAS/cuDNN through the reference backend, batch norm and other dtypes stay on Triton."""
    monkeypatch.setenv("EIDETIC_BACKEND", forced)
    monkeypatch.setattr(backends, "_triton_usable", lambda device: None if device.type == "cuda" else "no GPU")
    cuda = torch.device("cuda")
    for op in ("linear", "conv2d"):
        assert backends.select(op, cuda, torch.float64) == "reference"
        assert backends.select(op, cuda, torch.float32) == "triton"
        assert backends.traceable(cuda, op, torch.float32) and not backends.traceable(cuda, op, torch.float64)
    assert backends.select("batch_norm", cuda, torch.float64) == "triton"


@pytest.mark.parametrize("make, shape", [(lambda: EideticLinear(6, 7), (4, 6)),
                                         (lambda: EideticConv2d(6, 7, 3, padding=1), (2, 6, 5, 4))])
def test_gradcheck_in_both_gradient_modes(make, shape):
    """fp64 gradcheck of a layer with frozen blocks (tasks 0 and 1) and FREE, PRUNED neurons, reading inputs of
    tasks 0-1, FREE and PRUNED producers. Exact mode: input and parameter gradients. Frozen-constant mode
    (what EideticNetwork trains with): parameter gradients, with the input requiring grad so the dX-only
    path runs, and the input gradient equal to the exact one on inputs from FREE producers."""
    torch.manual_seed(0)
    layer = make().double()
    layer.set_input_task(torch.tensor([0, 1, FREE, PRUNED, 0, FREE], dtype=torch.int16))
    layer.prune_neurons([1, 2, 3, 4, 5, 6])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([2, 3, 5, 6])
    layer.freeze_free_neurons(1)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([5])
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(x_in, w, b, constant):
        layer.constant_frozen = constant
        try:  # plain tensors stand in for the Parameters
            return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x_in,))
        finally:
            layer.constant_frozen = False

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    fast = gradcheck_fast(layer._op)
    assert torch.autograd.gradcheck(lambda xi, wi, bi: run(xi, wi, bi, False), (x.clone().requires_grad_(), w, b),
                                    fast_mode=fast)
    assert torch.autograd.gradcheck(lambda wi, bi: run(x.clone().requires_grad_(), wi, bi, True), (w, b),
                                    fast_mode=fast)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(run(x, w, b, False))
    (ge,) = torch.autograd.grad(run(xe, w, b, False), xe, g)
    (gc,) = torch.autograd.grad(run(xc, w, b, True), xc, g)
    free_inputs = layer.input_task == FREE
    torch.testing.assert_close(gc[:, free_inputs], ge[:, free_inputs])
    if layer.last_backend == "reference":  # the Triton kernels compute every dX in both modes (for now)
        assert bool((gc[:, ~free_inputs] == 0).all()) and bool((ge[:, ~free_inputs] != 0).any())


def test_first_version_checkpoints_are_upgraded_on_load():
    """Version 1 kept frozen rows at full width, ordered by (task, index); loading compacts them."""
    torch.manual_seed(0)
    for make, shape in ((lambda: EideticLinear(6, 7), (3, 6)), (lambda: EideticConv2d(6, 7, 3), (2, 6, 5, 5))):
        layer = make()
        layer.set_input_task(torch.tensor([0, 1, FREE, PRUNED, 0, 2], dtype=torch.int16))
        layer.prune_neurons([1, 4])
        layer.freeze_free_neurons(1)
        layer.recycle_pruned_neurons()
        layer.prune_neurons([4])
        layer.freeze_free_neurons(2)
        sd = layer.state_dict()
        v1 = sd.copy()
        v1._metadata = {"": {"version": 1}}
        dense = layer.dense()  # full rows, zeros on dead synapses: what version 1 stored
        frozen = (layer.task_state >= 0) & (layer.task_state != FREE)
        order = sorted(frozen.nonzero().flatten().tolist(), key=lambda i: (int(layer.task_state[i]), i))
        v1["frozen_weight"] = dense[order].clone()
        v1["frozen_bias"] = layer.dense("bias")[order].clone()
        fresh = make()
        fresh.load_state_dict(v1)
        assert torch.equal(fresh.frozen_weight, layer.frozen_weight) and torch.equal(fresh.frozen_bias, layer.frozen_bias)
        x = torch.randn(shape)
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.filterwarnings("ignore::eidetic_kernels.FreeInputsWarning")
@pytest.mark.parametrize("make", [lambda: EideticConv2d(3, 4, 3), lambda: EideticBatchNorm2d(3)], ids=["conv", "bn"])
def test_channels_last_input_gives_channels_last_output_with_frozen_neurons(make):
    """As the torch twins: a channels_last input (or, for conv, weight) gives a channels_last output, also once
    neurons are frozen (the blocks' products assemble a contiguous tensor), with the same values."""
    torch.manual_seed(0)
    layer = make()
    layer.prune_neurons([0])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    x = torch.randn(2, 3, 8, 8)
    expected = layer(x)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, expected)  # a backend may sum in another order for another layout
    if isinstance(layer, EideticConv2d) and layer.weight.numel():
        layer.to(memory_format=torch.channels_last)
        assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cls, shape", [(ek.EideticBatchNorm1d, (0, 6)), (ek.EideticBatchNorm2d, (0, 6, 3, 3))])
def test_an_empty_batch_moves_no_statistic_of_a_batch_norm_with_frozen_channels(cls, shape):
    """An empty training batch (a filter that matched no sample) through a batch norm with frozen and PRUNED
    channels: running statistics unchanged (FREE ones were NaN before), no warning, zero gradients and the batch
    count as nn.BatchNorm gives them."""
    import warnings
    torch.manual_seed(0)
    layer = cls(6)
    twin = (torch.nn.BatchNorm1d if cls is ek.EideticBatchNorm1d else torch.nn.BatchNorm2d)(6)
    layer.prune_neurons([1, 3])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([1])  # recycled, FREE again: PRUNED now; 3 stays FREE
    layer.train(), twin.train()
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.zeros(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, y_twin = layer(x), twin(x)
    assert y.shape == y_twin.shape == shape
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == int(twin.num_batches_tracked) == 1
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("make, shape", [(lambda: EideticLinear(3, 5), (0, 3)),
                                         (lambda: EideticConv2d(3, 5, 3, padding=1), (0, 3, 6, 6))],
                         ids=["linear", "conv2d"])
def test_an_empty_batch_adds_nothing_to_the_taylor_scores(monkeypatch, backend, make, shape):
    """An empty batch through a layer collecting Taylor scores: backward runs (the conv's score reshaped
    [0, C, -1], which torch cannot) and adds 0 to every score; the gradients are zero."""
    op = "linear" if len(shape) == 2 else "conv2d"
    reason = backends.available(backend, torch.device("cpu"), op)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    layer = make()
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.enable_taylor()
    layer.taylor_score.fill_(0.25)
    x = torch.randn(shape, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.taylor_score, torch.full_like(layer.taylor_score, 0.25))
    assert x.grad.shape == shape and not layer.weight.grad.any()


def test_a_weight_replaced_by_another_shape_is_a_clear_error():
    """Init code that assigns a full-size weight to a layer with frozen neurons, or a weight of another input width
    (which would lose its last columns silently): a ValueError saying what the weight holds and how to write it."""
    x = torch.randn(3, 8)
    for shape in ((6, 8), (2, 9)):
        layer = ek.EideticLinear(8, 6)
        layer.prune_neurons([0, 1])
        layer.freeze_free_neurons(0)
        layer.recycle_pruned_neurons()
        layer.weight.data = torch.randn(shape)
        with pytest.raises(ValueError, match=r"holds the trainable neurons' rows only \(2 of 6.*expected \(2, 8\)"):
            layer(x)
    conv = ek.EideticConv2d(3, 4, 3)
    conv.weight.data = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"expected \(4, 3, 3, 3\)"):
        conv(torch.randn(1, 3, 6, 6))


def test_convert_says_when_a_norm_mixes_the_features():
    """ek.convert of a model with LayerNorm (or GroupNorm over several channels) warns that finished tasks' outputs
    would move; per-channel norms without affine parameters and plain models convert silently."""
    import warnings
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\).*promise does not hold"):
        ek.convert(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)))
    with pytest.warns(UserWarning, match=r"GroupNorm"):
        ek.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(8, 8, affine=False),
                                       torch.nn.BatchNorm2d(8)))


def test_wrong_arguments_to_the_helpers_are_clear_errors():
    """Names and objects the helpers do not take: errors that say what they take (were raw AttributeErrors)."""
    with pytest.raises(ValueError, match=r"dense\('foo'\): name one of the split storages \['weight', 'bias'\]"):
        EideticLinear(4, 3).dense("foo")
    with pytest.raises(ValueError, match="running statistics are whole buffers"):
        EideticBatchNorm1d(3).dense("running_mean")
    assert EideticLinear(4, 3, bias=False).dense("bias") is None
    with pytest.raises(TypeError, match="convert takes a torch.nn.Module, got str"):
        ek.convert("model")
    with pytest.raises(TypeError, match="rebind_optimizer takes a torch.optim.Optimizer, got NoneType"):
        ek.rebind_optimizer(None)


def test_convert_names_the_modules_it_leaves_unprotected():
    """Modules with parameters and no twin (Conv1d, BatchNorm3d, PReLU) stay torch.nn modules that train on with
    every task: convert says so once, naming them, at the caller's line; a model of twins only gets no warning."""
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.PReLU())
    with pytest.warns(UserWarning, match=r"ek.convert left 0 \(Conv1d\), 3 \(PReLU\) as they are \(no Eidetic "
                                         r"twin\)") as caught:
        ek.convert(model)
    assert caught[0].filename == __file__
    assert isinstance(model[2], EideticLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.BatchNorm1d(3)))


def test_convert_names_an_affine_group_norm_with_one_channel_per_group_but_not_a_layer_parametrization():
    """GroupNorm(C, C) normalises each channel alone (no feature-mixing warning), but its affine parameters train
    on with every task: named as left unprotected. A parametrization of an Eidetic layer's weight (weight_norm)
    holds the layer's own storage: not named."""
    with pytest.warns(UserWarning, match=r"ek.convert left 1 \(GroupNorm\) as they are"):
        ek.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8)))
    layer = EideticLinear(4, 4)
    nn.utils.parametrizations.weight_norm(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.convert(nn.Sequential(layer, nn.ReLU()))
