"""Triton masked_linear against the dense-mask spec (naive.py, run in float64), under the interpreter on CPU.

Each case draws fresh random states, storages and inputs; sizes are odd and not multiples of the tiles.
Cases hold full-width storages with rows by slot (the layout the spec reads); ``kern`` hands the kernels
the range table and the compact frozen storage built from them, as a layer stores it.
Tolerances per dtype are in TOL; fp32 uses exact ("ieee") dot products, so it matches tightly.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.linear import naive  # noqa: E402
from eidetic_kernels.ops.linear import triton as tri  # noqa: E402
from eidetic_kernels.state import (FREE, PRUNED, assemble_rows, compact_rows, is_frozen, make_table,  # noqa: E402
                                   storage_slots)

pytestmark = pytest.mark.triton


class ref:
    """The dense-mask spec (naive.py) on the split full-width storages the kernels read (rows by slot)."""

    @staticmethod
    def linear(x, tw, fw, tb, fb, in_task, out_task, lo, slot, plan=None, taylor_score=None):
        w = assemble_rows(tw, fw, out_task, slot)
        b = None if tb is None else assemble_rows(tb, fb, out_task, slot)
        return naive.masked_linear(x, w, b, in_task, out_task, lo, taylor_score)


class kern:
    """The Triton backend on the same case: range table from the states, frozen rows stored compactly."""

    @staticmethod
    def linear(x, tw, fw, tb, fb, in_task, out_task, lo, slot, plan=None, taylor_score=None):
        table = make_table(in_task, out_task, lo)
        blocks = table.frozen_blocks
        by_neuron = assemble_rows(tw.detach(), fw, out_task, slot)
        fw_c = compact_rows(by_neuron, blocks)
        fb_c = None
        if tb is not None:
            b = assemble_rows(tb.detach(), fb, out_task, slot)
            fb_c = torch.cat([b[blk.rows] for blk in blocks]) if blocks else tb.new_empty(0)
        return tri.linear(x, tw, tb, fw_c, fb_c, table, taylor_score)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=1.5e-1, rtol=5e-2)}
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 path: GPU only"))]


def random_states(n_out, n_in, kind, gen):
    """(in_task, out_task, out_min_task) for a named scenario; tasks 0..2 interleaved with FREE/PRUNED."""
    choices = {"mixed": [FREE, 0, 1, 2, PRUNED], "all_free": [FREE], "all_frozen": [0, 1, 2],
               "all_pruned": [PRUNED], "free_pruned": [FREE, PRUNED]}[kind]
    pick = lambda n, vals: torch.tensor(vals, dtype=torch.int16)[torch.randint(len(vals), (n,), generator=gen)]  # noqa: E731
    out_task = pick(n_out, choices)
    in_task = pick(n_in, [0, 1, 2, FREE, PRUNED]) if kind != "all_free" else torch.zeros(n_in, dtype=torch.int16)
    lo = torch.zeros(n_out, dtype=torch.int16)
    if kind in ("mixed", "all_frozen"):
        # forward transfer off for some neurons: they read only their own task's inputs
        own = (torch.rand(n_out, generator=gen) < 0.3) & is_frozen(out_task)
        lo[own] = out_task[own]
        lo[(out_task == FREE) & (torch.rand(n_out, generator=gen) < 0.3)] = 1
    return in_task, out_task, lo


def make_case(M, K, N, kind, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    in_task, out_task, lo = random_states(N, K, kind, gen)
    slot = storage_slots(out_task).to(torch.int32)
    n_frozen = int(is_frozen(out_task).sum())
    n_train = N - n_frozen
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    case = dict(x=rnd(M, K), tw=rnd(n_train, K), fw=rnd(n_frozen, K),
                tb=rnd(n_train) if bias else None, fb=rnd(n_frozen) if bias else None,
                in_task=in_task, out_task=out_task, lo=lo, slot=slot, g=rnd(M, N))
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def run(backend, c, x=None, dtype=None, taylor=True, grad="random"):
    """Forward + backward; returns y, dx, dw, db, taylor score (all detached)."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    x = cast(c["x"] if x is None else x).detach().requires_grad_()
    tw = cast(c["tw"]).detach().requires_grad_()
    tb = None if c["tb"] is None else cast(c["tb"]).detach().requires_grad_()
    fw, fb = cast(c["fw"]), cast(c["fb"])
    plan = None
    score = torch.zeros(c["out_task"].numel(), device=DEVICE) if taylor else None
    y = backend.linear(x, tw, fw, tb, fb, c["in_task"], c["out_task"], c["lo"], c["slot"], plan, score)
    if not y.requires_grad:  # a backend may return a constant 0 when every neuron is PRUNED
        return [y.detach(), None, None, None, None]
    if grad == "sum":
        y.sum().backward()  # stride-0 incoming gradient
    else:
        (y * cast(c["g"]).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad, tw.grad, None if tb is None else tb.grad, score]


def assert_close(got, want, dtype, names=("y", "dx", "dw", "db", "taylor")):
    for name, a, b in zip(names, got, want):
        if a is None or b is None:  # a storage no live output reads may get None or a zero gradient
            assert all(t is None or not t.any() for t in (a, b)), name
            continue
        assert a.shape == b.shape, name
        tol = TOL[dtype] if name != "taylor" else dict(atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"] * 4)
        torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{name}: {m}", **tol)


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """Run the kernels even where the dense shortcut would call torch's GEMM."""
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mixed", "all_free", "all_frozen", "all_pruned", "free_pruned"])
def test_matches_reference(kind, dtype):
    c = make_case(37, 45, 29, kind, dtype, seed=sum(map(ord, kind)))
    got = run(kern, c)
    want = run(ref, c, dtype=torch.float64)
    if kind == "all_pruned":
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert got[2] is None  # no row is computed: the trainable storage gets no gradient
        got, want = got[:1], want[:1]
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_tiles_many_windows_per_tile(dtype):
    """16-wide tiles: several tiles per dim, windows mixing inside tiles, a tail tile on every dim."""
    c = make_case(35, 41, 53, "mixed", dtype, seed=3)
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with triton_common.override_blocks("fwd", **blocks), triton_common.override_blocks("dx", **blocks), \
            triton_common.override_blocks("dw", **blocks):
        got = run(kern, c)
    assert_close(got, run(ref, c, dtype=torch.float64), dtype)


@pytest.mark.parametrize("limit", [1, 2])
def test_launches_split_at_the_grid_limit_give_the_same_bits(monkeypatch, limit):
    """A GPU grid holds at most 65535 programs on its second axis: a forward with more row windows, or a dX with
    more column tiles (over 2 million fp32 inputs: a head after a flatten of large feature maps), launches in parts.
    With the limit lowered, the parts give the one launch's bits, small tiles making many programs."""
    c = make_case(19, 41, 53, "mixed", torch.float32, seed=5)
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with triton_common.override_blocks("fwd", **blocks), triton_common.override_blocks("dx", **blocks):
        whole = run(kern, c)
        monkeypatch.setattr(triton_common, "GRID_AXIS_LIMIT", limit)
        parts = run(kern, c)
    for name, a, b in zip(("y", "dx", "dw", "db", "taylor"), parts, whole):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_grad_split_over_the_batch_matches_reference(dtype):
    # dW/db reduced over ranges of the batch (what a GPU gets when a layer has few dW tiles): float32 partials
    # summed in order give the spec's gradients; the last range is shorter
    c = make_case(75, 41, 29, "mixed", dtype, seed=13)
    with triton_common.override_blocks("dw", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), \
            triton_common.override_blocks("dw_split", SPLIT=3):
        assert triton_common.dw_split(1, 75, 16) == (3, 32)
        got = run(kern, c)
    assert_close(got, run(ref, c, dtype=torch.float64), dtype)


def task_major_case(M, K, rows, widths, dtype, seed):
    """A network's layout: neurons of tasks 0.. then FREE ones (``rows`` per task, the last entry FREE), inputs
    task-major too with ``widths[t]`` inputs of task t, forward transfer on (every window a prefix)."""
    gen = torch.Generator().manual_seed(seed)
    in_task = torch.full((K,), FREE, dtype=torch.int16)
    out_task = torch.full((sum(rows),), FREE, dtype=torch.int16)
    a = b = 0
    for t, (n, w) in enumerate(zip(rows[:-1], widths)):
        out_task[a:a + n], in_task[b:b + w] = t, t
        a, b = a + n, b + w
    lo = torch.zeros_like(out_task)
    slot = storage_slots(out_task).to(torch.int32)
    n_frozen = int(is_frozen(out_task).sum())
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    case = dict(x=rnd(M, K), tw=rnd(out_task.numel() - n_frozen, K), fw=rnd(n_frozen, K),
                tb=rnd(out_task.numel() - n_frozen), fb=rnd(n_frozen), in_task=in_task, out_task=out_task, lo=lo,
                slot=slot, g=rnd(M, out_task.numel()))
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("widths, align", [((16, 16), (16, 16, 16)), ((5, 11), (16, 16, 1)), ((8, 8), (16, 16, 8))])
def test_alignment_facts_of_task_major_tables(widths, align):
    # the offsets the forward declares aligned (tiles.table_align): prefix windows start at 0, trainable rows
    # at multiples of 64 inputs, frozen compact rows at multiples of their block's width; and the kernels
    # (one loop for frozen rows and one for trainable ones when they differ) match the spec
    c = task_major_case(37, 64, (16, 16, 32), widths, torch.float32, seed=sum(widths))
    table = make_table(c["in_task"], c["out_task"], c["lo"])
    tiles = tri.build_tiles(table, False, *tri.tile_shape(torch.float32))
    assert not tiles.scattered
    assert tri.table_align(tiles.tensors) == align
    assert_close(run(kern, c), run(ref, c, dtype=torch.float64), torch.float32)


def test_alignment_of_scattered_and_offset_windows():
    gen = torch.Generator().manual_seed(3)
    in_task, out_task, lo = random_states(29, 45, "mixed", gen)
    tiles = tri.build_tiles(make_table(in_task, out_task, lo), False, 64, 64)
    assert tiles.scattered and tri.table_align(tiles.tensors)[0] == 1  # gathered windows: no start declared
    # forward transfer off: task 1's window starts after task 0's 6 inputs
    c = task_major_case(9, 32, (4, 4, 8), (6, 10), torch.float32, seed=5)
    lo = c["out_task"].clone()
    lo[lo == FREE] = 0
    tiles = tri.build_tiles(make_table(c["in_task"], c["out_task"], lo), False, 64, 64)
    assert tri.table_align(tiles.tensors)[0] == 2


def test_noncontiguous_3d_input_and_stride0_grad():
    c = make_case(4 * 7, 33, 19, "mixed", torch.float32, seed=5)
    base = torch.randn(7, 4, 2 * 33, device=DEVICE)
    x = base[:, :, ::2].transpose(0, 1)  # [4, 7, 33], non-contiguous
    assert not x.is_contiguous()
    got = run(kern, c, x=x, grad="sum")
    want = run(ref, c, x=x, dtype=torch.float64, grad="sum")
    assert got[0].shape == (4, 7, 19)
    assert_close(got, want, torch.float32)


def test_no_bias_and_no_taylor():
    c = make_case(21, 17, 23, "mixed", torch.float32, bias=False, seed=7)
    got = run(kern, c, taylor=False)
    assert_close(got, run(ref, c, dtype=torch.float64, taylor=False), torch.float32)


def test_frozen_storage_gets_no_gradient_and_pruned_rows_get_zero():
    c = make_case(13, 19, 31, "mixed", torch.float32, seed=11)
    fw = c["fw"].clone().requires_grad_()
    tw = c["tw"].clone().requires_grad_()
    y = kern.linear(c["x"], tw, fw, c["tb"], c["fb"], c["in_task"], c["out_task"], c["lo"], c["slot"])
    y.sum().backward()
    assert fw.grad is None
    pruned_rows = c["slot"][c["out_task"] == PRUNED].long()
    assert torch.equal(tw.grad[pruned_rows], torch.zeros_like(tw.grad[pruned_rows]))


def test_nan_in_dead_inputs_and_weights_stays_out_of_live_outputs():
    c = make_case(17, 29, 37, "mixed", torch.float32, seed=13)
    clean = run(kern, c, taylor=False)[0]
    x = c["x"].clone()
    # inputs from FREE or PRUNED producers: dead for every frozen neuron (and PRUNED ones for all)
    x[:, (c["in_task"] == FREE) | (c["in_task"] == PRUNED)] = float("nan")
    fw, tw = c["fw"].clone(), c["tw"].clone()
    # weights on dead synapses of frozen rows, and the whole row of every PRUNED neuron
    frozen = is_frozen(c["out_task"])
    for i in frozen.nonzero().flatten().tolist():
        t, lo = int(c["out_task"][i]), int(c["lo"][i])
        dead = (c["in_task"] == PRUNED) | (c["in_task"] < lo) | (c["in_task"] > t)
        fw[c["slot"][i].long(), dead] = float("inf")
    tw[c["slot"][c["out_task"] == PRUNED].long()] = float("nan")
    y = kern.linear(x, tw, fw, c["tb"], c["fb"], c["in_task"], c["out_task"], c["lo"], c["slot"])
    assert torch.equal(y[:, frozen], clean[:, frozen]), "a frozen output changed or saw a NaN"
    pruned = c["out_task"] == PRUNED
    assert torch.equal(y[:, pruned], torch.zeros_like(y[:, pruned]))


def test_frozen_outputs_are_bit_stable_when_everything_else_changes():
    c = make_case(19, 27, 41, "mixed", torch.float32, seed=17)
    frozen = is_frozen(c["out_task"])
    before = kern.linear(c["x"], c["tw"], c["fw"], c["tb"], c["fb"], c["in_task"], c["out_task"], c["lo"], c["slot"])
    # retrain FREE rows, change FREE inputs, prune/unprune trainable neurons: frozen outputs stay bit-equal
    out_task = c["out_task"].clone()
    trainable = (~frozen).nonzero().flatten()
    out_task[trainable] = torch.where(out_task[trainable] == FREE, PRUNED, FREE).to(torch.int16)
    x = c["x"].clone()
    x[:, c["in_task"] == FREE] = torch.randn_like(x[:, c["in_task"] == FREE]) * 1e6
    after = kern.linear(x, torch.randn_like(c["tw"]), c["fw"], torch.randn_like(c["tb"]), c["fb"], c["in_task"],
                       out_task, c["lo"], c["slot"])
    assert torch.equal(before[:, frozen], after[:, frozen])


def test_dense_shortcut_matches_kernels(monkeypatch):
    c = make_case(23, 31, 17, "all_free", torch.float32, seed=19)
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", True)
    short = run(kern, c, taylor=False)
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)
    assert_close(short, run(kern, c, taylor=False), torch.float32)


def test_layer_runs_triton_backend(monkeypatch):
    from eidetic_kernels import EideticLinear
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch.manual_seed(0)
    layer = EideticLinear(23, 19).to(DEVICE)
    layer.prune_neurons([0, 3, 5])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    layer.prune_neurons([3])
    x = torch.randn(9, 23, device=DEVICE)
    y = layer(x)
    assert layer.last_backend == "triton"
    monkeypatch.setenv("EIDETIC_BACKEND", "reference")
    torch.testing.assert_close(y, layer(x), **TOL[torch.float32])
