"""Drop-in parity with the torch.nn twins: PyTorch's own ModuleInfo samples as a peer suite, the forward
keyword, unbatched inputs, constructor arguments, conversion, mixed precision, caches across grad modes,
double backward, torch.compile on the CPU engine, and no C++ probing at construction.

Tolerances: fp64 samples compare with rtol 1e-7, atol 1e-9 (the same ATen ops run on both sides while every
neuron is FREE, so differences are rounding only); bf16 under autocast with rtol 1.6e-2, atol 1e-2.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing._internal.common_modules import module_db

import eidetic_kernels as ek
from eidetic_kernels import backends, cpp
from eidetic_kernels.layers import EideticBatchNorm1d, EideticBatchNorm2d, EideticConv2d, EideticLinear

REPO = Path(__file__).resolve().parents[2]
TWINS = {nn.Linear: EideticLinear, nn.Conv2d: EideticConv2d, nn.BatchNorm1d: EideticBatchNorm1d,
         nn.BatchNorm2d: EideticBatchNorm2d}
F64 = dict(rtol=1e-7, atol=1e-9)


def _samples():
    for info in module_db:
        if info.module_cls not in TWINS:
            continue
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                             training=training)
            for i, sample in enumerate(inputs):
                yield pytest.param(info, training, sample, id=f"{info.name}-{'train' if training else 'eval'}-{i}")


def _clone_inputs(args, kwargs):
    def c(v):
        return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
    return [c(a) for a in args], {k: c(v) for k, v in kwargs.items()}


def _tensors(args, kwargs):
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.requires_grad]


def _run(module, sample, training):
    module.train(training)
    args, kwargs = _clone_inputs(sample.forward_input.args, sample.forward_input.kwargs)
    out = module(*args, **kwargs)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    out.backward(grad)
    stats = {name: getattr(module, name) for name in ("running_mean", "running_var", "num_batches_tracked")
             if getattr(module, name, None) is not None}
    params = {name: p.grad for name, p in module.named_parameters() if not name.startswith("frozen_")}
    return out, [t.grad for t in _tensors(args, kwargs)], stats, params


@pytest.mark.parametrize("info, training, sample", list(_samples()))
def test_module_info_peer_suite(info, training, sample):
    """Every ModuleInfo sample of the twins, fp64, train and eval: the fresh twin (same constructor
    arguments, same seed) and ``from_module`` of the torch module give torch's output, input gradients,
    parameter gradients and running statistics."""
    ctor = sample.constructor_input
    torch.manual_seed(0)
    reference = info.module_cls(*ctor.args, **ctor.kwargs, device="cpu", dtype=torch.float64)
    torch.manual_seed(0)
    fresh = TWINS[info.module_cls](*ctor.args, **ctor.kwargs, device="cpu", dtype=torch.float64)
    converted = TWINS[info.module_cls].from_module(copy.deepcopy(reference))
    want = _run(reference, sample, training)
    for twin in (fresh, converted):
        got = _run(twin, sample, training)
        assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
        torch.testing.assert_close(got[0], want[0], **F64)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, **F64)
        assert got[2].keys() == want[2].keys()
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], **F64)
        assert got[3].keys() == want[3].keys(), "the same trainable parameters (names) as the twin"
        for name in want[3]:
            torch.testing.assert_close(got[3][name], want[3][name], **F64)


def test_forward_keyword_and_unbatched_conv():
    lin = EideticLinear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(lin(input=x), lin(x))
    conv = EideticConv2d(3, 5, 3, padding=1)
    img = torch.randn(3, 6, 6)
    out = conv(input=img)
    assert out.shape == (5, 6, 6)
    assert torch.equal(out, conv(img.unsqueeze(0)).squeeze(0))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[C, H, W\]"):
        conv(torch.randn(2, 2, 3, 6, 6))
    bn = EideticBatchNorm1d(3)
    assert bn(input=x).shape == x.shape


def test_batch_norm_bias_false_matches_torch():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, bias=False)
    twin = EideticBatchNorm2d(3, bias=False)
    assert twin.bias is None and twin.weight is not None
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert "bias=False" in repr(twin)
    twin.prune_neurons([1])
    twin.freeze_free_neurons(0)
    twin.recycle_pruned_neurons()  # frozen and recycled channels without a bias
    y = twin(torch.randn(4, 3, 2, 2))
    assert torch.isfinite(y).all()
    converted = ek.convert(nn.BatchNorm1d(4, bias=False))
    assert converted.bias is None


# ----- conversion keeps what the user set ----------------------------------------------------------------

def test_convert_keeps_requires_grad_training_hooks_and_parameters():
    torch.manual_seed(0)
    frozen_stem = nn.Linear(3, 2).requires_grad_(False)
    converted = ek.convert(frozen_stem)
    assert converted.weight.requires_grad is False and converted.bias.requires_grad is False

    calls = []
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    model[0].register_forward_hook(lambda m, i, o: calls.append("forward"))
    model[2].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model[2].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    model[0].weight.register_hook(lambda g: calls.append("tensor hook"))
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ek.convert(model)
    assert isinstance(model[0], EideticLinear) and not model.training and not model[1].training
    assert [p for p in model.parameters() if not p.numel() == 0] == params, "the same Parameter objects"
    model(torch.randn(5, 3, requires_grad=True)).sum().backward()
    assert sorted(calls) == ["backward", "forward", "pre", "tensor hook"]
    before = model[0].weight.detach().clone()
    optimizer.step()  # the optimizer built before the conversion trains the twin
    assert not torch.equal(model[0].weight, before)


def test_network_never_trains_or_prunes_a_stem_the_user_froze():
    from python_layers.network import EideticNetwork
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    body[0].requires_grad_(False)
    model = EideticNetwork(body, 8)
    stem = body[0].weight.detach().clone()
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    for task in range(2):
        model.prepare_for_task(task, 2)
        model.train_task(loader, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1), pruning="l2",
                         step=0.25, stop_threshold=1.0, max_epochs=2, patience=1, recovery_epochs=1, progress=False)
        assert model.body[0].dense("weight").equal(stem), f"the frozen stem changed in task {task}"
        assert int((model.body[0].neuron_task == ek.PRUNED).sum()) == 0
    assert int((model.body[2].neuron_task == 0).sum()) < 8, "the trainable layer was pruned"


def test_pruning_a_stem_the_user_froze_by_hand_is_refused():
    from python_layers.network import EideticNetwork
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    body[0].requires_grad_(False)
    model = EideticNetwork(body, 8)
    model.prepare_for_task(0, 2)
    model(torch.randn(4, 6))  # traces the graph
    stem = next(g for g in model.groups if any(layer is model.body[0] for _, layer in g.members))
    with pytest.raises(ValueError, match=r"body\.0 is frozen by the user.*requires_grad_\(True\) first.*"
                                         r"Nothing was pruned"):
        stem.prune([0, 1])
    assert int((model.body[0].neuron_task == ek.PRUNED).sum()) == 0
    stem.prune([])  # nothing to prune: nothing to refuse
    model.body[0].requires_grad_(True)
    stem.prune([0, 1])
    assert int((model.body[0].neuron_task == ek.PRUNED).sum()) == 2


# ----- mixed precision ------------------------------------------------------------------------------------

def _finished(layer):
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons(torch.Generator().manual_seed(1))
    return layer


@pytest.mark.parametrize("state", ["fresh", "frozen"])
def test_autocast_cpu_bfloat16_runs_where_the_twins_run(state):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
                        nn.Linear(3, 2))
    twin = ek.convert(copy.deepcopy(ref))
    if state == "frozen":
        for i in (0, 1, 4):
            _finished(twin[i])
        ref = twin  # no torch twin for a frozen state: compare against the fp32 result below
    x = torch.randn(5, 3, 6, 6)
    with torch.autocast("cpu", torch.bfloat16):
        want = ref(x)
        got = twin(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert twin[1](torch.randn(5, 4, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    full = twin(x)
    torch.testing.assert_close(got.float(), full, rtol=1.6e-2 * 4, atol=5e-2)
    if state == "fresh":
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    with torch.autocast("cpu", torch.bfloat16):
        twin(x).float().sum().backward()
    assert twin[0].weight.grad.dtype == torch.float32


def test_autocast_functional_ops():
    from eidetic_kernels.functional import masked_conv2d, masked_linear
    task = torch.tensor([0, ek.FREE, ek.PRUNED], dtype=torch.int16)
    with torch.autocast("cpu", torch.bfloat16):
        y = masked_linear(torch.randn(4, 5), torch.randn(3, 5), torch.randn(3), torch.zeros(5, dtype=torch.int16),
                          task)
        z = masked_conv2d(torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3), None, torch.zeros(2, dtype=torch.int16),
                          task)
    assert y.dtype == z.dtype == torch.bfloat16
    assert y[:, 2].eq(0).all() and z[:, 2].eq(0).all()


def test_autocast_graph_tracer():
    from python_layers.network import EideticNetwork
    torch.manual_seed(0)
    model = EideticNetwork(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)), 5)
    model.prepare_for_task(0, 2)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16 and model.graph is not None


# ----- caches across grad modes ----------------------------------------------------------------------------

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
         "autocast": lambda: torch.autocast("cpu", torch.bfloat16)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["linear", "conv", "bn"])
def test_caches_built_in_any_grad_mode_serve_training(kind, mode):
    """Plans built during an evaluation (no_grad, inference_mode, autocast) serve the next training step:
    the same loss and gradients as a layer whose caches were built in training."""
    def make():
        torch.manual_seed(0)
        layer = {"linear": lambda: EideticLinear(5, 4), "conv": lambda: EideticConv2d(3, 4, 3),
                 "bn": lambda: EideticBatchNorm2d(4)}[kind]()
        return _finished(layer)
    x = torch.randn(6, 5) if kind == "linear" else torch.randn(6, 3 if kind == "conv" else 4, 5, 5)
    evaluated, clean = make(), make()
    with MODES[mode]():
        evaluated(x)
    if kind == "bn":  # an evaluation in train mode moved the running statistics: start both alike
        clean.load_state_dict(evaluated.state_dict())
    results = []
    for layer in (evaluated, clean):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, layer.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----- double backward -------------------------------------------------------------------------------------

TRITON_ON_CPU = backends._triton_usable(torch.device("cpu")) is None  # the interpreter (TRITON_INTERPRET=1)


@pytest.mark.parametrize("backend", ["default", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("kind", ["linear", "conv", "bn1d", "bn2d"])
def test_double_backward_with_frozen_and_pruned_neurons(kind, backend, monkeypatch):
    """gradgradcheck through a layer holding FREE, frozen and PRUNED neurons (gradient penalties, as the
    twins support); on the default CPU engine batch norm runs the C++ op; the fused ops differentiate a
    readable forward when ``create_graph=True`` (ops/double_backward.py)."""
    if backend == "default":
        monkeypatch.delenv("EIDETIC_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EIDETIC_BACKEND", backend)
    torch.manual_seed(0)
    layer, shape = {"linear": (lambda: EideticLinear(4, 4), (3, 4)),
                    "conv": (lambda: EideticConv2d(2, 4, 3, padding=1), (2, 2, 4, 4)),
                    "bn1d": (lambda: EideticBatchNorm1d(4), (5, 4)),
                    "bn2d": (lambda: EideticBatchNorm2d(4), (3, 4, 2, 2))}[kind]
    layer = layer().double()
    layer.prune_neurons([1, 2])
    layer.freeze_free_neurons(0)  # neurons 0 and 3 frozen
    layer.recycle_pruned_neurons()
    layer.prune_neurons([2])  # 1 FREE, 2 PRUNED
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    # fast mode under the interpreter (a random projection, torch's own): full mode took 80 s for the conv
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp), (x,), fast_mode=backend == "triton")
    if backend != "default":
        assert layer.last_backend == backend
    penalty_grads = []
    for _ in range(2):
        layer.weight.grad = None
        xi = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(layer(xi).sin().sum(), xi, create_graph=True)
        g.square().sum().backward()
        penalty_grads.append(layer.weight.grad.clone())
    assert penalty_grads[0].abs().sum() > 0 and torch.equal(penalty_grads[0], penalty_grads[1])


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("kind", ["conv", "bn2d"])
def test_double_backward_of_channels_last_inputs(kind, backend, monkeypatch):
    """A non-contiguous (channels_last) input through a layer with frozen and PRUNED neurons: the C++ batch norm
    copies it contiguous, and a double backward must differentiate the input autograd knows, not that copy."""
    if backend == "default":
        monkeypatch.delenv("EIDETIC_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EIDETIC_BACKEND", backend)
    torch.manual_seed(0)
    layer = (EideticConv2d(3, 4, 3, padding=1) if kind == "conv" else EideticBatchNorm2d(3)).double()
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([1])
    x = torch.randn(4, 3, 3, 3, dtype=torch.double).to(memory_format=torch.channels_last).requires_grad_()
    assert not x.is_contiguous()
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp), (x,))
    (g,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0


def test_channels_last_is_told_as_torch_tells_it():
    """``channels_last_strides`` (which memory format an Eidetic conv and batch norm return, and whether a network
    evaluates at full width) against torch's ``suggest_memory_format`` on permuted and sliced tensors with sizes 1
    to 3, including single channels permuted from [N, H, W, 1], which are contiguous too."""
    import itertools

    prims = pytest.importorskip("torch._prims_common")
    if not hasattr(prims, "suggest_memory_format"):
        pytest.skip("this torch has no Python suggest_memory_format")
    from eidetic_kernels.layers import channels_last_strides

    checked = 0
    for sizes in itertools.product((1, 2, 3), repeat=4):
        dense, padded = torch.empty(sizes), torch.empty(tuple(n + 1 for n in sizes))
        for perm in itertools.permutations(range(4)):
            sliced = padded.permute(perm)[tuple(slice(0, n - 1) for n in padded.permute(perm).shape)]
            for view in (dense.permute(perm), sliced, sliced[:, :, :, ::2]):
                want = prims.suggest_memory_format(view) == torch.channels_last
                assert channels_last_strides(view.shape, view.stride()) == want, (view.shape, view.stride())
                checked += 1
    x = torch.randn(2, 5, 5, 1).permute(0, 3, 1, 2)
    assert x.is_contiguous() and channels_last_strides(x.shape, x.stride())
    assert F.conv2d(x, torch.randn(4, 1, 1, 1)).is_contiguous(memory_format=torch.channels_last)
    assert checked > 1000


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_create_graph_backward_with_frozen_blocks_constant_gives_the_input_the_kernels_gradient(kind, monkeypatch):
    """Frozen blocks as constants (``constant_frozen``, as a network trains): a ``create_graph=True`` backward
    (gradient penalty) through the Triton op gives the input what its first-order backward and the reference
    give it (no gradient through frozen rows or into inputs of frozen producers), and a penalty on that input
    gradient gives the weights the reference's gradients. Before, the graph was the dense product: the input
    gradient included the frozen rows'."""
    torch.manual_seed(0)
    layer, shape = {"linear": (lambda: EideticLinear(6, 5), (3, 6)),
                    "conv": (lambda: EideticConv2d(6, 5, 3, padding=1), (2, 6, 4, 4))}[kind]
    layer = layer().double()
    layer.set_input_task(torch.tensor([0, ek.FREE, 0, ek.FREE, ek.FREE, 1], dtype=torch.int16))  # producers: 2 tasks, FREE
    layer.prune_neurons([1, 2])
    layer.freeze_free_neurons(0)  # rows 0, 3, 4 frozen
    layer.recycle_pruned_neurons()
    layer.prune_neurons([2])  # 1 FREE, 2 PRUNED
    layer.__dict__["constant_frozen"] = True
    x = torch.randn(shape, dtype=torch.double)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("EIDETIC_BACKEND", backend)
        layer.weight.grad = None
        xi = x.clone().requires_grad_()
        first = torch.autograd.grad(layer(xi).sin().sum(), xi)[0]
        (g,) = torch.autograd.grad(layer(xi).sin().sum(), xi, create_graph=True)
        assert layer.last_backend == backend
        g.square().sum().backward()
        results[backend] = (first, g.detach(), layer.weight.grad.clone())
    (first, g, dw), (ref_first, ref_g, ref_dw) = results["triton"], results["reference"]
    torch.testing.assert_close(g, first, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, ref_g, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dw, ref_dw, atol=1e-12, rtol=1e-12)
    assert ref_dw.abs().sum() > 0


@pytest.mark.parametrize("backend", ["default", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("frozen", [False, True])
def test_a_layer_with_every_trainable_neuron_pruned_backpropagates_as_its_twin(kind, backend, frozen, monkeypatch):
    """No FREE neuron left: the output still requires grad, as nn's does, so a loss over it can call backward;
    the trainable storages get gradients of exactly 0 (NaN in the PRUNED rows is never read) and the outputs
    keep their bits (frozen rows as before, PRUNED rows 0). Before: no gradient, and with nothing frozen
    backward raised "does not require grad"."""
    if backend == "default":
        monkeypatch.delenv("EIDETIC_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EIDETIC_BACKEND", backend)
    torch.manual_seed(0)
    layer, shape = {"linear": (lambda: EideticLinear(4, 3), (5, 4)),
                    "conv": (lambda: EideticConv2d(2, 3, 3, padding=1), (2, 2, 4, 4))}[kind]
    layer = layer()
    if frozen:
        layer.prune_neurons([0, 2])
        layer.freeze_free_neurons(0)  # neuron 1 frozen
        layer.recycle_pruned_neurons()
    layer.prune_neurons([0, 2] if frozen else [0, 1, 2])
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
        layer.bias.fill_(float("nan"))
    x = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        want = layer(x)
    y = layer(x)
    assert y.requires_grad and torch.equal(y, want) and not y.isnan().any()
    y.square().sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
    if frozen:  # the frozen neuron's synapses carry the input's gradient (standalone layers are exact)
        assert x.grad.isfinite().all() and x.grad.any()
    else:
        assert x.grad is None or not x.grad.any()


# ----- torch.compile on the CPU engine ---------------------------------------------------------------------

def test_importing_does_not_import_torch_compile():
    """torch._dynamo takes longer to import than torch itself: importing the library (and building a network)
    must not pull it in (a command such as ``eidetic --help`` or a config check pays for torch alone); the first
    forward does, through torch's lazy ``torch._disable_dynamo``."""
    code = textwrap.dedent("""
        import sys, torch, torch.nn as nn
        import eidetic_kernels, python_layers, python_layers.cli
        net = python_layers.EideticNetwork(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), 6)
        net.prepare_for_task(0, 2)
        print("torch._dynamo" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("state", ["fresh", "pruned", "frozen"])
def test_compile_on_cpu_engine_whatever_the_cache_state(state, monkeypatch):
    """Compiling before any eager call, after a prune or a freeze: same outputs and gradients as eager, and at
    most one warning (the layers run eagerly inside the compiled graph)."""
    monkeypatch.delenv("EIDETIC_BACKEND", raising=False)
    from eidetic_kernels import layers
    monkeypatch.setattr(layers, "_warned_eager_under_compile", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(EideticConv2d(3, 6, 3), EideticBatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          EideticLinear(6 * 4 * 4, 5))
    if state != "fresh":
        for i in (0, 1, 4):
            model[i].prune_neurons([1])
            if state == "frozen":
                model[i].freeze_free_neurons(0)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    compiled = torch.compile(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    ours = [w for w in caught if "eidetic" in str(w.message)]
    assert len(ours) <= 1
    out.square().sum().backward()
    ref = eager(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: EideticLinear(4, 2), lambda: EideticConv2d(3, 4, 3),
                                  lambda: EideticBatchNorm2d(3)], ids=["linear", "conv2d", "batch_norm"])
def test_torch_export_on_cpu_engine_is_a_clear_error(make, monkeypatch):
    """torch.export needs one graph without breaks: on the host-planning engine that is a RuntimeError that
    names what to export instead (not a recursion through the eager fallback)."""
    monkeypatch.delenv("EIDETIC_BACKEND", raising=False)
    from eidetic_kernels import backends
    layer = make().eval()
    x = torch.randn(2, 4) if isinstance(layer, EideticLinear) else torch.randn(2, 3, 5, 5)
    if backends.traceable(x.device):
        pytest.skip("this engine is traceable: torch.export captures it")
    with pytest.raises(RuntimeError, match=r"torch.export cannot capture .* EideticNetwork.export\(task\)"):
        torch.export.export(nn.Sequential(layer), (x,))


# ----- reset_parameters and the meta device ---------------------------------------------------------------

RESET_CASES = [(lambda **kw: nn.Linear(6, 5, **kw), lambda **kw: EideticLinear(6, 5, **kw), (3, 6)),
         (lambda **kw: nn.Conv2d(3, 4, 3, **kw), lambda **kw: EideticConv2d(3, 4, 3, **kw), (2, 3, 6, 6)),
         (lambda **kw: nn.BatchNorm2d(4, **kw), lambda **kw: EideticBatchNorm2d(4, **kw), (5, 4, 3, 3))]


@pytest.mark.parametrize("make_nn, make_eid, shape", RESET_CASES, ids=["linear", "conv2d", "batch_norm"])
def test_reset_parameters_and_meta_initialisation_as_torch_nn(make_nn, make_eid, shape):
    """reset_parameters draws what the twin draws under the same seed; a layer built on the meta device,
    materialised with to_empty and reset (what FSDP-style initialisation does) equals the twin built the
    same way, forward and running statistics."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outs = []
    for make in (make_nn, make_eid):
        torch.manual_seed(3)
        fresh = make()
        fresh.reset_parameters()
        meta = make(device="meta").to_empty(device="cpu")
        torch.manual_seed(3)
        meta.reset_parameters()
        outs.append([fresh.weight, meta.weight, fresh(x), meta(x)] +
                    [getattr(m, "running_mean", None) for m in (fresh, meta)])
    for i, (want, got) in enumerate(zip(outs[0], outs[1])):
        if want is None:
            continue
        if i < 2:  # the same draws
            assert torch.equal(want, got)
        else:  # the same function (the Triton kernels sum in their own order)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reset_parameters_keeps_frozen_neurons():
    torch.manual_seed(0)
    layer = EideticConv2d(3, 6, 3)
    layer.prune_neurons([4, 5])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    bn = EideticBatchNorm2d(6)
    bn.prune_neurons([4, 5])
    bn(torch.randn(4, 6, 5, 5))
    bn.freeze_free_neurons(0)
    frozen = (layer.frozen_weight.clone(), layer.frozen_bias.clone(), bn.running_mean[:4].clone(),
              bn.frozen_weight.clone())
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    bn.reset_parameters()
    assert torch.equal(layer.frozen_weight, frozen[0]) and torch.equal(layer.frozen_bias, frozen[1])
    assert torch.equal(bn.running_mean[:4], frozen[2]) and torch.equal(bn.frozen_weight, frozen[3])
    assert not torch.equal(layer.weight, before)  # the trainable rows were drawn again
    assert bool((bn.running_mean[4:] == 0).all()) and bool((bn.running_var[4:] == 1).all())
    with pytest.raises(RuntimeError, match="meta device"):
        layer.to("meta").to_empty(device="cpu")


# ----- construction probes nothing; one cache folder -------------------------------------------------------

def test_building_layers_probes_no_cpp_toolchain(tmp_path):
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")  # any warning while building is a failure
        import torch
        from eidetic_kernels import backends, cpp
        from eidetic_kernels.layers import EideticBatchNorm2d, EideticConv2d, EideticLinear
        EideticLinear(3, 2); EideticConv2d(3, 4, 3); bn = EideticBatchNorm2d(4)
        assert cpp._module is None and cpp._failure is None and not cpp._tools_found, "probed at construction"
        assert not cpp.cache_root().exists()
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            bn.prune_neurons([1]); bn.freeze_free_neurons(0)
            bn(torch.randn(4, 4, 2, 2)); bn(torch.randn(4, 4, 2, 2))
        assert sum("C++ CPU backend is unavailable" in str(w.message) for w in caught) == 1, caught
        print("ok")
    """)
    env = {**os.environ, "CXX": "/nonexistent/c++", "EIDETIC_CACHE": str(tmp_path / "cache")}
    env.pop("EIDETIC_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_one_cache_folder(monkeypatch, tmp_path):
    from python_layers import scenarios
    monkeypatch.delenv("EIDETIC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpp.cache_root() == tmp_path / "xdg" / "eidetic" == scenarios._cache_dir()
    monkeypatch.setenv("EIDETIC_CACHE", str(tmp_path / "mine"))
    assert cpp.cache_root() == tmp_path / "mine" == scenarios._cache_dir()


# ----- batch norm per channel -------------------------------------------------------------------------------

def test_cumulative_average_restarts_for_recycled_channels():
    bn = EideticBatchNorm1d(2, momentum=None)
    bn(torch.zeros(2, 2))
    bn.prune_neurons([1])
    bn.freeze_free_neurons(0)
    bn.recycle_pruned_neurons()
    bn(torch.tensor([[0.0, 4.0], [0.0, 6.0]]))
    fresh = nn.BatchNorm1d(2, momentum=None)
    fresh(torch.tensor([[0.0, 4.0], [0.0, 6.0]]))
    assert bn.running_mean[1] == fresh.running_mean[1] == 5.0
    assert bn.running_var[1] == fresh.running_var[1] == 2.0
    assert bn.running_mean[0] == 0.0 and bn.running_var[0] == 0.0  # frozen: unchanged
    bn(torch.tensor([[1.0, 8.0], [3.0, 10.0]]))
    fresh(torch.tensor([[1.0, 8.0], [3.0, 10.0]]))
    torch.testing.assert_close(bn.running_mean[1], fresh.running_mean[1])
    torch.testing.assert_close(bn.running_var[1], fresh.running_var[1])
    # the per-channel count is state: it survives a state dict round trip and renumbering
    copy_ = EideticBatchNorm1d(2, momentum=None)
    copy_.load_state_dict(bn.state_dict())
    assert torch.equal(copy_.recycled_at_batch, bn.recycled_at_batch)
    old = {k: v for k, v in bn.state_dict().items() if k != "recycled_at_batch"}
    legacy = EideticBatchNorm1d(2, momentum=None)
    legacy.load_state_dict(old)  # checkpoints without the per-channel count still load
    assert legacy.recycled_at_batch.eq(0).all()
    # a load that holds none of the layer's states (partial, or a torch.nn twin's) leaves the counts alone
    kept = bn.recycled_at_batch.clone()
    assert kept.ne(0).any()
    bn.load_state_dict({}, strict=False)
    assert torch.equal(bn.recycled_at_batch, kept)
    twin = {k: v for k, v in bn.state_dict().items() if k in nn.BatchNorm1d(2).state_dict()}
    with pytest.raises(RuntimeError, match="frozen neurons"):  # refused (frozen channels): nothing loaded
        bn.load_state_dict(twin, strict=False)
    assert torch.equal(bn.recycled_at_batch, kept)


def test_a_finished_tasks_view_in_training_mode_counts_no_batch():
    """A view of finished task 0 sees no FREE channel, so no running statistic moves and the batch is not counted:
    with momentum=None the FREE channel's average stays that of the batches it saw, as its twin's."""
    bn = EideticBatchNorm1d(2, momentum=None)
    bn.prune_neurons([1])
    bn.freeze_free_neurons(0)
    bn.recycle_pruned_neurons()
    fresh = nn.BatchNorm1d(1, momentum=None)
    first, second = torch.tensor([[0.0, 4.0], [1.0, 6.0]]), torch.tensor([[2.0, 8.0], [3.0, 12.0]])
    bn(first), fresh(first[:, 1:])
    count, stats = int(bn.num_batches_tracked), (bn.running_mean.clone(), bn.running_var.clone())
    bn.view_task = 0
    bn(torch.randn(4, 2))  # training mode, task 0's view
    assert int(bn.num_batches_tracked) == count
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    bn.view_task = None
    bn(second), fresh(second[:, 1:])
    torch.testing.assert_close(bn.running_mean[1:], fresh.running_mean)
    torch.testing.assert_close(bn.running_var[1:], fresh.running_var)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True])
def test_frozen_channels_in_low_precision_are_as_accurate_as_the_twin(dtype, training):
    """A bf16/fp16 batch norm with frozen channels normalises in float32 and rounds once, as ATen does for the
    twin: its error against the fp64 computation on the same (rounded) parameters is the twin's."""
    torch.manual_seed(0)
    twin = nn.BatchNorm2d(8)
    with torch.no_grad():
        twin.running_mean.uniform_(-2, 2), twin.running_var.uniform_(0.5, 3)
        twin.weight.uniform_(0.5, 2), twin.bias.uniform_(-1, 1)
    twin.to(dtype)
    bn = ek.convert(copy.deepcopy(twin))
    bn.prune_neurons([6, 7])
    bn.freeze_free_neurons(0)
    bn.recycle_pruned_neurons()  # channels 0..5 frozen: running statistics, in training too
    x = (torch.randn(16, 8, 5, 5) * 2 + 1).to(dtype)
    exact = copy.deepcopy(twin).double().eval()(x.double())[:, :6]
    bn.train(training)
    twin.eval()  # frozen channels normalise with running statistics in both modes
    with torch.no_grad():
        err = (bn(x)[:, :6].double() - exact).abs().max().item()
        err_twin = (twin(x)[:, :6].double() - exact).abs().max().item()
    if dtype == torch.bfloat16 and bn.last_backend == "triton" and x.device.type != "cuda":
        pytest.skip("bf16 on the Triton backend: GPU only, as in the kernel tests (the interpreter's bf16 is not "
                    "the GPU's)")
    assert err <= err_twin * 1.01 + 1e-6, (err, err_twin)


@pytest.mark.parametrize("state", ["fresh", "frozen"])
def test_one_value_per_channel_is_an_error_in_training(state):
    bn = EideticBatchNorm2d(3)
    if state == "frozen":
        _finished(bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for x in (torch.randn(1, 3), torch.randn(1, 3, 1, 1)):
        layer = bn if x.dim() == 4 else EideticBatchNorm1d(3)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused batch"
    bn.eval()
    assert bn(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # eval uses running statistics: fine


# ----- torch.func transforms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv", "bn2d"])
def test_torch_func_transforms_give_what_autograd_gives(kind):
    """``torch.func`` on a layer with frozen, FREE and PRUNED neurons (eval mode; in train mode the batch norm
    twin's in-place statistics update refuses ``grad`` too): per-sample parameter gradients ``vmap(grad(...))``
    (as Opacus-style training and influence functions use), the input gradient through ``grad``, and ``vmap``
    of the layer itself equal standard autograd and plain calls sample by sample (fp64, 1e-10). Inside
    transforms every backend runs the reference's plain torch ops (``ops/blocks.functorch_active``)."""
    from torch.func import functional_call, grad, vmap
    make, shape = {"linear": (lambda: EideticLinear(5, 6), (4, 5)),
                   "conv": (lambda: EideticConv2d(3, 6, 3, padding=1), (4, 3, 5, 5)),
                   "bn2d": (lambda: EideticBatchNorm2d(6), (4, 6, 3, 3))}[kind]
    torch.manual_seed(0)
    layer = make().double()
    layer.prune_neurons([1, 2, 4])
    layer.freeze_free_neurons(0)  # neurons 0, 3, 5 frozen: scattered
    layer.recycle_pruned_neurons()
    layer.prune_neurons([2])  # 1 and 4 FREE, 2 PRUNED
    if kind == "bn2d":
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(p, xi):
        return (functional_call(layer, p, (xi.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    assert layer.last_backend == "reference"
    tol = dict(atol=1e-10, rtol=1e-10)
    for i in range(x.shape[0]):
        expected = torch.autograd.grad(loss(dict(layer.named_parameters()), x[i]), list(layer.parameters()),
                                       allow_unused=True, materialize_grads=True)
        for (name, _), e in zip(layer.named_parameters(), expected):
            torch.testing.assert_close(per_sample[name][i], e, **tol, msg=lambda m, name=name: f"{name}[{i}]: {m}")
    xr = x.clone().requires_grad_()
    (expected_x,) = torch.autograd.grad((layer(xr) ** 3).sum(), xr)
    torch.testing.assert_close(grad(lambda xi: (layer(xi) ** 3).sum())(x), expected_x, **tol)
    torch.testing.assert_close(vmap(layer)(x.unsqueeze(1)).squeeze(1), layer(x), **tol)
