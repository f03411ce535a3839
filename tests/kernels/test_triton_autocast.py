"""The Triton custom ops under torch.autocast return the dtype their torch twin returns there.

``eidetic::triton_linear`` and ``eidetic::triton_conv2d`` cast input, weights and biases to the autocast dtype
(as F.linear / F.conv2d; float64 stays), ``eidetic::triton_batch_norm`` runs in its input's dtype (as
F.batch_norm, which autocast does not cast on CPU or CUDA). Checked on the CPU autocast device (same
registration as CUDA's), on real tensors under the interpreter, on fake tensors, and in compiled graphs.
A table built for one tile shape runs with that shape in any dtype (``tiles.table_shape``).
"""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

pytest.importorskip("triton")

import eidetic_kernels as ek  # noqa: E402
from eidetic_kernels.ops import triton_common  # noqa: E402
from eidetic_kernels.ops.batch_norm import triton as bn  # noqa: E402
from eidetic_kernels.ops.conv2d import triton as conv  # noqa: E402
from eidetic_kernels.ops.linear import triton as lin  # noqa: E402
from eidetic_kernels.ops.tiles import build_tiles, table_shape, tile_shape  # noqa: E402
from eidetic_kernels.state import FREE, PRUNED, compact_rows, make_table, storage_slots  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = [torch.bfloat16, torch.float16]

IN_TASK = torch.tensor([0, 1, FREE, PRUNED, 0], dtype=torch.int16)
OUT_TASK = torch.tensor([0, FREE, 1, PRUNED, FREE, 0], dtype=torch.int16)  # 3 trainable rows (FREE, PRUNED)


def _case(dtype=torch.float32, conv_op=False, in_task=IN_TASK):
    """(x, trainable weight, frozen compact weight, trainable bias, frozen bias, tiles) on DEVICE."""
    g = torch.Generator().manual_seed(0)
    n_in = in_task.numel()
    table = make_table(in_task.to(DEVICE), OUT_TASK.to(DEVICE), torch.zeros_like(OUT_TASK).to(DEVICE))
    tiles = build_tiles(table, False, *tile_shape(dtype), torch.device(DEVICE))
    k = (3, 3) if conv_op else ()
    full = torch.randn(6, n_in, *k, generator=g, dtype=torch.float64)
    fw = compact_rows(full, table.frozen_blocks)
    tw = torch.randn(3, n_in, *k, generator=g, dtype=torch.float64)
    tb, fb = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(*((2, n_in, 6, 6) if conv_op else (4, n_in)), generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (x, tw, fw, tb, fb)] + [tiles]


def _linear(x, tw, fw, tb, fb, tiles):
    return torch.ops.eidetic.triton_linear(x, tw, fw, tb, fb, list(tiles.tensors), 6, tiles.scattered, None)


def _conv(x, tw, fw, tb, fb, tiles):
    return torch.ops.eidetic.triton_conv2d(x, tw, fw, tb, fb, list(tiles.tensors), 6, tiles.scattered, [1, 1],
                                           [1, 1], [1, 1], None)


def _twin(op, x, tw, tb):
    return F.linear(x, tw, tb) if op is _linear else F.conv2d(x, tw, tb, 1, 1)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("op", [_linear, _conv], ids=["linear", "conv2d"])
def test_gemm_ops_cast_as_their_twins(op, low):
    """fp32 inputs under autocast: the op returns the autocast dtype (as F.linear/F.conv2d), with the values
    of the op called on inputs cast by hand; gradients reach the fp32 tensors in fp32."""
    x, tw, fw, tb, fb, tiles = _case(conv_op=op is _conv)
    x.requires_grad_()
    tw.requires_grad_()
    with torch.autocast(DEVICE, low):
        y = op(x, tw, fw, tb, fb, tiles)
        twin = _twin(op, x, tw, tb)
    assert y.dtype == twin.dtype == low
    by_hand = op(*(t.detach().to(low) for t in (x, tw, fw, tb, fb)), tiles)
    assert torch.equal(y.detach(), by_hand)
    y.float().sum().backward()
    assert x.grad.dtype == tw.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and bool(x.grad.ne(0).any())


@pytest.mark.parametrize("op", [_linear, _conv], ids=["linear", "conv2d"])
def test_gemm_ops_keep_float64_under_autocast(op):
    """float64 is not eligible for autocast (ATen leaves it): the op runs in float64, as its twin."""
    x, tw, fw, tb, fb, tiles = _case(torch.float64, conv_op=op is _conv)
    with torch.autocast(DEVICE, torch.bfloat16):
        y = op(x, tw, fw, tb, fb, tiles)
        twin = _twin(op, x, tw, tb)
    assert y.dtype == twin.dtype == torch.float64


@pytest.mark.parametrize("op", [_linear, _conv], ids=["linear", "conv2d"])
def test_gemm_ops_on_fake_tensors_under_autocast(op):
    """The autocast rule is a dispatcher kernel: fake tensors (what torch.compile traces with) see it too."""
    case = _case(conv_op=op is _conv)
    with FakeTensorMode() as mode:
        x, tw, fw, tb, fb = (mode.from_tensor(t) for t in case[:5])
        tiles = case[5]._replace(tensors=tuple(mode.from_tensor(t) for t in case[5].tensors))
        with torch.autocast(DEVICE, torch.bfloat16):
            y = op(x, tw, fw, tb, fb, tiles)
            twin = _twin(op, x, tw, tb)
        plain = op(x, tw, fw, tb, fb, tiles)
    assert y.dtype == twin.dtype == torch.bfloat16
    assert plain.dtype == torch.float32


def _bn_args(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 3, 3, generator=g).to(DEVICE, dtype)
    slot = storage_slots(OUT_TASK).int().to(DEVICE)
    tw, tb = torch.randn(3, generator=g).to(DEVICE), torch.randn(3, generator=g).to(DEVICE)
    fw, fb = torch.randn(3, generator=g).to(DEVICE), torch.randn(3, generator=g).to(DEVICE)
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    return x, rm, rv, tw, fw, tb, fb, OUT_TASK.to(DEVICE), slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_norm_op_runs_in_its_input_dtype(dtype):
    """As F.batch_norm under autocast: an fp32 input stays fp32, a bf16 input (fp32 parameters and statistics)
    gives bf16; nothing is cast, so the output equals the op's outside autocast."""
    x, rm, rv, tw, fw, tb, fb, task, slot = _bn_args(dtype)
    order = bn.channel_order(task)
    with torch.autocast(DEVICE, torch.bfloat16):
        y, mean, invstd, _, _ = torch.ops.eidetic.triton_batch_norm(x, rm, rv, tw, fw, tb, fb, task, slot, *order,
                                                                     True, 1e-5, False, None)
        twin = F.batch_norm(x, rm.clone(), rv.clone(), torch.ones(6, device=DEVICE), None, True)
    assert y.dtype == twin.dtype == dtype
    assert mean.dtype == invstd.dtype == torch.float32
    plain = torch.ops.eidetic.triton_batch_norm(x, rm, rv, tw, fw, tb, fb, task, slot, *order, True, 1e-5, False,
                                                None)[0]
    assert torch.equal(y, plain)


def _network_layer():
    torch.manual_seed(0)
    layer = ek.EideticLinear(13, 11).to(DEVICE)
    layer.prune_neurons([1, 3, 4])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    return layer


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_linear_under_autocast_gives_the_twin_dtype(monkeypatch, backend):
    """torch.compile of an EideticLinear and of the bare op, under autocast: the twin's dtype, eager's values."""
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")
    torch._dynamo.reset()
    layer = _network_layer()
    x = torch.randn(5, 13, device=DEVICE)
    with torch.autocast(DEVICE, torch.bfloat16):
        eager = layer(x)
        compiled = torch.compile(layer, backend=backend, fullgraph=True)(x)
        twin = torch.nn.Linear(13, 11).to(DEVICE)(x)
    assert compiled.dtype == eager.dtype == twin.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

    case = _case()
    torch._dynamo.reset()
    with torch.autocast(DEVICE, torch.bfloat16):
        y = torch.compile(_linear, backend=backend, fullgraph=True)(*case)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _linear(*(t.to(torch.bfloat16) for t in case[:5]), case[5]))


@pytest.mark.parametrize("op", [_linear, _conv], ids=["linear", "conv2d"])
def test_a_table_runs_with_the_tile_shape_it_was_built_for(op):
    """The kernels launch with the table's own (ROWS, COLS), not the running dtype's: a table of 16x16 tiles
    (40 inputs in task-major ranges: three dX programs where the dtype's tiles make one) gives the forward and gradients of a
    table of the dtype's tiles, as under autocast, where an op gets a table built for another dtype."""
    in_task = torch.tensor([0] * 14 + [1] * 10 + [FREE] * 12 + [PRUNED] * 4, dtype=torch.int16)  # task-major
    x, tw, fw, tb, fb, tiles = _case(conv_op=op is _conv, in_task=in_task)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with triton_common.override_blocks("fwd", **small), triton_common.override_blocks("dx", **small):
        table = make_table(in_task.to(DEVICE), OUT_TASK.to(DEVICE), torch.zeros_like(OUT_TASK).to(DEVICE))
        small_tiles = build_tiles(table, False, *tile_shape(torch.float32), torch.device(DEVICE))
    assert table_shape(small_tiles.tensors) == (16, 16) != table_shape(tiles.tensors)
    assert small_tiles.tensors[4].shape[0] == 3 > tiles.tensors[4].shape[0]  # dX programs
    results = []
    for t in (tiles, small_tiles):
        xi, twi = x.clone().requires_grad_(), tw.clone().requires_grad_()
        y = op(xi, twi, fw, tb, fb, t)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, twi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
