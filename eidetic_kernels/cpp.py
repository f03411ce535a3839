"""Loader for the optional C++ CPU backend (``csrc/``).

The extension is compiled with ninja through ``torch.utils.cpp_extension.load`` the first time a
C++ op is needed, into the cache folder (``cache_root()``: ``$EIDETIC_CACHE``, else the XDG cache) under a folder keyed by a
hash of the sources, the flags, torch and Python, so it is built once per machine and version.
Importing this module never builds anything.

No compiler, no ninja or a failed build: one warning, and every op runs on the reference path.
``EIDETIC_BACKEND=cpp`` then fails with the reason (see ``eidetic_kernels.backends``).

Only the ops that beat the reference on ``benchmarks/cpp_bench.py`` are kept (``CPP_OPS``), and the
dispatch makes them the CPU default (``backends.CPU_DEFAULT_CPP_OPS``); whether they can run is decided lazily: dispatch
only checks for the tools, and the first CPU call of such an op builds (or loads the cached build).
``EIDETIC_CPP_CFLAGS`` overrides the compiler flags (they are part of the key).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("eidetic_cpu.cpp",)


def _default_cflags() -> str:
    # omp simd: vectorised reductions (no OpenMP runtime). fp-contract=off: no fused multiply-add, so
    # an element's value never depends on whether it fell in a vector or in a scalar remainder loop.
    # AVX2 only where this CPU has it (flags are part of the cache key: no CPU loads a build it cannot run).
    flags = "-O3 -fopenmp-simd -ffp-contract=off"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += " -mavx2"
    return flags


CFLAGS = tuple(os.environ.get("EIDETIC_CPP_CFLAGS", _default_cflags()).split())


def _openmp_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile, link) flags that make ``at::parallel_for`` in csrc/ run on torch's threads.

    With ATen's OpenMP backend, ``at::parallel_for`` is an inline ``#pragma omp parallel``: compiled without
    -fopenmp it runs on one thread. Built with -fopenmp against the libgomp torch itself loads (same SONAME, so
    the process keeps one OpenMP runtime and one thread pool). Other backends or no libgomp beside torch:
    no flags (one thread, as before)."""
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return (), ()
    lib = Path(torch.__file__).resolve().parent / "lib"
    gomp = sorted(lib.glob("libgomp*.so*"))
    if not gomp or sys.platform != "linux":
        return (), ()
    return ("-fopenmp",), (f"-L{lib}", f"-l:{gomp[0].name}", f"-Wl,-rpath,{lib}")


OPENMP_CFLAGS, OPENMP_LDFLAGS = _openmp_flags()
# Ops with a C++ implementation; each wins on benchmarks/cpp_bench.py, so each is the CPU default.
# (linear and conv2d have none: their ATen matrix products dominate, and fused backward epilogues measure
# 0.8-1.0x the reference.)
CPP_OPS = ("batch_norm",)

_lock = threading.Lock()
_module = None
_failure: str | None = None
_tools_found = False  # sources, compiler and ninja were found (checked once, before the first build)
build_seconds: float | None = None  # wall time of the build done in this process (None: loaded or not tried)


class CppBuildWarning(UserWarning):
    """The C++ backend could not be built; the reference path is used instead."""


def cache_root() -> Path:
    """The one cache folder of eidetic (C++ builds, decoded datasets): ``$EIDETIC_CACHE``, else
    ``$XDG_CACHE_HOME/eidetic``, else ``~/.cache/eidetic``."""
    root = os.environ.get("EIDETIC_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "eidetic"


def _source_paths() -> list[Path]:
    return [SOURCE_DIR / name for name in SOURCES]


def _flags(openmp: bool) -> tuple[list[str], list[str]]:
    """(compile, link) flags of a build, with or without OpenMP."""
    return list(CFLAGS) + list(OPENMP_CFLAGS if openmp else ()), list(OPENMP_LDFLAGS if openmp else ())


def build_key(openmp: bool = True) -> str:
    """Hash of everything the binary depends on: sources, flags, compiler name, torch and Python."""
    h = hashlib.sha256()
    for path in _source_paths():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    cflags, ldflags = _flags(openmp)
    for part in (*cflags, *ldflags, os.environ.get("CXX", "c++"), torch.__version__, sys.version, sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _find_ninja() -> str | None:
    """Path of ninja; also puts the venv's (pip-installed) ninja on PATH, as cpp_extension runs ``ninja``."""
    found = shutil.which("ninja")
    if found:
        return found
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the pip package ships the binary
        candidates.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for folder in candidates:
        exe = os.path.join(folder, "ninja")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return exe
    return None


def _missing_tools() -> str | None:
    """Why a build cannot even start (no sources, compiler or ninja), else None. Cheap: no compiling."""
    missing = [str(p) for p in _source_paths() if not p.is_file()]
    if missing:
        return f"C++ sources not found ({', '.join(missing)}): is this a full checkout?"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} (from $CXX, default c++) is not an executable; "
                "install g++ or point CXX at one")
    if _find_ninja() is None:
        return "ninja is not installed: pip install ninja"
    return None


def _build(openmp: bool = True):
    """Compile (or reuse the cached build of) csrc/ and import it; raises with a clear message."""
    global build_seconds
    why = _missing_tools()
    if why is not None:
        raise RuntimeError(why)
    compiler = os.environ.get("CXX", "c++")
    key = build_key(openmp)
    name = f"eidetic_cpu_{key}"
    folder = cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load
    started = time.perf_counter()
    already_built = (folder / f"{name}.so").is_file()
    if not already_built:
        # said at WARNING, which Python prints without any logging set-up: the first call stalls for a while
        logging.getLogger("eidetic").warning("eidetic: building the C++ CPU backend (batch norm with frozen channels) "
                                             "into %s, once per version: about 15-40 s", folder)
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    level = ext_logger.level
    ext_logger.setLevel(logging.ERROR)  # our own warning says it once; no duplicate compiler chatter
    try:
        cflags, ldflags = _flags(openmp)
        module = load(name=name, sources=[str(p) for p in _source_paths()], extra_cflags=cflags,
                      extra_ldflags=ldflags, build_directory=str(folder), verbose=False)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        detail = (errors or lines or [type(exc).__name__])[0]
        raise RuntimeError(f"building csrc/ with {compiler} failed ({detail}); build log in {folder}") from exc
    finally:
        ext_logger.setLevel(level)
    if not already_built:
        build_seconds = time.perf_counter() - started
    return module


def _give_up(reason: str) -> None:
    global _failure
    _failure = reason
    warnings.warn(f"eidetic: the C++ CPU backend is unavailable, using the reference path: {reason}",
                  CppBuildWarning, stacklevel=4)


def load_module():
    """The compiled extension, building it on first use; raises RuntimeError when impossible
    (after one CppBuildWarning per process)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except Exception as exc:
                if not OPENMP_CFLAGS:
                    _give_up(str(exc))
                else:  # a compiler without OpenMP support: the same op on one thread beats the reference path
                    try:
                        _module = _build(openmp=False)
                        warnings.warn(f"eidetic: the C++ CPU backend was built without OpenMP ({exc}); its batch "
                                      "norm runs on one thread", CppBuildWarning, stacklevel=3)
                    except Exception:
                        _give_up(str(exc))
    if _module is None:
        raise RuntimeError(_failure)
    return _module


def unavailable_reason(op: str) -> str | None:
    """None when the C++ backend can run ``op``, else why not.

    Dispatch asks this on every call (and when layers are built), so it never compiles by itself:
    before the first build it only checks that sources, compiler and ninja are there, and the op's
    first call builds (a failure there warns once and runs the reference). Only when
    ``EIDETIC_BACKEND=cpp`` forces the backend does it build at once, so that the error is raised here.
    """
    if op not in CPP_OPS:
        return (f"the C++ backend has no {op} (kept only where it beats the reference: "
                f"{', '.join(CPP_OPS)})")
    if _module is None and _failure is None:
        if os.environ.get("EIDETIC_BACKEND", "").strip().lower() == "cpp":
            try:
                load_module()
            except RuntimeError:
                pass
        else:
            global _tools_found
            with _lock:
                if not _tools_found and _failure is None:
                    why = _missing_tools()
                    if why is not None:
                        _give_up(why)
                    _tools_found = why is None
    return None if _failure is None else f"the C++ extension could not be built: {_failure}"
