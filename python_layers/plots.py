"""Figures of a run (matplotlib, Agg backend: no display needed).

* ``plot_accuracy_matrix``: heatmap of R[i][j] (row = after training task i, column = task j), values printed.
* ``plot_task_accuracy``: each task's test accuracy over training, epochs on the x axis across the whole run,
  task boundaries dashed (like the paper's Figure 1: finished tasks stay flat).
* ``plot_capacity``: share of neurons frozen (solid) and pruned (dashed) over training, per neuron group and their
  neuron-weighted total (like the paper's Figure 3).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_accuracy_matrix", "plot_task_accuracy", "plot_capacity", "plot_run"]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_matrix(matrix, path, title: str = "accuracy matrix") -> Path:
    R = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    T = R.shape[0]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.7 * T), max(3.6, 0.9 + 0.6 * T)))
    masked = np.ma.masked_invalid(R)
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not math.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="black" if R[i, j] > 0.6 else "white")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    # wrapped to the figure's width (about 8 characters per inch at the title's size): a long title is not clipped
    ax.set_title("\n".join(textwrap.wrap(title, width=max(20, int(8 * fig.get_figwidth())))))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_task_accuracy(evaluations, path, task_starts=None, title: str = "test accuracy over training") -> Path:
    """``evaluations``: dicts with ``global_epoch``, ``task`` (evaluated) and ``test_accuracy``.

    ``task_starts``: the global epoch at which each task's training began (dashed lines).
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    tasks = sorted({int(e["task"]) for e in evaluations})
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    last_epoch = max((float(e["global_epoch"]) for e in evaluations), default=0.0)
    for k, t in enumerate(tasks):
        pts = sorted((float(e["global_epoch"]), float(e["test_accuracy"])) for e in evaluations
                     if int(e["task"]) == t and e.get("test_accuracy") is not None)
        if not pts:
            continue
        xs, ys = zip(*pts)
        if xs[-1] < last_epoch:  # a finished task is frozen: its accuracy holds until the end
            xs, ys = xs + (last_epoch,), ys + (ys[-1],)
        ax.plot(xs, ys, marker=".", markersize=3, color=cmap(k % cmap.N), label=f"task {t}")
    for start in (task_starts or [])[1:]:
        ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epoch (whole run)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if tasks:
        ax.legend(fontsize=7, ncol=2 if len(tasks) > 5 else 1, loc="lower left")
    return _save(fig, path)


def plot_capacity(history, path, task_starts=None, title: str = "share of neurons frozen and pruned") -> Path:
    """``history``: per-epoch dicts with ``global_epoch``, ``pruned_share`` and ``frozen_share`` ({group: share})
    and optionally ``group_sizes`` ({group: neurons}) for the weighted total."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [h for h in history if isinstance(h.get("pruned_share"), dict) and h.get("global_epoch") is not None]
    groups = list(rows[0]["pruned_share"]) if rows else []
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    xs = [float(h["global_epoch"]) for h in rows]
    for k, g in enumerate(groups):
        color = cmap(k % cmap.N)
        ax.plot(xs, [h["frozen_share"].get(g, np.nan) for h in rows], color=color, linewidth=1, label=f"{g} frozen")
        ax.plot(xs, [h["pruned_share"].get(g, np.nan) for h in rows], color=color, linewidth=1, linestyle="--",
                label=f"{g} pruned")
    if rows and len(groups) > 1:
        def total(h, key):
            sizes = h.get("group_sizes") or {g: 1 for g in groups}
            n = sum(sizes.get(g, 1) for g in groups)
            return sum(h[key].get(g, 0.0) * sizes.get(g, 1) for g in groups) / max(1, n)
        ax.plot(xs, [total(h, "frozen_share") for h in rows], color="black", linewidth=2, label="all frozen")
        ax.plot(xs, [total(h, "pruned_share") for h in rows], color="black", linewidth=2, linestyle="--",
                label="all pruned")
    for start in (task_starts or [])[1:]:
        ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("epoch (whole run)")
    ax.set_ylabel("share of the group's neurons")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if groups:
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    return _save(fig, path)


def plot_run(results: dict, history, evaluations, out_dir) -> dict[str, Path]:
    """The three figures of a run into ``out_dir``; returns {name: path}."""
    out_dir = Path(out_dir)
    starts = results.get("task_start_epochs")
    paths = {"accuracy_matrix": plot_accuracy_matrix(results["accuracy_matrix"], out_dir / "accuracy_matrix.png",
                                                     "test accuracy R[i][j] (true task id)")}
    if results.get("routed_accuracy_matrix") is not None and any(
            v is not None for row in results["routed_accuracy_matrix"] for v in row):
        paths["routed_accuracy_matrix"] = plot_accuracy_matrix(
            results["routed_accuracy_matrix"], out_dir / "routed_accuracy_matrix.png",
            f"test accuracy through the {results.get('config', {}).get('router', '')} router (no task id)")
    paths["task_accuracy"] = plot_task_accuracy(evaluations, out_dir / "task_accuracy.png", starts)
    paths["capacity"] = plot_capacity(history, out_dir / "capacity.png", starts)
    return paths
