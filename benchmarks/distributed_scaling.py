"""Scaling over processes: training samples per second of ``configs/pmnist_small.yaml``, 1 process x 2 threads
against 2 processes x 1 thread on this machine (or any N, T), run one after the other.

    python -m benchmarks.distributed_scaling [--csv benchmarks/results/<run>.csv] [--tasks 2] [--quick]

Samples per second = training samples the run processed (epochs x the task's training-set size, summed over
tasks) / the run's wall time, from its ``results.json``; the same run on both layouts, so the ratio is the
scaling efficiency at the same global batch (``eidetic train --nproc`` splits every batch over the
processes). ``--tasks`` (default 2) limits the run to its first tasks to keep ``make bench`` short.
Rows (suite "processes") are appended to the run's CSV; the table is appended to its .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_report import replace_rows
from benchmarks.plot import newest_csv

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ((1, 2), (2, 1))  # (processes, threads per process)


def samples_per_second(results: dict) -> float:
    sizes = results["scenario"]["train_sizes"]
    return sum(t["epochs"] * sizes[t["task"]] for t in results["tasks"]) / results["wall_seconds"]


def run(processes: int, threads: int, tasks: int, quick: bool) -> dict:
    overrides = [f"tasks={tasks}", f"threads={threads}", "progress=false", "router=none"]
    if quick:
        overrides += ["train_samples_per_task=2000", "test_samples_per_task=500", "max_epochs=1",
                      "max_prune_steps=1", "recovery_epochs=1"]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "python_layers.cli", "train", "--nproc", str(processes), "--config",
               str(ROOT / "configs" / "pmnist_small.yaml"), "--out", str(Path(out) / "run"), *overrides]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(out) / "run" / "results.json").read_text())


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, help="the run's CSV to append to (default: the newest cpu-*/gpu-* CSV)")
    ap.add_argument("--tasks", type=int, default=2, help="train the config's first TASKS tasks (default 2)")
    ap.add_argument("--quick", action="store_true", help="a few samples and one epoch: a smoke run")
    args = ap.parse_args(argv)
    path = args.csv or newest_csv()
    with open(path, newline="") as f:
        existing = list(csv.DictReader(f))
    head = existing[0] if existing else {}
    measured = []
    for processes, threads in LAYOUTS:
        results = run(processes, threads, args.tasks, args.quick)
        measured.append((processes, threads, samples_per_second(results), results))
    base = measured[0][2]
    rows = []
    for processes, threads, sps, results in measured:
        rows.append({**{k: head.get(k, "") for k in ("date", "machine", "logical_cpus", "load_1min", "torch", "triton")},
                     "device": "cpu", "threads": threads, "suite": "processes", "layer": "pmnist_small",
                     "size": processes, "shape": f"{processes} process{'es' if processes > 1 else ''} x {threads} "
                     f"thread{'s' if threads > 1 else ''}, {args.tasks} tasks", "pass": "train",
                     "provider": "eidetic", "frozen_share": "", "tasks": args.tasks, "dtype": "float32",
                     "backend": "reference", "metric": "samples_per_s", "value": f"{sps:.1f}", "min": "", "iqr": "",
                     "rounds": 1, "ratio_to_nn": round(sps / base, 4), "ratio_to_torch_prune": ""})
    lines = ["Processes (configs/pmnist_small.yaml, training samples per second; ratio to 1 process x 2 threads; "
             "ACC of each run beside):", "", "| layout | samples/s | ratio | ACC |", "|---|---|---|---|"]
    for (processes, threads, sps, results), r in zip(measured, rows):
        lines.append(f"| {r['shape']} | {sps:.0f} | {sps / base:.2f} | {results['acc']:.4f} |")
    table = "\n".join(lines) + "\n"
    replace_rows(path, rows, "processes", table, "Processes (configs/pmnist_small.yaml")  # a rerun replaces them
    print(table)
    print(f"appended {len(rows)} rows to {path}")
    return path


if __name__ == "__main__":
    main()
