"""Where an eidetic layer's time goes, kernel by kernel: ``torch.profiler`` over forward + backward.

    python -m benchmarks.gpu_profile [--out FILE] [--dtypes bfloat16,float32] [--share 0.5]
                                     [--backends triton,reference] [--only linear,conv2d,batchnorm2d]
    python -m benchmarks.gpu_profile --quick    # tiny shapes on a CPU (Triton under TRITON_INTERPRET=1)

``benchmarks/gpu.py`` gives each layer's time against nn; this says which kernels take it. For each layer case
of the GPU suite (``PROFILE_CASES``: linear 4096 -> 4096 at batch 4096, conv x[32,256,32,32], batch norm
x[64,256,56,56]), each dtype, nn and the eidetic
layer on each backend with ``share`` of its neurons frozen by one finished task: two untimed warm-up steps
(JIT compilation, plans), then ``--steps`` forward + backward steps under the profiler, and a table of the
kernels with the most device time (CUDA) or the ops with the most CPU time (a CPU run), per step. The text
goes to stdout and to ``--out`` (default: ``benchmarks/results/gpu-profile-<gpu>-<date>.txt``; none with
``--quick`` unless given).

Exit status 1 when a case raised (its traceback is printed, the others still run).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.cpu_report import RESULTS_DIR
from benchmarks.gpu import FULL_LAYER_CASES, QUICK_LAYER_CASES, default_eidetic_backends, eidetic_backend
from benchmarks.providers import backend_of, make_layer

ROW_LIMIT = 12


# the GPU suite's cases the targets name: linear in = out = 4096 at batch 4096, and the conv and batch norm
# that measured slowest in the first GPU run
PROFILE_CASES = [c for c in FULL_LAYER_CASES if (c.kind, c.size) in {("linear", 4096), ("conv2d", 256),
                                                                      ("batchnorm2d", 256)}]


def profile_case(case, dtype, provider: str, backend: str | None, share: float, device, steps: int) -> str:
    """The profiler's table for ``steps`` forward + backward steps of one layer (``provider``: "nn" or
    "eidetic"; ``backend`` forced for the eidetic layer)."""
    g = torch.Generator().manual_seed(0)
    with eidetic_backend(backend):
        layer = make_layer(provider, case, share if provider == "eidetic" else 0.0, device=device, dtype=dtype)
        x = case.make_input(g, device, dtype).requires_grad_()
        grad = torch.randn(layer(x).shape, generator=g).to(device, dtype)

        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        ran = backend_of(layer) if provider == "eidetic" else "torch"
    table = None
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:  # torch has named device time both ways
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=ROW_LIMIT, max_name_column_width=70)
            break
        except (AttributeError, KeyError):
            continue
    return f"backend run: {ran}; {steps} steps (times below are totals over them)\n{table}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs on a CPU)")
    ap.add_argument("--out", type=Path, default=None, help="also write the text here")
    ap.add_argument("--dtypes", default=None, help="default bfloat16,float32 (float32 on a CPU)")
    ap.add_argument("--share", type=float, default=0.5, help="share of each layer frozen (default 0.5)")
    ap.add_argument("--backends", default=None, help="eidetic backends (default: as benchmarks.gpu)")
    ap.add_argument("--only", default="", help="comma list of linear,conv2d,batchnorm2d (default: all)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("gpu_profile: no CUDA device here; use --quick for the CPU smoke run", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16,float32" if device.type == "cuda"
                                                         else "float32")).split(",")]
    backends = args.backends.split(",") if args.backends else default_eidetic_backends(device)
    cases = QUICK_LAYER_CASES if args.quick else PROFILE_CASES
    if args.only:
        cases = [c for c in cases if c.kind in args.only.split(",")]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    lines = [f"Kernel profile: {name}, torch {torch.__version__}, frozen share {args.share:.0%} (eidetic), "
             f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%dT%H:%M} UTC"]
    failures = 0
    for case in cases:
        for dtype in dtypes:
            for provider, backend in [("nn", None)] + [("eidetic", b) for b in backends]:
                title = f"== {case.kind} {case.shape} {str(dtype).replace('torch.', '')} {provider}" + (
                    f" ({backend})" if backend else "")
                print(title, flush=True)
                try:
                    text = profile_case(case, dtype, provider, backend, args.share, device, args.steps)
                except Exception:  # noqa: BLE001 - printed and counted; the other cases still run
                    failures += 1
                    text = "FAILED\n" + traceback.format_exc()
                print(text, flush=True)
                lines += [title, text]
    out = args.out
    if out is None and not args.quick:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        out = RESULTS_DIR / f"gpu-profile-{slug}-{_dt.datetime.now():%Y%m%d-%H%M}.txt"
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
