"""Structured pruning of the current task's FREE neurons (paper Section 3, steps 1-2).

A pruning step works on *neuron groups* (``python_layers.graph.NeuronGroup``): the neurons of a
Linear/Conv together with the BatchNorm channels normalising them and, for residual adds, the
output neurons of every branch added together. A group is pruned as one unit; any object with
``name``, ``size``, ``members`` (``[(qualified name, EideticLayer)]``), ``task_state``, ``prune(neurons)``
and ``weight_members()`` works (the unit tests use single layers).

Scores (higher = more important; only FREE neurons are scored, everything else is ``nan``):

* ``"l1"`` / ``"l2"``: L1 / L2 norm of each neuron's *live* incoming weights (the inputs a FREE neuron
  reads under the live-synapse rule: ``in_task != PRUNED`` and ``in_task >= min_input_task``), summed
  over the group's weight members (Linear/Conv). The bias is not part of the norm.
* ``"taylor"``: the Taylor score |mean_b Σ a·∂L/∂a| the layers accumulate during the ordinary backward
  passes while ``enable_taylor()`` is on (Molchanov et al. 2017), summed over every member that
  collected one (Linear/Conv outputs and BatchNorm outputs). ``train_task`` collects it over an epoch (the
  best training epoch's, restored with its weights, for the first step; the recovery epoch's after), each
  batch's term weighted by (its size / the first batch's)², so that every sample counts alike.

Normalisation: before members are summed, each member's raw scores over the group's FREE neurons are
divided by their mean over those FREE neurons (a member whose scores are all 0 contributes 0). Every
member then has mean 1 over the candidates, so a member with a wide fan-in (a 3x3 conv vs a 1x1
projection) or large activations does not drown the others, and the score of every group is on the same
scale (mean = number of contributing members). Selection within a group only uses the ranking, and
every group prunes the same share (the paper's "same share per layer"), so groups never compete.

Selection: each step prunes ``max(1, round(step * n_task))`` of the group's FREE neurons with the
lowest scores, where ``n_task`` is the number of FREE neurons the group had when the task's pruning began
(so ``step=0.05`` takes about 20 steps to exhaust a group), never more than leaves one FREE neuron.
``round`` is Python's (half to even: 0.25 x 10 gives 2, 0.25 x 14 gives 4), so groups of different sizes prune
the same share up to that rounding.
Ties break towards the lower neuron index; a ``nan`` score of a FREE neuron (e.g. non-finite weights) is
treated as least important. Frozen and PRUNED neurons are never candidates.
"""
from __future__ import annotations

import torch

from eidetic_kernels.state import FREE, PRUNED

__all__ = ["PRUNING_METHODS", "check_method", "group_scores", "prune_counts", "select_neurons", "prune_step",
           "member_norms", "pruned_share", "frozen_share"]

PRUNING_METHODS = ("l1", "l2", "taylor")


def check_method(method: str) -> str:
    if method not in PRUNING_METHODS:
        raise ValueError(f"pruning must be one of {', '.join(repr(m) for m in PRUNING_METHODS)} "
                         f"(or None to skip pruning), got {method!r}")
    return method


def _layers(group):
    return [layer for _, layer in group.members]


def _weight_layers(group):
    if hasattr(group, "weight_members"):
        return list(group.weight_members())
    return [layer for layer in _layers(group) if hasattr(layer, "input_task")]


@torch.no_grad()
def member_norms(layer, p: int) -> torch.Tensor:
    """Float32[out]: Lp norm of each FREE neuron's live incoming weights (``nan`` for other neurons).

    Reads the trainable storage only (FREE rows live there), so a frozen value is never touched.
    """
    state = layer.task_state
    out = torch.full((state.numel(),), float("nan"), dtype=torch.float32, device=state.device)
    free = (state == FREE).nonzero().flatten()
    if free.numel() == 0:
        return out
    rows = layer.weight.detach()[layer.slot[free].long()].float()  # [n_free, in, (kh, kw)]
    rows = rows.reshape(rows.shape[0], rows.shape[1], -1)
    in_task = layer.input_task.long()
    lo = layer.min_input_task[free].long()
    for m in torch.unique(lo).tolist():
        sel = lo == m
        live = (in_task != PRUNED) & (in_task >= m)  # in_task <= FREE always holds
        w = rows[sel][:, live]
        norm = w.abs().sum((1, 2)) if p == 1 else w.pow(2).sum((1, 2)).sqrt()
        out[free[sel]] = norm
    return out


def _normalised(raw: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Raw member scores divided by their mean over the FREE neurons (see the module docstring)."""
    vals = raw[free]
    finite = vals[torch.isfinite(vals)]
    mean = finite.mean() if finite.numel() else vals.new_zeros(())
    if float(mean) > 0:
        return raw / mean
    return torch.where(free, torch.zeros_like(raw), raw)  # an all-zero member carries no ranking


@torch.no_grad()
def group_scores(group, method: str) -> torch.Tensor:
    """Float32[group.size]: importance of each FREE neuron of ``group``; ``nan`` for the others."""
    check_method(method)
    state = group.task_state
    free = state == FREE
    if method == "taylor":
        raws = [layer.taylor_score.float() for layer in _layers(group) if getattr(layer, "taylor_score", None)
                is not None]
        if not raws:
            raise RuntimeError(f"{group.name}: no Taylor score was collected; call enable_taylor() on the group's "
                               "layers and run forward/backward passes before scoring with pruning='taylor'")
    else:
        p = 1 if method == "l1" else 2
        raws = [member_norms(layer, p) for layer in _weight_layers(group)]
        if not raws:  # a group of BN channels only: fall back to |gamma| of its members
            raws = [layer.dense("weight").abs().float() for layer in _layers(group)
                    if getattr(layer, "weight", None) is not None]
        if not raws:
            raise RuntimeError(f"{group.name}: no member has weights to score; use pruning='taylor'")
    total = torch.zeros(state.numel(), dtype=torch.float32, device=state.device)
    for raw in raws:
        total += _normalised(raw.to(total.device), free)
    return torch.where(free, total, torch.full_like(total, float("nan")))


def fixed_by_user(layer) -> bool:
    """The user froze this layer: it has parameters and none has ``requires_grad=True``."""
    params = list(layer.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def is_fixed(group) -> bool:
    """True when the user froze a member layer (e.g. a pretrained stem): such a group is never pruned, so the
    layer's outputs stay what the user froze; its neurons freeze with the first task and later tasks read
    them (forward transfer)."""
    return any(fixed_by_user(layer) for layer in _layers(group))


def prune_counts(group, step: float, task_free: int) -> int:
    """How many FREE neurons of ``group`` one step prunes (0 when only one is left, the group is fixed, or it is
    a batch norm of the raw input: its channels are input features, which every task reads as task 0's; pruning
    one would cut that input from the task's frozen neurons for good)."""
    if is_fixed(group) or getattr(group, "input_normalizer", False):
        return 0
    n_free = int((group.task_state == FREE).sum())
    want = max(1, round(step * task_free))
    return max(0, min(want, n_free - 1))


@torch.no_grad()
def select_neurons(scores: torch.Tensor, state: torch.Tensor, count: int) -> torch.Tensor:
    """LongTensor: the ``count`` FREE neurons with the lowest scores (never a non-FREE one)."""
    free = (state == FREE).nonzero().flatten()
    count = min(count, free.numel())
    if count <= 0:
        return free[:0]
    s = scores[free].float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = torch.sort(s, stable=True).indices  # stable: ties break towards the lower index
    return free[order[:count]]


@torch.no_grad()
def prune_step(groups, method: str, step: float, task_free: dict, decide=None) -> dict:
    """Prune one step in every group; returns {group name: LongTensor of neurons pruned}.

    ``task_free[name]``: the group's FREE count when the task's pruning began. An empty dict means
    nothing was left to prune anywhere (every group is down to one FREE neuron). ``decide`` (optional) maps
    the chosen {group name: neurons} to the ones to prune: many processes pass one that broadcasts rank 0's
    choice (``python_layers.distributed.broadcast_object``), so every process prunes the same neurons.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be a share in (0, 1], got {step!r}")
    missing = [group.name for group in groups if task_free and group.name not in task_free]
    if missing:
        raise ValueError(f"task_free has no count for group(s) {', '.join(missing)} (it has: "
                         f"{', '.join(map(str, task_free)) or 'none'}): take it when the task's pruning begins, "
                         "{g.name: int((g.task_state == FREE).sum()) for g in model.groups}")
    chosen = {}
    for group in groups:  # score everything first: pruning one group changes its consumers' live inputs
        if group.name not in task_free:
            continue  # an empty dict: nothing was left to prune
        count = prune_counts(group, step, task_free[group.name])
        if count:
            neurons = select_neurons(group_scores(group, method), group.task_state, count)
            if neurons.numel():
                chosen[group.name] = neurons.cpu()
    if decide is not None:
        chosen = decide(chosen)
    by_name = {g.name: g for g in groups}
    pruned = {}
    for name, neurons in chosen.items():
        group = by_name[name]
        neurons = neurons.to(group.task_state.device)
        group.prune(neurons)
        pruned[name] = neurons
    return pruned


def pruned_share(group) -> float:
    return float((group.task_state == PRUNED).sum()) / max(1, group.size)


def frozen_share(group) -> float:
    s = group.task_state
    return float(((s >= 0) & (s != FREE)).sum()) / max(1, group.size)
