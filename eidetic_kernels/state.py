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

import dataclasses
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


def storage_slots(out_task: torch.Tensor, out_min_task: torch.Tensor | None = None) -> torch.Tensor:
    """Int64[out]: each neuron's row in its storage.

    FREE and PRUNED neurons live, in index order, in the trainable storage; frozen neurons
    live in the frozen storage ordered by (task, min_input_task, index), so each block of the
    block-triangular product is one contiguous run of rows and freezing a new task only appends.
    """
    out_task = out_task.long()
    frozen = is_frozen(out_task)
    # Fixed shapes and no host sync (traceable by torch.compile): trainable rows count up in index
    # order; a stable sort puts the frozen neurons first, by (task, min task, index), and its inverse is the slot.
    key = torch.where(frozen, out_task, FREE + 1)
    if out_min_task is not None:
        key = key * (FREE + 2) + torch.where(frozen, out_min_task.long(), 0)
    order = torch.sort(key, stable=True).indices
    trainable_slot = torch.cumsum((~frozen).long(), 0) - 1
    position = torch.arange(out_task.numel(), device=out_task.device)
    frozen_slot = torch.empty_like(position).scatter_(0, order, position)
    return torch.where(frozen, frozen_slot, trainable_slot)


def _range_of(index: torch.Tensor) -> tuple[int, int] | None:
    """(a, b) when the ascending int64 ``index`` (on the CPU) is a..b-1, else None."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1:
        return int(index[0]), int(index[0]) + n
    return None


@dataclass
class Block:
    """One product of the block-triangular layer: output neurons ``rows`` read the inputs ``cols``.

    A frozen block's weights are ``[len(rows), len(cols), *kernel]`` at element ``offset`` of the flat
    frozen storage (its bias at rows ``bias_start:`` of the frozen bias). The trainable block reads the
    trainable storage: rows ``slots`` (None: every trainable row, in order; its PRUNED rows, at
    positions ``zero_rows`` of the block's output, are set to exactly 0). Inputs are a slice when
    ``col_range`` is set, else gathered by ``cols``; ``dead`` are columns inside the slice the block must
    not read (PRUNED inputs between FREE ones: zeroed on the smaller of the inputs and the weights).
    ``train_pos`` / ``train_range``: positions of the block's inputs that can carry a gradient to a
    trainable parameter (FREE producers): the only inputs the trainable block computes dX for when frozen
    blocks are constants to autograd.
    """

    task: int  # frozen task, or FREE
    min_task: int
    rows: torch.Tensor  # int64 output neurons, ascending
    cols: torch.Tensor | None  # int64 inputs read, ascending; None: every input
    col_range: tuple[int, int] | None
    width: int  # number of inputs read (columns of the compact storage)
    offset: int = 0  # frozen: element offset in the flat storage (in units of weights per synapse)
    bias_start: int = 0  # frozen: first row in the frozen bias
    slots: torch.Tensor | None = None  # trainable: storage rows read; None = all, in order
    zero_rows: torch.Tensor | None = None  # trainable: PRUNED rows of the block output
    dead: torch.Tensor | None = None  # trainable: columns inside col_range not read (relative to its start)
    train_pos: torch.Tensor | None = None  # trainable: positions among the block's inputs with FREE producers
    train_range: tuple[int, int] | None = None

    @property
    def frozen(self) -> bool:
        return self.task != FREE


@dataclass
class Table:
    """The range table of one layer for one view: which products run, and how outputs are assembled.

    Host-side work done once per state change (layers cache it), never per step; it holds index
    vectors only (no weight-shaped tensor). Block outputs are concatenated in table order; when
    ``out_index`` is None that concatenation (followed by ``tail`` zero columns) is already the output
    in neuron order, else output neuron i is column ``out_index[i]`` of the concatenation with one
    zero column appended (PRUNED neurons and those the view cannot see read it).
    """

    blocks: list[Block]
    n_out: int
    n_in: int
    out_index: torch.Tensor | None
    tail: int  # zero outputs after the blocks' (identity layout only)
    frozen_numel: int  # synapses in the whole frozen storage (every block, whatever the view)
    n_frozen: int
    all_trainable_dense: bool  # one trainable block over every row and every input: a plain layer
    zero_neurons: torch.Tensor | None = None  # outputs that are exactly 0 (device); None if none

    @property
    def frozen_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.frozen]


def frozen_blocks(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor) -> list[Block]:
    """Every frozen block of a layer from its real (not view) states, in storage order (task, min task)."""
    out_l, lo_l, in_l = out_task.long().cpu(), out_min_task.long().cpu(), in_task.long().cpu()
    frozen = is_frozen(out_l)
    blocks = []
    if not bool(frozen.any()):
        return blocks
    offset, bias_start = 0, 0
    for task, lo in torch.unique(torch.stack([out_l[frozen], lo_l[frozen]], 1), dim=0).tolist():
        rows = ((out_l == task) & (lo_l == lo)).nonzero().flatten()
        live = live_inputs(in_l, task, lo)
        cols = live.nonzero().flatten()
        whole = cols.numel() == in_l.numel()
        blocks.append(Block(task=task, min_task=lo, rows=rows, cols=None if whole else cols,
                            col_range=(0, in_l.numel()) if whole else _range_of(cols), width=cols.numel(),
                            offset=offset, bias_start=bias_start))
        offset += rows.numel() * cols.numel()
        bias_start += rows.numel()
    return blocks


def make_table(in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor,
               view_task: int | None = None, dense_gather_share: float = 0.75) -> Table:
    """The range table of a layer with real states ``in_task``/``out_task``/``out_min_task``, as view
    ``view_task`` sees it (None: the layer as it trains; t: finished task t, blocks of tasks <= t only).

    Frozen blocks: one per (task, min_input_task), each reading exactly its live inputs (in the
    task-major layout of a network, one contiguous range). The trainable block: FREE neurons by
    min_input_task; when they share one, a single product over the whole trainable storage. Its
    inputs are a slice with dead columns zeroed when the live ones fill at least ``dense_gather_share``
    of their span, else gathered.
    """
    dev = out_task.device
    out_l, lo_l, in_l = out_task.long().cpu(), out_min_task.long().cpu(), in_task.long().cpu()
    n_out, n_in = out_l.numel(), in_l.numel()
    all_frozen = frozen_blocks(in_l, out_l, lo_l)
    n_frozen = sum(b.rows.numel() for b in all_frozen)
    frozen_numel = sum(b.rows.numel() * b.width for b in all_frozen)
    blocks = [b for b in all_frozen if view_task is None or b.task <= view_task]
    trainable = ~is_frozen(out_l)
    free = out_l == FREE
    if view_task is None and bool(free.any()):
        slot = torch.cumsum(trainable.long(), 0) - 1
        los = torch.unique(lo_l[free]).tolist()
        for lo in los:
            rows_free = (free & (lo_l == lo)).nonzero().flatten()
            if len(los) == 1:  # one product over every trainable row; PRUNED rows zeroed after it
                rows = trainable.nonzero().flatten()
                slots = None
                pruned_pos = (out_l[rows] == PRUNED).nonzero().flatten()
                zero_rows = pruned_pos if pruned_pos.numel() else None
            else:
                rows, slots, zero_rows = rows_free, slot[rows_free], None
            live = live_inputs(in_l, FREE, lo)
            cols = live.nonzero().flatten()
            blk = Block(task=FREE, min_task=lo, rows=rows, cols=None, col_range=None, width=cols.numel(),
                        slots=None if slots is None else slots.to(dev),
                        zero_rows=None if zero_rows is None else zero_rows.to(dev))
            if cols.numel() == n_in:
                blk.col_range = (0, n_in)
            elif cols.numel() and cols.numel() >= dense_gather_share * (int(cols[-1]) + 1 - int(cols[0])):
                a, b = int(cols[0]), int(cols[-1]) + 1
                blk.col_range = (a, b)
                dead = (~live[a:b]).nonzero().flatten()
                blk.dead = dead.to(dev) if dead.numel() else None
                blk.width = b - a
            else:
                blk.cols = cols
                blk.col_range = _range_of(cols)
            # inputs from FREE producers: the only ones a gradient can carry to a trainable parameter
            if blk.cols is not None:
                window_states = in_l[blk.cols]
            else:
                window_states = in_l[blk.col_range[0]:blk.col_range[1]]
            train_pos = (window_states == FREE).nonzero().flatten()
            blk.train_range = _range_of(train_pos)
            blk.train_pos = train_pos.to(dev)
            blocks.append(blk)
    # output assembly: identity when the blocks' rows, in order, are 0..covered-1
    order = [b.rows for b in blocks]
    covered = sum(r.numel() for r in order)
    cat = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    identity = bool((cat == torch.arange(covered)).all()) if covered else True
    zero = torch.ones(n_out, dtype=torch.bool)
    if covered:
        zero[cat] = False
    for b in blocks:  # PRUNED rows computed by the trainable product and zeroed there
        if b.zero_rows is not None:
            zero[b.rows[b.zero_rows.cpu()]] = True
    out_index = None
    if not identity:
        out_index = torch.full((n_out,), covered, dtype=torch.long)
        out_index[cat] = torch.arange(covered)
        out_index = out_index.to(dev)
    for b in blocks:
        b.rows = b.rows.to(dev)
        if b.cols is not None:
            b.cols = b.cols.to(dev)
    zero_neurons = zero.nonzero().flatten()
    dense = (len(blocks) == 1 and not blocks[0].frozen and blocks[0].slots is None and blocks[0].zero_rows is None
             and blocks[0].col_range == (0, n_in) and blocks[0].dead is None and n_frozen == 0)
    return Table(blocks=blocks, n_out=n_out, n_in=n_in, out_index=out_index,
                 tail=n_out - covered if identity else 0, frozen_numel=frozen_numel, n_frozen=n_frozen,
                 all_trainable_dense=dense,
                 zero_neurons=zero_neurons.to(dev) if zero_neurons.numel() else None)


def narrow_table(table: Table, n_out: int | None, n_in: int, what: str = "layer") -> Table:
    """``table`` (a finished task's view) at prefix width: outputs are the view's ``n_out`` neurons, the
    first of the layer (the task-major layout of a network), and inputs only the first ``n_in`` features.

    The blocks are the view's own, unchanged (same windows, storage offsets and products), so every output
    is computed exactly as at full width; only the zero tail is not written. Raises RuntimeError when the
    view's neurons are not a prefix or a block reads an input at or after ``n_in``."""
    if n_out is None or table.out_index is not None or table.n_out - table.tail != n_out:
        raise RuntimeError(f"{what}: the view's neurons are not the layer's first ones; prefix-width evaluation "
                           "needs the task-major layout of an EideticNetwork")
    for b in table.blocks:
        if not b.frozen:
            raise RuntimeError(f"{what}: prefix-width evaluation is for finished tasks' views only")
        if b.col_range is not None:
            end = b.col_range[1]
        else:
            end = int(b.cols.max()) + 1 if b.cols.numel() else 0
        if end > n_in:
            raise RuntimeError(f"{what}: the view reads input {end - 1} but gets only {n_in} features at prefix "
                               "width")
    return dataclasses.replace(table, n_out=n_out, n_in=n_in, tail=0, zero_neurons=None)


def compact_rows(dense: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    """Flat frozen storage from per-neuron rows ``dense`` [out, in, *kernel]: each block's rows, each
    row's live columns, in storage order (the inverse of ``expand_rows``)."""
    parts = []
    for b in blocks:
        rows = dense.index_select(0, b.rows.to(dense.device))
        if b.cols is not None:
            rows = rows.index_select(1, b.cols.to(dense.device))
        parts.append(rows.reshape(-1))
    if not parts:
        return dense.new_empty(0)
    return torch.cat(parts)


def expand_rows(flat: torch.Tensor, in_task: torch.Tensor, out_task: torch.Tensor, out_min_task: torch.Tensor,
                n_frozen: int, kernel: tuple[int, ...]) -> torch.Tensor:
    """[n_frozen, in, *kernel] in storage-slot order from the flat frozen storage, zeros on dead synapses.

    Traceable (fixed shapes, no host sync; ``n_frozen`` is a Python int the layer keeps): for backends
    that read full-width frozen rows and for ``dense()``. Holds one bool per frozen synapse while it runs;
    the layers store no such tensor.
    """
    frozen = is_frozen(out_task)
    slot = storage_slots(out_task, out_min_task)
    key = torch.where(frozen, slot, torch.full_like(slot, out_task.numel()))
    rows = torch.argsort(key)[:n_frozen]  # frozen neurons in slot order
    t = out_task.long()[rows]
    lo = out_min_task.long()[rows]
    i = in_task.long()[None, :]
    live = (i != PRUNED) & (i >= lo[:, None]) & (i <= t[:, None])
    k = 1
    for d in kernel:
        k *= d
    full = flat.new_zeros((n_frozen, in_task.numel(), k))
    full = full.masked_scatter(live[:, :, None].expand_as(full), flat.reshape(-1, k))
    return full.reshape((n_frozen, in_task.numel()) + tuple(kernel))


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
