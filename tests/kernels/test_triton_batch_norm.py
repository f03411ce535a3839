"""Triton masked_batch_norm against the reference backend (run in float64), under the interpreter.

Covers train/eval, with and without running statistics and affine parameters, [N, C], [N, C, L] and
[N, C, H, W] inputs, the split reduction (forced with small blocks), fp32/fp16 (bf16 on GPU).
"""
import copy

import pytest
import torch

triton = pytest.importorskip("triton")

from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.batch_norm import reference as ref  # noqa: E402
from eidetic_kernels.ops.batch_norm import triton as tri  # noqa: E402
from eidetic_kernels.state import FREE, PRUNED, is_frozen, storage_slots  # noqa: E402

from .test_triton_linear import DEVICE, DTYPES, TOL, assert_close  # noqa: E402

pytestmark = pytest.mark.triton
STATES = {"mixed": [FREE, 0, PRUNED, 1, FREE, 2], "all_free": [FREE], "all_frozen": [0, 1],
          "all_pruned": [PRUNED]}


@pytest.fixture(autouse=True)
def _kernels_for_every_state(monkeypatch):
    """Run the kernels also where every channel is FREE (the layers hand that case to torch's op)."""
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)


def make_case(shape, kind, dtype, affine=True, stats=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    vals = torch.tensor(STATES[kind], dtype=torch.int16)
    task = vals[torch.randperm(C, generator=gen) % len(vals)]
    slot = storage_slots(task).to(torch.int32)
    n_frozen = int(is_frozen(task).sum())
    n_train = C - n_frozen
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    case = dict(x=(rnd(*shape) * 2 + rnd(1, C, *([1] * (len(shape) - 2)))).to(dtype),
                g=rnd(*shape).to(dtype), task=task, slot=slot,
                rm=rnd(C).to(dtype) if stats else None, rv=(torch.rand(C, generator=gen) + 0.5).to(dtype) if stats else None,
                tw=(torch.rand(n_train, generator=gen) + 0.5).to(dtype) if affine else None,
                fw=(torch.rand(n_frozen, generator=gen) + 0.5).to(dtype) if affine else None,
                tb=rnd(n_train).to(dtype) if affine else None, fb=rnd(n_frozen).to(dtype) if affine else None)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def run(backend, c, training, dtype=None, grad="random", x=None):
    """Forward + backward -> [y, dx, dw, db, running_mean, running_var, taylor]."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    x = cast(c["x"] if x is None else x).detach().requires_grad_()
    leaf = lambda t: None if t is None else cast(t).detach().requires_grad_()  # noqa: E731
    tw, tb = leaf(c["tw"]), leaf(c["tb"])
    rm = None if c["rm"] is None else cast(c["rm"]).clone()
    rv = None if c["rv"] is None else cast(c["rv"]).clone()
    score = torch.zeros(c["task"].numel(), device=DEVICE)
    y = backend.batch_norm(x, rm, rv, tw, cast(c["fw"]), tb, cast(c["fb"]), c["task"], c["slot"], training, 0.1,
                           1e-5, score)
    if grad == "sum":
        y.sum().backward()
    else:
        (y * cast(c["g"])).sum().backward()
    return [y.detach(), x.grad, None if tw is None else tw.grad, None if tb is None else tb.grad, rm, rv, score]


NAMES = ("y", "dx", "dw", "db", "running_mean", "running_var", "taylor")


def check(c, training, dtype, **kw):
    got = run(tri, c, training, **kw)
    want = run(ref, c, training, dtype=torch.float64, **kw)
    assert_close(got, want, dtype, names=NAMES)
    return got


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stats", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_modes_match_reference_4d(training, stats, affine):
    c = make_case((5, 7, 6, 5), "mixed", torch.float32, affine=affine, stats=stats, seed=3)
    got = check(c, training, torch.float32)
    if stats:  # frozen (and PRUNED) channels never touch their running statistics
        keep = c["task"] != FREE
        assert torch.equal(got[4][keep], c["rm"][keep]) and torch.equal(got[5][keep], c["rv"][keep])


@pytest.mark.parametrize("shape", [(67, 13), (9, 5, 31)], ids=["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_1d_shapes_match_reference(shape, training):
    check(make_case(shape, "mixed", torch.float32, seed=5), training, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(STATES))
def test_states_and_dtypes_match_reference(kind, dtype):
    c = make_case((4, 6, 5, 3), kind, dtype, seed=sum(map(ord, kind)))
    got = check(c, True, dtype)
    if kind == "all_pruned":
        assert torch.equal(got[0], torch.zeros_like(got[0]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_matches_reference_tightly(training):
    """fp64 runs in fp64 throughout (its division and square root take the fp64 path: the fp32 correctly rounded
    ones refuse fp64), so it matches the fp64 reference to rounding."""
    c = make_case((5, 6, 4, 3), "mixed", torch.float64, seed=13)
    got = run(tri, c, training)
    want = run(ref, c, training, dtype=torch.float64)
    for name, a, b in zip(NAMES, got, want):
        if name == "taylor":  # the score buffer is float32 whatever the input's dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        elif b is not None:
            assert a.dtype == torch.float64, name
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", [(6, 3, 17, 13), (301, 5)], ids=["few_channels", "2d"])
def test_split_reduction_with_small_blocks(shape):
    """Small blocks force many splits per channel: the Welford/Chan merges must give the same statistics."""
    c = make_case(shape, "mixed", torch.float32, seed=7)
    with triton_common.override_blocks("bn", BLOCK=64, TARGET_PROGRAMS=64, BLOCK_C=4):
        block_e, block_c, chunk, split, _ = tri._launch_shape(shape[1], c["x"][0, 0].numel(), c["x"].numel() // shape[1])
        assert split > 1
        check(c, True, torch.float32)


def test_noncontiguous_input_and_stride0_grad():
    c = make_case((4, 5, 7, 6), "mixed", torch.float32, seed=11)
    x = torch.randn(4, 7, 6, 5, device=DEVICE).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    check(c, True, torch.float32, grad="sum", x=x)


def test_large_mean_keeps_the_variance():
    """A common offset of 300: a one-pass E[x²]-E[x]² in fp32 would lose ~1e-2 of the variance; Welford keeps it."""
    c = make_case((4, 5, 7, 6), "mixed", torch.float32, seed=11)
    x = c["x"] + 300
    got = run(tri, c, True, x=x)
    want = run(ref, c, True, dtype=torch.float64, x=x)
    for i in (0, 5):  # y and the running variance
        torch.testing.assert_close(got[i].double(), want[i], atol=2e-4, rtol=1e-4)


def test_nan_in_pruned_and_other_channels_stays_out():
    c = make_case((4, 6, 5, 3), "mixed", torch.float32, seed=13)
    clean = run(tri, c, True)[0]
    x = c["x"].clone()
    x[:, (c["task"] == PRUNED) | (c["task"] == FREE)] = float("nan")
    y = tri.batch_norm(x, c["rm"].clone(), c["rv"].clone(), c["tw"], c["fw"], c["tb"], c["fb"], c["task"], c["slot"],
                       True, 0.1, 1e-5)
    frozen = is_frozen(c["task"])
    assert torch.equal(y[:, frozen], clean[:, frozen])
    pruned = c["task"] == PRUNED
    assert torch.equal(y[:, pruned], torch.zeros_like(y[:, pruned]))


@pytest.mark.parametrize("cls", ["EideticBatchNorm2d", "EideticBatchNorm1d"])
def test_layer_runs_triton_backend(monkeypatch, cls):
    import eidetic_kernels as ek
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch.manual_seed(0)
    layers = [getattr(ek, cls)(6).to(DEVICE) for _ in range(2)]
    for layer in layers:
        layer.prune_neurons([1, 4])
        layer.freeze_free_neurons(0)
        layer.recycle_pruned_neurons()
    x = torch.randn((8, 6, 5, 4) if cls.endswith("2d") else (8, 6), device=DEVICE)
    y = layers[0](x)
    assert layers[0].last_backend == "triton"
    monkeypatch.setenv("EIDETIC_BACKEND", "reference")
    torch.testing.assert_close(y, layers[1](x), **TOL[torch.float32])
    torch.testing.assert_close(layers[0].running_mean, layers[1].running_mean, **TOL[torch.float32])
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var, **TOL[torch.float32])


@pytest.mark.parametrize("stats", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("shape", [(5, 7, 6, 5), (37, 9)], ids=["4d", "2d"])
def test_constant_frozen_gives_frozen_channels_no_input_gradient(shape, stats):
    """``constant_frozen`` (as the C++ backend): frozen channels get dx = 0 and no Taylor score; everything
    else is the reference's."""
    c = make_case(shape, "mixed", torch.float32, stats=stats, seed=17)
    frozen = is_frozen(c["task"])
    assert bool(frozen.any())
    x = c["x"].detach().requires_grad_()
    tw, tb = c["tw"].detach().requires_grad_(), c["tb"].detach().requires_grad_()
    score = torch.zeros(c["task"].numel(), device=DEVICE)
    rm = None if c["rm"] is None else c["rm"].clone()
    rv = None if c["rv"] is None else c["rv"].clone()
    y = tri.batch_norm(x, rm, rv, tw, c["fw"], tb, c["fb"], c["task"], c["slot"], True, 0.1, 1e-5, score,
                       constant_frozen=True)
    (y * c["g"]).sum().backward()
    want = run(ref, c, True, dtype=torch.float64)
    got = [y.detach(), x.grad, tw.grad, tb.grad, rm, rv, score]
    assert torch.equal(got[1][:, frozen], torch.zeros_like(got[1][:, frozen]))
    assert torch.equal(score[frozen], torch.zeros_like(score[frozen]))
    want[1][:, frozen] = 0
    want[6][frozen] = 0
    assert_close(got, want, torch.float32, names=NAMES)


class _GuardedFinalize:
    """``_bn_bwd_finalize_kernel`` launched with its affine-gradient outputs (arguments 8 and 9) moved to the
    front of larger buffers whose tail holds a sentinel: a store past the end of dw or db shows as a changed
    tail (instead of a heap written out of bounds)."""

    def __init__(self, kernel):
        self.kernel, self.overruns = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args, outputs = list(args), []
            for i in (8, 9):
                out = args[i]
                if out.dim() != 1:  # no affine gradient asked: a placeholder the kernel does not write
                    continue
                big = torch.full((out.numel() + 4096,), -7.0, dtype=out.dtype, device=out.device)
                big[:out.numel()] = out
                args[i] = big[:out.numel()]
                outputs.append((out, big))
            self.kernel[grid](*args, **kwargs)
            for out, big in outputs:
                n = out.numel()
                self.overruns.append(int((big[n:] != -7.0).sum()))
                out.copy_(big[:n])
        return launch


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_a_view_that_hides_later_tasks_frozen_channels_matches_the_reference(monkeypatch, affine):
    """Training through a finished task's view (``view_task=0``) hides the later task's frozen channels as
    PRUNED; their slots index the frozen storage, here far longer than the trainable one. Backward stores no
    affine gradient outside the trainable storage (such a store wrote past the end of dw and aborted the
    process) and gives the reference's gradients."""
    import eidetic_kernels as ek
    guard = _GuardedFinalize(tri._bn_bwd_finalize_kernel)
    monkeypatch.setattr(tri, "_bn_bwd_finalize_kernel", guard)
    C = 70
    torch.manual_seed(3)
    layer = ek.EideticBatchNorm2d(C, affine=affine).to(DEVICE)
    layer.prune_neurons(list(range(3, C)))
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([C - 2, C - 1])
    layer.freeze_free_neurons(1)  # task 1: 65 channels, slots 3..67 of the frozen storage; 2 trainable
    layer.recycle_pruned_neurons()
    x0 = torch.randn(4, C, 3, 2, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("EIDETIC_BACKEND", backend)
        twin = copy.deepcopy(layer).train()
        twin.view_task = 0
        x = x0.clone().requires_grad_()
        y = twin(x)
        assert twin.last_backend == backend
        (y * y).sum().backward()
        results.append([y.detach(), x.grad] + ([twin.weight.grad, twin.bias.grad] if affine else []))
    assert len(guard.overruns) == (2 if affine else 0) and not any(guard.overruns), guard.overruns
    got, want = results
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_channel_order_puts_free_then_frozen_then_pruned():
    task = torch.tensor([FREE, 0, PRUNED, 1, FREE, 0, PRUNED], dtype=torch.int16, device=DEVICE)
    order, counts = tri.channel_order(task)
    assert order.tolist() == [0, 4, 1, 3, 5, 2, 6]
    assert counts.tolist() == [2, 3, 2] and counts.device.type == "cpu"


def _work(layer, x, backward=False):
    counter = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with triton_common.count_work(counter):
        y = layer(x)
        if backward:
            y.sum().backward()
    return int(counter)


@pytest.mark.parametrize("cls", ["EideticBatchNorm2d", "EideticBatchNorm1d"])
def test_work_follows_the_channels_that_need_it(monkeypatch, cls):
    """A task-major layer of 100 channels, task 0 owning the first 10, 90 FREE: evaluating task 0 reads 10%
    of what evaluating every channel reads; a training step with frozen channels as constants reads x for
    the normalisation of every channel and for the statistics, reduction and dx of the FREE ones only."""
    import eidetic_kernels as ek
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch.manual_seed(0)
    layer = getattr(ek, cls)(100).to(DEVICE)
    layer.prune_neurons(list(range(10, 100)))
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    x = torch.randn((4, 100, 3, 5) if cls.endswith("2d") else (60, 100), device=DEVICE)
    L = x.numel() // 100
    layer.eval()
    assert _work(layer, x) == 100 * L
    layer.view_task = 0
    y = layer(x)
    assert _work(layer, x) == 10 * L
    assert torch.equal(y[:, 10:], torch.zeros_like(y[:, 10:]))
    layer.view_task = None
    layer.train()
    layer.constant_frozen = True
    assert _work(layer, x.requires_grad_(), backward=True) == (90 + 100 + 90 + 90) * L
    layer.constant_frozen = False  # frozen channels' dx (running statistics: no reduction for them)
    assert _work(layer, x, backward=True) == (90 + 100 + 90 + 100) * L


@pytest.mark.parametrize("cls", ["EideticBatchNorm2d", "EideticBatchNorm1d"])
def test_every_channel_free_is_the_twin_bit_for_bit_and_one_frozen_channel_runs_the_kernels(monkeypatch, cls):
    """DENSE_SHORTCUT: a layer whose channels are all FREE is nn.BatchNorm (torch's op, cuDNN on a GPU), in
    training (outputs, gradients, running statistics) and eval; once a channel is frozen the kernels run."""
    import eidetic_kernels as ek
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", True)
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch.manual_seed(0)
    twin = getattr(torch.nn, cls.replace("Eidetic", ""))(6).to(DEVICE)
    layer = ek.convert(copy.deepcopy(twin))
    launches = []
    monkeypatch.setattr(tri, "_bn_op", lambda *a, _op=tri._bn_op: launches.append(1) or _op(*a))
    x = torch.randn((8, 6, 5, 4) if cls.endswith("2d") else (8, 6), device=DEVICE)
    for training in (True, False):
        layer.train(training), twin.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), twin(xb)
        assert torch.equal(ya, yb)
        (ya * x).sum().backward()
        (yb * x).sum().backward()
        assert torch.equal(xa.grad, xb.grad) and torch.equal(layer.weight.grad, twin.weight.grad)
        assert torch.equal(layer.running_mean, twin.running_mean)
        assert torch.equal(layer.running_var, twin.running_var)
    assert layer.last_backend == "triton" and launches == []
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer(x)
    assert launches
