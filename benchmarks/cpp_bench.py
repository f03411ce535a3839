"""The C++ CPU backend against the reference backend and plain torch.nn, per op.

    python -m benchmarks.cpp_bench [--quick] [--repeats 15] [--threads 1] [--ops batch_norm] [--append]

Times forward (as in training: grad enabled) and forward+backward (with and without the Taylor
score) of each Eidetic layer on the ``reference`` and ``cpp`` backends and of its torch.nn twin,
for several sizes and shares of frozen (and pruned) neurons. Each time is the median of
``--repeats`` rounds (after warm-up), interleaving the providers so that the load of other
processes hits them alike. Writes benchmarks/results/cpp-<date>-<machine>.csv with the machine,
torch version, times (ms) and ratios (ratio_to_reference = reference time / this time: above 1 is
faster than the reference).

Only ops the C++ backend still has can be timed: linear and conv2d were measured by an earlier
version of this script (their rows stay in the committed CSV) and removed because they did not win.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.conftest import cpu_model
from eidetic_kernels import FREE, EideticBatchNorm1d, EideticBatchNorm2d, cpp

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "machine", "logical_cpus", "threads", "torch", "op", "shape", "frozen_share", "pruned_share",
           "dtype", "pass", "provider", "median_ms", "iqr_ms", "rounds", "ratio_to_reference", "ratio_to_nn"]


def machine_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{cpu_model()} {os.cpu_count()}c".lower()).strip("-")


def set_states(layer, frozen_share: float, pruned_share: float, generator: torch.Generator) -> None:
    """Freeze a random ``frozen_share`` of the neurons for task 0, prune ``pruned_share``; the rest FREE.

    A layer with inputs reads FREE inputs in the same shares (its producer is in the same state).
    """
    n = layer.num_neurons
    order = torch.randperm(n, generator=generator)
    n_frozen, n_pruned = int(round(frozen_share * n)), int(round(pruned_share * n))
    if n_frozen:
        layer.prune_neurons(order[n_frozen:])
        layer.freeze_free_neurons(0)
        layer.recycle_pruned_neurons()
    if n_pruned:
        layer.prune_neurons(order[n_frozen:n_frozen + n_pruned])
    if hasattr(layer, "input_task"):
        m = layer.input_task.numel()
        in_task = torch.full((m,), FREE, dtype=torch.int16)
        in_task[torch.randperm(m, generator=generator)[:int(round(frozen_share * m))]] = 0
        layer.set_input_task(in_task)


def cases(quick: bool, ops: list[str]):
    """(op, shape label, make nn module, make input)."""
    if "batch_norm" in ops:
        sizes = [(32, 64, 16, 16)] if quick else [(32, 64, 16, 16), (64, 128, 8, 8), (16, 32, 32, 32)]
        for s in sizes:
            yield "batch_norm", "x".join(map(str, s)), lambda c=s[1]: nn.BatchNorm2d(c), s
        for s in ([(256, 512)] if quick else [(256, 512), (1024, 256)]):
            yield "batch_norm", "x".join(map(str, s)), lambda c=s[1]: nn.BatchNorm1d(c), s


def eidetic_twin(module):
    cls = {nn.BatchNorm2d: EideticBatchNorm2d, nn.BatchNorm1d: EideticBatchNorm1d}[type(module)]
    return cls.from_module(module)


def step_fn(layer, x, dy, kind: str, backend: str | None):
    """A closure running one forward (``fwd``) or forward+backward (``fwd+bwd``, ``fwd+bwd+taylor``)."""
    def run():
        if backend is not None:
            os.environ["EIDETIC_BACKEND"] = backend
        try:
            y = layer(x)
            if kind != "fwd":
                y.backward(dy)
        finally:
            os.environ.pop("EIDETIC_BACKEND", None)
    return run


def measure(fns: dict, repeats: int, inner: int) -> dict:
    """Median and IQR (ms) per provider, rounds interleaved across providers."""
    for fn in fns.values():
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out[name] = (statistics.median(s), q[2] - q[0])
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one size per op, fewer rounds")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--ops", default=",".join(cpp.CPP_OPS), help="comma-separated ops the C++ backend has")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--append", action="store_true", help="add the rows to an existing CSV (e.g. another --threads)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in cpp.CPP_OPS]
    if unknown:
        raise SystemExit(f"the C++ backend has no {', '.join(unknown)}; it has {', '.join(cpp.CPP_OPS)}")
    cpp.load_module()
    dtype = getattr(torch, args.dtype)
    repeats = 5 if args.quick else args.repeats
    gen = torch.Generator().manual_seed(0)
    today = dt.date.today().isoformat()
    machine = f"{cpu_model()} ({os.cpu_count()} logical CPUs)"
    rows = []
    shares = [(0.0, 0.0), (0.5, 0.0), (0.5, 0.25), (0.9, 0.0)]
    for op, shape_label, make_nn, in_shape in cases(args.quick, ops):
        torch.manual_seed(0)
        twin = make_nn().to(dtype).train()
        x = torch.randn(in_shape, dtype=dtype)
        with torch.no_grad():
            dy = torch.randn_like(twin(x))
        numel = x.numel() + dy.numel()
        inner = max(1, int(2e6 // numel))  # ~ms-scale rounds for small shapes
        for frozen_share, pruned_share in shares:
            layer = eidetic_twin(twin).train()
            set_states(layer, frozen_share, pruned_share, gen)
            for kind in ("fwd", "fwd+bwd", "fwd+bwd+taylor"):
                layer.enable_taylor(kind == "fwd+bwd+taylor")
                fns = {"reference": step_fn(layer, x, dy, kind, "reference"),
                       "cpp": step_fn(layer, x, dy, kind, "cpp")}
                if frozen_share == 0 and pruned_share == 0 and kind != "fwd+bwd+taylor":
                    fns["nn"] = step_fn(twin, x, dy, kind, None)
                res = measure(fns, repeats, inner)
                ref_ms = res["reference"][0]
                nn_ms = res["nn"][0] if "nn" in res else None
                for provider, (med, iqr) in res.items():
                    rows.append(dict(date=today, machine=machine, logical_cpus=os.cpu_count(),
                                     threads=torch.get_num_threads(), torch=torch.__version__, op=op,
                                     shape=shape_label, frozen_share=frozen_share, pruned_share=pruned_share,
                                     dtype=args.dtype, **{"pass": kind}, provider=provider,
                                     median_ms=f"{med:.4f}", iqr_ms=f"{iqr:.4f}", rounds=repeats,
                                     ratio_to_reference=f"{ref_ms / med:.3f}",
                                     ratio_to_nn="" if nn_ms is None else f"{nn_ms / med:.3f}"))
                print(f"{op:10s} {shape_label:18s} frozen={frozen_share:.2f} pruned={pruned_share:.2f} {kind:15s} "
                      + "  ".join(f"{k}={v[0]:.3f}ms" for k, v in res.items())
                      + f"  ref/cpp={ref_ms / res['cpp'][0]:.2f}", flush=True)
    out = args.out or RESULTS_DIR / f"cpp-{today}-{machine_slug()}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    append = args.append and out.is_file()
    with open(out, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
