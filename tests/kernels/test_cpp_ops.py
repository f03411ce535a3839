"""The C++ CPU backend (csrc/, eidetic_kernels/cpp.py) against the reference backend.

Every op the C++ backend keeps (batch_norm; linear and conv2d were measured and removed, see
eidetic_kernels/cpp.py) is run on fresh random inputs with odd sizes and random states (FREE,
PRUNED, frozen by several tasks), in fp32 and fp64, forward and backward, with Taylor scores,
once with EIDETIC_BACKEND=reference and once with EIDETIC_BACKEND=cpp.
Tolerances: fp32 rtol 1e-4 / atol 1e-5, fp64 rtol 1e-10 / atol 1e-12 (same math, other order).
Taylor scores are compared in float32 (the reference computes them in float32).

The build is cached (``cpp.cache_root()``: $EIDETIC_CACHE, else the XDG cache); the first test here builds it once.
Where there is no C++ compiler at all these tests are skipped; a compiler that fails is a failure.
The fallback test runs in subprocesses with a broken compiler path and a fresh cache folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eidetic_kernels import FREE, PRUNED, EideticBatchNorm2d, cpp
from eidetic_kernels.functional import masked_batch_norm
from tests.helpers import TOL, random_states

DTYPES = [torch.float32, torch.float64]
REPO = Path(__file__).resolve().parents[2]

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler on this machine: the C++ backend cannot be built", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    cpp.load_module()  # a failed build fails here, with the compiler's message


def run_on(backend, monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("EIDETIC_BACKEND", backend)
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("EIDETIC_BACKEND")


def leaf(t):
    return t.detach().clone().requires_grad_()


def close(a, b, dtype):
    if a is None or b is None:
        assert a is None and b is None or torch.count_nonzero(a if b is None else b) == 0
        return
    torch.testing.assert_close(a, b, **TOL[dtype])


def taylor_close(a, b):
    # |Σ y·dy| can cancel: compare to the scale of the terms, in float32
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max())))


# ----- batch norm (the CPU default) ----------------------------------------------------------------

def _bn_run(backend, monkeypatch, x, rm, rv, w, b, task, training, dy, taylor):
    xs, ws, bs = leaf(x), None if w is None else leaf(w), None if b is None else leaf(b)
    rms = None if rm is None else rm.clone()
    rvs = None if rv is None else rv.clone()
    score = torch.zeros(task.numel()) if taylor else None
    y = run_on(backend, monkeypatch, masked_batch_norm, xs, rms, rvs, ws, bs, task, training, 0.1, 1e-5, score)
    y.backward(dy)
    return dict(y=y.detach(), dx=xs.grad, dw=None if ws is None else ws.grad, db=None if bs is None else bs.grad,
                rm=rms, rv=rvs, score=score)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(7, 11), (5, 9, 13), (3, 13, 5, 7), (2, 3, 1, 1)])
def test_batch_norm_matches_reference(dtype, training, shape, monkeypatch):
    g = torch.Generator().manual_seed(hash((shape, training)) % 1000)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2)
    w, b = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
    rm, rv = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    dy = torch.randn(shape, generator=g, dtype=dtype)
    for task in (random_states(c, g), torch.full((c,), FREE, dtype=torch.int16)):
        ref = _bn_run("reference", monkeypatch, x, rm, rv, w, b, task, training, dy, True)
        got = _bn_run("cpp", monkeypatch, x, rm, rv, w, b, task, training, dy, True)
        for key in ("y", "dx", "dw", "db", "rm", "rv"):
            close(got[key], ref[key], dtype)
        taylor_close(got["score"], ref["score"])
        assert torch.equal(got["y"][:, task == PRUNED], torch.zeros_like(got["y"][:, task == PRUNED]))


@pytest.mark.parametrize("affine, stats", [(False, True), (True, False), (False, False)])
def test_batch_norm_without_affine_or_running_stats(affine, stats, monkeypatch):
    g = torch.Generator().manual_seed(11)
    x, dy = torch.randn(6, 5, 3, 2, generator=g), torch.randn(6, 5, 3, 2, generator=g)
    task = torch.tensor([FREE, 0, PRUNED, 2, FREE], dtype=torch.int16)
    w = torch.randn(5, generator=g) if affine else None
    b = torch.randn(5, generator=g) if affine else None
    rm, rv = (torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5) if stats else (None, None)
    for training in (True, False):
        ref = _bn_run("reference", monkeypatch, x, rm, rv, w, b, task, training, dy, True)
        got = _bn_run("cpp", monkeypatch, x, rm, rv, w, b, task, training, dy, True)
        for key in ("y", "dx", "dw", "db", "rm", "rv"):
            close(got[key], ref[key], torch.float32)
        taylor_close(got["score"], ref["score"])


def test_batch_norm_gradcheck_fp64(monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", "cpp")
    g = torch.Generator().manual_seed(7)
    task = torch.tensor([FREE, 1, 0, PRUNED, FREE, 0], dtype=torch.int16)
    free = task == FREE
    xb = torch.randn(5, 6, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    wb, bb = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)

    def bn(x, w_free, b_free):
        return masked_batch_norm(x, rm.clone(), rv.clone(), wb.masked_scatter(free, w_free),
                                 bb.masked_scatter(free, b_free), task, True, 0.1, 1e-5)
    assert torch.autograd.gradcheck(bn, (xb, leaf(wb[free]), leaf(bb[free])))


def test_batch_norm_nan_stays_in_its_channel(monkeypatch):
    """NaN in a PRUNED or FREE channel never reaches a frozen channel; PRUNED outputs are exactly 0."""
    monkeypatch.setenv("EIDETIC_BACKEND", "cpp")
    task = torch.tensor([0, FREE, PRUNED, 1], dtype=torch.int16)
    x = torch.randn(4, 4, 3, 3)
    clean = masked_batch_norm(x, torch.zeros(4), torch.ones(4), torch.randn(4), torch.randn(4), task, True)
    x_bad = x.clone()
    x_bad[:, 1] = float("nan")
    x_bad[:, 2] = float("inf")
    rm, rv = torch.zeros(4), torch.ones(4)
    w, b = torch.ones(4), torch.zeros(4)
    y = masked_batch_norm(x_bad, rm, rv, w, b, task, True)
    y2 = masked_batch_norm(x, torch.zeros(4), torch.ones(4), w, b, task, True)
    assert torch.equal(y[:, [0, 3]], y2[:, [0, 3]])
    assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))
    assert torch.equal(rm[[0, 2, 3]], torch.zeros(3)) and torch.isfinite(clean).all()


def test_batch_norm_layer_frozen_channels_bit_stable(monkeypatch):
    """Train FREE channels of a layer on the C++ path: frozen channels' outputs never change, bit for bit,
    whatever the other channels' states, the Taylor score, train or eval mode."""
    monkeypatch.setenv("EIDETIC_BACKEND", "cpp")
    torch.manual_seed(0)
    probe = torch.randn(3, 7, 5, 5)
    bn = EideticBatchNorm2d(7)
    bn(torch.randn(6, 7, 5, 5))
    bn.prune_neurons([1, 4])
    bn.freeze_free_neurons(0)
    bn.recycle_pruned_neurons()
    bn.eval()
    before = bn(probe).detach()
    bn.train()
    bn.enable_taylor()
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        bn(torch.randn(6, 7, 5, 5) * 3).square().mean().backward()
        opt.step()
    assert bn.last_backend == "cpp"
    frozen = bn.task_state == 0
    assert bool((bn.taylor_score[~frozen] > 0).all())
    bn.eval()
    after = bn(probe).detach()  # now with a Taylor score: another code path for the FREE channels
    assert torch.equal(before[:, frozen], after[:, frozen])
    assert not torch.equal(before[:, ~frozen], after[:, ~frozen])
    bn.enable_taylor(False)
    bn.prune_neurons(int((~frozen).nonzero()[0]))  # a later pruning step elsewhere in the layer
    assert torch.equal(before[:, frozen], bn(probe)[:, frozen].detach())
    bn.view_task = 0  # evaluating task 0: FREE channels act PRUNED
    assert torch.equal(before[:, frozen], bn(probe)[:, frozen].detach())
    bn.train()
    assert torch.equal(before[:, frozen], bn(probe)[:, frozen].detach())  # training: running stats too


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_does_not_depend_on_the_thread_count(training, monkeypatch):
    """Statistics run one channel per thread, the normalisation and dx over (sample, channel) planes split among
    threads: every value, running statistic, gradient and Taylor score is the same, bit for bit, on 1, 2 or 3
    threads."""
    g = torch.Generator().manual_seed(5)
    # 448 planes of 256 values: a grain of 128 planes (and of 2 channels for the statistics) gives each of 3
    # threads a range of its own
    shape, c = (64, 7, 16, 16), 7
    x, dy = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    task = torch.tensor([0, FREE, PRUNED, 1, FREE, 0, 2], dtype=torch.int16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_bn_run("cpp", monkeypatch, x, rm, rv, w, b, task, training, dy, True))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for key in ("y", "dx", "dw", "db", "rm", "rv", "score"):
            assert torch.equal(other[key], runs[0][key]), key


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0), (2, 0, 5), (0, 3)])
def test_the_extension_takes_empty_inputs(shape):
    """The wrapper sends empty batches to the reference; the extension itself returns empty outputs too."""
    ext = cpp.load_module()
    c = shape[1]
    x = torch.randn(shape)
    task, slot = torch.full((c,), FREE, dtype=torch.int16), torch.arange(c, dtype=torch.int32)
    w, b = torch.ones(c), torch.zeros(c)
    for stats in (True, False):
        y, mean, invstd = ext.bn_forward(x, torch.zeros(c), torch.ones(c), w, None, b, None, task, slot, stats, 0.1,
                                         1e-5)
        assert y.shape == x.shape and mean.shape == (c,)
        dx, dw, db = ext.bn_backward(torch.randn(shape), x, mean, invstd, w, None, b, None, task, slot, stats, True,
                                     True, True, True, None)
        assert dx.shape == x.shape and dw.shape == (c,) and db.shape == (c,)


def test_batch_norm_layer_with_every_channel_frozen(monkeypatch):
    """Empty trainable storage (every channel frozen): the frozen affine rows are still read."""
    torch.manual_seed(4)
    bn = EideticBatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn(torch.randn(6, 5, 3, 3) * 2 + 1)
    bn.freeze_free_neurons(0)
    assert bn.weight.numel() == 0
    x = torch.randn(4, 5, 3, 3)
    for training in (True, False):
        bn.train(training)
        ref = run_on("reference", monkeypatch, bn, x)
        got = run_on("cpp", monkeypatch, bn, x)
        close(got, ref, torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_all_free_is_the_twin_bit_for_bit(training, monkeypatch):
    """Every channel FREE and no Taylor score: the layer is its torch.nn twin, bit for bit (ATen path)."""
    monkeypatch.setenv("EIDETIC_BACKEND", "cpp")
    torch.manual_seed(3)
    twin = torch.nn.BatchNorm2d(5).train(training)
    layer = EideticBatchNorm2d.from_module(twin).train(training)
    x = torch.randn(4, 5, 3, 3)
    xa, xb = leaf(x), leaf(x)
    ya, yb = twin(xa), layer(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(twin.weight.grad, layer.weight.grad)
    assert torch.equal(twin.running_var, layer.running_var)


def test_batch_norm_is_the_cpu_default():
    from eidetic_kernels import backends
    if os.environ.get("EIDETIC_BACKEND"):
        pytest.skip("EIDETIC_BACKEND forces a backend")
    assert "batch_norm" in backends.CPU_DEFAULT_CPP_OPS
    assert backends.select("batch_norm", torch.device("cpu")) == "cpp"


def test_forcing_cpp_runs_a_whole_conv_body(monkeypatch):
    """EIDETIC_BACKEND=cpp forces C++ where it has the op (batch norm); linear and conv2d stay on the reference
    instead of failing, so a whole body runs, with the same numbers as the default."""
    from eidetic_kernels import convert
    torch.manual_seed(0)
    body = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)))
    x = torch.randn(2, 3, 6, 6)
    expected = run_on("reference", monkeypatch, body, x)
    got = run_on("cpp", monkeypatch, body, x)
    assert [body[0].last_backend, body[1].last_backend, body[4].last_backend] == ["reference", "cpp", "reference"]
    close(got, expected, torch.float32)


# ----- build, cache and fallback ------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("always")
    import eidetic_kernels
    from eidetic_kernels import cpp, FREE
    from eidetic_kernels.backends import BackendUnavailable
    from eidetic_kernels.functional import masked_batch_norm
    assert cpp._module is None and not cpp.cache_root().exists(), "importing must not build"
    x = torch.randn(4, 3, 2, 2)
    task = torch.tensor([FREE, 0, -1], dtype=torch.int16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = masked_batch_norm(x, torch.zeros(3), torch.ones(3), None, None, task, True)
    build_warnings = [w for w in caught if issubclass(w.category, cpp.CppBuildWarning)]
    assert len(build_warnings) == 1, [str(w.message) for w in caught]
    print("WARNING:", build_warnings[0].message)
    assert y[:, 2].eq(0).all() and torch.isfinite(y).all()
""")


def _python(script, **env):
    full_env = {**os.environ, **env}
    full_env.pop("EIDETIC_BACKEND", None) if "EIDETIC_BACKEND" not in env else None
    # a build can take minutes on two loaded cores (this one timed out at 120 s once, beside other runs)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=600)


def test_broken_compiler_falls_back_with_one_warning(tmp_path):
    res = _python(FALLBACK_SCRIPT, CXX="/nonexistent/c++", EIDETIC_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "C++ CPU backend is unavailable" in res.stdout and "/nonexistent/c++" in res.stdout

    forced = textwrap.dedent("""
        import torch
        from eidetic_kernels.backends import BackendUnavailable
        from eidetic_kernels.functional import masked_batch_norm
        try:
            masked_batch_norm(torch.randn(4, 3), None, None, None, None, torch.zeros(3, dtype=torch.int16), True)
        except BackendUnavailable as exc:
            print("ERROR:", exc)
        else:
            raise SystemExit("EIDETIC_BACKEND=cpp ran without a compiler")
    """)
    res = _python(forced, CXX="/nonexistent/c++", EIDETIC_CACHE=str(tmp_path / "cache2"), EIDETIC_BACKEND="cpp")
    assert res.returncode == 0, res.stderr
    assert "EIDETIC_BACKEND=cpp cannot run batch_norm" in res.stdout and "compiler" in res.stdout


def test_failing_compiler_falls_back_on_first_call(tmp_path):
    """A compiler that exists but fails: building a layer does not compile, its first call tries,
    warns once and runs the reference."""
    script = FALLBACK_SCRIPT.replace("x = torch.randn(4, 3, 2, 2)", "eidetic_kernels.EideticBatchNorm2d(3)\n"
                                     "assert not cpp.cache_root().exists(), 'building a layer must not build'\n"
                                     "x = torch.randn(4, 3, 2, 2)")
    res = _python(script, CXX=shutil.which("false") or "false", EIDETIC_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "C++ CPU backend is unavailable" in res.stdout and "failed" in res.stdout


def test_cached_build_is_reused():
    """A second process loads the cached build without compiling (the key covers sources and torch)."""
    cpp.load_module()
    res = _python("from eidetic_kernels import cpp; cpp.load_module(); print('built', cpp.build_seconds)")
    assert res.returncode == 0, res.stderr
    assert "built None" in res.stdout


def test_openmp_build_failure_falls_back_to_a_one_thread_build(tmp_path):
    """csrc/ is built with OpenMP (ATen's at::parallel_for needs it to use torch's threads); a compiler that
    cannot build it that way gets the same op built without it, with one warning saying so."""
    if cpp.OPENMP_CFLAGS:
        assert "-fopenmp" in cpp.OPENMP_CFLAGS and any("gomp" in f for f in cpp.OPENMP_LDFLAGS)
    script = FALLBACK_SCRIPT.replace("from eidetic_kernels import cpp, FREE\n", "from eidetic_kernels import cpp, FREE\n"
                                     "cpp.OPENMP_CFLAGS = ('-fopenmp', '-fno-such-flag-eidetic')\n")
    script += "assert cpp._module is not None and cpp._failure is None\n"
    script += "assert torch.equal(y[:, 1], (x[:, 1] - 0) / (1 + 1e-5) ** 0.5)\n"
    res = _python(script, EIDETIC_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "built without OpenMP" in res.stdout and "one thread" in res.stdout


def test_a_first_build_says_so_where_python_prints_it(tmp_path, monkeypatch, caplog):
    """The first build stalls the first call for 15-40 s: it is said at WARNING level (printed by Python without
    any logging set-up), once; a cached build loads silently."""
    import logging

    import torch.utils.cpp_extension as ext
    from eidetic_kernels import cpp

    built = []

    def fake_load(name, build_directory, **kwargs):
        Path(build_directory, f"{name}.so").write_bytes(b"")  # what a real build leaves in the cache
        built.append(name)
        return object()

    monkeypatch.setenv("EIDETIC_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp, "_missing_tools", lambda: None)
    monkeypatch.setattr(cpp, "build_seconds", cpp.build_seconds)  # put back afterwards
    monkeypatch.setattr(ext, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger="eidetic"):
        cpp._build()
        cpp._build()
    said = [r for r in caplog.records if "building the C++ CPU backend" in r.getMessage()]
    assert len(built) == 2 and len(said) == 1 and said[0].levelno == logging.WARNING
    assert str(tmp_path) in said[0].getMessage()
