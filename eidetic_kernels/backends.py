"""Backend dispatch: which implementation of each op runs for a tensor on a device.

Defaults: CUDA tensors use Triton; CPU tensors use the reference (or a C++ op where it is
registered as the CPU default because it wins on the bench). ``EIDETIC_BACKEND`` forces one
of ``reference``, ``triton``, ``cpp`` and fails clearly when it cannot run.

``implementation(op, name)`` imports each backend's function with a plain import; each op module
exposes a function named after the op with the signature documented in its reference.py.
"""
from __future__ import annotations

import os

import torch

from . import cpp
from .ops.blocks import functorch_active
from .cpp import CPP_OPS

BACKEND_NAMES = ("reference", "triton", "cpp")
OPS = ("linear", "conv2d", "batch_norm")
# Ops for which the C++ backend is the CPU default: each one it implements (each won on the bench).
CPU_DEFAULT_CPP_OPS: frozenset[str] = frozenset(CPP_OPS)


class BackendUnavailable(RuntimeError):
    pass


# Triton's interpreter mode is fixed when the JIT functions are created, which imports done with this package
# start: a TRITON_INTERPRET=1 set only afterwards fails deep inside a kernel call
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable(device: torch.device) -> str | None:
    """None when Triton can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({exc}); pip install triton"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            if not _INTERPRET_AT_IMPORT:
                return ("TRITON_INTERPRET=1 was set after eidetic_kernels was imported, too late for Triton's "
                        "interpreter: set it before importing torch, triton and eidetic_kernels (in the shell, or "
                        "first thing in the script)")
            return None
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 (before importing triton)"
    return f"Triton does not support device {device}"


def _cpp_usable(op: str) -> str | None:
    return cpp.unavailable_reason(op)


def available(name: str, device: torch.device, op: str) -> str | None:
    """None when backend ``name`` can run ``op`` on ``device``, else the reason."""
    if name == "reference":
        return None
    if name == "triton":
        return _triton_usable(device)
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on the CPU only, got a tensor on {device}"
        return _cpp_usable(op)
    return f"unknown backend {name!r}"


def select(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device`` (and ``dtype``, when given): EIDETIC_BACKEND when set, else
    Triton on CUDA, C++ for the CPU ops it wins, the reference otherwise. ``EIDETIC_BACKEND=cpp`` forces C++
    for the ops it implements (``CPP_OPS``) and leaves the others on the reference, on the CPU (elsewhere it
    is refused, as C++ runs on the CPU only). float64 linear and conv2d on a GPU
    run on the reference backend even when Triton is asked for: Triton's fp64 ``tl.dot`` does not compile
    on every release (3.6 rejects it), and cuBLAS/cuDNN compute fp64 exactly. Inside ``torch.func`` transforms
    (grad, vmap, jacrev, ...) every op runs on the reference backend, whatever is asked for: the Triton and C++
    ops have no functorch rules, and the reference runs plain torch ops there (``ops/blocks.functorch_active``).
    Raises BackendUnavailable."""
    forced = os.environ.get("EIDETIC_BACKEND", "").strip().lower()
    if functorch_active():
        return "reference"
    if forced:
        if forced not in BACKEND_NAMES:
            raise BackendUnavailable(
                f"EIDETIC_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKEND_NAMES)}")
        if forced == "cpp" and op not in CPP_OPS and device.type == "cpu":
            return "reference"  # the C++ backend is a fast path for some CPU ops; the others keep the reference
        why = available(forced, device, op)
        if why is not None:
            raise BackendUnavailable(f"EIDETIC_BACKEND={forced} cannot run {op}: {why}")
        if forced == "triton" and _fp64_gemm_on_gpu(op, device, dtype):
            return "reference"
        return forced
    if device.type == "cuda" and _triton_usable(device) is None:
        return "reference" if _fp64_gemm_on_gpu(op, device, dtype) else "triton"
    if device.type == "cpu" and op in CPU_DEFAULT_CPP_OPS and _cpp_usable(op) is None:
        return "cpp"
    return "reference"


def _fp64_gemm_on_gpu(op: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    return dtype == torch.float64 and op in ("linear", "conv2d") and device.type == "cuda"


def traceable(device: torch.device, op: str | None = None, dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch.compile`` can trace ``op`` on ``device`` (and ``dtype``): only the Triton backend (custom
    ops, no host-side planning) can; the reference and C++ engines plan on the host and run eagerly under it."""
    try:
        return select(op or "linear", device, dtype) == "triton"
    except BackendUnavailable:  # the call itself says why
        return False


_cache: dict[tuple[str, str], object] = {}


def implementation(op: str, name: str):
    """The function of backend ``name`` for ``op``, through plain imports (Triton and C++ modules are imported
    only when used: both are optional). Each op's reference.py documents its backend signature."""
    if op == "linear":
        if name == "triton":
            from .ops.linear.triton import linear as fn
        else:
            from .ops.linear.reference import linear as fn
    elif op == "conv2d":
        if name == "triton":
            from .ops.conv2d.triton import conv2d as fn
        else:
            from .ops.conv2d.reference import conv2d as fn
    elif op == "batch_norm":
        if name == "triton":
            from .ops.batch_norm.triton import batch_norm as fn
        elif name == "cpp":
            from .ops.batch_norm.cpp import batch_norm as fn
        else:
            from .ops.batch_norm.reference import batch_norm as fn
    else:
        raise BackendUnavailable(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    return fn


def get(op: str, device: torch.device, dtype: torch.dtype | None = None):
    """(backend name, function) for ``op`` on ``device`` (and ``dtype``: see ``select``)."""
    name = select(op, device, dtype)
    fn = _cache.get((name, op))
    if fn is None:
        fn = _cache[(name, op)] = implementation(op, name)
    return name, fn


def preload(device: torch.device) -> None:
    """Import the backend modules that tensors on ``device`` will use, now.

    torch.compile cannot trace an import, so layers call this when they are built or moved: the first
    forward traced by torch.compile then finds its backend in the cache. Nothing is built or probed here
    (no compiler lookup, no C++ build, no warning): the C++ backend is checked on the first call of an op
    that would use it. Errors are left to the call.
    """
    device = torch.device(device)
    forced = os.environ.get("EIDETIC_BACKEND", "").strip().lower()
    for op in OPS:
        if forced:
            names = [forced] if forced in BACKEND_NAMES and (forced != "cpp" or device.type == "cpu") else []
        elif device.type == "cuda":
            names = ["triton"]
        else:
            names = ["reference"] + (["cpp"] if op in CPU_DEFAULT_CPP_OPS else [])
        for name in names:
            if name == "triton" and _triton_usable(device) is not None:
                continue
            if name == "cpp" and op not in CPP_OPS:
                continue
            try:
                fn = implementation(op, name)
            except Exception:  # noqa: BLE001 - reported with its reason when the op is called
                continue
            _cache.setdefault((name, op), fn)
