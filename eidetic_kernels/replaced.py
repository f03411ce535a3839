"""Parameters that a state transition replaced, and optimizers that still hold them.

State transitions (freezing, recycling, loading a checkpoint of another shape) never resize a
Parameter in place: an autograd graph that is still alive (logits kept for a plot) would break the
next backward, and an optimizer's state would silently stop matching its parameter. They install a
new ``nn.Parameter`` instead and mark the old one as replaced.

An optimizer built before the transition still holds the old objects; stepping it would train
nothing. ``rebind_optimizer`` swaps the new Parameters into its param groups (hyperparameters kept,
the replaced Parameters' state dropped); ``train_task`` calls it for the optimizer it was given.
Stepping a stale optimizer anywhere else raises ``StaleOptimizerError`` naming that fix (a global
``torch.optim`` step pre-hook; it scans an optimizer's parameters only after a replacement happened,
so its cost per step is one integer comparison).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["StaleOptimizerError", "replace_parameter", "rebind_optimizer", "current"]

_generation = 0  # bumped on every replacement: optimizers re-scan only when it moved


class StaleOptimizerError(RuntimeError):
    """An optimizer steps Parameters that a state transition (finish_task, load) replaced."""


def replace_parameter(module: nn.Module, name: str, data: torch.Tensor) -> nn.Parameter:
    """Install ``nn.Parameter(data)`` as ``module.<name>`` (same ``requires_grad``), mark the old one replaced.

    What the user attached to the old Parameter carries over (``_carry_over``): its tensor hooks and its
    attributes. Returns the new Parameter. The old object keeps its values (a live graph can still use them).
    """
    global _generation
    old = getattr(module, name)
    new = nn.Parameter(data, requires_grad=old.requires_grad if old is not None else True)
    if old is not None:
        _carry_over(old, new)
    setattr(module, name, new)
    if old is not None:
        old._eidetic_replaced_by = new
        _generation += 1
    return new


def _carry_over(old: nn.Parameter, new: nn.Parameter) -> None:
    """The old Parameter's hooks (``register_hook``: gradient clipping, logging; ``register_post_accumulate_grad_hook``:
    an optimizer stepped in backward) and attributes (``p.lr_scale = ...``) on the new one. The hook dicts are
    shared, so a handle the user kept still removes its hook. A hook receives the new Parameter: one that looks
    its Parameter up by identity (a dict of optimizers per Parameter) must map it (``current(old)``)."""
    for key, value in old.__dict__.items():
        if key != "_eidetic_replaced_by":
            new.__dict__.setdefault(key, value)
    if old._backward_hooks:
        new._backward_hooks = old._backward_hooks
    post = getattr(old, "_post_accumulate_grad_hooks", None)
    if post:
        new._post_accumulate_grad_hooks = post


def current(p: torch.Tensor) -> torch.Tensor:
    """The Parameter that replaced ``p`` (following every later replacement), or ``p`` itself."""
    while getattr(p, "_eidetic_replaced_by", None) is not None:  # each replacement is new: no cycle
        p = p._eidetic_replaced_by
    return p


def rebind_optimizer(optimizer: torch.optim.Optimizer) -> int:
    """Swap replaced Parameters in ``optimizer``'s param groups for their replacements.

    Hyperparameters and param-group structure are kept; the state (moments, step counts) of every
    replaced Parameter is dropped (its rows changed meaning). Returns how many were swapped.
    Raises TypeError when ``optimizer`` is not a torch.optim.Optimizer (anything with ``param_groups``).
    """
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(f"rebind_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    swapped = 0
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            q = current(p)
            if q is not p:
                optimizer.state.pop(p, None)
                swapped += 1
            params.append(q)
        group["params"] = params
    optimizer.__dict__["_eidetic_checked"] = _generation
    return swapped


def _check_step(optimizer, args, kwargs) -> None:
    # inside torch.compile the check runs on every trace and its result is not cached: dynamo cannot store
    # into an optimizer's __dict__ from a hook (torch 2.11 refuses the mutation)
    compiling = torch.compiler.is_compiling()
    if not compiling and optimizer.__dict__.get("_eidetic_checked") == _generation:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if getattr(p, "_eidetic_replaced_by", None) is not None:
                raise StaleOptimizerError(
                    f"this {type(optimizer).__name__} holds a Parameter of shape {tuple(p.shape)} that a state "
                    "transition replaced (finish_task freezes rows into buffers and installs new Parameters; "
                    "loading a checkpoint of another shape does too), so stepping it would train nothing. Call "
                    "eidetic_kernels.rebind_optimizer(optimizer) (train_task does this for the optimizer it is "
                    "given), or build a new optimizer over model.parameters(). A new task's head is a new Parameter "
                    "too: after model.prepare_for_task(t, ...) in a loop of your own, add it with "
                    "optimizer.add_param_group({'params': model.heads[t].parameters()}) (train_task does)")
    if not compiling:
        optimizer.__dict__["_eidetic_checked"] = _generation


register_optimizer_step_pre_hook(_check_step)
