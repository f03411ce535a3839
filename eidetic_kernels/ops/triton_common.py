"""Pieces shared by the Triton backends of linear, conv2d and batch_norm.

* The GEMM-like kernels (linear, conv2d) run on a layer's tile table (``ops/tiles.py``): each program
  reads one block's live inputs and rows only, and rows it must not compute are written 0 by a select
  (never a product with a 0/1 mask), so a NaN or Inf in a dead input or in free capacity can never reach
  a frozen output, and a row's bits depend only on its own block.
* block sizes: fixed per (kind, dtype, device), never autotuned, so a frozen neuron's summation
  order cannot change between runs (autotuning could pick another tile size in another process).
  Under the interpreter tiles are big (few programs: each one costs Python time, not FLOPs).
* ``count_work``: compiles the kernels' work counters in (a constexpr ``COUNT``, off by default).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..state import FREE, PRUNED

FREE_C: tl.constexpr = tl.constexpr(FREE)
PRUNED_C: tl.constexpr = tl.constexpr(PRUNED)


# Fused multiply-adds, stated on every launch rather than left to Triton's default (which Triton plans to turn off,
# and which TRITON_DEFAULT_FP_FUSION overrides): fused and separate roundings give other bits, and a finished task's
# outputs (batch norm's normalisation above all) must not change with an environment variable or a Triton upgrade.
# The interpreter ignores the option (numpy rounds each operation).
FP_FUSION = True


# The most programs a CUDA grid holds on its second (and third) axis; launches with more are split in parts.
# Tests lower it to run the split under the interpreter.
GRID_AXIS_LIMIT = 65535


def tensor_device(t: torch.Tensor):
    """A context with ``t``'s CUDA device current (a no-op elsewhere, or when it already is). Triton launches on
    the current device, where torch's ops follow their tensors: a layer on cuda:1 while cuda:0 is current would
    have its kernels read another GPU's memory."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def on_tensor_device(fn):
    """``fn`` (a host function that launches kernels) run on the device of its first tensor argument
    (``tensor_device``)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with contextlib.nullcontext() if t is None else tensor_device(t):
            return fn(*args, **kwargs)
    return run


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype, device: torch.device, conv: bool = False, frozen: bool = False) -> str:
    """fp32 dot precision: exact ("ieee") unless torch allows TF32 on this GPU for the twin's op, as the twin
    does: ``torch.backends.cuda.matmul.allow_tf32`` for linear (off by default), ``torch.backends.cudnn.
    allow_tf32`` for conv2d (on by default, so nn.Conv2d and EideticConv2d both run fp32 convolutions in TF32).

    ``frozen``: a forward over stored frozen synapses runs exact whatever the flags say. The flags are global and
    any later code may flip them (``torch.set_float32_matmul_precision``, a trainer's setup): read per call, they
    would change a finished task's outputs. (A task trained with TF32 sees its outputs move once, by TF32's
    rounding, when it finishes.) Gradient kernels follow the flags: no finished task's output depends on them."""
    if frozen and dtype in (torch.float32, torch.float64):
        return "ieee"
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    if dtype == torch.float32 and device.type == "cuda" and allowed:
        return "tf32"
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    return "tf32"  # ignored for 16-bit operands


def acc_type(dtype: torch.dtype):
    """Accumulation dtype of the kernels: fp64 for fp64 tensors, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter's numpy dot has no bf16: upcast the operands there (exact: bf16 ⊂ fp32)."""
    return interpreting() and dtype == torch.bfloat16


# Block sizes. Tests may override them (small tiles exercise the multi-tile paths).
_BLOCK_OVERRIDE: dict[str, dict] = {}


@contextlib.contextmanager
def override_blocks(kind: str, **blocks):
    """Temporarily force the block sizes of one kernel kind (tests, tuning)."""
    old = _BLOCK_OVERRIDE.get(kind)
    _BLOCK_OVERRIDE[kind] = blocks
    try:
        yield
    finally:
        if old is None:
            _BLOCK_OVERRIDE.pop(kind, None)
        else:
            _BLOCK_OVERRIDE[kind] = old


# Interpreter tiles per op. The interpreter's cost is mostly per operation (~70 µs of Python each), partly per
# element: a linear layer runs fastest on 128-wide tiles (an MLP 784-200-200 step on MNIST batches: 0.58 s at
# 64, 0.15 s at 128), a conv on tall M tiles (thousands of N·H·W positions) of 64 rows (128 rows make its
# [M, rows] tiles cost more than the operations they save: a three-task CNN test 65 s at 64, 87 s at 128).
_INTERPRETER_BLOCKS = {"linear": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128),
                       "conv2d": dict(BLOCK_M=2048, BLOCK_N=64, BLOCK_K=64)}


def gemm_blocks(kind: str, dtype: torch.dtype, op: str = "linear") -> dict:
    """BLOCK_M/BLOCK_N/BLOCK_K and launch options for a GEMM-like kernel.

    ``kind`` names the kernel ("fwd", "dx", "dw"); the roles of M/N/K are the kernel's own. ``op`` ("linear" or
    "conv2d") matters under the interpreter only: on a GPU both ops run the same tiles.
    """
    if kind in _BLOCK_OVERRIDE:
        cfg = dict(num_warps=4, num_stages=2)
        cfg.update(_BLOCK_OVERRIDE[kind])
        return cfg
    if interpreting():
        return dict(_INTERPRETER_BLOCKS[op], num_warps=4, num_stages=1)
    if dtype == torch.float64:  # rare; keep shared memory small
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    wide = dtype != torch.float32
    if kind == "dw":  # [BLOCK_N rows, BLOCK_K cols] tile, reduction over M
        return dict(BLOCK_M=64 if wide else 32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if wide else 32, num_warps=8, num_stages=3)


def reduction_blocks(kind: str) -> dict:
    if kind in _BLOCK_OVERRIDE:
        return dict(_BLOCK_OVERRIDE[kind])
    if interpreting():
        return dict(BLOCK=4096, TARGET_PROGRAMS=4)
    return dict(BLOCK=1024, TARGET_PROGRAMS=4 * _sm_count())


# dW: when a layer has too few dW tiles to fill the GPU, the reduction over samples (positions) is split into
# ranges of at least this many; each range writes a float32 partial, summed in a fixed order after the kernel
# (deterministic: no atomics). Only trainable rows' gradients are reduced this way: no finished task's bits
# depend on it.
_DW_MIN_RANGE = 1024


def dw_split(programs: int, M: int, block_m: int) -> tuple[int, int]:
    """(ranges, samples per range) of the dW reduction over ``M`` samples for ``programs`` dW tiles: one range
    while the tiles fill the GPU (twice its SMs), else enough ranges to do so, each at least ``_DW_MIN_RANGE``
    samples and a multiple of ``block_m``. The split depends on the shapes and the device only. Tests force a
    split with ``override_blocks("dw_split", SPLIT=k)``; the interpreter runs one range."""
    if "dw_split" in _BLOCK_OVERRIDE:
        splits = _BLOCK_OVERRIDE["dw_split"]["SPLIT"]
    elif interpreting() or M == 0:
        splits = 1
    else:
        target = 2 * _sm_count()
        splits = max(1, min(triton.cdiv(target, max(programs, 1)), triton.cdiv(M, _DW_MIN_RANGE)))
    per = triton.cdiv(triton.cdiv(max(M, 1), splits), block_m) * block_m
    return triton.cdiv(max(M, 1), per), per


def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 8


def frozen_or_dummy(frozen: torch.Tensor | None, trainable: torch.Tensor | None):
    """A valid pointer for the frozen storage: when it is empty no row is ever read from it."""
    if frozen is None or frozen.numel() == 0:
        return trainable
    return frozen


# ----- work counter ------------------------------------------------------------------------------

_COUNTER: list = []  # the int64 counter the kernels add their work to, while ``count_work`` is active


@contextlib.contextmanager
def count_work(counter: torch.Tensor):
    """Compile the kernels with their work counter while active: each program atomically adds the
    multiply-adds it issues on valid elements to ``counter`` (int64[1], on the device of the inputs)."""
    _COUNTER.append(counter)
    try:
        yield counter
    finally:
        _COUNTER.pop()


def _counter(like: torch.Tensor):
    return (True, _COUNTER[-1]) if _COUNTER else (False, like)



# ----- autocast ----------------------------------------------------------------------------------

_AUTOCAST_LIBS: list = []  # the registrations live as long as their Library objects


def register_autocast(qualname: str, cast: tuple[int, ...]) -> None:
    """Register the autocast kernels (CPU and CUDA) of custom op ``qualname`` ("namespace::name").

    Under ``torch.autocast(device)`` the positional arguments at the indices ``cast`` are cast to the
    autocast dtype read when the op is called (``torch.get_autocast_dtype``), when eligible as ATen casts
    its lower-precision ops' arguments (linear, convolution): floating tensors on the autocast device, not
    float64. The op then runs below autocast with those arguments; the others (states, tiles, Taylor
    scores, which accumulate in float32) pass unchanged. ``cast=()`` registers an op that runs in its
    inputs' dtypes, as ATen's batch norm (on no autocast list for CPU or CUDA) does."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, below=below):
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(_autocast_cast(a, device_type, dtype) if i in cast else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(*args)

        lib.impl(name, kernel, key)
    op = getattr(getattr(torch.ops, namespace), name).default
    _AUTOCAST_LIBS.append(lib)


def _autocast_cast(t, device_type: str, dtype: torch.dtype):
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type):
        return t.to(dtype)
    return t


# ----- device helpers ---------------------------------------------------------------------------

@triton.jit
def is_frozen_state(task):
    return (task >= 0) & (task < FREE_C)


@triton.jit
def any_true(m):
    return tl.max(m.to(tl.int32), axis=0) > 0


@triton.jit
def taylor_kernel(a_ptr, g_ptr, score_ptr,  # a, g: [B, C, S] by strides; score: fp32[C]
                  B, C, S, s_ab, s_ac, s_as, s_gb, s_gc, s_gs, inv_divisor,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """score[c] += | Σ_{b,s} a·g | / divisor  (the Taylor importance of ops/taylor.py)."""
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    R = B * S
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m = (o_r < R)[:, None] & m_c[None, :]
        b = (o_r // S).to(tl.int64)
        s = (o_r % S).to(tl.int64)
        a = tl.load(a_ptr + b[:, None] * s_ab + o_c[None, :] * s_ac + s[:, None] * s_as, mask=m, other=0.0)
        g = tl.load(g_ptr + b[:, None] * s_gb + o_c[None, :] * s_gc + s[:, None] * s_gs, mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * g.to(tl.float32), axis=0)
    old = tl.load(score_ptr + o_c, mask=m_c, other=0.0)
    tl.store(score_ptr + o_c, old + tl.abs(acc * inv_divisor), mask=m_c)


@on_tensor_device
def add_taylor(score: torch.Tensor, a3: torch.Tensor, g3: torch.Tensor, divisor: int) -> None:
    """Accumulate the Taylor score from activation and gradient viewed as [B, C, S]."""
    B, C, S = a3.shape
    if C == 0:
        return
    block_c = 64 if interpreting() else 32
    block_r = 256 if interpreting() else 128
    taylor_kernel[(triton.cdiv(C, block_c),)](
        a3, g3, score, B, C, S, *a3.stride(), *g3.stride(), 1.0 / max(divisor, 1),
        BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=FP_FUSION)


@triton.jit
def window_columns(o_k, m_k, start, w_start, gather, frozen, cols_ptr, SCATTERED: tl.constexpr):
    """(input columns, weight columns) at offsets ``o_k`` of a program's window (``m_k``: inside it): the slice
    ``start + o_k``, weights from ``w_start + o_k``; or, compiled with ``SCATTERED`` and the program's gather
    flag set, its gather list ``cols[start + o_k]``, a frozen block's compact weights at ``o_k`` and the
    trainable storage's at the input column. Only the block's live inputs are ever read."""
    if SCATTERED:  # compiled only for tables with a gather list; slices keep contiguous loads otherwise
        m_g = m_k & (o_k * 0 + gather > 0)  # a block-shaped mask (the interpreter wants one)
        col = tl.where(m_g, tl.load(cols_ptr + start + o_k, mask=m_g, other=0), start + o_k)
        w_col = tl.where(frozen, o_k, col)
    else:
        col = start + o_k
        w_col = w_start + o_k
    return col, w_col


@triton.jit
def dx_segment(seg_ptr, s, map_ptr, o_t, o_c, m_c, SCATTERED: tl.constexpr):
    """Segment ``s`` of a dX tile table (``ops/tiles.py``: kind, first row entry, rows, inputs [lo, hi), shift,
    map start) for a program's input columns ``o_c`` (``o_t``: their offsets in the tile, ``m_c``: in range).

    Returns (frozen block?, first row entry, rows, weight column of each input column, which of the columns
    the block reads). A column outside [lo, hi), or -1 in the map of a scattered window (``SCATTERED``), is
    not read: the kernels keep its sum by a select."""
    q = seg_ptr + s * 7
    frozen = tl.load(q) == 0
    row0 = tl.load(q + 1)
    n_rows = tl.load(q + 2)
    c_lo = tl.load(q + 3)
    c_hi = tl.load(q + 4)
    shift = tl.load(q + 5)
    in_range = (o_c >= c_lo) & (o_c < c_hi)
    if SCATTERED:
        map0 = tl.load(q + 6)
        m_map = m_c & (o_t * 0 + map0 >= 0)  # a block-shaped mask (the interpreter wants one)
        mapped = tl.load(map_ptr + map0 + o_t, mask=m_map, other=-1)
        w_col = tl.where(m_map, mapped, o_c - shift)
        live = m_c & tl.where(m_map, mapped >= 0, in_range)
    else:
        w_col = o_c - shift
        live = m_c & in_range
    return frozen, row0, n_rows, w_col, live
