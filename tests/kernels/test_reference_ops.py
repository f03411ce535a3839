"""Functional ops (default backend on CPU: the reference) against independent dense-mask computations.

Tolerances (tests/helpers.TOL): fp32 rtol 1e-4 / atol 1e-5, fp64 rtol 1e-10 / atol 1e-12. The dense
computation multiplies by a 0/1 mask, so the inputs here are finite; NaN-safety has its own tests.
"""
import pytest
import torch
import torch.nn.functional as F

from eidetic_kernels import FREE, PRUNED
from eidetic_kernels.functional import masked_batch_norm, masked_conv2d, masked_linear
from eidetic_kernels.ops.batch_norm import naive as naive_batch_norm
from tests.helpers import TOL, dense_mask, dense_weight_for_grad, gradcheck_fast, random_states

DTYPES = [torch.float32, torch.float64]


def Z(n):
    return torch.zeros(n, dtype=torch.int16)


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_linear_forward_backward(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, batch = 13, 11, 7
    x = torch.randn(batch, n_in, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(n_out, generator=g, dtype=dtype, requires_grad=True)
    in_task, out_task = random_states(n_in, g), random_states(n_out, g)
    lo = torch.randint(0, 2, (n_out,), generator=g).to(torch.int16)
    dy = torch.randn(batch, n_out, generator=g, dtype=dtype)

    y = masked_linear(x, w, b, in_task, out_task, out_min_task=lo)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy, allow_unused=True, materialize_grads=True)

    m = dense_mask(in_task, out_task, lo).to(dtype)
    live_out = (out_task != PRUNED).to(dtype)
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    y_ref = x2 @ (dense_weight_for_grad(w2, out_task) * m).T + dense_weight_for_grad(b2, out_task) * live_out
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w2, b2), dy, allow_unused=True, materialize_grads=True)
    _close(y, y_ref, dtype)
    _close(gx, rx, dtype)
    _close(gw, rw, dtype)
    _close(gb, rb, dtype)
    not_free = out_task != FREE
    assert bool((gw[not_free] == 0).all()) and bool((gb[not_free] == 0).all())
    assert bool((y[:, out_task == PRUNED] == 0).all())


def test_masked_linear_leading_dims_and_no_bias():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g)
    w = torch.randn(4, 5, generator=g)
    in_task = torch.tensor([0, FREE, PRUNED, 0, 1], dtype=torch.int16)
    out_task = torch.tensor([FREE, 1, 0, PRUNED], dtype=torch.int16)
    y = masked_linear(x, w, None, in_task, out_task)
    ref = x @ (w * dense_mask(in_task, out_task).float()).T
    _close(y, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_masked_conv2d_forward_backward(dtype, stride, padding, dilation):
    g = torch.Generator().manual_seed(stride * 10 + padding + dilation)
    c_in, c_out = 5, 7
    x = torch.randn(3, c_in, 9, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=dtype, requires_grad=True)
    in_task, out_task = random_states(c_in, g), random_states(c_out, g)
    y = masked_conv2d(x, w, b, in_task, out_task, stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn(y.shape, generator=g, dtype=dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy, allow_unused=True, materialize_grads=True)

    m = dense_mask(in_task, out_task).to(dtype)[:, :, None, None]
    live_out = (out_task != PRUNED).to(dtype)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y_ref = F.conv2d(x2, dense_weight_for_grad(w2, out_task) * m, dense_weight_for_grad(b2, out_task) * live_out,
                     stride=stride, padding=padding, dilation=dilation)
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w2, b2), dy, allow_unused=True, materialize_grads=True)
    for got, ref in ((y, y_ref), (gx, rx), (gw, rw), (gb, rb)):
        _close(got, ref, dtype)
    assert bool((gw[out_task != FREE] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 7, 5, 3), (9, 7), (4, 7, 6)])
def test_masked_batch_norm(dtype, training, shape):
    g = torch.Generator().manual_seed(len(shape) + int(training))
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype).mul(2).add(0.5).requires_grad_()
    w = torch.randn(c, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=dtype, requires_grad=True)
    rm = torch.randn(c, generator=g, dtype=dtype)
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    task = random_states(c, g)
    rm0, rv0 = rm.clone(), rv.clone()
    y = masked_batch_norm(x, rm, rv, w, b, task, training, 0.1, 1e-5)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy, allow_unused=True, materialize_grads=True)

    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm_ref, rv_ref = rm0.clone(), rv0.clone()
    y_ref = naive_batch_norm.masked_batch_norm(x2, rm_ref, rv_ref, w2, b2, task, training, 0.1, 1e-5)
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w2, b2), dy, allow_unused=True, materialize_grads=True)
    for got, ref in ((y, y_ref), (gx, rx), (gw, rw), (gb, rb), (rm, rm_ref), (rv, rv_ref)):
        _close(got, ref, dtype)
    frozen = (task >= 0) & (task != FREE)
    assert torch.equal(rm[frozen], rm0[frozen]) and torch.equal(rv[frozen], rv0[frozen])
    assert bool((gw[task != FREE] == 0).all()) and bool((gb[task != FREE] == 0).all())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("affine, stats", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_masked_batch_norm_backends_match_the_spec(backend, affine, stats, training, monkeypatch):
    """Each CPU backend against ``ops/batch_norm/naive.py``: output, gradients, running statistics and the
    Taylor score, with and without affine parameters and running statistics (fp64)."""
    from eidetic_kernels import backends
    if backends.available(backend, torch.device("cpu"), "batch_norm") is not None:
        pytest.skip(f"{backend} cannot run here")
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    g = torch.Generator().manual_seed(11)
    c, dtype = 9, torch.float64
    x = (torch.randn(5, c, 4, 3, generator=g, dtype=dtype) * 2 + 0.5).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=dtype, requires_grad=True) if affine else None
    rm = torch.randn(c, generator=g, dtype=dtype) if stats else None
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5 if stats else None
    task = random_states(c, g)
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    runs = []
    for fn in (masked_batch_norm, naive_batch_norm.masked_batch_norm):
        xs, ws, bs = (None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b))
        rms, rvs = (None if t is None else t.clone() for t in (rm, rv))
        score = torch.zeros(c, dtype=torch.float32)
        y = fn(xs, rms, rvs, ws, bs, task, training, 0.1, 1e-5, taylor_score=score)
        leaves = [t for t in (xs, ws, bs) if t is not None]
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True)
        runs.append([y, *grads, *(t for t in (rms, rvs) if t is not None), score])
    for got, want in zip(*runs):
        _close(got, want, want.dtype)  # the Taylor score is float32


def test_masked_batch_norm_without_running_stats_uses_batch_stats():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 3, 3, generator=g)
    task = torch.tensor([FREE, 0, PRUNED, 1], dtype=torch.int16)
    y = masked_batch_norm(x, None, None, None, None, task, False, 0.1, 1e-5)
    ref = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    ref[:, 2] = 0
    _close(y, ref, torch.float32)


def _frozen_constant_wrapper(fn, w, out_task):
    """fn of the FREE rows only: gradcheck cannot see that frozen rows are constants by design."""
    free_idx = (out_task == FREE).nonzero().flatten()
    base = w.detach().clone()

    def wrapped(x, w_free, *rest):
        return fn(x, base.index_copy(0, free_idx, w_free), *rest)
    return wrapped, w.detach()[free_idx].clone().requires_grad_()


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(7)
    in_task = torch.tensor([0, FREE, PRUNED, 1, FREE], dtype=torch.int16)
    out_task = torch.tensor([FREE, 1, 0, PRUNED, FREE, 0], dtype=torch.int16)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    f, w_free = _frozen_constant_wrapper(lambda x, w: masked_linear(x, w, None, in_task, out_task), w, out_task)
    assert torch.autograd.gradcheck(f, (x, w_free), fast_mode=gradcheck_fast("linear"))

    xc = torch.randn(2, 5, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    f, wc_free = _frozen_constant_wrapper(
        lambda x, w: masked_conv2d(x, w, None, in_task, out_task, stride=2, padding=1), wc, out_task)
    assert torch.autograd.gradcheck(f, (xc, wc_free), fast_mode=gradcheck_fast("conv2d"))

    xb = torch.randn(5, 6, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    free = out_task == FREE

    def bn(x, w_free, b_free):
        w_full = wb.detach().masked_scatter(free, w_free)
        b_full = bb.detach().masked_scatter(free, b_free)
        return masked_batch_norm(x, rm.clone(), rv.clone(), w_full, b_full, out_task, True, 0.1, 1e-5)
    assert torch.autograd.gradcheck(bn, (xb, wb.detach()[free].clone().requires_grad_(),
                                         bb.detach()[free].clone().requires_grad_()),
                                     fast_mode=gradcheck_fast("batch_norm"))


def test_nan_in_dead_inputs_never_reaches_live_outputs():
    in_task = torch.tensor([0, FREE, PRUNED, 1], dtype=torch.int16)
    out_task = torch.tensor([0, 1, FREE], dtype=torch.int16)
    x = torch.randn(2, 4)
    x[:, 1] = float("nan")  # output of a FREE neuron gone wrong
    x[:, 2] = float("inf")  # a PRUNED input
    w = torch.randn(3, 4)
    y = masked_linear(x, w, torch.randn(3), in_task, out_task)
    assert torch.isfinite(y[:, :2]).all()
    xc = torch.randn(1, 4, 5, 5)
    xc[:, 1] = float("nan")
    yc = masked_conv2d(xc, torch.randn(3, 4, 3, 3), None, in_task, out_task, padding=1)
    assert torch.isfinite(yc[:, :2]).all()


def test_taylor_score_accumulates_in_backward():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 5, generator=g)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    in_task = torch.zeros(5, dtype=torch.int16)
    out_task = torch.tensor([FREE, FREE, 0, PRUNED], dtype=torch.int16)
    score = torch.zeros(4)
    y = masked_linear(x, w, None, in_task, out_task, taylor_score=score)
    dy = torch.randn(6, 4, generator=g)
    y.backward(dy)
    expected = (y.detach() * dy).mean(0).abs()
    _close(score, expected, torch.float32)
    y = masked_linear(x, w, None, in_task, out_task, taylor_score=score)
    y.backward(dy)
    _close(score, 2 * expected, torch.float32)

    xc = torch.randn(3, 5, 4, 4, generator=g)
    wc = torch.randn(4, 5, 3, 3, generator=g, requires_grad=True)
    score = torch.zeros(4)
    yc = masked_conv2d(xc, wc, None, in_task, out_task, padding=1, taylor_score=score)
    dyc = torch.randn(yc.shape, generator=g)
    yc.backward(dyc)
    _close(score, (yc.detach() * dyc).sum((2, 3)).mean(0).abs(), torch.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: masked_linear(torch.randn(2, 4), torch.randn(3, 5), None, Z(5), Z(3)),
     r"x.shape\[-1\] == 5"),
    (lambda: masked_linear(torch.randn(2, 5).double(), torch.randn(3, 5), None, Z(5), Z(3)),
     "float64 but the weights are torch.float32"),
    (lambda: masked_linear(torch.randn(2, 5), torch.randn(3, 5), torch.randn(4), Z(5), Z(3)),
     r"bias must have shape \(3,\)"),
    (lambda: masked_linear(torch.randn(2, 5), torch.randn(3, 5), None, Z(4), Z(3)),
     "in_task has 4 entries, expected 5"),
    (lambda: masked_linear(torch.randn(2, 5), torch.randn(3, 5), None, Z(5), torch.tensor([0, 1, -5])),
     "outside"),
    (lambda: masked_linear(torch.randint(0, 3, (2, 5)), torch.randn(3, 5), None, Z(5), Z(3)),
     "floating-point"),
    (lambda: masked_conv2d(torch.randn(4, 4), torch.randn(3, 3, 3, 3), None, Z(3), Z(3)),
     "at least 4 dims"),
    (lambda: masked_conv2d(torch.randn(2, 3, 4), torch.randn(3, 3, 3, 3), None, Z(3), Z(3)),
     r"unbatched x of shape \[3, H, W\], got shape \(2, 3, 4\)"),
    (lambda: masked_conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 3, 3), None, Z(3), Z(3), padding="sme"),
     "invalid padding string 'sme': use 'valid', 'same', an int or a pair of ints"),
    (lambda: masked_linear(torch.randn(2, 5), torch.randn(3, 5), None, Z(5), Z(3), taylor_score=torch.zeros(4)),
     r"taylor_score must be a float32 tensor of shape \(3,\).*got torch.float32 of shape \(4,\)"),
    (lambda: masked_linear(torch.randn(2, 5), torch.randn(3, 5), None, Z(5), Z(3), taylor_score=[0.0] * 3),
     "taylor_score must be a float32 tensor of shape \\(3,\\) that backward adds the scores into, or None; got list"),
    (lambda: masked_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), None, Z(3), Z(2),
                           taylor_score=torch.zeros(2, dtype=torch.int64)),
     "got torch.int64 of shape"),
    (lambda: masked_batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), None, None,
                               torch.tensor([0, FREE, FREE]), True),
     r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
    (lambda: masked_batch_norm(torch.randn(2, 3), torch.zeros(4), torch.ones(4), None, None, Z(3), True),
     r"running_mean must have shape \(3,\)"),
    (lambda: masked_batch_norm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), None, None, Z(3), True, None),
     "momentum must be a number"),
    (lambda: masked_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, Z(3), Z(4), stride=2,
                           padding="same"),
     "not supported for strided convolutions"),
    (lambda: masked_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, Z(3), Z(4), stride=1.5),
     r"stride must be an int or a pair of ints, got 1.5"),
    (lambda: masked_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, Z(3), Z(4), stride=0),
     r"stride must be positive, got \(0, 0\)"),
    (lambda: masked_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, Z(3), Z(4), padding=(1, -1)),
     r"padding must be non-negative, got \(1, -1\)"),
    (lambda: masked_conv2d(torch.randn(1, 3, 3, 8, 8), torch.randn(4, 3, 3, 3), None, Z(3), Z(4)),
     r"expects x of shape \[N, C, H, W\] or \[C, H, W\], got \(1, 3, 3, 8, 8\)"),
    (lambda: masked_batch_norm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), None, None, Z(3), True, eps="a"),
     "eps must be a number, got 'a'"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("frozen", [False, True])
def test_masked_batch_norm_takes_what_f_batch_norm_takes(frozen):
    """An empty batch in training moves no running statistic (the statistics of zero values would be NaN) and
    gives the affine parameters zero gradients; a float16/bfloat16 x with float32 statistics normalises in float32
    and returns x's dtype, as F.batch_norm; an unbatched x reaches masked_conv2d as F.conv2d takes it."""
    task = torch.tensor([0 if frozen else FREE, FREE, FREE])
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = masked_batch_norm(torch.randn(0, 3, 4, 4), rm, rv, w, b, task, True)
    assert y.shape == (0, 3, 4, 4) and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 2, 2, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        got_rm, got_rv = torch.zeros(3), torch.ones(3)
        want_rm, want_rv = got_rm.clone(), got_rv.clone()
        got = masked_batch_norm(low, got_rm, got_rv, None, None, task, True)
        want = masked_batch_norm(low.float(), want_rm, want_rv, None, None, task, True).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(got_rm, want_rm) and torch.equal(got_rv, want_rv)
    xc, wc = torch.randn(3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    torch.testing.assert_close(masked_conv2d(xc, wc, None, Z(3), Z(4), padding=1),
                               F.conv2d(xc, wc, padding=1), rtol=1e-5, atol=1e-6)


def test_everything_pruned_outputs_zeros_of_the_right_shape():
    out_task = torch.full((4,), PRUNED, dtype=torch.int16)
    y = masked_conv2d(torch.randn(2, 3, 7, 7), torch.randn(4, 3, 3, 3), None, Z(3), out_task, stride=2)
    assert y.shape == (2, 4, 3, 3) and bool((y == 0).all())
    y = masked_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4), Z(3), out_task)
    assert y.shape == (2, 4) and bool((y == 0).all())


# ----- the reference backend on split storage, as layers call it ------------------------------------
# Frozen rows stored compactly (live synapses only); windows that are slices or gathers, a trainable
# block over a slice with dead columns zeroed or over gathered columns, both output assemblies: these
# cases span batch sizes and widths that take every path, for linear and conv.

from eidetic_kernels.ops.conv2d.reference import conv2d as reference_conv2d  # noqa: E402
from eidetic_kernels.ops.linear.reference import linear as reference_linear  # noqa: E402
from eidetic_kernels.state import compact_rows, frozen_blocks, is_frozen, make_table  # noqa: E402


def _split(weight, bias, in_task, out_task, lo):
    """Dense rows -> the storages layers keep: trainable rows in index order, frozen rows compact (live
    synapses only, block by block) with their bias in block order."""
    frozen = is_frozen(out_task)
    blocks = frozen_blocks(in_task, out_task, lo)
    fw = compact_rows(weight, blocks)
    fb = torch.cat([bias[b.rows] for b in blocks]) if blocks else bias[:0]
    return weight[~frozen].clone(), fw, bias[~frozen].clone(), fb


def _run_reference(kind, x, tw, fw, tb, fb, in_task, out_task, lo, view_task=None):
    table = make_table(in_task, out_task, lo, view_task)
    if kind == "linear":
        return reference_linear(x, tw, tb, fw, fb, table)
    return reference_conv2d(x, tw, tb, fw, fb, table, (1, 1), (1, 1), (1, 1))


def _storage_case(kind, n_in, n_out, batch, seed, in_pattern):
    g = torch.Generator().manual_seed(seed)
    if in_pattern == "raw":  # raw inputs: every group reads every input (one window)
        in_task = Z(n_in)
    elif in_pattern == "tasks":  # frozen producers only: several windows, nothing PRUNED in the input
        in_task = torch.randint(0, 3, (n_in,), generator=g).to(torch.int16)
    else:
        in_task = random_states(n_in, g)
    out_task = random_states(n_out, g)
    lo = torch.randint(0, 2, (n_out,), generator=g).to(torch.int16)
    # conv: 6x5 outputs, or 17x16 when the batch is 1 (>= 256 per channel: the other assembly path)
    shape = (batch, n_in) if kind == "linear" else (batch, n_in) + ((17, 16) if batch == 1 else (6, 5))
    w_shape = (n_out, n_in) if kind == "linear" else (n_out, n_in, 3, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    return x, w, b, in_task, out_task, lo


STORAGE_CASES = [(kind, n_in, n_out, batch, pattern)
                 for kind, sizes in (("linear", [(13, 11, 3), (13, 11, 40), (40, 9, 2), (40, 30, 2), (7, 30, 1)]),
                                     ("conv", [(5, 7, 2), (11, 6, 1)]))
                 for n_in, n_out, batch in sizes for pattern in ("raw", "tasks", "mixed")]


@pytest.mark.parametrize("kind, n_in, n_out, batch, pattern", STORAGE_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_on_split_storage_matches_dense_mask(kind, n_in, n_out, batch, pattern, seed):
    x, w, b, in_task, out_task, lo = _storage_case(kind, n_in, n_out, batch, seed, pattern)
    tw, fw, tb, fb = _split(w, b, in_task, out_task, lo)
    tw.requires_grad_()
    tb.requires_grad_()
    x.requires_grad_()
    y = _run_reference(kind, x, tw, fw, tb, fb, in_task, out_task, lo)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=y.dtype)
    gx, gtw, gtb = torch.autograd.grad(y, (x, tw, tb), dy, materialize_grads=True, allow_unused=True)

    m = dense_mask(in_task, out_task, lo)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    live_out = (out_task != PRUNED).double()
    if kind == "linear":
        y_ref = x2 @ (w2 * m).T + b2 * live_out
    else:
        y_ref = F.conv2d(x2, w2 * m[:, :, None, None], b2 * live_out, padding=1)
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w2, b2), dy)
    _close(y, y_ref, torch.float64)
    _close(gx, rx, torch.float64)
    trainable = ~is_frozen(out_task)
    free = out_task[trainable] == FREE  # trainable rows are the non-frozen neurons in index order
    _close(gtw[free], rw[out_task == FREE], torch.float64)
    _close(gtb[free], rb[out_task == FREE], torch.float64)
    # exact zeros: PRUNED outputs, gradients of PRUNED rows and of dead synapses, dX of inputs nobody reads
    assert bool((y[:, out_task == PRUNED] == 0).all())
    pruned_rows = out_task[trainable] == PRUNED
    assert bool((gtw[pruned_rows] == 0).all()) and bool((gtb[pruned_rows] == 0).all())
    dead = (m[out_task == FREE] == 0)
    assert bool((gtw[free][dead] == 0).all())
    unread = m.sum(0) == 0
    assert bool((gx[:, unread] == 0).all())
    assert int(trainable.sum()) == tw.shape[0]


@pytest.mark.parametrize("kind, n_in, n_out, batch, pattern", STORAGE_CASES)
def test_reference_frozen_outputs_never_see_nan(kind, n_in, n_out, batch, pattern):
    """NaN/inf in dead inputs and in every trainable row: frozen outputs are bit-identical to a clean run
    and PRUNED outputs exactly 0; dX is bit-identical too while the trainable rows are finite (dX = dY·W
    reads W's rows: NaN·0 would be NaN).

    (Dead synapses of frozen rows keep the finite values they were trained with. The reference may
    zero a frozen group's dead inputs instead of selecting its live ones when the weight is large and
    the batch small, so unlike the Triton kernels it does not promise to ignore inf stored there.)"""
    x, w, b, in_task, out_task, lo = _storage_case(kind, n_in, n_out, batch, 5, pattern)
    tw, fw, tb, fb = _split(w, b, in_task, out_task, lo)
    x.requires_grad_()
    clean = _run_reference(kind, x, tw, fw, tb, fb, in_task, out_task, lo)
    frozen = is_frozen(out_task)
    x_bad = x.detach().clone()
    x_bad[:, (in_task == FREE) | (in_task == PRUNED)] = float("nan")
    tw_bad = torch.full_like(tw, float("nan"))
    tb_bad = torch.full_like(tb, float("nan"))
    x_bad.requires_grad_()
    y = _run_reference(kind, x_bad, tw_bad, fw, tb_bad, fb, in_task, out_task, lo)
    assert torch.equal(y[:, frozen], clean[:, frozen].detach())
    assert torch.equal(y[:, out_task == PRUNED], torch.zeros_like(y[:, out_task == PRUNED]))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    (gx_clean,) = torch.autograd.grad(clean, (x,), dy)
    y = _run_reference(kind, x_bad, tw, fw, tb, fb, in_task, out_task, lo)
    (gx,) = torch.autograd.grad(y, (x_bad,), dy)
    assert torch.equal(gx, gx_clean)


@pytest.mark.parametrize("kind, n_in, n_out, batch, pattern", STORAGE_CASES)
def test_reference_view_of_a_finished_task_is_bit_stable(kind, n_in, n_out, batch, pattern):
    """Evaluated as finished task 0, the outputs depend on task 0's neurons only: the same bits whatever
    later tasks, FREE and PRUNED neurons hold (states and values)."""
    x, w, b, in_task, out_task, lo = _storage_case(kind, n_in, n_out, batch, 7, pattern)
    g = torch.Generator().manual_seed(8)
    later_in = torch.where(in_task == 0, in_task, random_states(n_in, g).clamp(min=1))
    later_out = torch.where(out_task == 0, out_task, random_states(n_out, g).clamp(min=1))
    outputs = []
    for ins, outs, fill in ((in_task, out_task, 1.0), (later_in, later_out, float("nan"))):
        tw, fw, tb, fb = _split(w, b, ins, outs, lo)
        tw = torch.full_like(tw, fill) if fill != 1.0 else tw
        outputs.append(_run_reference(kind, x, tw, fw, tb, fb, ins, outs, lo, view_task=0))
    assert torch.equal(outputs[0], outputs[1])
    assert bool(torch.isfinite(outputs[1]).all())
