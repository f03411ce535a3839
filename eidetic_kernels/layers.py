"""Drop-in layers: storage + per-neuron state + one backend call.

Storage is split by construction. The rows (weight row, bias entry, BN affine entry) of FREE
and PRUNED neurons live in ordinary Parameters (``weight``, ``bias``); the rows of frozen
neurons live in buffers (``frozen_weight``, ``frozen_bias``). No frozen value is reachable
through ``model.parameters()``, so no optimizer, weight decay, hook or gradient can move it.
The state costs O(out + in) small integers. ``slot[i]`` is neuron i's row in whichever storage
its state selects.

Linear and Conv2d store frozen rows compactly: ``frozen_weight`` is one flat buffer holding, block by
block of the block-triangular product (``state.make_table``: frozen neurons by (task, min_input_task)),
each frozen row's *live* synapses only. A layer's bytes therefore shrink as tasks finish. The inputs a
frozen block reads can never change afterwards (``set_input_task`` refuses it), so the layout is a
function of the states. ``dense()`` gives the twin's dense tensors back (zeros on dead synapses).

While every neuron is FREE, ``weight`` has the twin's shape and the layer is the twin.
"""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from .functional import InputError, autocast_dtype, check_input, conv_padding
from .ops.blocks import ZeroGradients, functorch_active
from .ops.eager import compile_disabled
from .replaced import replace_parameter
from .state import (FREE, MAX_TASK, PRUNED, STATE_DTYPE, assemble_rows, check_state_vector, compact_rows,
                    expand_rows, frozen_blocks, is_frozen, live_inputs, make_table, narrow_table, new_state,
                    storage_slots, view_states)

__all__ = ["EideticLinear", "EideticConv2d", "EideticBatchNorm1d", "EideticBatchNorm2d", "EideticLayer",
           "convert"]


@contextlib.contextmanager
def _ordinary_tensors():
    """Build a cache as ordinary tensors even inside ``torch.inference_mode``: a plan built during an
    evaluation is reused by the next training step, which may save it for backward (inference tensors
    cannot be saved). Caches are never differentiable, so grad mode does not matter; they hold no floats
    that autocast could change."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            yield
    else:
        yield


_warned_eager_under_compile = False


@compile_disabled(reason="Eidetic layers on the CPU engine (reference/C++ backends) plan their work on the host "
                         "and run eagerly: fullgraph=True needs the Triton backend (CUDA, or EIDETIC_BACKEND=triton)")
def _run_eagerly(layer: "EideticLayer", input: torch.Tensor) -> torch.Tensor:
    """A layer on an engine that plans on the host (reference, C++), called inside ``torch.compile``: run
    eagerly (the compiled graph breaks around the layer), with one warning per process. ``torch.export`` wants
    one graph without breaks, which the host-side planning cannot be part of: a clear error."""
    if torch.compiler.is_exporting():
        raise RuntimeError(
            f"{layer._name()}: torch.export cannot capture Eidetic layers on the CPU engine (the reference/C++ "
            "backends plan on the host). Export a finished task instead: EideticNetwork.export(task) returns a "
            "plain torch.nn module that torch.export accepts; or run on the Triton backend")
    global _warned_eager_under_compile
    if not _warned_eager_under_compile:
        _warned_eager_under_compile = True
        warnings.warn("eidetic: on the CPU engine (reference/C++ backends) Eidetic layers plan on the host, so "
                      "torch.compile runs them eagerly and compiles the code around them; the Triton backend "
                      "compiles them too (CUDA, or EIDETIC_BACKEND=triton)", UserWarning, stacklevel=2)
    return layer.forward(input)  # not layer(input): the compiled caller already ran the module's hooks


def channels_last_strides(shape, stride) -> bool:
    """Whether torch treats a 4-D tensor of this shape and stride as channels_last (ATen's
    ``is_channels_last_strides_2d``, what ``Tensor.suggest_memory_format`` and the convolutions follow). Unlike
    ``is_contiguous(memory_format=torch.channels_last) and not is_contiguous()``, this also says so for a single
    channel permuted from [N, H, W, 1] images, which is contiguous as well, yet a convolution of it returns
    channels_last outputs."""
    if len(shape) != 4 or stride[1] == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or stride[d] < low:
            return False
        if d == 0 and low == stride[1]:  # N111 or N11W: a trivial channel dim decides nothing
            return False
        low = stride[d] * shape[d] if shape[d] > 1 else stride[d]
    return True


def _channels_last(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and channels_last_strides(t.shape, t.stride())


def _memory_format_of(y: torch.Tensor, *like) -> torch.Tensor:
    """``y`` in channels_last when an input or the weight is (as torch's conv and batch norm return it): the
    products over blocks assemble a contiguous output."""
    if y.dim() == 4 and any(_channels_last(t) for t in like) and not y.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _task_id(task, what: str = "task") -> int:
    """An int task id in [0, MAX_TASK] (an integer scalar of numpy or torch is taken as its int; bools are not task
    ids). ValueError otherwise."""
    if not isinstance(task, bool) and not (isinstance(task, torch.Tensor) and (task.is_floating_point()
                                                                               or task.dtype == torch.bool)):
        try:
            value = operator.index(task)
        except TypeError:
            value = None
        if value is not None and 0 <= value <= MAX_TASK:
            return value
    raise ValueError(f"{what} must be an int in [0, {MAX_TASK}], got {task!r}")


class FreeInputsWarning(UserWarning):
    """Inputs a layer's neurons will not read. ``freeze_free_neurons`` on a layer whose input states still say
    FREE: frozen neurons never read FREE inputs, so the synapses from them are cut at the freeze (usually a producer
    not frozen or not wired yet). ``set_min_input_task(t)`` on a layer whose inputs are all of tasks older than t
    (a layer reading the raw input): its FREE neurons would read nothing."""


class PrefixWidthMismatch(Exception):
    """Raised by a layer evaluating at prefix width (``narrow``) on an input that is not the width it expects;
    ``EideticNetwork.forward`` then evaluates at full width."""


class EideticLayer(nn.Module):
    """Per-neuron state and split storage shared by every Eidetic layer.

    Subclasses set ``_split_names`` (per-neuron tensors split between trainable and frozen
    storage) and implement ``_reinit_rows`` and ``_run``.
    """

    _split_names: tuple[str, ...] = ()
    _has_inputs = True  # False for batch norm: its channels are its neurons' own outputs
    _compact = False  # frozen weight rows stored compactly (Linear/Conv); bias and BN entries stay per neuron
    # prefix-width evaluation (``narrow_width``): EideticNetwork sets it, with a view, for a finished task, to the
    # input width the layer reads then (channels, for a batch norm); None: off
    narrow: int | None = None
    # set by EideticNetwork: the layer is in its body, and whether the network's forward is running now
    _network_managed: bool = False
    _network_forward: bool = False
    # set by EideticNetwork for a layer of its body that its layer graph does not hold (the traced batch did not
    # run it, or it came later): why; such a layer refuses to run
    _outside_graph: str | None = None

    # ----- construction -------------------------------------------------------------------
    def _init_state(self, n_out: int, n_in: int | None, device) -> None:
        self.register_buffer("task_state", new_state(n_out, FREE, device))
        if n_in is not None:
            self.register_buffer("min_input_task", torch.zeros(n_out, dtype=STATE_DTYPE, device=device))
            # raw inputs are always live: task 0 until a network wires this layer to its producers
            self.register_buffer("input_task", torch.zeros(n_in, dtype=STATE_DTYPE, device=device))
        self.register_buffer("taylor_score", None, persistent=False)
        self._slot: torch.Tensor | None = None
        self._frozen_count: int | None = 0
        self.view_task: int | None = None
        # frozen blocks are constants to autograd (EideticNetwork turns this on for its own training)
        self.constant_frozen = False
        self.last_backend: str | None = None
        self._plans: dict = {}
        backends.preload(self.task_state.device)  # torch.compile cannot trace the backend's import

    def _split(self, name: str, value: torch.Tensor | None) -> None:
        """Register ``value`` as the trainable storage ``name`` and an empty frozen twin."""
        if value is None:
            self.register_parameter(name, None)
            self.register_buffer("frozen_" + name, None)
            return
        self.register_parameter(name, nn.Parameter(value))
        # compact layers keep frozen rows flat (live synapses only); batch norm one entry per channel
        self.register_buffer("frozen_" + name, value.detach().new_empty((0,) if self._compact else
                                                                       (0,) + tuple(value.shape[1:])))

    @property
    def num_neurons(self) -> int:
        """Neurons (output features or channels) of the layer: its twin's out_features / out_channels /
        num_features, whatever their states."""
        return self.task_state.numel()

    @property
    def neuron_task(self) -> torch.Tensor:
        """Int16[out], read-only copy: the task that froze each neuron, FREE or PRUNED.

        Indexed by the neuron's current position. Inside an ``EideticNetwork`` positions change at every
        ``finish_task`` (neurons are renumbered task-major: see ``permute_neurons``);
        ``EideticNetwork.neuron_positions`` maps a neuron's first index to its current one.
        """
        return self.task_state.clone()

    def _split_pairs(self):
        for name in self._split_names:
            trainable = getattr(self, name)
            if trainable is not None:
                yield name, trainable, getattr(self, "frozen_" + name)

    # ----- state transitions (between steps, never inside one) ---------------------------------
    @property
    def slot(self) -> torch.Tensor:
        """Int32[out]: each neuron's row in its storage. Derived from the states, so not a buffer."""
        if self._slot is None or self._slot.device != self.task_state.device:
            lo = self.min_input_task if self._has_inputs else None
            with _ordinary_tensors():
                self._slot = storage_slots(self.task_state, lo).to(torch.int32)
        return self._slot

    def plan_token(self) -> object:
        """An object that stays the same (``is``) until a state of this layer changes: a cache of anything
        derived from the states (``EideticNetwork``'s prefix widths) keeps it and compares."""
        token = self._plans.get("token")
        if token is None:
            token = self._plans["token"] = object()
        return token

    def _state_changed(self) -> None:
        self._slot = None
        self._frozen_count = None
        self._free_count = None
        self._plans.clear()

    def _frozen_blocks(self, task_state=None, min_input_task=None, input_task=None):
        """Frozen blocks in storage order (see ``state.frozen_blocks``); channels of their own for BN."""
        task_state = self.task_state if task_state is None else task_state
        if self._has_inputs:
            lo = self.min_input_task if min_input_task is None else min_input_task
            inputs = self.input_task if input_task is None else input_task
        else:
            lo = torch.zeros_like(task_state)
            inputs = torch.zeros(0, dtype=STATE_DTYPE, device=task_state.device)
        return frozen_blocks(inputs, task_state, lo)

    @property
    def _n_frozen(self) -> int:
        """Frozen neurons (a Python int kept by state changes: torch.compile reads it as a constant)."""
        if self._frozen_count is None:
            self._frozen_count = int(is_frozen(self.task_state).sum())
        return self._frozen_count

    @property
    def _n_free(self) -> int:
        """FREE neurons (a Python int kept by state changes, as ``_n_frozen``)."""
        if getattr(self, "_free_count", None) is None:
            self._free_count = int((self.task_state == FREE).sum())
        return self._free_count

    def _apply(self, fn, *args, **kwargs):
        self._state_changed()  # cached plans hold tensors on the old device
        on_meta = self.task_state.is_meta
        out = super()._apply(fn, *args, **kwargs)
        if on_meta and not self.task_state.is_meta:
            self._materialized()
        backends.preload(self.task_state.device)  # torch.compile cannot trace the backend's import
        return out

    @torch.no_grad()
    def _materialized(self) -> None:
        """After ``to_empty`` from the meta device: the state buffers hold whatever the new memory held. A
        layer built on meta has no finished task: every neuron FREE, every input task 0. Its weights stay
        uninitialised, as torch.nn's do, until ``reset_parameters()``."""
        if any(t.numel() for _, _, t in self._split_pairs()):
            raise RuntimeError(f"{self._name()}: frozen neurons' weights do not survive the meta device; load "
                               "them from a state dict instead")
        self.task_state.fill_(FREE)
        for name in ("min_input_task", "input_task"):
            if getattr(self, name, None) is not None:
                getattr(self, name).zero_()
        if getattr(self, "recycled_at_batch", None) is not None:
            self.recycled_at_batch.zero_()
        self._state_changed()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the trainable storage (FREE and PRUNED neurons) as the torch.nn twin's
        ``reset_parameters`` does, drawing from torch's default generator in the same order (a fresh layer
        gets the twin's values under the same seed). Frozen neurons keep their weights: a finished task never
        changes."""
        rows = self.weight.shape[0] if self.weight is not None else 0
        self._reinit_rows(torch.arange(rows, device=self.task_state.device), None)

    def _check_not_meta(self, what: str) -> None:
        """RuntimeError for a state change on the meta device, where the layer holds no states to change."""
        if self.task_state.is_meta:
            raise RuntimeError(f"{self._name()}: {what} changes neuron states, which a layer on the meta device "
                               "does not hold: call to_empty(device=...) and reset_parameters(), or load a state dict "
                               "with assign=True, first")

    def _indices(self, neurons) -> torch.Tensor:
        idx = torch.as_tensor(neurons, device=self.task_state.device)
        if idx.numel() == 0 and not isinstance(neurons, torch.Tensor):
            idx = idx.long()  # an empty list (nothing to prune) reads as float32
        if idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"{self._name()}: neuron indices must be integers or a boolean mask, got {idx.dtype}")
        if idx.dtype == torch.bool:
            if idx.numel() != self.num_neurons:
                raise ValueError(f"a boolean neuron mask needs {self.num_neurons} entries, got {idx.numel()}")
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_neurons):
            raise IndexError(f"{self._name()}: neuron index out of range [0, {self.num_neurons}) (indices count "
                             f"from 0; negative ones are not taken)")
        return idx

    @torch.no_grad()
    def prune_neurons(self, neurons) -> None:
        """FREE -> PRUNED. Frozen neurons are never pruned: asking is an error and changes nothing.

        ``neurons``: indices in [0, num_neurons) (a list, an int tensor) or a bool mask [num_neurons]. Raises,
        before anything changes, ValueError for a neuron that is not FREE or a mask of another length,
        IndexError for an index out of range, TypeError for float indices, RuntimeError on the meta device."""
        self._check_not_meta("prune_neurons")
        idx = self._indices(neurons)
        states = self.task_state[idx]
        bad = states != FREE
        if bool(bad.any()):
            i = int(idx[bad.nonzero()[0, 0]])
            raise ValueError(f"{self._name()}: neuron {i} is {describe_state(int(self.task_state[i]))}; "
                             "only FREE neurons can be pruned (frozen neurons never change)")
        self.task_state[idx] = PRUNED
        self._state_changed()

    @torch.no_grad()
    def unprune_neurons(self, neurons) -> None:
        """PRUNED -> FREE, keeping their stored values (undo a pruning step).

        ``neurons``: as ``prune_neurons`` takes them. Raises ValueError when one is not PRUNED, and as
        ``prune_neurons`` for bad indices; nothing changes then."""
        self._check_not_meta("unprune_neurons")
        idx = self._indices(neurons)
        if bool((self.task_state[idx] != PRUNED).any()):
            raise ValueError(f"{self._name()}: only PRUNED neurons can be restored to FREE")
        self.task_state[idx] = FREE
        self._state_changed()

    @torch.no_grad()
    def freeze_free_neurons(self, task: int) -> int:
        """FREE -> ``task``: move their rows from the Parameters into the frozen buffers.

        Tasks freeze in increasing order, each once per layer, so each task's rows stay one
        contiguous block of the frozen storage. Returns the number of neurons frozen.

        Raises (before anything changes) ValueError when ``task`` is not an int in [0, MAX_TASK], a task >=
        ``task`` is already frozen here or a FREE neuron's ``min_input_task`` is above ``task``, TypeError for a
        weight computed by a parametrization, RuntimeError on the meta device. Warns ``FreeInputsWarning`` when some
        inputs are FREE (the neurons frozen now never read them).
        """
        task = _task_id(task)
        self._check_not_meta("freeze_free_neurons")
        frozen_tasks = self.task_state[is_frozen(self.task_state)]
        if frozen_tasks.numel() and int(frozen_tasks.max()) >= task:
            raise ValueError(f"{self._name()}: neurons of task {int(frozen_tasks.max())} are already frozen; "
                             f"tasks freeze once each, in increasing order, so task {task} cannot freeze now")
        free = self.task_state == FREE
        n = int(free.sum())
        if n == 0:
            return 0
        self._check_no_parametrization("freeze_free_neurons")
        if self._has_inputs:
            late = free & (self.min_input_task > task)
            if bool(late.any()):
                i = int(late.nonzero()[0, 0])
                raise ValueError(
                    f"{self._name()}: FREE neuron {i} has min_input_task {int(self.min_input_task[i])} > {task}: "
                    f"frozen for task {task} it would read no input. Call set_min_input_task(t) with t <= {task} "
                    f"first (forward transfer off: t = the task being frozen). Nothing was changed")
            # a frozen neuron reads inputs of tasks <= its own only: a FREE input would be cut from it for good,
            # and the function the task trained would change (the producer not frozen, or not wired, yet)
            free_inputs = self.input_task == FREE
            if bool(free_inputs.any()):
                warnings.warn(
                    f"{self._name()}: {int(free_inputs.sum())} inputs are FREE (input "
                    f"{int(free_inputs.nonzero()[0, 0])} first); the neurons frozen now for task {task} never "
                    f"read them, so if the task trained with them its outputs change here. If those inputs come "
                    f"from neurons meant to freeze for task {task}: freeze their layer first, pass its states with "
                    f"set_input_task(producer.neuron_task), then freeze this one (inputs from pruned neurons are "
                    f"PRUNED, not FREE)", FreeInputsWarning, stacklevel=3)
        old_slot = self.slot.long()
        keep_slots = old_slot[self.task_state == PRUNED]
        self.task_state[free] = task
        # rows of the new frozen neurons in storage order (by min_input_task, then index): appended
        new_blocks = [b for b in self._frozen_blocks() if b.task == task]
        for name, trainable, frozen in self._split_pairs():
            rows = trainable.detach()
            if self._compact and name == "weight":  # the blocks' rows, read at their old trainable slots
                added = compact_rows(rows, [replace(b, rows=old_slot[b.rows]) for b in new_blocks])
            else:
                added = torch.cat([rows[old_slot[b.rows]] for b in new_blocks])
            setattr(self, "frozen_" + name, torch.cat([frozen, added]))
            # a new Parameter, never a resize in place: graphs still alive keep the old one intact
            replace_parameter(self, name, rows[keep_slots])
        self._state_changed()
        return n

    def _check_no_parametrization(self, what: str) -> None:
        """TypeError for a layer whose weight is computed by a parametrization (``weight_norm``, ``spectral_norm``,
        ``torch.nn.utils.parametrize``, ``torch.nn.utils.prune``): state changes install new Parameters (frozen rows
        move to their own storage), which such a weight does not follow. Raised before anything changes."""
        found = computed_weight(self)
        if found is not None:
            kind, remedy = found
            raise TypeError(f"{self._name()}: {what} cannot run on a layer whose weight is computed by {kind}: "
                            f"frozen neurons move to a storage of their own, which it does not follow. Remove it "
                            f"({remedy}) before changing neuron states. Nothing was changed")

    @torch.no_grad()
    def recycle_pruned_neurons(self, generator: torch.Generator | None = None) -> int:
        """PRUNED -> FREE with a fresh default init, for the next task. Returns how many.

        Recycled neurons read every earlier task's inputs (their ``min_input_task`` is reset to 0): for a next
        task without forward transfer, call ``set_min_input_task(next_task)`` after recycling, on a layer that
        reads another layer's outputs (one reading the raw input keeps 0: raw inputs are task 0's). Layers
        reading this one's outputs see the recycled neurons as FREE once told so (``set_input_task``).
        Raises TypeError for a weight computed by a parametrization, RuntimeError on the meta device, before
        anything changes."""
        self._check_not_meta("recycle_pruned_neurons")
        pruned = self.task_state == PRUNED
        n = int(pruned.sum())
        if n == 0:
            return 0
        self._check_no_parametrization("recycle_pruned_neurons")
        slots = self.slot[pruned].long()
        for name, trainable, _ in self._split_pairs():  # fresh storage: a live graph keeps the old values
            replace_parameter(self, name, trainable.detach().clone())
        self._reinit_rows(slots, generator)
        self.task_state[pruned] = FREE
        if hasattr(self, "min_input_task"):
            self.min_input_task[pruned] = 0
        self._state_changed()
        return n

    @torch.no_grad()
    def permute_neurons(self, perm: torch.Tensor) -> None:
        """Renumber the neurons: new neuron i is old neuron ``perm[i]`` (int64[out], a permutation).

        Only FREE and PRUNED neurons may move (frozen ones keep their positions, so their storage and
        every finished task's computation stay as they are): anything else is a ValueError. Everything
        per neuron moves along: states, trainable rows (new Parameters), running statistics, Taylor scores.
        Layers reading this layer's outputs must permute their inputs the same way (``permute_inputs``).
        """
        self._check_no_parametrization("permute_neurons")
        perm = torch.as_tensor(perm, device=self.task_state.device).long()
        if perm.shape != (self.num_neurons,) or not torch.equal(torch.sort(perm).values,
                                                                 torch.arange(self.num_neurons, device=perm.device)):
            raise ValueError(f"{self._name()}: perm must be a permutation of 0..{self.num_neurons - 1}")
        moved = perm != torch.arange(self.num_neurons, device=perm.device)
        if bool(is_frozen(self.task_state[moved]).any()) or bool(is_frozen(self.task_state[perm[moved]]).any()):
            raise ValueError(f"{self._name()}: frozen neurons never move; permute FREE and PRUNED neurons only")
        if not bool(moved.any()):
            return
        old_slot = self.slot.long()
        new_state = self.task_state[perm]
        rows = old_slot[perm[~is_frozen(new_state)]]  # old trainable rows, in the new order
        for name, trainable, _ in self._split_pairs():
            replace_parameter(self, name, trainable.detach()[rows])
        self.task_state.copy_(new_state)
        per_neuron = ["min_input_task", "taylor_score"] + ([] if self._has_inputs else
                                                          ["running_mean", "running_var", "recycled_at_batch"])
        for name in per_neuron:
            t = getattr(self, name, None)
            if t is not None:  # through .data, as batch norm's own forward updates its statistics: a graph
                t.data.copy_(t[perm])  # kept from before (torch saves the statistics) still backpropagates
        self._state_changed()

    @torch.no_grad()
    def permute_inputs(self, perm: torch.Tensor) -> None:
        """Input j now reads what input ``perm[j]`` read (its producer renumbered its neurons).

        Only inputs no frozen neuron reads may move (from FREE or PRUNED producers); trainable weight
        columns move along (a new Parameter), frozen storage never changes.
        """
        self._check_no_parametrization("permute_inputs")
        if not self._has_inputs:
            raise TypeError(f"{self._name()} has no inputs of its own")
        perm = torch.as_tensor(perm, device=self.input_task.device).long()
        n = self.input_task.numel()
        if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
            raise ValueError(f"{self._name()}: perm must be a permutation of 0..{n - 1}")
        moved = perm != torch.arange(n, device=perm.device)
        if not bool(moved.any()):
            return
        states = self.input_task[moved]
        if bool(is_frozen(states).any()):
            raise ValueError(f"{self._name()}: inputs from frozen neurons never move")
        replace_parameter(self, "weight", self.weight.detach().index_select(1, perm))
        self.input_task.copy_(self.input_task[perm])
        self._plans.clear()

    @torch.no_grad()
    def set_min_input_task(self, task: int) -> None:
        """Oldest task the FREE and PRUNED neurons may read from (0: forward transfer).

        Warns (``FreeInputsWarning``) when no input could ever be read then: every input is a finished task's
        older than ``task`` (raw inputs are task 0's, so a layer reading the network's input keeps 0), and the
        FREE neurons would train on their bias alone."""
        if not hasattr(self, "min_input_task"):
            raise TypeError(f"{self._name()} has no inputs of its own")
        task = _task_id(task, "min input task")
        self._check_not_meta("set_min_input_task")
        # inputs FREE or PRUNED now may still become readable (a producer recycles, then set_input_task)
        if task > 0 and not bool(((self.input_task >= task) | (self.input_task == PRUNED)).any()):
            newest = int(self.input_task.max()) if self.input_task.numel() else 0
            held = "task 0's (as raw inputs are)" if newest == 0 else f"of finished tasks 0..{newest}"
            warnings.warn(
                f"{self._name()}: set_min_input_task({task}) leaves its FREE neurons no input to read: every input "
                f"is {held}, and never will be of a later task. Keep 0 on a layer reading "
                f"the network's input; without forward transfer, set it on layers reading another layer's outputs, "
                f"after recycling that producer", FreeInputsWarning, stacklevel=2)
        self.min_input_task[~is_frozen(self.task_state)] = task
        self._state_changed()

    @torch.no_grad()
    def set_input_task(self, input_task: torch.Tensor) -> None:
        """States of the neurons that produce this layer's inputs (one per input feature/channel)."""
        if not self._has_inputs:
            raise TypeError(f"{self._name()} has no inputs of its own")
        check_state_vector(input_task, "input_task", self.input_task.numel())
        self._check_not_meta("set_input_task")
        new = input_task.to(self.input_task.device, STATE_DTYPE)
        changed = new != self.input_task
        if bool(changed.any()):
            where = changed.nonzero().flatten()
            old_c, new_c = self.input_task[where], new[where]
            for b in self._frozen_blocks():
                read = live_inputs(old_c, b.task, b.min_task) | live_inputs(new_c, b.task, b.min_task)
                if bool(read.any()):
                    j = int(where[read.nonzero()[0, 0]])  # the first input whose change the rule refuses
                    raise ValueError(
                        f"{self._name()}: input {j} cannot change from {describe_state(int(self.input_task[j]))} "
                        f"to {describe_state(int(new[j]))}: neurons frozen for task {b.task} read inputs of tasks "
                        f"{b.min_task}..{b.task}, and a finished task's outputs never change. An input may change "
                        f"state only while no frozen neuron reads it before or after (FREE, PRUNED, later tasks). "
                        f"Wire a layer (set_input_task) after its producer freezes and before it freezes itself. "
                        f"Nothing was changed")
        self.input_task.copy_(new)
        self._plans.clear()

    # ----- evaluation views ------------------------------------------------------------------
    def _view(self) -> int | None:
        """``view_task``, checked: None (every neuron) or a task id t >= 0 (the neurons of tasks <= t; an integer
        scalar of numpy or torch is taken as its int). TypeError / ValueError otherwise, before anything runs."""
        view = self.view_task
        if view is None or (type(view) is int and view >= 0):
            return view
        if isinstance(view, bool) or isinstance(view, torch.Tensor) and (view.is_floating_point()
                                                                         or view.dtype == torch.bool):
            raise TypeError(f"{self._name()}: view_task must be None or an int task id, got {view!r}")
        try:
            view = operator.index(view)
        except TypeError:
            raise TypeError(f"{self._name()}: view_task must be None or an int task id, got {view!r}") from None
        if view < 0:
            raise ValueError(f"{self._name()}: view_task must be a task id >= 0 (the view computes the neurons of "
                             f"tasks <= view_task), got {view}")
        self.__dict__["view_task"] = view
        return view

    def _table(self, n_in: int | None = None):
        """The range table (``state.make_table``) of the current view; cached per view until a state changes.
        ``n_in``: the view at prefix width (``narrow``) reading the first ``n_in`` inputs (``state.narrow_table``)."""
        key = self._view()
        table = self._plans.get(key)
        if table is None:
            with _ordinary_tensors():
                table = make_table(self.input_task, self.task_state, self.min_input_task, key)
            self._plans[key] = table
        if n_in is None:
            return table
        narrow_key = ("narrow table", key, n_in)
        narrow = self._plans.get(narrow_key)
        if narrow is None:
            narrow = self._plans[narrow_key] = narrow_table(table, self.narrow_width(), n_in, self._name())
        return narrow

    def narrow_width(self) -> int | None:
        """The number n of neurons the current view (a finished task, ``view_task``) computes when they are the
        layer's first n, as in the task-major layout of an ``EideticNetwork``; None when they are not (or no
        view is set). With ``narrow`` on, the layer then reads and writes activations of that prefix width:
        the view's products unchanged, its zero tail not written (``EideticNetwork.forward``)."""
        view = self._view()
        key = ("narrow width", view)
        if key not in self._plans:
            n = None
            if view is not None:
                with _ordinary_tensors():
                    seen = (self.task_state >= 0) & (self.task_state <= view)
                    n = int(seen.sum())
                    if not bool(seen[:n].all()):
                        n = None
            self._plans[key] = n
        return self._plans[key]

    def _taylor_view(self, n_in: int | None):
        """The Taylor scores the op accumulates into: all of them, or at prefix width (``n_in`` given) the
        view's neurons' (a view of the first ``narrow_width()``: the zero tail would add nothing)."""
        if n_in is None or self.taylor_score is None:
            return self.taylor_score
        return self.taylor_score[:self.narrow_width()]

    def _narrow_input(self, x, dim: int) -> int | None:
        """Prefix-width evaluation: the input width ``narrow`` (None when off). Raises PrefixWidthMismatch when
        ``x`` is not that wide (an input of the wrong size: the network reruns it at full width, which raises
        the error a full-width forward gives)."""
        if self.narrow is None:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() <= max(dim, -1 - dim) or x.shape[dim] != self.narrow:
            raise PrefixWidthMismatch(self._name())
        return self.narrow

    def _view_states(self):
        """(in_task, out_task, out_min_task) as the current view sees them (traceable)."""
        key = self._view()
        if key is None or torch.compiler.is_compiling():
            out_task = view_states(self.task_state, key)
        else:  # a finished task's view: cached until a state changes
            out_task = self._plans.get(("view states", key))
            if out_task is None:
                out_task = self._plans[("view states", key)] = view_states(self.task_state, key)
        if not self._has_inputs:
            return None, out_task, None
        return view_states(self.input_task, key), out_task, self.min_input_task

    def _full_frozen_weight(self) -> torch.Tensor:
        """Frozen rows at full width [n_frozen, in, *kernel] in slot order (zeros on dead synapses).

        Expanded once per state change (cached with the tables; under torch.compile, traced instead)."""
        if torch.compiler.is_compiling():
            return self._expand_frozen_weight()
        full = self._plans.get("full frozen weight")
        if full is None:
            with _ordinary_tensors():
                full = self._plans["full frozen weight"] = self._expand_frozen_weight()
        return full

    def _expand_frozen_weight(self) -> torch.Tensor:
        return expand_rows(self.frozen_weight, self.input_task, self.task_state, self.min_input_task,
                           self._n_frozen, tuple(self.weight.shape[2:]))

    def _product(self, input: torch.Tensor) -> torch.Tensor:
        """Linear and Conv2d: ``_run`` on the input and the four storages, in the autocast dtype when autocast
        is on (as the torch.nn twins); eagerly inside torch.compile on an engine that plans on the host."""
        if torch.compiler.is_compiling():  # first: a frame that breaks here at once guards on nothing of the layer
            if not backends.traceable(input.device, self._op, input.dtype):
                return _run_eagerly(self, input)
        else:
            if self.task_state.is_meta:  # shapes only (no states there): the twin's op on the dense shape
                return self._meta_forward(input)
            self._check_call()
            self._check_storage_shape()
        storages = (self.weight, self.bias, self.frozen_weight, self.frozen_bias)
        cast = autocast_dtype(input)
        if cast is not None:
            input, storages = input.to(cast), tuple(None if t is None else t.to(cast) for t in storages)
            with torch.autocast(input.device.type, enabled=False):
                y = self._run(input, *storages)
        else:
            y = self._run(input, *storages)
        weight, bias = storages[:2]
        if (weight.shape[0] and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and self._view() is None and self._n_free == 0 and weight.requires_grad and not functorch_active()):
            # every trainable neuron PRUNED: nothing computed reads the trainable storage, yet nn's would get
            # gradients (and its output require grad): they get gradients of 0, as PRUNED rows always do. Not
            # inside torch.compile, where counting the FREE states would read a tensor on the host (the compiled
            # layer leaves those gradients None, as a parameter no output reads)
            y = ZeroGradients.apply(y, *(t for t in (weight, bias) if t is not None))
        return y

    def _check_storage_shape(self) -> None:
        """ValueError when ``weight`` (or ``bias``) was replaced by a tensor of another shape (``layer.weight.data =
        ...`` in init code): it holds the trainable neurons' rows only, which a full-size or wrongly wide weight
        would not match (a wider one would silently lose its last columns)."""
        rows = self.num_neurons - self._n_frozen
        want = (rows,) + self._row_shape()
        for name, shape in (("weight", want), ("bias", want[:1])):
            t = self._parameters.get(name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(
                    f"{self._name()}.{name} has shape {tuple(t.shape)}, but it holds the trainable neurons' rows only "
                    f"({rows} of {self.num_neurons}; the frozen ones are in frozen_{name}): expected {shape}. To "
                    f"initialise the trainable rows, write into them in place (torch.nn.init.*_(layer.{name}) or "
                    f"layer.{name}.data.copy_(...)); layer.dense('{name}') gives the full [out, ...] tensor")

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a clear error instead of TorchScript's on an annotation."""
        raise RuntimeError(f"TorchScript (torch.jit.script) cannot compile {self._name()}: its work is planned "
                           "on the host from the neuron states. Script EideticNetwork.export(task) (a plain "
                           "torch.nn module of a finished task) instead, or use torch.compile / torch.export")

    def _check_call(self) -> None:
        """Refuse a layer its network's graph does not hold (see ``_outside_graph``), and the two callers that
        would run this layer as another function than the one they record:
        ``torch.jit.trace`` (the layer plans its work on the host from its states) and activation checkpointing
        inside an EideticNetwork's body (the recomputation in backward runs without the mode the network set
        for the forward: another view, and frozen blocks no longer constant, so wrong gradients)."""
        if torch.jit.is_tracing():
            raise RuntimeError(f"torch.jit.trace cannot record {self._name()}: its work is planned on the host from "
                               "the neuron states. For a plain module of a finished task use "
                               "EideticNetwork.export(task) (then torch.jit.trace or torch.export that), or "
                               "torch.export / torch.compile")
        if self._outside_graph is not None:
            raise RuntimeError(f"{self._name()} is in an EideticNetwork but not in its layer graph "
                               f"({self._outside_graph}): the network manages no neuron of it (none is ever "
                               "frozen), so running it would let weights that later tasks train reach finished "
                               "tasks. Every layer the network holds outside its heads and router is its body's: "
                               "the body (forward_features) must call it on every forward. A layer skipped at "
                               "random (LayerDrop) or called in one mode only (a branch on self.training) is seen "
                               "or missed once, when the graph is traced on the first batch; a layer called "
                               "outside forward_features (in an overridden forward, e.g. a projection head) "
                               "belongs in a module of its own, outside the network; a layer added later needs a "
                               "new network. Or declare the graph with python_layers.declare_graph")
        if self._network_managed and not self._network_forward and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(f"{self._name()} of an EideticNetwork's body ran inside a backward pass, outside the "
                               "network's forward: activation checkpointing (torch.utils.checkpoint) inside the "
                               "body would recompute it in another mode and give wrong gradients. Checkpoint the "
                               "whole network call instead: checkpoint(model, x, use_reentrant=False)")

    # ----- Taylor importance -----------------------------------------------------------------
    def enable_taylor(self, enabled: bool = True) -> None:
        """Accumulate the Taylor score of each neuron during backward while enabled: ``taylor_score``,
        float32[out] on the states' device, adds |mean_b Σ_spatial a · ∂L/∂a| of each backward pass through the
        layer (the paper's Taylor pruning score, after Molchanov et al., 2017). Disabling drops the buffer."""
        if enabled and self.taylor_score is None:
            self.taylor_score = torch.zeros(self.num_neurons, dtype=torch.float32, device=self.task_state.device)
        elif not enabled:
            self.taylor_score = None

    @property
    def taylor_enabled(self) -> bool:
        """Whether backward passes accumulate ``taylor_score`` (``enable_taylor``)."""
        return self.taylor_score is not None

    def reset_taylor(self) -> None:
        """Zero ``taylor_score`` in place (the trainer does it at each epoch's start); nothing when disabled."""
        if self.taylor_score is not None:
            self.taylor_score.zero_()

    # ----- dense export, loading --------------------------------------------------------------
    def dense(self, name: str = "weight") -> torch.Tensor | None:
        """The twin's dense tensor ``name`` [out, ...] assembled from both storages (a copy; the storages' dtype
        and device), in the current neuron positions; None for a layer without it (``bias=False``).

        ``name``: a split storage, "weight" or "bias" (a batch norm's running statistics are whole buffers:
        read ``running_mean``/``running_var``). Raises ValueError for another name."""
        if name not in self._split_names:
            raise ValueError(f"{self._name()}.dense({name!r}): name one of the split storages "
                             f"{list(self._split_names)}" + (
                                 "; running statistics are whole buffers (read running_mean / running_var)"
                                 if hasattr(self, "running_mean") else ""))
        trainable = getattr(self, name)
        if trainable is None:
            return None
        frozen = getattr(self, "frozen_" + name)
        if self._compact and name == "weight":
            frozen = self._full_frozen_weight()
        return assemble_rows(trainable.detach(), frozen, self.task_state, self.slot).clone()

    def _check_owned_load(self, state_dict, prefix: str, error_msgs: list) -> None:
        """A layer of an EideticNetwork loaded on its own (``layer.load_state_dict``, part of the body's, or a
        network state dict without this layer's states): RuntimeError, before anything loads, when the state dict
        would change a frozen neuron (its state, inputs, frozen weights or batch-norm statistics). The network's
        own load of this layer's states is checked by the network (``_network_loading``: (the load, its list of
        errors, the states it brings), used once; a load that stopped is no longer active, and a later load
        matches no mark: torch gives each ``load_state_dict`` call a list of errors of its own, which it passes
        to every module it loads)."""
        incoming = state_dict.get(prefix + "task_state")
        load, loading, brought = self.__dict__.pop("_network_loading", (None, None, None))  # used once
        if load is not None and load["active"] and error_msgs is loading and incoming is not None \
                and incoming is brought:
            return
        own = self.task_state
        if isinstance(incoming, torch.Tensor):
            if incoming.shape != own.shape:
                return  # other sizes: the load's own checks report it
            incoming = incoming.to(own.device, own.dtype)
        else:
            incoming = own  # frozen storage without its states is read with this layer's states
        frozen = is_frozen(own) | is_frozen(incoming)
        if not bool(frozen.any()):
            return
        same = torch.equal(incoming[frozen], own[frozen])
        for name in ("min_input_task", "input_task", "frozen_weight", "frozen_bias", "running_mean",
                     "running_var"):
            new, old = state_dict.get(prefix + name), getattr(self, name, None)
            if not same:
                break
            if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor) or new.shape != old.shape:
                continue  # absent, or sizes the load's own checks report
            if name in ("min_input_task", "running_mean", "running_var"):  # per neuron: the frozen ones
                new, old = new[frozen.to(new.device)], old[frozen]
            elif name == "input_task":  # frozen neurons read inputs of finished tasks only
                new = new.to(old.device, old.dtype)
                read = is_frozen(old) | is_frozen(new)
                new, old = new[read], old[read]
            same = torch.equal(new.to(old), old)
        if not same:
            if load is not None:  # the network's load stops here: no layer may use its marks afterwards
                load["active"] = False
            raise RuntimeError(f"{self._name()} belongs to an EideticNetwork, and this state dict would change its "
                               "frozen neurons (their states, inputs, weights or batch-norm statistics), which "
                               "finished tasks read: load the network's whole state dict (model.load_state_dict), "
                               "which keeps its tasks, heads and counters consistent (a layer copied out of its "
                               "network keeps this guard: load into a new layer instead). Nothing was loaded into "
                               "this layer")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "task_state"
        if self.__dict__.get("_owned_by_network"):
            self._check_owned_load(state_dict, prefix, error_msgs)
        if key not in state_dict and self._load_twin_state_dict(state_dict, prefix, local_metadata, strict,
                                                                missing_keys, unexpected_keys, error_msgs):
            return
        if key in state_dict:
            incoming = state_dict[key]
            try:
                check_state_vector(incoming, key, self.num_neurons)
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{exc}; this layer has {self.num_neurons} neurons")
                return
            # a layer built on the meta device (loaded with assign=True) plans on the incoming states' device
            incoming = incoming.to(incoming.device if self.task_state.is_meta else self.task_state.device,
                                   STATE_DTYPE)
            lo = in_task = None
            if self._has_inputs:
                lo = state_dict.get(prefix + "min_input_task", self.min_input_task).to(incoming.device, STATE_DTYPE)
                in_task = state_dict.get(prefix + "input_task", self.input_task).to(incoming.device, STATE_DTYPE)
            blocks = self._frozen_blocks(incoming, lo, in_task)
            n_frozen = sum(b.rows.numel() for b in blocks)
            version = (local_metadata or {}).get("version", 1) or 1
            if self._compact and version < 2:
                self._upgrade_v1(state_dict, prefix, incoming, lo, blocks, error_msgs)
            sizes = {"": self.num_neurons - n_frozen, "frozen_": n_frozen}
            for name, trainable, frozen in self._split_pairs():
                for kind, tensor in (("", trainable), ("frozen_", frozen)):
                    k = prefix + kind + name
                    if k not in state_dict:
                        continue
                    want = self._storage_shape(kind, name, sizes[kind], blocks, tensor)
                    got = tuple(state_dict[k].shape)
                    if got != want:
                        error_msgs.append(
                            f"size mismatch for {k}: expected {want} for the {n_frozen} frozen of "
                            f"{self.num_neurons} neurons in {key}, got {got}")
                        return
            # a storage the dict leaves out keeps its values (as torch leaves a missing key) only where they still
            # mean the same neurons; otherwise the layer would compute on memory nothing wrote
            for name, trainable, frozen in self._split_pairs():
                for kind, tensor in (("", trainable), ("frozen_", frozen)):
                    k = prefix + kind + name
                    if k in state_dict:
                        continue
                    want = self._storage_shape(kind, name, sizes[kind], blocks, tensor)
                    if math.prod(want) == 0:  # holds nothing: no value can be missing
                        continue
                    keeps = tuple(tensor.shape) == want
                    if not (keeps and (kind == "" or self._same_frozen_neurons(incoming, lo, in_task))):
                        error_msgs.append(
                            f"{k} is missing, and the neuron states in {key} ({n_frozen} frozen of "
                            f"{self.num_neurons}) are not this layer's: its {kind or 'trainable '}{name} would "
                            f"hold no values. A layer's states and its storages load together: pass the whole "
                            f"state dict of the layer, or leave out its states too; nothing was loaded into it")
                        return
            for name, trainable, frozen in self._split_pairs():
                shape = self._storage_shape("", name, sizes[""], blocks, trainable)
                if tuple(trainable.shape) != shape:  # same shape: the same Parameter object is loaded into
                    replace_parameter(self, name, trainable.detach().new_empty(shape))
                want = self._storage_shape("frozen_", name, n_frozen, blocks, frozen)
                if prefix + "frozen_" + name in state_dict or tuple(frozen.shape) != want:
                    # a new tensor (caches and live graphs keep the old one); missing from the dict only when empty
                    setattr(self, "frozen_" + name, frozen.new_empty(want))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._state_changed()

    def _same_frozen_neurons(self, incoming, lo, in_task) -> bool:
        """Whether incoming states (task_state, min_input_task, input_task) freeze the same neurons in the same
        blocks as this layer's, so that its frozen storage holds their values (on the meta device it holds none)."""
        if self.task_state.is_meta:
            return False
        mine, theirs = is_frozen(self.task_state), is_frozen(incoming)
        if not torch.equal(mine, theirs) or not torch.equal(self.task_state[mine], incoming[theirs]):
            return False
        if self._has_inputs:
            return torch.equal(self.min_input_task[mine], lo[theirs]) and torch.equal(self.input_task, in_task)
        return True

    def _load_twin_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> bool:
        """A torch.nn twin's state dict (its keys, no ``task_state``): loaded as the twin loads it when no neuron
        is frozen, the neuron states kept (a fresh layer's: all FREE), and the eidetic-only keys not asked
        for; refused with frozen neurons, whose weights and statistics it would overwrite. False when no key
        of this layer is in ``state_dict`` (nothing to load here: the usual missing-key report)."""
        own = [name for name, p in self._parameters.items() if p is not None]
        own += [name for name, b in self._buffers.items() if b is not None and name not in
                self._non_persistent_buffers_set]
        eidetic_only = {"task_state", "min_input_task", "input_task", "recycled_at_batch"} | {
            "frozen_" + name for name in self._split_names}
        twin = [name for name in own if name not in eidetic_only]
        if not any(prefix + name in state_dict for name in twin):
            return False
        where, twin_kind = prefix[:-1] or "the layer", type(self).__name__[len("Eidetic"):]
        if self.task_state.is_meta:
            error_msgs.append(
                f"{where}: this looks like a torch.nn {twin_kind} "
                "state dict (no neuron states), and the layer is on the meta device, where it has none either: "
                "call to_empty(device=...) and reset_parameters() before loading it")
            return True
        frozen = int(is_frozen(self.task_state).sum())
        if frozen:
            error_msgs.append(
                f"{where}: this looks like a torch.nn {twin_kind} state "
                f"dict (no '{prefix}task_state'), and the layer has {frozen} frozen neurons whose weights it would "
                "overwrite; nothing was loaded into it. Load the torch.nn state dict into the torch.nn module "
                "before ek.convert, or into a layer with no frozen neuron")
            return True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [k for k in missing_keys
                           if not (k.startswith(prefix) and k[len(prefix):] in eidetic_only)]
        self._state_changed()
        return True

    def _storage_shape(self, kind: str, name: str, rows: int, blocks, like: torch.Tensor) -> tuple:
        if kind == "frozen_" and self._compact and name == "weight":
            per_synapse = 1
            for d in self.weight.shape[2:]:
                per_synapse *= d
            return (sum(b.rows.numel() * b.width for b in blocks) * per_synapse,)
        if kind == "frozen_" and self._compact:
            return (rows,)
        return (rows,) + tuple(like.shape[1:])

    def _upgrade_v1(self, state_dict, prefix, incoming, lo, blocks, error_msgs) -> None:
        """First-version checkpoints kept frozen rows at full width, ordered by (task, index): compact them."""
        k = prefix + "frozen_weight"
        old = state_dict.get(k)
        if old is None or old.dim() < 2:
            return
        frozen = is_frozen(incoming)
        if old.shape[0] != int(frozen.sum()):
            error_msgs.append(f"{k}: a first-version checkpoint with {old.shape[0]} frozen rows for "
                              f"{int(frozen.sum())} frozen neurons; it does not belong to this layer")
            return
        v1_slot = storage_slots(incoming).to(old.device)  # the first version's order: (task, index)
        by_neuron = old.new_zeros((incoming.numel(),) + tuple(old.shape[1:]))
        by_neuron[frozen] = old[v1_slot[frozen]]
        state_dict[k] = compact_rows(by_neuron, blocks)
        kb = prefix + "frozen_bias"
        if kb in state_dict and lo is not None:  # bias rows move from (task, index) to (task, min task, index)
            bias = state_dict[kb]
            by_neuron = bias.new_zeros(incoming.numel())
            by_neuron[frozen] = bias[v1_slot[frozen]]
            state_dict[kb] = torch.cat([by_neuron[b.rows.to(bias.device)] for b in blocks]) if blocks else bias

    def _name(self) -> str:
        """The layer in error messages: its class, and its name in the model when it has one."""
        where = getattr(self, "qualified_name", None)
        return f"{type(self).__name__} '{where}'" if where else type(self).__name__


def describe_state(state: int) -> str:
    if state == FREE:
        return "FREE"
    if state == PRUNED:
        return "PRUNED"
    return f"frozen for task {state}"


def _reinit_linear_like(layer: EideticLayer, slots: torch.Tensor, generator) -> None:
    """torch's default Linear/Conv init for the given trainable rows (fan_in from the full layer)."""
    w = layer.weight
    fresh = torch.empty((slots.numel(),) + tuple(w.shape[1:]), dtype=w.dtype, device=w.device)
    fan_in = fresh[0].numel() if fresh.numel() else 1
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear/Conv2d reset_parameters
    fresh.uniform_(-bound, bound, generator=generator)
    w.data.index_copy_(0, slots, fresh)
    if layer.bias is not None:
        b = torch.empty(slots.numel(), dtype=w.dtype, device=w.device).uniform_(-bound, bound, generator=generator)
        layer.bias.data.index_copy_(0, slots, b)


class EideticLinear(EideticLayer):
    """nn.Linear with per-neuron task state (see the module docstring).

    Arguments as ``nn.Linear(in_features, out_features, bias=True, device=None, dtype=None)`` and initialised
    as it. Input [*, in_features] (any float dtype the twin takes), output [*, out_features]. ``weight``
    [trainable rows, in_features] and ``bias`` hold the FREE and PRUNED neurons (Parameters); frozen rows live
    in ``frozen_weight``/``frozen_bias`` (buffers, live synapses only); ``task_state`` int16[out_features]
    gives each neuron's state, ``dense("weight")`` the twin's [out_features, in_features] tensor. A PRUNED
    neuron outputs exactly 0; a frozen one reads only inputs of its own or earlier tasks.
    """

    _op = "linear"  # the backend op (``backends``)
    _split_names = ("weight", "bias")
    _compact = True
    _version = 2  # state-dict format: 2 = compact frozen rows (first-version checkpoints are upgraded on load)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        twin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._split("weight", twin.weight.detach())
        self._split("bias", None if twin.bias is None else twin.bias.detach())
        self._init_state(out_features, in_features, twin.weight.device)

    @classmethod
    def from_module(cls, module: nn.Linear) -> "EideticLinear":
        """The twin of ``module`` (see ``convert`` for what carries over)."""
        new = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                  dtype=module.weight.dtype)
        _adopt(new, module)
        return new

    def _reinit_rows(self, slots, generator):
        _reinit_linear_like(self, slots, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """y [*, out] = input [*, in] · Wᵀ + b over the live synapses (frozen rows from the frozen storage).

        Under ``torch.autocast`` the product runs in the autocast dtype, as ``nn.Linear`` does.
        Raises InputTypeError/InputError (TypeError/ValueError, and RuntimeError as nn.Linear raises) for a
        wrong dtype, device or feature size."""
        return self._product(input)

    def _row_shape(self) -> tuple:
        return (self.in_features,)

    def _meta_forward(self, input):
        return F.linear(input, self.weight.new_empty((self.out_features,) + self._row_shape()),
                        None if self.bias is None else self.bias.new_empty(self.out_features))

    def _run(self, x, weight, bias, frozen_weight, frozen_bias):
        n_in = self._narrow_input(x, -1)
        check_input(x, "input", weight, -1, self.in_features if n_in is None else n_in, 1, self._name())
        name, fn = backends.get("linear", x.device, x.dtype)
        self.__dict__["last_backend"] = name  # a plain attribute, set per call: no nn.Module bookkeeping
        plan = self._table(n_in) if self.last_backend == "reference" else self._linear_tiles(x.dtype, n_in)
        return fn(x, weight, bias, frozen_weight, frozen_bias, plan, self._taylor_view(n_in), self.constant_frozen)

    def _linear_tiles(self, dtype: torch.dtype, n_in: int | None = None):
        """The Triton backend's tile table for the current view and dtype (``ops/linear/triton.layer_tiles``),
        cached with the range tables until a state changes."""
        from .ops.linear.triton import layer_tiles  # triton is optional: imported when this backend runs

        with _ordinary_tensors():
            return layer_tiles(self._plans, lambda: self._table(n_in), self.input_task, self.task_state,
                               self.min_input_task, self._view(), self.constant_frozen, dtype, n_in)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{state_summary(self.task_state)}")


class EideticConv2d(EideticLayer):
    """nn.Conv2d (groups=1, zero padding) with per-output-channel task state (see the module docstring).

    Arguments as ``nn.Conv2d`` and initialised as it; ``groups`` other than 1 and ``padding_mode`` other than
    "zeros" raise ValueError (put a padding module before the layer). Input [N, C_in, H, W] or unbatched
    [C_in, H, W], output [N, C_out, H', W'] (channels_last when the input or weight is). Storages as
    ``EideticLinear``'s, by output channel: ``weight`` [trainable channels, C_in, kh, kw], ``task_state``
    int16[C_out].
    """

    _op = "conv2d"  # the backend op (``backends``)
    _split_names = ("weight", "bias")
    _compact = True
    _version = 2  # state-dict format: 2 = compact frozen rows (first-version checkpoints are upgraded on load)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        if groups != 1:
            raise ValueError(f"EideticConv2d supports groups=1 only, got groups={groups}: its engine computes each "
                             "output channel from a window of all the input channels a neuron may read, and "
                             "grouped (and depthwise) convolutions are not implemented; use groups=1")
        if padding_mode != "zeros":
            pad = {"reflect": "ReflectionPad2d", "replicate": "ReplicationPad2d", "circular": "CircularPad2d"}
            amount = (f"(({padding[1]}, {padding[1]}, {padding[0]}, {padding[0]}))"
                      if isinstance(padding, (tuple, list)) and len(padding) == 2 else
                      f"({padding})" if isinstance(padding, int) else "(kernel_size // 2 per side, odd kernels)")
            raise ValueError(f"EideticConv2d supports padding_mode='zeros' only, got {padding_mode!r}. For the same "
                             f"result, pad first with nn.{pad.get(padding_mode, 'ReflectionPad2d')}{amount} and give "
                             "the conv padding=0 (nn.Sequential(pad, conv)); an EideticNetwork follows these pads")
        twin = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode,
                         device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = twin.kernel_size, twin.stride, twin.dilation
        self.padding = conv_padding(twin.padding, twin.kernel_size, twin.dilation, "EideticConv2d")
        self.groups, self.padding_mode = 1, "zeros"
        self._split("weight", twin.weight.detach())
        self._split("bias", None if twin.bias is None else twin.bias.detach())
        self._init_state(out_channels, in_channels, twin.weight.device)

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> "EideticConv2d":
        """The twin of ``module`` (see ``convert`` for what carries over)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode,
                  device=module.weight.device, dtype=module.weight.dtype)
        _adopt(new, module)
        return new

    def _reinit_rows(self, slots, generator):
        _reinit_linear_like(self, slots, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """y [N, out, H', W'] (or [out, H', W'] for an unbatched [C, H, W] input, as nn.Conv2d).

        Under ``torch.autocast`` the convolution runs in the autocast dtype, as ``nn.Conv2d`` does.
        Raises InputTypeError/InputError (TypeError/ValueError, and RuntimeError as nn.Conv2d raises) for a
        wrong dtype, device, rank or channel count."""
        if isinstance(input, torch.Tensor) and input.dim() == 3:  # unbatched, as nn.Conv2d accepts
            if input.shape[0] != self.in_channels:  # named in the user's shape, not the batched one
                raise InputError(f"{type(self).__name__} expects an unbatched input of shape [{self.in_channels}, "
                                 f"H, W], got shape {tuple(input.shape)}")
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return _memory_format_of(self._product(input), input, self.weight)

    def _row_shape(self) -> tuple:
        return (self.in_channels // self.groups,) + tuple(self.kernel_size)

    def _meta_forward(self, input):
        return F.conv2d(input, self.weight.new_empty((self.out_channels,) + self._row_shape()),
                        None if self.bias is None else self.bias.new_empty(self.out_channels), self.stride,
                        self.padding, self.dilation)

    def _run(self, x, weight, bias, frozen_weight, frozen_bias):
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            raise InputError(f"{self._name()} expects input of shape [N, C, H, W] or [C, H, W], "
                             f"got {tuple(x.shape)}")
        n_in = self._narrow_input(x, 1)
        check_input(x, "input", weight, 1, self.in_channels if n_in is None else n_in, 4, self._name())
        name, fn = backends.get("conv2d", x.device, x.dtype)
        self.__dict__["last_backend"] = name  # a plain attribute, set per call: no nn.Module bookkeeping
        plan = self._table(n_in) if self.last_backend == "reference" else self._conv_tiles(x.dtype, n_in)
        return fn(x, weight, bias, frozen_weight, frozen_bias, plan, self.stride, self.padding, self.dilation,
                  self._taylor_view(n_in), self.constant_frozen)

    def _conv_tiles(self, dtype: torch.dtype, n_in: int | None = None):
        """The Triton backend's tile table for the current view and dtype (``ops/tiles.layer_tiles``), cached
        with the range tables until a state changes."""
        from .ops.tiles import layer_tiles  # triton is optional: imported when this backend runs

        with _ordinary_tensors():
            return layer_tiles(self._plans, lambda: self._table(n_in), self.input_task, self.task_state,
                               self.min_input_task, self._view(), self.constant_frozen, dtype, n_in, op="conv2d")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"{state_summary(self.task_state)}")


class _EideticBatchNorm(EideticLayer):
    """Batch norm with per-channel task state; running statistics are per-channel buffers
    that the op updates for FREE channels only.

    ``recycled_at_batch`` (int32[C]) holds ``num_batches_tracked`` at each channel's last recycling, so that
    with ``momentum=None`` (cumulative average) a recycled channel averages its own batches only, as a fresh
    ``nn.BatchNorm`` would."""

    _split_names = ("weight", "bias")
    _has_inputs = False
    _twin = nn.BatchNorm2d

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        # the twin without ``bias=`` (older torch lacks it); a bias-free affine layer drops its bias below
        twin = self._twin(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self._split("weight", twin.weight.detach() if affine else None)
        self._split("bias", twin.bias.detach() if affine and bias else None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(twin, name))
        state_device = twin.running_mean.device if track_running_stats else device
        self.register_buffer("recycled_at_batch", torch.zeros(num_features, dtype=torch.int32, device=state_device)
                             if track_running_stats else None)
        self._any_recycled: bool | None = False
        self._init_state(num_features, None, state_device)

    @classmethod
    def from_module(cls, module):
        """The twin of ``module`` (see ``convert`` for what carries over)."""
        like = next((t for t in (module.running_mean, module.weight) if t is not None), None)
        device = None if like is None else like.device
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  device=device, dtype=None if like is None else like.dtype,
                  bias=getattr(module, "bias", None) is not None or not module.affine)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src = getattr(module, name)
                if src is not None:
                    getattr(new, name).copy_(src)
        _adopt(new, module)
        return new

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """torch.nn's ``reset_running_stats`` for the channels that are not frozen (a frozen channel normalises
        with its statistics for good); ``num_batches_tracked`` restarts at 0."""
        if not self.track_running_stats:
            return
        live = ~is_frozen(self.task_state)
        self.running_mean.masked_fill_(live, 0.0)
        self.running_var.masked_fill_(live, 1.0)
        self.num_batches_tracked.zero_()
        self.recycled_at_batch.zero_()
        self._any_recycled = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch.nn's ``reset_parameters`` (running statistics, weight 1, bias 0) for the channels that are not
        frozen; frozen channels keep their statistics and affine parameters."""
        self.reset_running_stats()
        for t, value in ((self.weight, 1.0), (self.bias, 0.0)):
            if t is not None:
                t.data.fill_(value)

    @torch.no_grad()
    def _reinit_rows(self, slots, generator):
        if self.weight is not None:
            self.weight.data.index_fill_(0, slots, 1.0)
        if self.bias is not None:
            self.bias.data.index_fill_(0, slots, 0.0)
        if self.running_mean is not None:
            channels = (self.task_state == PRUNED).nonzero().flatten()
            self.running_mean.data.index_fill_(0, channels, 0.0)  # .data: see permute_neurons
            self.running_var.data.index_fill_(0, channels, 1.0)
            if self.num_batches_tracked is not None:
                self.recycled_at_batch.index_fill_(0, channels, int(self.num_batches_tracked))
                self._any_recycled = True

    def _check_input_dim(self, x):
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "recycled_at_batch"
        if self.recycled_at_batch is not None and key not in state_dict and prefix + "task_state" in state_dict:
            # this layer's checkpoint from before per-channel counts: every channel counts from the layer's first
            # batch. (A dict without the layer's states, a partial load or a torch.nn twin's, leaves them.)
            state_dict[key] = torch.zeros_like(self.recycled_at_batch)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._any_recycled = None  # read from the loaded counts on the next cumulative-average batch

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """y, the shape of ``input`` [N, C, *]: FREE channels as ``nn.BatchNorm``, frozen channels with their
        own running statistics and affine parameters, PRUNED channels exactly 0 (paper, Section 3).

        A float16/bfloat16 input with float32 parameters (mixed precision, as under ``torch.autocast``) is
        normalised in float32 and returned in the input's dtype, as ``nn.BatchNorm`` does.
        Raises ValueError for a wrong rank or channel count and, when normalising with batch statistics,
        for a batch with one value per channel (as torch does)."""
        if torch.compiler.is_compiling():  # first: a frame that breaks here at once guards on nothing of the layer
            if not backends.traceable(input.device):
                return _run_eagerly(self, input)
        elif self.task_state.is_meta:  # shapes only (no states there), as the twin on the meta device
            self._check_input_dim(input)
            if not (isinstance(input, torch.Tensor) and input.is_meta):
                raise InputError(f"{self._name()}: input is on {getattr(input, 'device', type(input))} but the layer "
                                 "is on the meta device; move one")
            check_input(input, "input", input, 1, self.num_features, 2, self._name())
            return torch.empty_like(input)
        else:
            self._check_call()
        x = input
        if self.narrow is not None and isinstance(x, torch.Tensor):
            try:  # a wrong rank at prefix width: the network runs at full width, which raises the user's error
                self._check_input_dim(x)
            except InputError:
                raise PrefixWidthMismatch(self._name()) from None
        self._check_input_dim(x)
        # prefix-width evaluation: the view's channels only, the first ``narrow`` ones
        n = None
        if self.narrow is not None:
            n = self.narrow
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != n or self.narrow_width() != n:
                raise PrefixWidthMismatch(self._name())
        like = self.running_mean if self.running_mean is not None else (self.weight if self.weight is not None else x)
        low = (x.dtype in (torch.float16, torch.bfloat16) and like.dtype == torch.float32
               and isinstance(x, torch.Tensor))
        check_input(x, "input", like.to(x.dtype) if low else like, 1, self.num_features if n is None else n, 2,
                    self._name())
        batch_stats = self.training or self.running_mean is None
        if batch_stats:
            values = x.shape[0]
            for d in x.shape[2:]:
                values *= d
            if values == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{x.size()}; drop batches of one sample (DataLoader(..., drop_last=True))")
        factor = 0.0 if self.momentum is None else self.momentum
        cumulative = False
        # a finished task's view sees no FREE channel, so no running statistic moves: the batch is not counted
        # (with momentum=None the count is the average's divisor)
        if (self.training and self.track_running_stats and self.num_batches_tracked is not None
                and self._view() is None):
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                cumulative = self._recycled_any()
                factor = 1.0 if cumulative else 1.0 / float(self.num_batches_tracked)
        if x.numel() == 0:
            # an empty batch (a filter that matched no sample): no statistic moves, as in nn.BatchNorm; the
            # backends' batch statistics of zero values would be NaN, written into the FREE channels' running ones.
            # The affine parameters get zero gradients, as nn.BatchNorm's do (an optimizer then steps them alike)
            y = x.clone()
            for p in (self.weight, self.bias):
                if p is not None and p.requires_grad and torch.is_grad_enabled():
                    y = y + p.sum() * 0
            return y
        use_running = not self.training or self.track_running_stats
        _, out_task, _ = self._view_states()
        name, fn = backends.get("batch_norm", x.device)
        self.__dict__["last_backend"] = name  # a plain attribute, set per call: no nn.Module bookkeeping
        running = (self.running_mean, self.running_var) if use_running else (None, None)
        slot, taylor = self.slot, self.taylor_score
        if n is not None:  # the first n channels: the view's, each with its own statistics and affine entries
            out_task, slot = out_task[:n], slot[:n]
            running = tuple(None if r is None else r[:n] for r in running)
            taylor = None if taylor is None else taylor[:n]
        if cumulative:
            old = (self.running_mean.clone(), self.running_var.clone())
        extra = {}
        if self.last_backend == "triton":
            extra = {"plan": self._channel_order(out_task, n)}
        elif self.last_backend == "cpp" and self._view() is not None:
            # a finished task's view has no FREE channel (``view_states``: the ones it cannot see act PRUNED)
            extra = {"all_free": out_task.numel() == 0}
        y = fn(x.float() if low else x, *running, self.weight, self.frozen_weight, self.bias, self.frozen_bias,
               out_task, slot, batch_stats, factor, self.eps, taylor,
               constant_frozen=self.constant_frozen, **extra)
        if cumulative:
            self._cumulative_average(old, out_task)
        return _memory_format_of(y.to(x.dtype) if low else y, x)

    def _channel_order(self, out_task: torch.Tensor, narrow: int | None = None):
        """The Triton backend's channel order for the current view (``ops/batch_norm/triton.channel_order``),
        cached with the range tables until a state changes; inside a compiled graph a missing one is built by
        an op of the graph. ``narrow``: the view at prefix width (its first ``narrow`` channels)."""
        from .ops.batch_norm.triton import channel_order  # triton is optional: imported when this backend runs

        key = ("bn channel order", self._view(), narrow)
        plan = self._plans.get(key)
        if plan is None:
            with _ordinary_tensors():
                plan = channel_order(out_task)
            if not torch.compiler.is_compiling():
                self._plans[key] = plan
        return plan

    def _recycled_any(self) -> bool:
        if self._any_recycled is None:
            self._any_recycled = bool((self.recycled_at_batch != 0).any())
        return self._any_recycled

    @torch.no_grad()
    def _cumulative_average(self, old, out_task) -> None:
        """momentum=None after a recycling: the op stored this batch's statistics (factor 1) in the FREE
        channels; average them with each channel's own count of batches (torch's formula, per channel)."""
        count = (self.num_batches_tracked - self.recycled_at_batch).clamp_min(1)
        f = 1.0 / count.to(self.running_mean.dtype)
        free = out_task == FREE
        for now, before in zip((self.running_mean, self.running_var), old):
            now.copy_(torch.where(free, f * now + (1 - f) * before, before))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}"
                f"{'' if self.bias is not None or not self.affine else ', bias=False'}, "
                f"{state_summary(self.task_state)}")


class EideticBatchNorm1d(_EideticBatchNorm):
    _twin = nn.BatchNorm1d

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise InputError(f"{self._name()} expects 2-D or 3-D input [N, C(, L)], got shape {tuple(x.shape)}")


class EideticBatchNorm2d(_EideticBatchNorm):
    _twin = nn.BatchNorm2d

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise InputError(f"{self._name()} expects 4-D input [N, C, H, W], got shape {tuple(x.shape)}")


def state_summary(task: torch.Tensor) -> str:
    free = int((task == FREE).sum())
    pruned = int((task == PRUNED).sum())
    return f"free={free}, frozen={task.numel() - free - pruned}, pruned={pruned}"


_CONVERSIONS = {nn.Linear: EideticLinear, nn.Conv2d: EideticConv2d, nn.BatchNorm1d: EideticBatchNorm1d,
                nn.BatchNorm2d: EideticBatchNorm2d}


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def computed_weight(module: nn.Module) -> tuple[str, str] | None:
    """(what computes ``module``'s weight, how to remove it) when a parametrization or a weight hook does
    (``torch.nn.utils.parametrize`` and ``parametrizations.*``, the older ``weight_norm`` / ``spectral_norm``
    hooks, ``torch.nn.utils.prune``); None for a plain weight."""
    from torch.nn.utils import parametrize, prune

    if parametrize.is_parametrized(module):
        names = list(module.parametrizations.keys())
        return (f"a parametrization of {', '.join(repr(n) for n in names)} (torch.nn.utils.parametrize)",
                " and ".join(f"torch.nn.utils.parametrize.remove_parametrizations(layer, {n!r})" for n in names))
    for hook in module._forward_pre_hooks.values():
        kind = type(hook).__name__
        if isinstance(hook, prune.BasePruningMethod):
            return (f"torch.nn.utils.prune ({kind}; this library prunes whole neurons itself: train_task, "
                    "group.prune)", f"torch.nn.utils.prune.remove(layer, '{hook._tensor_name}')")
        if kind == "WeightNorm":
            return "weight_norm (torch.nn.utils.weight_norm)", "torch.nn.utils.remove_weight_norm(layer)"
        if kind == "SpectralNorm":
            return "spectral_norm (torch.nn.utils.spectral_norm)", "torch.nn.utils.remove_spectral_norm(layer)"
    return None


def _refuse_computed_weight(module: nn.Module, where: str) -> None:
    """ValueError for a layer to convert whose weight a parametrization or weight hook computes: the twin takes
    the module's Parameters, which such a module no longer holds as ``weight``."""
    found = computed_weight(module)
    if found is not None:
        kind, remedy = found
        raise ValueError(f"cannot convert {where}: its weight is computed by {kind}. Remove it first ({remedy}, "
                         "which keeps the computed values); a parametrization can be added to the Eidetic layer "
                         "after conversion (it runs while every neuron is FREE). Nothing was converted")


def _adopt(new: EideticLayer, module: nn.Module) -> None:
    """Give ``new`` the module's own Parameter objects (so ``requires_grad``, tensor hooks and an optimizer
    already holding them carry over), its training flag and its forward/backward hooks."""
    for name in new._split_names:
        param = getattr(module, name, None)
        if param is not None and getattr(new, name) is not None:
            setattr(new, name, param)
    new.train(module.training)
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if hooks:
            getattr(new, name).update(hooks)
    if getattr(module, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = module._is_full_backward_hook


def convert(model: nn.Module, _path: str = "", _twins: dict | None = None) -> nn.Module:
    """Replace every nn.Linear/Conv2d/BatchNorm1d/2d in ``model`` by its Eidetic twin (same weights).

    Modifies ``model`` in place and returns it (or the twin when ``model`` itself is such a layer).
    What carries over: the module's own Parameter objects (values, ``requires_grad``, tensor hooks, and so
    an optimizer built before the conversion), the training flag, forward and backward hooks, running
    statistics. What does not: state-dict hooks (the twin's keys differ), the handles of carried hooks
    (removing a hook through its handle affects the replaced module only), attributes the user added.
    Frozen parameters stay frozen: a layer whose ``requires_grad`` is False is not trained by
    ``train_task`` either, nor pruned (``python_layers.pruning.is_fixed``).
    A layer used at several places of the model (one module object under several names) becomes one twin used
    at the same places, so its neurons keep one state (``EideticNetwork`` refuses such weight sharing with a
    clear error: per-neuron states cannot tell its places apart).
    Tied weights (a layer's Parameter also held by another module of ``model``, e.g. an output layer tied to an
    embedding) are refused: freezing a neuron moves its row to the frozen storage, which the other module would
    not follow, and that module would go on training the frozen rows. A tie to a module outside ``model`` cannot
    be seen here: convert the model that holds both.
    Raises ValueError for a layer the twins cannot represent (grouped conv, non-zero padding modes, tied weights),
    before anything is converted; TypeError when ``model`` is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    # id(module) -> (module, its twin), for modules met more than once (the module is kept: its id stays its own)
    twins = {} if _twins is None else _twins
    if not _path and _twins is None:  # the user's call (EideticNetwork's own refuses such bodies with a GraphError)
        _warn_feature_mixing(model)
    prepare_twins(model, _path, twins)  # every twin first: a layer that cannot convert leaves the model as it was
    _refuse_tied_parameters(model, _path, twins)
    out = _install_twins(model, twins)
    if not _path and _twins is None:
        _warn_unconverted(out)
    return out


def _warn_unconverted(model: nn.Module) -> None:
    """Modules with Parameters of their own that have no Eidetic twin (Conv1d, ConvTranspose2d, BatchNorm3d,
    Embedding, PReLU, a bare nn.Parameter, ...) stay as they are: without neuron states nothing freezes them, so
    they train on with every task. Said once per call, naming them (the norms ``_warn_feature_mixing`` names
    are left out, and so is a parametrization list inside an Eidetic layer: it holds the layer's own storage)."""
    layers = [name + "." for name, m in model.named_modules() if isinstance(m, EideticLayer)]
    kept = [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules()
            if not isinstance(m, EideticLayer) and not _mixes_features(m)
            and not (isinstance(m, nn.utils.parametrize.ParametrizationList)
                     and any(name.startswith(prefix) for prefix in layers))
            and any(p is not None and p.requires_grad for p in m._parameters.values())]
    if kept:
        warnings.warn(f"ek.convert left {', '.join(kept)} as they are (no Eidetic twin): nothing freezes the "
                      "parameters of a module without neuron states, so they train on with every task "
                      "(EideticNetwork refuses such a body). Twins exist for Linear, Conv2d and BatchNorm1d/2d",
                      UserWarning, stacklevel=3)


def _mixes_features(m: nn.Module) -> bool:
    """A norm over the features together: LayerNorm, RMSNorm, LocalResponseNorm, GroupNorm with several channels
    per group (one channel per group is an instance norm)."""
    kinds = tuple(getattr(nn, k) for k in ("LayerNorm", "RMSNorm", "LocalResponseNorm") if hasattr(nn, k))
    return isinstance(m, kinds) or (isinstance(m, nn.GroupNorm) and m.num_groups < m.num_channels)


def _warn_feature_mixing(model: nn.Module) -> None:
    """A norm over the features together (LayerNorm, RMSNorm, GroupNorm with several channels per group,
    LocalResponseNorm) makes every output read every neuron's value, FREE ones too: a finished task's outputs then
    move as later tasks train. Said once per call, naming the modules."""
    mixing = [f"{name or 'the model'} ({type(m).__name__})" for name, m in model.named_modules() if _mixes_features(m)]
    if mixing:
        warnings.warn(f"ek.convert: {', '.join(mixing)} normalise(s) over many features together, so each output "
                      "reads the FREE neurons that later tasks train as well, and finished tasks' outputs will change: "
                      "the no-forgetting promise does not hold for this model (EideticNetwork refuses such a body). "
                      "Use BatchNorm, GroupNorm with one channel per group (InstanceNorm) without affine parameters, "
                      "or no norm there",
                      UserWarning, stacklevel=3)


def _attribute_expression(qualified: str, root: str = "model") -> str:
    """Python that reaches a qualified name from ``root``: "body.1.weight" -> "model.body[1].weight" (a
    container's numbered children are indexed, as a user writes them)."""
    return root + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in qualified.split("."))


def _refuse_tied_parameters(model: nn.Module, path: str, twins: dict) -> None:
    """ValueError naming a layer to convert whose Parameter another module of ``model`` also holds."""
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id(Parameter) -> (module, its path, param name)
    for name, module in model.named_modules(prefix=path, remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name, p_name))
    for held in holders.values():
        converted = [(m, name, p_name) for m, name, p_name in held if id(m) in twins]
        if not converted:
            continue
        module, name, p_name = converted[0]
        others = [(n, q) for m, n, q in held if m is not module]
        if others:
            mine = f"{name}.{p_name}" if name else p_name
            other = f"{others[0][0]}.{others[0][1]}" if others[0][0] else others[0][1]
            untie = f"{_attribute_expression(mine)} = nn.Parameter({_attribute_expression(other)}.detach().clone())"
            raise ValueError(
                f"cannot convert {name or type(module).__name__} ({type(module).__name__}): its {p_name} is tied to "
                f"{other} (one Parameter held by two modules). Per-neuron states cannot follow a tie: freezing a "
                f"neuron moves its row to the frozen storage, and the other module would go on training the frozen "
                f"rows. Untie them first, e.g. `{untie}` (model: the module given to convert, or the EideticNetwork). "
                f"Nothing was converted")


def prepare_twins(model: nn.Module, path: str, twins: dict) -> None:
    """The twin of every layer of ``model`` that ``convert`` replaces, into ``twins`` (id -> (module, twin)),
    changing nothing in ``model``. Raises ValueError for a layer the twins cannot represent."""
    from torch.nn.utils import parametrize

    # a parametrized module is an instance of a subclass torch creates (ParametrizedLinear): its original class
    original = type(model).__bases__[0] if parametrize.is_parametrized(model) else type(model)
    cls = _CONVERSIONS.get(original)
    if cls is not None:
        if id(model) not in twins:
            _refuse_computed_weight(model, f"{path} ({original.__name__})" if path else original.__name__)
            try:
                twin = cls.from_module(model)
            except ValueError as exc:
                where = f"{path} ({type(model).__name__})" if path else type(model).__name__
                raise ValueError(f"cannot convert {where}: {exc}. Nothing was "
                                 "converted") from exc
            if path:
                twin.qualified_name = path  # error messages name the layer as the model does
            twins[id(model)] = (model, twin)
        return
    # _modules, not named_children(): that one names a module used twice under one parent only once
    for name, child in model._modules.items():
        if child is not None:
            prepare_twins(child, f"{path}.{name}" if path else name, twins)


def _install_twins(model: nn.Module, twins: dict) -> nn.Module:
    """``model`` with every layer that has a twin in ``twins`` replaced by it (in place)."""
    if id(model) in twins and twins[id(model)][0] is model:
        return twins[id(model)][1]
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        new = _install_twins(child, twins)
        if new is not child:
            setattr(model, name, new)
    return model
