"""Draw the ratios to ``nn`` of one results CSV as a PNG beside it.

    python -m benchmarks.plot [benchmarks/results/<run>.csv]   (default: the newest CSV there)

One panel per layer kind (and one for the end-to-end training steps, one for memory); bars are
torch-prune and eidetic at each frozen share, for each pass and size; the line at 1 is ``nn``.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDER_COLORS = {"torch-prune": ("#f4b183", "#e07b39", "#a0461a"), "eidetic": ("#9dc3e6", "#2e75b6", "#1f4e79")}


def newest_csv(directory: Path = RESULTS_DIR) -> Path:
    # cpu-* from cpu_report, gpu-* from gpu.py (cpp-* files from cpp_bench.py have other columns)
    found = sorted([*directory.glob("cpu-*.csv"), *directory.glob("gpu-*.csv")], key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no CSV in {directory}; run `make bench` (or benchmarks/gpu.py) first")
    return found[-1]


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _panel(ax, rows: list[dict], title: str, shares: list[str], xlabel_of, target: float | None = None) -> None:
    cases = []
    for r in rows:
        key = xlabel_of(r)
        if key not in cases:
            cases.append(key)
    bars = [(p, s) for p in ("torch-prune", "eidetic") for s in shares]
    width = 0.8 / len(bars)
    for j, (provider, share) in enumerate(bars):
        heights = []
        for case in cases:
            match = [r for r in rows if xlabel_of(r) == case and r["provider"] == provider
                     and r["frozen_share"] == share and r["ratio_to_nn"] not in ("", None)]
            heights.append(float(match[0]["ratio_to_nn"]) if match else float("nan"))
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cases))]
        color = PROVIDER_COLORS[provider][shares.index(share) % 3]
        ax.bar(xs, heights, width, color=color, label=f"{provider} {float(share):.0%} frozen")
    ax.axhline(1.0, color="black", lw=0.8)
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.annotate(f"target {target:g}", (len(cases) - 0.5, target), fontsize=7, color="gray", ha="right",
                    va="bottom")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("ratio to nn (lower is better)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _tasks_panel(ax, rows: list[dict]) -> None:
    """eidetic/nn against the number of finished tasks, one line per model and pass."""
    lines = sorted({(r["layer"], r["shape"], r["pass"]) for r in rows})
    for layer, shape, pss in lines:
        points = sorted((int(r["tasks"]), float(r["ratio_to_nn"])) for r in rows
                        if (r["layer"], r["shape"], r["pass"]) == (layer, shape, pss)
                        and r["ratio_to_nn"] not in ("", None))
        kept = "kept" in shape  # the allocator setting (benchmarks.tasks_curve): dashed when freed memory is kept
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ls="--" if kept else "-",
                label=f"{layer} {pss}{' (mem kept)' if kept else ''}")
    ax.axhline(1.0, color="black", lw=0.8)
    for target in (0.25, 0.5, 1.0):
        ax.axhline(target, color="gray", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("finished tasks (10% of every layer each)", fontsize=8)
    ax.set_ylabel("eidetic / nn time", fontsize=8)
    ax.set_title("task after task: next task's training step, task-0 evaluation", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)


def plot(path: Path) -> Path:
    rows = [r for r in load(path) if r["provider"] != "nn"]
    if not rows:
        raise SystemExit(f"{path} has no torch-prune/eidetic rows")
    task_rows = [r for r in rows if r.get("suite") == "tasks" and r["metric"] == "time_ms"]
    rows = [r for r in rows if r.get("suite") in ("layer", "e2e")]  # the processes suite has its own table
    shares = sorted({r["frozen_share"] for r in rows}, key=float)
    time_rows = [r for r in rows if r["metric"] == "time_ms"]
    panels = []
    for dtype in sorted({r["dtype"] for r in time_rows}):
        for layer in sorted({r["layer"] for r in time_rows if r["suite"] == "layer"}):
            chosen = [r for r in time_rows if r["layer"] == layer and r["dtype"] == dtype and r["suite"] == "layer"]
            panels.append((f"{layer} time ({dtype})", chosen, lambda r: f"{r['pass']} {r['size']}", None))
        e2e = [r for r in time_rows if r["suite"] == "e2e" and r["dtype"] == dtype]
        if e2e:
            panels.append((f"training step (forward, backward, AdamW), {dtype}", e2e,
                           lambda r: f"{r['layer']} batch {r['size']}", 1.15))
    for metric, what, target in (("layer_bytes", "bytes held by the layer/model", 1.02),
                                 ("step_bytes", "training-step bytes", None)):
        mem = [r for r in rows if r["metric"] == metric]
        if mem:
            panels.append((what, mem, lambda r: f"{r['layer']} {r['size']} {r['dtype']}", target))
    if task_rows:
        panels.append(("tasks", task_rows, None, None))
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 3.6 * nrows), squeeze=False)
    for ax, (title, prow, label, target) in zip(axes.flat, panels):
        if label is None:
            _tasks_panel(ax, prow)
        else:
            _panel(ax, prow, title, shares, label, target)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    first = load(path)[0]
    fig.suptitle(f"{path.stem}: {first['machine']} ({first['device']}), torch {first['torch']}, "
                 f"triton {first['triton']}", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, nargs="?", help="results CSV (default: newest cpu-*/gpu-* in benchmarks/results)")
    args = ap.parse_args(argv)
    return plot(args.csv or newest_csv())


if __name__ == "__main__":
    main()
