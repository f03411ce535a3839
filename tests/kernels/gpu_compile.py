"""Compile every Triton kernel for real GPUs, on any machine (no GPU needed): the checks only the real
compiler makes (register pressure, shared memory, unsupported ops on a target) that the interpreter cannot.

    python -m tests.kernels.gpu_compile [--targets 90,80] [--json OUT]

Run in a fresh interpreter without TRITON_INTERPRET. Every backend entry point (linear, conv2d, batch_norm:
forward and backward, Taylor scores on, bias on and off, training and eval) is called on small CPU tensors
of each dtype (fp32, fp16, bf16; linear and conv2d also under ``torch.autocast`` from fp32) with
``JITFunction.run`` replaced by a recorder: each launch the host code makes (its argument types, constexprs,
warps and stages) is recorded instead of run. Each distinct launch is
then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))`` down to a cubin, and
ptxas (Triton's own) reports registers and spills. Prints one line per compiled kernel; exits 1 on any
failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels being compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tests.kernels.launches import exercise  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1",
          torch.uint8: "u8"}


def _record_launches() -> list:
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = run
    return launches


def _signature(kernel: JITFunction, args: tuple, kwargs: dict):
    """(signature, constexprs, launch options, attributes) of a recorded launch, specialised as the JIT
    specialises it (an integer equal to 1 becomes a constant; 16-aligned pointers and integers divisible by 16
    carry that divisibility, which is what lets the compiler vectorise loads)."""
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    for param in kernel.params:
        name, value = param.name, values.get(param.name, param.default)
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:  # as the JIT specialises an aligned pointer
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int) and value == 1 and param.num not in kernel.do_not_specialize:
            sig[name] = "constexpr"  # as the JIT specialises an integer equal to 1
            constexprs[name] = 1
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0 and param.num not in kernel.do_not_specialize:
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value is None:
            sig[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(value).__name__}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    return sig, constexprs, options, attrs


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    try:  # the signature changed across Triton releases
        tool = get_ptxas(arch)
    except TypeError:
        tool = get_ptxas()
    ptxas = getattr(tool, "path", tool)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = done.stdout + done.stderr
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    return {"registers": max(regs) if regs else None, "spill_bytes": max(spills) if spills else 0}


def _load_report(ptx: str) -> dict:
    """How the kernel reads global memory: scalar loads, vector loads (128/64-bit) and asynchronous copies
    (cp.async, what software pipelining issues). A GEMM whose operand loads stay scalar runs far below the
    tensor cores' rate, whatever its tile sizes; the counts show it without a GPU (with the JIT's
    specialisation of these small launches' values, see ``_signature``)."""
    return {"loads_scalar": len(re.findall(r"ld\.global(?:\.[A-Za-z0-9_:]+)*?\.(?:b|u|s|f)\d+\s", ptx)),
            "loads_vector": len(re.findall(r"ld\.global(?:\.[A-Za-z0-9_:]+)*?\.v[248]\.", ptx)),
            "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx))}


def _math_report(ptx: str) -> dict:
    """Approximate arithmetic in the kernel (sqrt.approx, rsqrt.approx, rcp.approx, div.approx, div.full: what
    Triton emits for fp32 ``tl.sqrt`` and ``/``): a few ulp from torch's correctly rounded sqrt and division."""
    return {"approx_math": len(re.findall(r"\b(?:sqrt|rsqrt|rcp|div)\.(?:approx|full)\.", ptx))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="90,80", help="comma-separated SM versions (default 90,80)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    launches = _record_launches()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        exercise(dtype)
    seen, report, failures = set(), [], 0
    # on a GPU, fp32 products of trainable rows follow torch's TF32 flags (dot_precision), which CPU launches never
    # set: one TF32 variant of each GEMM kernel's first fp32 launch is compiled too (sm_90: the GPU at hand)
    tf32 = {}
    for kernel, kargs, kwargs in launches:
        if kwargs.get("PREC") == "ieee" and kernel.__name__ not in tf32 and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in kargs):
            tf32[kernel.__name__] = (kernel, kargs, dict(kwargs, PREC="tf32"))
    variants = [(k, a, kw, None) for k, a, kw in launches] + [(k, a, kw, "tf32") for k, a, kw in tf32.values()]
    for kernel, kargs, kwargs, variant in variants:
        sig, constexprs, options, attrs = _signature(kernel, kargs, kwargs)
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        for arch in (int(a) for a in args.targets.split(",")):
            if variant and arch != 90:
                continue
            start = time.perf_counter()
            entry = {"kernel": kernel.__name__, "target": f"sm_{arch}", "options": options, "variant": variant,
                     "dtypes": sorted({v for v in sig.values() if v.startswith("*")}),
                     "constexprs": {k: str(v) for k, v in constexprs.items()}}
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                ptx = compiled.asm["ptx"]
                entry.update(ok=True, shared_bytes=compiled.metadata.shared, seconds=round(time.perf_counter() - start, 2),
                             **_ptxas_report(ptx, arch), **_load_report(ptx), **_math_report(ptx))
            except Exception as exc:  # noqa: BLE001 - reported and counted
                failures += 1
                entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            report.append(entry)
            print(json.dumps(entry), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{len(report)} compilations, {failures} failed", flush=True)
    return 1 if failures or not report else 0


if __name__ == "__main__":
    sys.exit(main())
