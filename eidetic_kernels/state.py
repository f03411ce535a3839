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

from dataclasses import dataclass, field

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
    input_index: torch.Tensor | None = None  # int64: the live inputs (input_live.nonzero()); None when all live


@dataclass
class InputWindow:
    """Groups (indices into ``Plan.groups``) that read exactly the same inputs: one op can serve them all.

    ``covers_all``: the window is the layer's only one, so one op over every output in order (PRUNED
    ones as zero rows) needs no assembly. The rows of such an op are indexed by ``Plan.window_rows``.
    """

    groups: list[int]
    input_live: torch.Tensor | None  # Bool[in]; None when every input is live
    input_index: torch.Tensor | None  # int64 live inputs; None when every input is live
    covers_all: bool
    has_free: bool  # one of its groups is the FREE one


@dataclass
class Plan:
    groups: list[OutputGroup]
    live_neurons: torch.Tensor  # int64: every non-PRUNED output, in the order the groups emit them
    n_out: int
    all_trainable_dense: bool  # every neuron FREE, every input live: a plain layer
    live_is_identity: bool  # groups emit every neuron in index order: no gather needed
    gather_index: torch.Tensor  # int64[n_out]: each neuron's column in the groups' output; PRUNED -> n_live
    windows: list[InputWindow] = field(default_factory=list)  # the groups, by the inputs they read
    pruned_neurons: torch.Tensor | None = None  # int64 PRUNED outputs; None when there are none
    # Layers keep FREE and PRUNED rows in the trainable storage at slots 0..k-1: the FREE group's op over
    # the whole storage then puts row r at output trainable_row_neuron[r] (None when slots are not like
    # that, or when there are several FREE groups), and its rows trainable_pruned_rows (None if none) are
    # zeroed
    trainable_row_neuron: torch.Tensor | None = None
    trainable_pruned_rows: torch.Tensor | None = None
    trainable_rows_are_outputs: bool = False  # trainable_row_neuron is 0..n_out-1 (nothing frozen)
    # built on first use (index vectors only): window -> (neurons, row source), see window_rows
    window_row_cache: dict = field(default_factory=dict, repr=False)

    def window_rows(self, w: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(neurons, source) of one op serving window ``w``: its output neurons in row order (None: every
        output in order) and, per row, int32: slot s >= 0 in the trainable storage, -2 - s for slot s in
        the frozen storage, -1 for a zero row (a PRUNED neuron)."""
        cached = self.window_row_cache.get(w)
        if cached is None:
            window = self.windows[w]
            members = [self.groups[i] for i in window.groups]
            dev = members[0].neurons.device
            neurons = torch.cat([g.neurons for g in members])
            source = torch.cat([_rows_index(g.rows, dev) * (-1 if g.frozen else 1)
                                - (2 if g.frozen else 0) for g in members])
            if window.covers_all:
                full = torch.full((self.n_out,), -1, dtype=torch.long, device=dev)
                full[neurons] = source
                cached = (None, full.int())
            else:
                order = torch.argsort(neurons)  # output order: the assembly then copies sorted columns
                cached = (neurons[order], source[order].int())
            self.window_row_cache[w] = cached
        return cached

    def window_free_rows(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions among the rows of window ``w``'s op, trainable slots) of its FREE rows."""
        key = ("free", w)
        cached = self.window_row_cache.get(key)
        if cached is None:
            source = self.window_rows(w)[1]
            positions = (source >= 0).nonzero().flatten()
            cached = (positions, source[positions].long())
            self.window_row_cache[key] = cached
        return cached


def _rows_index(rows: torch.Tensor | slice, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows.long()


def _as_slice(rows: torch.Tensor) -> torch.Tensor | slice:
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) == n - 1 and bool((rows[1:] - rows[:-1] == 1).all()):
        return slice(int(rows[0]), int(rows[0]) + n)
    return rows


def make_plan(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor,
              slot: torch.Tensor) -> Plan:
    """Group output neurons by (state, min_input_task), and the groups by the inputs they read: the
    reference backend runs one GEMM per group or per window.

    Host-side work done once per state change (layers cache it), never per step. Only index vectors
    are stored: the layers keep their memory within a few percent of a plain layer.
    """
    out_l = out_task.long().cpu()
    lo_l = out_min_task.long().cpu()
    in_l = in_task.long().cpu()
    slot_l = slot.long().cpu()
    dev = out_task.device
    n_out = out_l.numel()
    live = out_l != PRUNED
    keys = torch.stack([out_l[live], lo_l[live]], 1)
    specs = []
    window_of: dict = {}  # input pattern -> group indices
    if keys.numel():
        uniq = torch.unique(keys, dim=0)
        for task, lo in uniq.tolist():
            neurons = ((out_l == task) & (lo_l == lo)).nonzero().flatten()
            inputs = live_inputs(in_l, task, lo)
            all_live = bool(inputs.all())
            specs.append((task, lo, neurons, None if all_live else inputs))
            window_of.setdefault(None if all_live else tuple(inputs.tolist()), []).append(len(specs) - 1)
    order = [s[2] for s in specs]
    live_neurons = torch.cat(order).to(dev) if order else torch.zeros(0, dtype=torch.long, device=dev)
    groups = []
    start = 0
    for task, lo, neurons, inputs in specs:
        rows = _as_slice(slot_l[neurons])
        groups.append(OutputGroup(
            task=task, min_task=lo,
            neurons=live_neurons[start:start + neurons.numel()],  # a view: the plan stores each index once
            frozen=task != FREE, rows=rows if isinstance(rows, slice) else rows.to(dev),
            input_live=None if inputs is None else inputs.to(dev),
            input_index=None if inputs is None else inputs.nonzero().flatten().to(dev),
        ))
        start += neurons.numel()
    all_dense = (len(groups) == 1 and groups[0].task == FREE and groups[0].input_live is None
                 and live_neurons.numel() == n_out)
    identity = live_neurons.numel() == n_out and bool(
        (live_neurons.cpu() == torch.arange(n_out)).all())
    n_live = live_neurons.numel()
    gather_index = torch.full((n_out,), n_live, dtype=torch.long, device=dev)
    gather_index[live_neurons] = torch.arange(n_live, device=dev)

    windows = []
    for members in window_of.values():
        first = groups[members[0]]
        windows.append(InputWindow(groups=members, input_live=first.input_live, input_index=first.input_index,
                                   covers_all=len(window_of) == 1,
                                   has_free=any(not groups[i].frozen for i in members)))
    pruned = (~live).nonzero().flatten()
    # trainable storage = FREE and PRUNED rows at slots 0..k-1 (what layers keep): row -> neuron
    trainable = (~is_frozen(out_l)).nonzero().flatten()
    row_neuron = torch.full((trainable.numel(),), -1, dtype=torch.long)
    slots = slot_l[trainable]
    if trainable.numel() and int(slots.min()) >= 0 and int(slots.max()) < trainable.numel():
        row_neuron[slots] = trainable
    free = [g for g in groups if not g.frozen]
    # (with FREE neurons split by min_input_task, each FREE group takes its own rows instead)
    mapped = len(free) == 1 and bool((row_neuron >= 0).all())
    row_neuron_dev = None
    if mapped:
        reuse = free and not pruned.numel() and torch.equal(free[0].neurons.cpu(), row_neuron)
        row_neuron_dev = free[0].neurons if reuse else row_neuron.to(dev)
    return Plan(groups=groups, live_neurons=live_neurons, n_out=n_out, all_trainable_dense=all_dense,
                live_is_identity=identity, gather_index=gather_index, windows=windows,
                pruned_neurons=pruned.to(dev) if pruned.numel() else None,
                trainable_row_neuron=row_neuron_dev,
                trainable_pruned_rows=slot_l[pruned].to(dev) if mapped and pruned.numel() else None,
                trainable_rows_are_outputs=mapped and row_neuron.numel() == n_out
                and bool((row_neuron == torch.arange(n_out)).all()))


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
