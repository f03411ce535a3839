"""Task after task: eidetic against nn after 1, 2, 4 and 8 finished tasks, timed interleaved.

    python -m benchmarks.tasks_curve [--csv benchmarks/results/<run>.csv] [--quick] [--allocator glibc kept]

For each model (MLP 784-1024-1024-10 batch 256, MLP 784-2000-2000-10 batch 1024, the CNN with batch norm
batch 64) an ``EideticNetwork`` with k finished tasks, each keeping 10% of every layer
(``providers.finished_network``), is timed against the same plain network, one round of each after the
other (so both see the same machine load): the next task's training step (zero_grad, forward, cross
entropy, backward, AdamW) and evaluating task 0 (eval mode, no grad) against nn's forward. The ratio is
the median of the per-round ratios. Training-step bytes (``providers.training_step_bytes``) are reported
beside the times. Rows (suite "tasks") are appended to the run's CSV (default: the newest in
benchmarks/results), with the same columns as ``cpu_report``; the table is appended to its .md.

Allocator: by default the whole curve runs twice in one process, first with glibc as it comes, then with
freed memory kept by the process (``keep_freed_memory``; shape "batch B, freed memory kept"). glibc as it
comes hands large freed blocks back to the OS, so each step's fresh activations page-fault again (8,000-15,000
faults a step for either network here), a cost both networks pay alike that hides the difference in their
work; PyTorch's CPU tuning guide advises an allocator that keeps memory (jemalloc, tcmalloc) for the same reason.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cpu_report import replace_rows, tasks_summary
from benchmarks.plot import newest_csv
from benchmarks.providers import (TASK_MODELS, backend_of, finished_network, make_optimizer, model_input,
                                  train_step, training_step_bytes)

TASK_COUNTS = (1, 2, 4, 8)
SHARE = 0.1  # of every layer, per finished task
ALLOCATORS = {"glibc": "", "kept": ", freed memory kept"}  # shape suffix of each setting


def keep_freed_memory() -> None:
    """glibc ``mallopt``: freed blocks stay with the process (no trimming of the heap, no mmap below 1 GiB), so
    a tensor allocated again after a free reuses pages already mapped instead of faulting fresh zero pages in.
    Process-wide and irreversible (the process keeps its peak memory). Raises RuntimeError without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        raise RuntimeError(f"keeping freed memory needs glibc ({exc}); run with --allocator glibc") from None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); run with --allocator glibc")


def interleaved(fa, fb, seconds: float, min_rounds: int = 5, max_rounds: int = 60) -> tuple[float, float, float]:
    """(median time of fa, median time of fb, median of the per-round ratios fa/fb), in ms."""
    for _ in range(2):
        fa(), fb()
    ta, tb = [], []
    start = time.perf_counter()
    while len(ta) < max_rounds and (len(ta) < min_rounds or time.perf_counter() - start < seconds):
        s = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - s)
        s = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - s)
    ratio = statistics.median(a / b for a, b in zip(ta, tb))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, ratio


def measure(model_name: str, tasks: int, quick: bool, allocator: str = "glibc") -> list[dict]:
    factory, in_shape, batch = TASK_MODELS[model_name]
    batch = 8 if quick else batch
    seconds = 0.05 if quick else 2.0
    torch.manual_seed(0)
    plain = factory().train()
    torch.manual_seed(0)
    eidetic = finished_network(factory(), in_shape, tasks, SHARE, seed=tasks)
    x, y = model_input(model_name, batch, torch.Generator().manual_seed(0))
    opt_e, opt_n = make_optimizer("eidetic", eidetic), make_optimizer("nn", plain)
    common = dict(suite="tasks", layer=model_name, size=batch, shape=f"batch {batch}{ALLOCATORS[allocator]}",
                  dtype="float32",
                  device="cpu")
    rows = []

    def row(provider, pss, metric, value, ratio, rounds=""):
        rows.append(dict(common, provider=provider, frozen_share=round(SHARE * tasks, 4) if provider == "eidetic"
                         else 0.0, tasks=tasks if provider == "eidetic" else 0, backend=backend_of(
                             eidetic if provider == "eidetic" else plain),
                         **{"pass": pss, "metric": metric, "value": value, "min": "", "iqr": "", "rounds": rounds,
                            "ratio_to_nn": round(ratio, 4), "ratio_to_torch_prune": ""}))

    te, tn, ratio = interleaved(lambda: train_step(eidetic, opt_e, x, y), lambda: train_step(plain, opt_n, x, y),
                                seconds)
    row("eidetic", "train_step", "time_ms", te, ratio)
    row("nn", "train_step", "time_ms", tn, 1.0)
    bytes_e = training_step_bytes(eidetic, opt_e, lambda: eidetic(x), lambda out: F.cross_entropy(out, y).backward())
    bytes_n = training_step_bytes(plain, opt_n, lambda: plain(x), lambda out: F.cross_entropy(out, y).backward())
    for metric in ("layer_bytes", "step_bytes"):
        row("eidetic", "train_step", metric, bytes_e[metric], bytes_e[metric] / bytes_n[metric])
        row("nn", "train_step", metric, bytes_n[metric], 1.0)
    eidetic.eval(), plain.eval()
    with torch.no_grad():
        te, tn, ratio = interleaved(lambda: eidetic(x, task=0), lambda: plain(x), seconds)
    row("eidetic", "eval_task0", "time_ms", te, ratio)
    row("nn", "eval_task0", "time_ms", tn, 1.0)
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, help="the run's CSV to append to (default: the newest cpu-*/gpu-* CSV)")
    ap.add_argument("--quick", action="store_true", help="tiny batches and rounds: a smoke run")
    ap.add_argument("--allocator", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS),
                    help="glibc: memory as glibc manages it; kept: freed memory stays with the process (set once, "
                         "for the rest of the process: so it runs after glibc). Default: both, in that order")
    args = ap.parse_args(argv)
    path = args.csv or newest_csv()
    with open(path, newline="") as f:
        existing = list(csv.DictReader(f))
    head = existing[0] if existing else {}
    rows = []
    for allocator in sorted(args.allocator, key=list(ALLOCATORS).index):
        if allocator == "kept":
            keep_freed_memory()
        for model_name in TASK_MODELS:
            for tasks in TASK_COUNTS:
                for r in measure(model_name, tasks, args.quick, allocator):
                    if r["provider"] == "nn" and any(o["provider"] == "nn" and o["layer"] == r["layer"]
                                                     and o["shape"] == r["shape"] and o["pass"] == r["pass"]
                                                     and o["metric"] == r["metric"] for o in rows):
                        continue  # one nn row per case (its value from the first pairing)
                    r.update({k: head.get(k, "") for k in ("date", "machine", "logical_cpus", "load_1min", "torch",
                                                            "triton", "threads")})
                    rows.append(r)
    table = "\n".join(tasks_summary(rows))
    replace_rows(path, rows, "tasks", table, "Task after task")  # a rerun replaces the curve
    print(table)
    print(f"appended {len(rows)} rows to {path}")
    return path


if __name__ == "__main__":
    main()
