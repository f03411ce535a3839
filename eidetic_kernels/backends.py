"""Backend dispatch: which implementation of each op runs for a tensor on a device.

Defaults: CUDA tensors use Triton; CPU tensors use the reference (or a C++ op where it is
registered as the CPU default because it wins on the bench). ``EIDETIC_BACKEND`` forces one
of ``reference``, ``triton``, ``cpp`` and fails clearly when it cannot run.

A backend registers itself by name with a lazily imported module path per op; each op module
exposes a function named after the op with the signature documented in its reference.py.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKEND_NAMES = ("reference", "triton", "cpp")
OPS = ("linear", "conv2d", "batch_norm")
_MODULES = {
    "reference": {op: f"eidetic_kernels.ops.{op}.reference" for op in OPS},
    "triton": {op: f"eidetic_kernels.ops.{op}.triton" for op in OPS},
    "cpp": {op: f"eidetic_kernels.ops.{op}.cpp" for op in OPS},
}
# Ops for which the C++ backend is the CPU default (set by eidetic_kernels.cpp when it wins).
CPU_DEFAULT_CPP_OPS: set[str] = set()


class BackendUnavailable(RuntimeError):
    pass


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
            return None
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 (before importing triton)"
    return f"Triton does not support device {device}"


def _cpp_usable(op: str) -> str | None:
    from . import cpp
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


def select(op: str, device: torch.device) -> str:
    forced = os.environ.get("EIDETIC_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKEND_NAMES:
            raise BackendUnavailable(
                f"EIDETIC_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKEND_NAMES)}")
        why = available(forced, device, op)
        if why is not None:
            raise BackendUnavailable(f"EIDETIC_BACKEND={forced} cannot run {op}: {why}")
        return forced
    if device.type == "cuda" and _triton_usable(device) is None:
        return "triton"
    if device.type == "cpu" and op in CPU_DEFAULT_CPP_OPS and _cpp_usable(op) is None:
        return "cpp"
    return "reference"


_cache: dict[tuple[str, str], object] = {}


def get(op: str, device: torch.device):
    """(backend name, function) for ``op`` on ``device``."""
    name = select(op, device)
    key = (name, op)
    fn = _cache.get(key)
    if fn is None:
        try:
            module = importlib.import_module(_MODULES[name][op])
        except ModuleNotFoundError as exc:
            raise BackendUnavailable(f"backend {name} has no implementation of {op} ({exc})") from exc
        fn = getattr(module, op)
        _cache[key] = fn
    return name, fn


def preload(device: torch.device) -> None:
    """Import the backend modules that tensors on ``device`` will use, now.

    torch.compile cannot trace an import, so layers call this when they are built or moved: the first
    forward traced by torch.compile then finds its backend in the cache. Errors are left to the call.
    """
    for op in OPS:
        try:
            get(op, device)
        except Exception:  # noqa: BLE001 - reported with its reason when the op is called
            pass
