"""Triton kernels past 2^31 elements: rows (linear), output positions (conv2d) and values per channel
(batch norm) whose flat offsets do not fit in int32.

The kernels compute every offset that can pass 2^31 in int64 (a program id times a tile, a sample index
times a sample's size, a split times its chunk). On a GPU each case runs at a size just past 2^31 (about
30 GB of GPU memory, bf16) and checks the rows past the boundary against torch on the same weights; on
the CPU the same checks run at a small size under the interpreter, so the checks themselves are tested
wherever the suite runs.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from eidetic_kernels import EideticBatchNorm2d, EideticConv2d, EideticLinear  # noqa: E402

pytestmark = pytest.mark.triton
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BIG = 2**31 + 4096  # rows / positions / values per channel on a GPU: past int32, not a tile multiple
DTYPE = torch.bfloat16 if GPU else torch.float32
# bf16 outputs of a single synapse (linear, 1x1 conv): a few ulp; the sums over 2^31 values (dW, batch
# statistics) are compared in relative terms against torch's fp32 sums
TOL = dict(atol=2e-2, rtol=2e-2) if GPU else dict(atol=1e-5, rtol=1e-5)
SUM_RTOL = 1e-2 if GPU else 1e-4


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("EIDETIC_BACKEND", "triton")  # on the CPU too (interpreter): the kernels, not ATen


def _size() -> int:
    if not GPU:
        return 3000
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip(f"needs 48 GiB of free GPU memory for tensors of 2^31 elements, {free / 2**30:.0f} GiB free")
    return BIG


def _frozen_free(layer):
    """Neuron 0 frozen by task 0, neuron 1 FREE (recycled): the kernels run, not torch's dense shortcut."""
    layer.prune_neurons([1])
    layer.freeze_free_neurons(0)
    layer.recycle_pruned_neurons()
    return layer


def _edges(n: int):
    """Row indices either side of 2^31 (where an int32 offset wraps) and at both ends."""
    picks = [torch.arange(0, 1024), torch.arange(n - 1024, n)]
    if n > 2**31:
        picks.append(torch.arange(2**31 - 1024, 2**31 + 1024))
    return torch.cat(picks).to(DEVICE)


def test_linear_rows_past_int32():
    """A batch of 2^31+ rows: forward rows past 2^31 equal torch's product; dX of those rows and the FREE
    row's dW (a sum over every row) match torch."""
    n = _size()
    layer = _frozen_free(EideticLinear(1, 2)).to(DEVICE, DTYPE)
    x = torch.rand(n, 1, device=DEVICE, dtype=DTYPE).requires_grad_()  # positive: dW's sum grows with n
    y = layer(x)
    w, b = layer.dense("weight").detach(), layer.dense("bias").detach()
    rows = _edges(n)
    torch.testing.assert_close(y[rows].detach(), F.linear(x[rows].detach(), w, b), **TOL)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad[rows], torch.ones(rows.numel(), 2, device=DEVICE, dtype=DTYPE) @ w, **TOL)
    dw = layer.weight.grad.float().flatten()  # the FREE row's only synapse
    want = x.detach().float().sum()
    assert torch.allclose(dw, want.reshape(1), rtol=SUM_RTOL), (dw, want)


def test_conv2d_positions_past_int32():
    """2^31+ output positions (a 1x1 convolution over N x 1 x H x W): outputs past the boundary equal
    torch's convolution; the input gradient there matches."""
    n = _size()
    width = 4096 if GPU else 60
    layer = _frozen_free(EideticConv2d(1, 2, 1)).to(DEVICE, DTYPE)
    x = torch.randn(n // width, 1, 1, width, device=DEVICE, dtype=DTYPE).requires_grad_()
    y = layer(x)
    w, b = layer.dense("weight").detach(), layer.dense("bias").detach()
    flat_rows = _edges(x.shape[0] * width) // width  # the samples holding those positions
    samples = torch.unique(flat_rows)
    torch.testing.assert_close(y[samples].detach(), F.conv2d(x[samples].detach(), w, b), **TOL)
    y.backward(torch.ones_like(y))
    want = F.conv_transpose2d(torch.ones_like(y[samples]), w)
    torch.testing.assert_close(x.grad[samples], want, **TOL)


def test_batch_norm_values_per_channel_past_int32():
    """2^31+ values per channel: the FREE channel's batch statistics (a split reduction whose chunks start
    past 2^31) match torch's fp32 mean and variance, through the running statistics; its outputs past the
    boundary are normalised with them; the frozen channel normalises with its stored statistics."""
    n = _size()
    width = 4096 if GPU else 60
    layer = _frozen_free(EideticBatchNorm2d(2)).to(DEVICE)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(n // width, 2, 1, width, device=DEVICE, dtype=DTYPE) * 3 + 1
    y = layer(x)
    free = x[:, 1].float()
    var, mean = torch.var_mean(free, correction=0)
    rm = 0.9 * rm0[1] + 0.1 * mean
    rv = 0.9 * rv0[1] + 0.1 * var * free.numel() / (free.numel() - 1)
    assert torch.allclose(layer.running_mean[1].float(), rm, rtol=SUM_RTOL, atol=1e-3), (layer.running_mean, rm)
    assert torch.allclose(layer.running_var[1].float(), rv, rtol=SUM_RTOL, atol=1e-3), (layer.running_var, rv)
    assert layer.running_mean[0] == rm0[0] and layer.running_var[0] == rv0[0]  # frozen: never updated
    samples = torch.unique(_edges(x.shape[0] * width) // width)
    weight, bias = layer.dense("weight").float(), layer.dense("bias").float()
    want = torch.stack([
        (x[samples, 0].float() - rm0[0]) / (rv0[0] + layer.eps).sqrt() * weight[0] + bias[0],
        (x[samples, 1].float() - mean) / (var + layer.eps).sqrt() * weight[1] + bias[1]], dim=1)
    torch.testing.assert_close(y[samples].float(), want, **TOL)
