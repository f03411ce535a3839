"""Per-neuron state: the one mask representation, and the one live-synapse rule.

Every Eidetic layer keeps, per output neuron, one small integer (``torch.int16``):

* ``0 <= t < FREE``: the task ``t`` that froze the neuron. It never changes again.
* ``FREE``: trainable now. Numerically the largest int16, so "FREE is newer than
  every task" falls out of plain integer comparison.
* ``PRUNED``: switched off now (outputs exactly 0), to be recycled for a later task.

A second per-neuron integer, ``min_input_task`` (default 0), is the oldest task a
neuron may read from. It is 0 with forward transfer and the neuron's own task
without it (disjoint sub-networks, the paper's Figure 2a).

The rule (used by every backend, the tests and the trainer):
    synapse j -> i is live  iff  in_task[j] != PRUNED and out_task[i] != PRUNED
                                 and min_input_task[i] <= in_task[j] <= out_task[i]

Raw network inputs are always live: they carry task 0 and the layer that reads them
keeps min_input_task 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STATE_DTYPE = torch.int16
FREE = 32767  # torch.iinfo(torch.int16).max: newer than every task
PRUNED = -1
MAX_TASK = FREE - 1


def is_free(task: torch.Tensor) -> torch.Tensor:
    return task == FREE


def is_frozen(task: torch.Tensor) -> torch.Tensor:
    return (task >= 0) & (task < FREE)


def is_pruned(task: torch.Tensor) -> torch.Tensor:
    return task == PRUNED


def new_state(n: int, value: int = FREE, device=None) -> torch.Tensor:
    return torch.full((n,), value, dtype=STATE_DTYPE, device=device)


def check_state_vector(task: torch.Tensor, name: str, expected_len: int | None = None) -> None:
    """Clear errors for a state vector of the wrong type, length or range."""
    if not isinstance(task, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of task states, got {type(task).__name__}")
    if task.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one state per neuron), got shape {tuple(task.shape)}")
    if task.dtype.is_floating_point or task.dtype == torch.bool or task.dtype.is_complex:
        raise TypeError(f"{name} must hold integers (task id, FREE={FREE} or PRUNED={PRUNED}), got {task.dtype}")
    if expected_len is not None and task.numel() != expected_len:
        raise ValueError(f"{name} has {task.numel()} entries, expected {expected_len} (one per neuron)")
    if task.numel():
        lo, hi = int(task.min()), int(task.max())
        if lo < PRUNED or hi > FREE:
            raise ValueError(
                f"{name} holds states outside [{PRUNED}, {FREE}] (min {lo}, max {hi}): each entry must be a "
                f"task id in [0, {MAX_TASK}], FREE ({FREE}) or PRUNED ({PRUNED})"
            )


def live_inputs(in_task: torch.Tensor, task: int, min_task: int = 0) -> torch.Tensor:
    """Bool[in]: which inputs a neuron of state ``task`` (not PRUNED) reads."""
    return (in_task != PRUNED) & (in_task >= min_task) & (in_task <= task)


def live_synapses(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor | None = None):
    """Bool[out, in] dense mask of the rule. For tests and debugging only: no fast path builds it."""
    if out_min_task is None:
        out_min_task = torch.zeros_like(out_task)
    i = in_task.long()[None, :]
    o = out_task.long()[:, None]
    lo = out_min_task.long()[:, None]
    return (i != PRUNED) & (o != PRUNED) & (i >= lo) & (i <= o)


def storage_slots(out_task: torch.Tensor) -> torch.Tensor:
    """Int64[out]: each neuron's row in its storage.

    FREE and PRUNED neurons live, in index order, in the trainable storage; frozen neurons
    live in the frozen storage ordered by (task, index), so each task's rows form one
    contiguous block and freezing a new task only appends.
    """
    out_task = out_task.long()
    frozen = is_frozen(out_task)
    # Fixed shapes and no host sync (traceable by torch.compile): trainable rows count up in index
    # order; a stable sort puts the frozen neurons first, by (task, index), and its inverse is the slot.
    trainable_slot = torch.cumsum((~frozen).long(), 0) - 1
    order = torch.sort(torch.where(frozen, out_task, FREE + 1), stable=True).indices
    position = torch.arange(out_task.numel(), device=out_task.device)
    frozen_slot = torch.empty_like(position).scatter_(0, order, position)
    return torch.where(frozen, frozen_slot, trainable_slot)


@dataclass
class OutputGroup:
    """Output neurons that share one input window; computed by one matmul/conv."""

    task: int  # FREE or the frozen task
    min_task: int
    neurons: torch.Tensor  # int64 logical output indices
    frozen: bool  # rows are in the frozen storage (else the trainable one)
    rows: torch.Tensor | slice  # rows in that storage: a slice when contiguous
    input_live: torch.Tensor | None  # Bool[in]; None when every input is live


@dataclass
class Plan:
    groups: list[OutputGroup]
    live_neurons: torch.Tensor  # int64: every non-PRUNED output, in the order the groups emit them
    n_out: int
    all_trainable_dense: bool  # every neuron FREE, every input live: a plain layer
    live_is_identity: bool  # groups emit every neuron in index order: no gather needed
    gather_index: torch.Tensor  # int64[n_out]: each neuron's column in the groups' output; PRUNED -> n_live


def _as_slice(rows: torch.Tensor) -> torch.Tensor | slice:
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) == n - 1 and bool((rows[1:] - rows[:-1] == 1).all()):
        return slice(int(rows[0]), int(rows[0]) + n)
    return rows


def make_plan(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor,
              slot: torch.Tensor) -> Plan:
    """Group output neurons by (state, min_input_task): the reference backend runs one GEMM per group.

    Host-side work done once per state change (layers cache it), never per step.
    """
    out_l = out_task.long().cpu()
    lo_l = out_min_task.long().cpu()
    in_l = in_task.long()
    slot_l = slot.long().cpu()
    dev = out_task.device
    live = out_l != PRUNED
    keys = torch.stack([out_l[live], lo_l[live]], 1)
    groups = []
    order = []
    if keys.numel():
        uniq = torch.unique(keys, dim=0)
        for task, lo in uniq.tolist():
            neurons = ((out_l == task) & (lo_l == lo)).nonzero().flatten()
            inputs = live_inputs(in_l, task, lo)
            groups.append(OutputGroup(
                task=task, min_task=lo, neurons=neurons.to(dev), frozen=task != FREE,
                rows=_as_slice(slot_l[neurons]),
                input_live=None if bool(inputs.all()) else inputs,
            ))
            order.append(neurons)
    for g in groups:
        if isinstance(g.rows, torch.Tensor):
            g.rows = g.rows.to(dev)
    live_neurons = torch.cat(order).to(dev) if order else torch.zeros(0, dtype=torch.long, device=dev)
    all_dense = (len(groups) == 1 and groups[0].task == FREE and groups[0].input_live is None
                 and live_neurons.numel() == out_l.numel())
    identity = live_neurons.numel() == out_l.numel() and bool(
        (live_neurons.cpu() == torch.arange(out_l.numel())).all())
    n_live = live_neurons.numel()
    gather_index = torch.full((out_l.numel(),), n_live, dtype=torch.long, device=dev)
    gather_index[live_neurons] = torch.arange(n_live, device=dev)
    return Plan(groups=groups, live_neurons=live_neurons, n_out=out_l.numel(), all_trainable_dense=all_dense,
                live_is_identity=identity, gather_index=gather_index)


def view_states(task_vector: torch.Tensor, view_task: int | None) -> torch.Tensor:
    """States as seen when evaluating finished task ``view_task``: neurons it cannot see act PRUNED.

    With ``view_task=None`` the states are returned as they are.
    """
    if view_task is None:
        return task_vector
    return torch.where(task_vector <= view_task, task_vector, torch.full_like(task_vector, PRUNED))


def assemble_rows(trainable: torch.Tensor, frozen: torch.Tensor, task: torch.Tensor,
                  slot: torch.Tensor) -> torch.Tensor:
    """Dense per-neuron tensor [out, ...] from the two storages.

    Differentiable w.r.t. ``trainable`` only; the frozen storage is read detached.
    """
    if frozen.numel() == 0 and trainable.shape[0] == task.numel():
        return trainable  # nothing frozen: slots are the identity
    index = slot.long() + is_frozen(task).long() * trainable.shape[0]
    return torch.cat([trainable, frozen.detach()]).index_select(0, index)
