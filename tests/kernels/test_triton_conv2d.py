"""Triton masked_conv2d (implicit GEMM) against the dense-mask spec (naive.py, run in float64), under the interpreter.

Odd spatial sizes and channel counts, several stride/padding/dilation geometries; tolerances in TOL. Cases hold
full-width storages with rows by slot (the layout the spec reads); ``kern`` hands the kernels the range table
and the compact frozen storage built from them, as a layer stores it.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.conv2d import naive  # noqa: E402
from eidetic_kernels.ops.conv2d import triton as tri  # noqa: E402
from eidetic_kernels.state import (FREE, PRUNED, assemble_rows, compact_rows, is_frozen, make_table,  # noqa: E402
                                   storage_slots)

from .test_triton_linear import DEVICE, DTYPES, TOL, assert_close, random_states  # noqa: E402

pytestmark = pytest.mark.triton


class ref:
    """The dense-mask spec (naive.py) on the split full-width storages the kernels read (rows by slot)."""

    @staticmethod
    def conv2d(x, tw, fw, tb, fb, in_task, out_task, lo, slot, stride, padding, dilation, plan=None,
               taylor_score=None):
        w = assemble_rows(tw, fw, out_task, slot)
        b = None if tb is None else assemble_rows(tb, fb, out_task, slot)
        return naive.masked_conv2d(x, w, b, in_task, out_task, stride, padding, dilation, lo, taylor_score)


class kern:
    """The Triton backend on the same case: range table from the states, frozen rows stored compactly."""

    @staticmethod
    def conv2d(x, tw, fw, tb, fb, in_task, out_task, lo, slot, stride, padding, dilation, plan=None,
               taylor_score=None):
        table = make_table(in_task, out_task, lo)
        blocks = table.frozen_blocks
        fw_c = compact_rows(assemble_rows(tw.detach(), fw, out_task, slot), blocks)
        fb_c = None
        if tb is not None:
            b = assemble_rows(tb.detach(), fb, out_task, slot)
            fb_c = torch.cat([b[blk.rows] for blk in blocks]) if blocks else tb.new_empty(0)
        return tri.conv2d(x, tw, tb, fw_c, fb_c, table, stride, padding, dilation, taylor_score)


GEOMETRIES = {  # (kernel, stride, padding, dilation)
    "3x3_s1_p1": ((3, 3), (1, 1), (1, 1), (1, 1)),
    "3x2_s2_p12_d12": ((3, 2), (2, 1), (1, 2), (1, 2)),
    "1x1": ((1, 1), (1, 1), (0, 0), (1, 1)),
    "5x3_s3_p2": ((5, 3), (3, 2), (2, 0), (1, 1)),
}


def make_case(N, C_in, H, W, C_out, geometry, kind, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    (kh, kw), stride, padding, dilation = GEOMETRIES[geometry]
    in_task, out_task, lo = random_states(C_out, C_in, kind, gen)
    slot = storage_slots(out_task).to(torch.int32)
    n_frozen = int(is_frozen(out_task).sum())
    n_train = C_out - n_frozen
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    case = dict(x=rnd(N, C_in, H, W), tw=rnd(n_train, C_in, kh, kw), fw=rnd(n_frozen, C_in, kh, kw),
                tb=rnd(n_train) if bias else None, fb=rnd(n_frozen) if bias else None,
                in_task=in_task, out_task=out_task, lo=lo, slot=slot)
    case = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case.update(stride=stride, padding=padding, dilation=dilation, seed=seed)
    return case


def run(backend, c, x=None, dtype=None, taylor=True, grad="random"):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    x = cast(c["x"] if x is None else x).detach().requires_grad_()
    tw = cast(c["tw"]).detach().requires_grad_()
    tb = None if c["tb"] is None else cast(c["tb"]).detach().requires_grad_()
    plan = None
    score = torch.zeros(c["out_task"].numel(), device=DEVICE) if taylor else None
    y = backend.conv2d(x, tw, cast(c["fw"]), tb, cast(c["fb"]), c["in_task"], c["out_task"], c["lo"], c["slot"],
                       c["stride"], c["padding"], c["dilation"], plan, score)
    if not y.requires_grad:  # a backend may return a constant 0 when every channel is PRUNED
        return [y.detach(), None, None, None, None]
    if grad == "sum":
        y.sum().backward()
    else:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(c["seed"] + 1)).to(y.device, y.dtype)
        (y * g).sum().backward()
    return [y.detach(), x.grad, tw.grad, None if tb is None else tb.grad, score]


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    monkeypatch.setattr(tri, "DENSE_SHORTCUT", False)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_geometries_match_reference(geometry):
    c = make_case(2, 5, 11, 9, 7, geometry, "mixed", torch.float32, seed=len(geometry))
    assert_close(run(kern, c), run(ref, c, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mixed", "all_free", "all_frozen", "all_pruned"])
def test_states_match_reference(kind, dtype):
    c = make_case(2, 6, 7, 8, 9, "3x2_s2_p12_d12", kind, dtype, seed=sum(map(ord, kind)))
    got = run(kern, c)
    if kind == "all_pruned":  # (the reference's empty conv cannot run this case)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in got[:2])
        assert got[2] is None and got[3] is None  # no row is computed: the trainable storage gets no gradient
        return
    assert_close(got, run(ref, c, dtype=torch.float64), dtype)


def test_small_tiles_noncontiguous_input_stride0_grad_no_bias():
    c = make_case(2, 9, 6, 5, 19, "3x3_s1_p1", "mixed", torch.float32, bias=False, seed=23)
    x = torch.randn(2, 6, 5, 9, device=DEVICE).permute(0, 3, 1, 2)  # channels-last memory
    assert not x.is_contiguous()
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with triton_common.override_blocks("fwd", **blocks), triton_common.override_blocks("dx", **blocks), \
            triton_common.override_blocks("dw", **blocks):
        got = run(kern, c, x=x, grad="sum")
    assert_close(got, run(ref, c, x=x, dtype=torch.float64, grad="sum"), torch.float32)


@pytest.mark.parametrize("splits", [2, 5])
def test_weight_grad_split_over_positions_matches_reference(splits):
    # dW/db reduced over ranges of output positions (what a GPU gets when a layer has few dW tiles): float32
    # partials summed in order give the spec's gradients; ranges need not divide the positions evenly
    c = make_case(3, 6, 7, 5, 9, "3x3_s1_p1", "mixed", torch.float32, seed=31 + splits)
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with triton_common.override_blocks("dw", **blocks), triton_common.override_blocks("dw_split", SPLIT=splits):
        assert triton_common.dw_split(1, 3 * 7 * 5, 16)[0] > 1  # ranges of whole BLOCK_M tiles: 5 -> 4 here
        got = run(kern, c)
    assert_close(got, run(ref, c, dtype=torch.float64), torch.float32)


def test_nan_in_dead_input_channels_stays_out_and_frozen_bits_are_stable():
    c = make_case(2, 7, 6, 7, 11, "3x3_s1_p1", "mixed", torch.float32, seed=29)
    args = lambda x, tw, tb, task: (x, tw, c["fw"], tb, c["fb"], c["in_task"], task, c["lo"], c["slot"],  # noqa: E731
                                    c["stride"], c["padding"], c["dilation"])
    clean = kern.conv2d(*args(c["x"], c["tw"], c["tb"], c["out_task"]))
    frozen = is_frozen(c["out_task"])
    x = c["x"].clone()
    x[:, (c["in_task"] == FREE) | (c["in_task"] == PRUNED)] = float("nan")
    out_task = c["out_task"].clone()
    trainable = (~frozen).nonzero().flatten()
    out_task[trainable] = torch.where(out_task[trainable] == FREE, PRUNED, FREE).to(torch.int16)
    tw = torch.full_like(c["tw"], float("nan"))
    y = kern.conv2d(*args(x, tw, torch.randn_like(c["tb"]), out_task))
    assert torch.equal(y[:, frozen], clean[:, frozen])
    pruned = out_task == PRUNED
    assert torch.equal(y[:, pruned], torch.zeros_like(y[:, pruned]))


def test_layer_runs_triton_backend(monkeypatch):
    from eidetic_kernels import EideticConv2d
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch.manual_seed(0)
    layer = EideticConv2d(4, 6, 3, stride=2, padding=1).to(DEVICE)
    layer.prune_neurons([1, 4])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    x = torch.randn(2, 4, 9, 7, device=DEVICE)
    y = layer(x)
    assert layer.last_backend == "triton"
    monkeypatch.setenv("EIDETIC_BACKEND", "reference")
    torch.testing.assert_close(y, layer(x), **TOL[torch.float32])
