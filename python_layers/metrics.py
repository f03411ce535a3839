"""Continual-learning metrics over the accuracy matrix.

The accuracy matrix ``R`` is T x T: ``R[i][j]`` = test accuracy on task j after training tasks 0..i (row i = the
model after task i). Entries that could not be measured are NaN (``None`` in JSON): in the eidetic CLI, task j's
head exists only from ``prepare_for_task(j)`` on, so ``R[i][j]`` for ``j > i + 1`` is NaN and ``R[j-1][j]`` is task
j measured right after its head was added, before any training on it (what FWT needs).

Definitions (T tasks, indices from 0):

* ACC (Lopez-Paz & Ranzato 2017, "average accuracy"):  ``ACC = mean_j R[T-1][j]``.
* BWT (Lopez-Paz & Ranzato 2017, backward transfer):   ``BWT = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])``.
  Negative = forgetting. Exactly 0 when no finished task's accuracy ever changes (eidetic's promise).
* FWT (Lopez-Paz & Ranzato 2017, forward transfer):    ``FWT = 1/(T-1) * sum_{j>=1} (R[j-1][j] - b[j])`` where
  ``b[j]`` is the test accuracy on task j of the untrained (randomly initialised) network. With one head per
  task, as here, ``R[j-1][j]`` reads task j through its fresh, untrained head, and the CLI's ``b[j]`` through
  another fresh head (a draw of its own): both are accuracies of untrained heads, near chance in expectation, so
  this FWT is near 0 whatever the body learned and varies with the head draws by several points. It does not
  measure how much task j gains from reading earlier tasks' features; for that compare ``R[j][j]`` of runs with
  and without forward transfer (the config key ``forward_transfer``).
* Forgetting (Chaudhry et al. 2018, "average forgetting" after the last task):
  ``f_j = max_{l in j..T-2} R[l][j] - R[T-1][j]`` for j < T-1, ``F = mean_{j<T-1} f_j``. The max runs over the
  rows where task j had been trained (l >= j); 0 without forgetting, negative when a task's accuracy rose after
  later tasks trained (which eidetic's frozen tasks never do).

With one task, BWT, FWT and forgetting are undefined: returned as NaN. NaN entries never enter a mean silently:
an entry a definition needs that is NaN makes that metric NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["as_matrix", "new_matrix", "average_accuracy", "backward_transfer", "forward_transfer", "forgetting",
           "forgetting_per_task", "summarize", "to_jsonable"]


def new_matrix(num_tasks: int) -> np.ndarray:
    """A T x T matrix of NaN, to be filled row by row."""
    return np.full((num_tasks, num_tasks), np.nan, dtype=np.float64)


def as_matrix(R) -> np.ndarray:
    """A square float64 array from a nested list (``None`` -> NaN) or array."""
    if not isinstance(R, np.ndarray):
        rows = [[np.nan if v is None else v for v in row] for row in R]
        if len({len(row) for row in rows}) > 1:  # ragged: numpy's own error would not say what is wrong
            raise ValueError(f"the accuracy matrix must be square T x T, got rows of lengths "
                             f"{[len(row) for row in rows]} (pad entries not measured with None)")
        R = rows
    a = np.array(R, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"the accuracy matrix must be square T x T, got shape {a.shape}")
    return a


def average_accuracy(R) -> float:
    R = as_matrix(R)
    return float(R[-1].mean())


def backward_transfer(R) -> float:
    R = as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return math.nan
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, baseline: Sequence[float]) -> float:
    R = as_matrix(R)
    T = R.shape[0]
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"baseline needs one accuracy per task ({T}), got {b.shape}")
    if T < 2:
        return math.nan
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting_per_task(R) -> list[float]:
    R = as_matrix(R)
    T = R.shape[0]
    return [float(np.max(R[j:T - 1, j]) - R[T - 1, j]) for j in range(T - 1)]


def forgetting(R) -> float:
    per_task = forgetting_per_task(R)
    return float(np.mean(per_task)) if per_task else math.nan


def summarize(R, baseline: Sequence[float] | None = None) -> dict:
    """ACC, BWT, FWT (NaN without a baseline) and forgetting of ``R``."""
    return {"acc": average_accuracy(R), "bwt": backward_transfer(R),
            "fwt": forward_transfer(R, baseline) if baseline is not None else math.nan,
            "forgetting": forgetting(R)}


def to_jsonable(value):
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
