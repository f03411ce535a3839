"""Task routing: predict without a task id (paper Section 3, "task routing").

``fit_router(model, loaders)`` trains a task classifier on the paper's meta-task dataset: the inputs of
every finished task labelled with their task id. It reads the body's features *in the view of all
finished tasks* (``view_task = last finished task``: FREE and PRUNED neurons are not computed and read as
exact zeros), computed once under ``torch.no_grad`` in eval mode, so it touches no neuron of the body and
no head; only the router's own parameters train.

``predict(model, x, router)`` runs the body once in that view and applies every finished head to the same
features. That is exact: a neuron of task s reads only neurons of tasks <= s, so its value in the view of
the last task equals its value in the view of task s, and head t reads only features of tasks <= t.
``router="learned"`` picks the task with the router's largest logit; ``router="entropy"`` picks the head
whose softmax has the lowest entropy divided by log(number of classes) (so heads with different class
counts are comparable; a one-class head counts as maximally uncertain). Needs no training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .trainer import _model_device

__all__ = ["TaskRouter", "fit_router", "predict", "ROUTERS"]

ROUTERS = ("learned", "entropy")


class TaskRouter(nn.Module):
    """Standardise the features, then a linear layer: logits over the finished tasks."""

    def __init__(self, feature_dim: int, num_tasks: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_tasks)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))

    @property
    def num_tasks(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_scale)


def _finished(model) -> int:
    n = int(getattr(model, "num_finished_tasks", 0))
    if n < 1:
        raise ValueError("no task is finished yet: train one with model.train_task(...) before routing")
    return n


def _inputs(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["x"] if "x" in batch else batch["input"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"a routing loader must yield inputs or (inputs, ...) tuples, got {type(batch).__name__}")


class _EvalMode:
    """Eval mode and no_grad inside, the model's previous mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def _features(model, x, num_finished):
    return model.features(x, view_task=num_finished - 1)


def fit_router(model, loaders, epochs: int = 30, lr: float = 1e-2, batch_size: int = 256,
               weight_decay: float = 1e-4, device=None, generator: torch.Generator | None = None) -> list[dict]:
    """Train ``model.router`` to tell the finished tasks apart; returns per-epoch {epoch, loss, accuracy}.

    ``loaders[t]`` (a list or a dict, one per finished task 0..T-1) yields task t's inputs (``x`` or
    ``(x, ...)`` batches; the labels are ignored: the target is ``t``).
    """
    num_finished = _finished(model)
    if isinstance(loaders, dict):
        missing = [t for t in range(num_finished) if t not in loaders]
        extra = [t for t in loaders if not (isinstance(t, int) and 0 <= t < num_finished)]
    else:
        loaders = list(loaders)
        missing = list(range(len(loaders), num_finished))
        extra = list(range(num_finished, len(loaders)))
    if missing or extra:
        raise ValueError(f"fit_router needs one loader per finished task 0..{num_finished - 1}; "
                         + (f"missing tasks {missing}" if missing else f"got loaders for unfinished tasks {extra}"))
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    device = torch.device(device) if device is not None else _model_device(model)

    # The meta-task dataset, as features: the body is fixed, so they are computed once.
    feats, targets = [], []
    with _EvalMode(model):
        for t in range(num_finished):
            for batch in loaders[t]:
                f = _features(model, _inputs(batch).to(device), num_finished)
                feats.append(f.float())
                targets.append(torch.full((f.shape[0],), t, dtype=torch.long, device=device))
    if not feats:
        raise ValueError("the routing loaders yielded no batch")
    feats, targets = torch.cat(feats), torch.cat(targets)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("the features of the finished tasks are not finite; the router cannot be trained on them")

    router = TaskRouter(feats.shape[1], num_finished).to(device)
    with torch.no_grad():
        router.feature_mean.copy_(feats.mean(0))
        # constant (e.g. never-live) features keep scale 1: they carry nothing and must not blow up
        std = feats.std(0, correction=0) if feats.shape[0] > 1 else torch.ones_like(feats[0])
        router.feature_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    # balance the tasks: a task with more samples must not become the router's default answer
    counts = torch.bincount(targets, minlength=num_finished).float()
    class_weight = counts.sum() / (num_finished * counts.clamp_min(1))
    history = []
    n = feats.shape[0]
    for e in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            logits = router(feats[idx])
            loss = F.cross_entropy(logits, targets[idx], weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * idx.numel()
            correct += int((logits.detach().argmax(-1) == targets[idx]).sum())
        history.append(dict(epoch=e + 1, loss=loss_sum / n, accuracy=correct / n))
    router.requires_grad_(False)  # it is done: keep it out of later tasks' optimizers
    model.router = router
    return history


def _head_logits(model, features, num_finished) -> list[torch.Tensor]:
    if hasattr(model, "logits"):  # the network's own head path (view mode), as model(x, task=t) uses
        return [model.logits(features, t) for t in range(num_finished)]
    return [model.heads[t](features) for t in range(num_finished)]


def predict(model, x: torch.Tensor, router: str = "learned") -> tuple[torch.Tensor, torch.Tensor]:
    """(tasks, classes), LongTensor[B] each: each sample's routed task and its class under that head."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    num_finished = _finished(model)
    learned = getattr(model, "router", None)
    if router == "learned":
        if learned is None:
            raise ValueError("no router is fitted: call model.fit_router(loaders) first, or use router='entropy'")
        if learned.num_tasks != num_finished:
            raise ValueError(f"the router was fitted on {learned.num_tasks} tasks but {num_finished} are finished; "
                             "call model.fit_router(loaders) again")
    with _EvalMode(model):
        features = _features(model, x, num_finished)  # one pass of the body
        logits = _head_logits(model, features, num_finished)
        if router == "learned":
            tasks = learned(features.float()).argmax(-1)
        else:
            entropies = []
            for z in logits:
                c = z.shape[-1]
                logp = F.log_softmax(z.float(), -1)
                h = -(logp.exp() * logp).sum(-1)
                entropies.append(h / math.log(c) if c > 1 else torch.ones_like(h))
            tasks = torch.stack(entropies, -1).argmin(-1)  # ties: the lowest task id
        width = max(z.shape[-1] for z in logits)
        padded = torch.stack([F.pad(z.float(), (0, width - z.shape[-1]), value=float("-inf")) for z in logits])
        per_sample = padded.gather(0, tasks.view(1, -1, 1).expand(1, -1, width)).squeeze(0)  # [B, width]
        classes = per_sample.argmax(-1)
    return tasks.long(), classes.long()
