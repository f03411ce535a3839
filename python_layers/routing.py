"""Task routing: predict without a task id (paper Section 3, "task routing").

``fit_router(model, loaders)`` trains a task classifier on the paper's meta-task dataset: the inputs of
every finished task labelled with their task id. It reads the body *in the view of all finished tasks*
(``view_task = last finished task``: FREE and PRUNED neurons are not computed and read as exact zeros),
computed once under ``torch.no_grad`` in eval mode, so it touches no neuron of the body and no head; only the
router's own parameters train.

What the router reads: the body features (the heads' input) and a summary of every Linear, Conv2d and
BatchNorm2d output of the body (``_summaries``: a Linear output as it is; a conv output's mean and standard
deviation over positions; relu(BatchNorm2d output) averaged and the BatchNorm2d output's maximum over positions),
all from the same single pass. The body was trained to tell the classes *within* each task apart, so the tasks
are not linearly separable in its last layer: on Split MNIST (configs/demo.yaml, 5 tasks, 10,000 router inputs
per task) a linear router on the features routes 90.8% of the test images to their task, every layer plus a
two-hidden-layer MLP 98.4% (routed ACC 0.9815 against 0.9972 with the task id). Measured on cached activations
(``benchmarks/router_study.py``, results in ``benchmarks/results/routing/``), what moves the routed accuracy is
the router's data: on Split CIFAR-10 (configs/split_cifar10_cpu.yaml) 6,000 instead of 2,000 inputs per task
add 16-17 points, the spread and maximum over positions 3.5, each input's mirror (``flip``) 2.4; a wider or longer
trained MLP, an ensemble of routers, extra random crops, Gaussian (LDA/QDA) task models and adding each head's
confidence (max softmax, logsumexp, entropy; z-scored per head) to the router's log-probability add nothing
or lose.

What a router reads of the body is bound by what the body was trained for: it can also read the raw input through its
own small CNN (``reads="input"``, config ``router_input``; ``_conv``), trained on the same router inputs, never
touching the body. On the same Split MNIST body (5 tasks, 10,000 inputs per task) it routes 0.9898 (gap 0.74
points; 3 epochs, ~70 s on one busy CPU thread), the body reader 0.9804, both (``reads="both"``: each trained
apart, their task log-probabilities added) 0.9873: the body reader's errors are confident enough to pull the sum
below the CNN alone.

``TaskRouter`` = a linear layer on the standardised features plus, when fitted with
``hidden > 0``, that MLP on the standardised layer summaries; their logits add. With a CNN, the CNN's logits alone
(``reads="input"``) or the sum of the two readers' log-softmaxes (``reads="both"``). Fitted with ``flip=True`` it
also trains on each input mirrored left-right and ``predict`` averages its task probabilities over an input
and its mirror. A router reading the input alone needs no body pass to be fitted. ``fit_router(..., init=router)``
warm-starts from the router fitted after the previous task (config ``router_warm_start``): its weights, a fresh
output row for the new task, then training on every finished task's inputs again.

``predict(model, x, router)`` runs the body once in that view (twice for a ``flip`` router reading the body; a
CNN-only router reads the mirror through its CNN alone) and applies every finished head to the same
features. That is exact: a neuron of task s reads only neurons of tasks <= s, so its value in the view of
the last task equals its value in the view of task s, and head t reads only features of tasks <= t.
``router="learned"`` picks the task with the router's largest logit (probability, averaged with the mirror's); ``router="entropy"`` picks the head
whose softmax has the lowest entropy divided by log(number of classes) (so heads with different class
counts are comparable; a one-class head counts as maximally uncertain). Needs no training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import EideticBatchNorm2d, EideticConv2d, EideticLinear

from .trainer import _model_device, batch_inputs

__all__ = ["TaskRouter", "fit_router", "predict", "ROUTERS", "ROUTER_INPUTS"]

ROUTERS = ("learned", "entropy")
# what the learned router reads: the body (features and layer activations), the raw input (its own CNN), both
ROUTER_INPUTS = ("body", "input", "both")


def _mlp(input_dim: int, hidden: int, num_tasks: int, like: torch.Tensor) -> nn.Sequential:
    kw = dict(device=like.device, dtype=like.dtype)
    return nn.Sequential(nn.Linear(input_dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                         nn.Linear(hidden, num_tasks, **kw))


_CONV_GRID = 7  # the conv router's last map is pooled to 7 x 7 (28 x 28 MNIST after two 2 x 2 pools: as it is)


def _conv(in_channels: int, num_tasks: int, like: torch.Tensor) -> nn.Sequential:
    """The router's own small CNN on the raw input [B, in_channels, H, W] -> task logits [B, num_tasks]:
    conv 5x5 (16) -> ReLU -> max pool 2 -> conv 5x5 (32) -> ReLU -> max pool 2 -> average pool to 7 x 7 ->
    Linear(128) -> ReLU -> Linear(num_tasks)."""
    kw = dict(device=like.device, dtype=like.dtype)
    return nn.Sequential(nn.Conv2d(in_channels, 16, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(_CONV_GRID), nn.Flatten(),
                         nn.Linear(32 * _CONV_GRID * _CONV_GRID, 128, **kw), nn.ReLU(), nn.Linear(128, num_tasks, **kw))


class TaskRouter(nn.Module):
    """Logits over the finished tasks from what it reads: the body (``reads_body``: a linear layer on the
    standardised body features plus, when ``input_dim > 0``, an MLP with two hidden layers of ``hidden`` units
    on the standardised layer activations, see the module docstring; the two add) and/or the raw input
    (``conv``, when ``in_channels > 0``: its own small CNN on the input standardised per channel, ``_conv``).
    Reading both, the scores are the sum of the two task log-probabilities (each reader trained on its own).

    ``TaskRouter(feature_dim, num_tasks)`` is the linear router alone; ``load_state_dict`` re-creates the MLP,
    the CNN and their input statistics with the sizes the state dict holds, so a router saved with its state dict
    is rebuilt from ``(feature_dim, num_tasks)`` alone; a state dict without ``reads_body`` (an older checkpoint)
    reads the body.
    """

    def __init__(self, feature_dim: int, num_tasks: int, input_dim: int = 0, hidden: int = 256,
                 in_channels: int = 0, reads_body: bool = True):
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_tasks)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))
        # whether predict also reads each input mirrored left-right and averages the two task probabilities
        self.register_buffer("flip", torch.tensor(False))
        self.register_buffer("reads_body", torch.tensor(bool(reads_body)))
        self.mlp: nn.Sequential | None = None
        self._set_mlp(int(input_dim), int(hidden))
        self.conv: nn.Sequential | None = None
        self._set_conv(int(in_channels))

    def _set_mlp(self, input_dim: int, hidden: int) -> None:
        like = self.linear.weight
        if input_dim > 0 and hidden > 0:
            self.mlp = _mlp(input_dim, hidden, self.num_tasks, like)
            self.mlp.requires_grad_(like.requires_grad)
        else:
            self.mlp, input_dim = None, 0
        self.register_buffer("input_mean", torch.zeros(input_dim, device=like.device, dtype=like.dtype))
        self.register_buffer("input_scale", torch.ones(input_dim, device=like.device, dtype=like.dtype))

    def _set_conv(self, in_channels: int) -> None:
        like = self.linear.weight
        if in_channels > 0:
            self.conv = _conv(in_channels, self.num_tasks, like)
            self.conv.requires_grad_(like.requires_grad)
            self.register_buffer("pixel_mean", torch.zeros(in_channels, device=like.device, dtype=like.dtype))
            self.register_buffer("pixel_scale", torch.ones(in_channels, device=like.device, dtype=like.dtype))
        else:  # None buffers are not in the state dict: a router without the CNN saves what it always did
            self.conv = None
            self.register_buffer("pixel_mean", None)
            self.register_buffer("pixel_scale", None)

    @property
    def num_tasks(self) -> int:
        return self.linear.out_features

    @property
    def input_dim(self) -> int:
        """Width of the layer activations the MLP reads; 0: no MLP (linear router on the features only)."""
        return 0 if self.mlp is None else self.mlp[0].in_features

    @property
    def in_channels(self) -> int:
        """Channels of the raw input the CNN reads; 0: no CNN (the router reads the body only)."""
        return 0 if self.conv is None else self.conv[0].in_channels

    def body_logits(self, features: torch.Tensor, activations: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_tasks] from the body features [B, feature_dim] and layer activations [B, input_dim], computed in
        the router's dtype."""
        dtype = self.feature_mean.dtype  # the router's own (float32 as fit_router builds it), whatever the body's
        logits = self.linear((features.to(dtype) - self.feature_mean) / self.feature_scale)
        if self.mlp is not None:
            if activations is None:
                raise ValueError(f"this router reads the body's layer activations ({self.input_dim} values) too: "
                                 "pass them (python_layers.routing.predict does)")
            logits = logits + self.mlp((activations.to(dtype) - self.input_mean) / self.input_scale)
        return logits

    def input_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, num_tasks] from the raw input x [B, in_channels, H, W] through the router's CNN."""
        if x is None or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"this router reads the raw input [B, {self.in_channels}, H, W] through its own CNN: "
                             f"pass it (python_layers.routing.predict does), got "
                             f"{None if x is None else tuple(x.shape)}")
        x = x.to(self.pixel_mean.dtype)
        return self.conv((x - self.pixel_mean.view(1, -1, 1, 1)) / self.pixel_scale.view(1, -1, 1, 1))

    def forward(self, features: torch.Tensor, activations: torch.Tensor | None = None,
                x: torch.Tensor | None = None) -> torch.Tensor:
        """Task scores [B, num_tasks] (argmax = the routed task): the body logits, the CNN's logits, or with both
        the sum of their log-softmaxes. ``x``: the raw input, needed when the router has a CNN."""
        if self.conv is None:
            return self.body_logits(features, activations)
        if not bool(self.reads_body):
            return self.input_logits(x)
        return self.body_logits(features, activations).log_softmax(-1) + self.input_logits(x).log_softmax(-1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the MLP's and CNN's sizes come from the state dict (their children load after this, into the right shapes)
        first, last = state_dict.get(prefix + "mlp.0.weight"), state_dict.get(prefix + "mlp.4.weight")
        if first is not None and last is not None:
            hidden, input_dim = first.shape
            if (input_dim, hidden) != (self.input_dim, 0 if self.mlp is None else self.mlp[0].out_features):
                self._set_mlp(int(input_dim), int(hidden))
        elif first is None and self.mlp is not None:  # a linear-only router (or an older checkpoint)
            self._set_mlp(0, 0)
        conv = state_dict.get(prefix + "conv.0.weight")
        in_channels = 0 if conv is None else int(conv.shape[1])
        if in_channels != self.in_channels:
            self._set_conv(in_channels)
        defaults = {name: default for name, default in (("flip", False), ("reads_body", True))
                    if prefix + name not in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a router saved without a flag (an older checkpoint) reads the inputs as they are, through the body
        for name, default in defaults.items():
            getattr(self, name).fill_(default)
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)


def _finished(model) -> int:
    n = int(getattr(model, "num_finished_tasks", 0))
    if n < 1:
        raise ValueError("no task is finished yet: train one with model.train_task(...) before routing")
    return n


def _inputs(batch):
    return batch_inputs(batch, "a routing loader")


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


def _router_layers(model) -> list:
    """The body's Linear, Conv2d and BatchNorm2d layers, in the network's order (none for a model without
    ``body_layers``)."""
    layers = model.body_layers() if hasattr(model, "body_layers") else {}
    return [m for m in layers.values() if isinstance(m, (EideticLinear, EideticConv2d, EideticBatchNorm2d))]


def _summaries(module, output: torch.Tensor) -> list[torch.Tensor]:
    """What the router reads of one layer's output, each [B, channels] float32: a Linear output as it is; a conv
    output's mean and standard deviation over positions; a BatchNorm2d output's mean of relu(output) (what the
    following ReLU passes on) and its maximum over positions. Positions are averaged away because the router
    must not depend on the image size; the spread and the maximum keep some of what the mean alone loses
    (measured on Split CIFAR-10, ``benchmarks/router_study.py``: 3.5 points of routed accuracy)."""
    o = output.float()
    if o.dim() <= 2:
        return [o]
    flat = o.flatten(2)
    if isinstance(module, EideticBatchNorm2d):
        return [flat.clamp_min(0).mean(-1), flat.amax(-1)]
    return [flat.mean(-1), flat.std(-1, correction=0)]


def _features(model, x, num_finished, activations: bool = False):
    """(features, activations or None) of one body pass in the view of every finished task.

    features: [B, feature_dim] in the body's dtype. activations: float32 [B, D], the ``_summaries`` of every
    Linear, Conv2d and BatchNorm2d output of the body in call order (a layer called twice gives both calls), then
    the features; D = Linear widths + 2 x (conv and BatchNorm2d channels) + feature_dim.
    """
    if not activations:
        return model.features(x, view_task=num_finished - 1), None
    seen = []

    def hook(module, args, output):
        seen.extend(_summaries(module, output))

    handles = [m.register_forward_hook(hook) for m in _router_layers(model)]
    try:
        f = model.features(x, view_task=num_finished - 1)
    finally:
        for h in handles:
            h.remove()
    return f, torch.cat([a.float() for a in seen] + [f.float()], 1)


def _standardise(values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> None:
    mean.copy_(values.mean(0))
    # constant (e.g. never-live) values keep scale 1: they carry nothing and must not blow up
    std = values.std(0, correction=0) if values.shape[0] > 1 else torch.ones_like(values[0])
    scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


def _feature_dim(model, x: torch.Tensor, num_finished: int) -> int:
    """Width of the body features (the router's linear layer keeps that shape whatever it reads)."""
    if isinstance(getattr(model, "feature_dim", None), int):
        return model.feature_dim
    with _EvalMode(model):
        return int(_features(model, x, num_finished)[0].shape[1])


def _warm_start(router: TaskRouter, init: TaskRouter) -> None:
    """Copy ``init``'s weights into ``router`` (fewer tasks, the same readers and sizes): every layer as it is,
    the output layers' rows of ``init``'s tasks; the rows of the new tasks keep their fresh init."""
    sizes = lambda r: dict(reads_body=bool(r.reads_body), feature_dim=r.linear.in_features, layer_inputs=r.input_dim,
                           hidden=0 if r.mlp is None else r.mlp[0].out_features, in_channels=r.in_channels)
    mine, theirs = sizes(router), sizes(init)
    if mine != theirs:
        diff = ", ".join(f"{k} {theirs[k]} (this fit: {mine[k]})" for k in mine if mine[k] != theirs[k])
        raise ValueError(f"init: the router to start from reads otherwise or has other sizes: {diff}")
    if not 1 <= init.num_tasks < router.num_tasks:
        raise ValueError(f"init: the router to start from was fitted on {init.num_tasks} tasks; it must have fewer "
                         f"than the {router.num_tasks} finished now")
    # the layers with one row per task: the linear layer on the features, the MLP's and the CNN's last
    outputs = {"linear"} | {f"{name}.{len(seq) - 1}" for name, seq in (("mlp", router.mlp), ("conv", router.conv))
                            if seq is not None}
    theirs = dict(init.named_parameters())
    for name, p in router.named_parameters():
        q = theirs[name].to(device=p.device, dtype=p.dtype)
        if name.rsplit(".", 1)[0] in outputs:
            p[:q.shape[0]].copy_(q)
        else:
            p.copy_(q)


def _random_crop(x: torch.Tensor, pad: int, generator) -> torch.Tensor:
    """[B, C, H, W] -> each input's own random H x W window of it padded by ``pad`` zeros (``pad`` 0: ``x``)."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def _one_cycle(parameters, lr: float, weight_decay: float, steps: int):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)


def _train(logits_of, parameters, n: int, targets: torch.Tensor, class_weight: torch.Tensor, epochs: int,
           batch_size: int, lr: float, weight_decay: float, label_smoothing: float, generator, device) -> list[dict]:
    """Minimise the weighted, smoothed cross entropy of ``logits_of(index)`` against ``targets[index]``: each
    sample's smoothed loss weighted by its task's ``class_weight``. (Not ``F.cross_entropy(weight=...)``, which
    weights the smoothing term of every sample by every class's weight: a task with few inputs, hence a large
    weight, then pulls every sample toward itself and becomes the router's answer for all of them.)"""
    optimizer, schedule = _one_cycle(parameters, lr, weight_decay, epochs * -(-n // batch_size))
    history = []
    for e in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            logits = logits_of(idx)
            weight = class_weight[targets[idx]]
            loss = (F.cross_entropy(logits, targets[idx], label_smoothing=label_smoothing, reduction="none")
                    * weight).sum() / weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * idx.numel()
            correct += int((logits.detach().argmax(-1) == targets[idx]).sum())
        history.append(dict(epoch=e + 1, loss=loss_sum / n, accuracy=correct / n))
    return history


def fit_router(model, loaders, epochs: int = 30, lr: float = 1e-2, batch_size: int = 256,
               weight_decay: float = 0.05, hidden: int = 256, label_smoothing: float = 0.1, flip: bool = False,
               reads: str = "body", conv_epochs: int = 3, conv_lr: float = 3e-3, conv_batch_size: int = 128,
               crop: int = 0, init: TaskRouter | None = None, device=None,
               generator: torch.Generator | None = None) -> list[dict]:
    """Train ``model.router`` to tell the finished tasks apart; returns per-epoch {epoch, loss, accuracy} (of the
    body reader, then of the CNN, each with ``reader`` "body" or "input").

    ``loaders[t]`` (a list or a dict, one per finished task 0..T-1) yields task t's inputs (``x`` or
    ``(x, ...)`` batches; the labels are ignored: the target is ``t``).
    ``reads`` (one of ``ROUTER_INPUTS``): "body" reads the body features and layer activations; "input" reads the
    raw input [B, C, H, W] through the router's own CNN (``_conv``); "both" trains the two readers apart and
    adds their task log-probabilities. The CNN is the router's own: it reads the same inputs, never the body's
    weights, and its training touches no neuron of the body.
    ``hidden``: width of the MLP on the layer activations (0: the linear router on the features alone).
    ``flip``: the router also trains on every input mirrored left-right (``x.flip(-1)``, so images
    ``[B, C, H, W]`` only; for data whose label survives the mirror, e.g. photographs), and ``predict`` averages
    its task probabilities over the input and its mirror (two body passes).
    Training: AdamW with a one-cycle learning rate peaking at ``lr`` (the body reader, ``epochs`` over cached
    float32 features, batch ``batch_size``) or ``conv_lr`` (the CNN, ``conv_epochs`` over the float32 inputs,
    batch ``conv_batch_size``), tasks weighted equally, label smoothing. With one finished task the CNN is not
    trained (there is nothing to tell apart).
    ``crop``: the CNN trains on a random crop of each input padded by ``crop`` zero pixels on every side (a
    fresh position per input and epoch, the input's size kept; 0: the inputs as they are); it predicts on the
    inputs as they are.
    ``init``: warm start from a router fitted on fewer tasks with the same readers and sizes (the router after
    the previous task): every weight starts from it, the output rows of the new tasks from a fresh init; the
    input statistics are measured again on this fit's inputs. The router still trains on every finished task's
    inputs; the body never sees them.
    ``generator``: draws the batch order and the crops (None: torch's global generator). The router's initial
    weights draw from torch's global generator, as any module's: seed both (``torch.manual_seed`` and the
    generator) for a fit that gives the same router again.
    Raises ValueError for a loader list that does not match the finished tasks, bad sizes, an unknown ``reads``,
    no batch, non-finite features, ``flip`` or ``reads`` "input"/"both" with inputs that are not
    ``[B, C, H, W]``, and an ``init`` router that reads otherwise, has other sizes or as many tasks or more;
    TypeError for an ``init`` that is not a TaskRouter (checked before any feature is computed).
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
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("conv_epochs", conv_epochs),
                        ("conv_batch_size", conv_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("hidden", hidden), ("crop", crop)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if reads not in ROUTER_INPUTS:
        raise ValueError(f"reads must be one of {ROUTER_INPUTS}, got {reads!r}")
    if init is not None and not isinstance(init, TaskRouter):
        raise TypeError(f"init must be None or a TaskRouter to warm-start from (model.router, fitted after an "
                        f"earlier task), got {type(init).__name__}")
    flip = bool(flip)
    reads_body, reads_input = reads in ("body", "both"), reads in ("input", "both")
    device = torch.device(device) if device is not None else _model_device(model)

    # The meta-task dataset, as features and layer activations (and the raw inputs for the CNN): the body is
    # fixed, so they are computed once; a router reading the input alone needs no body pass.
    feats, acts, images, targets = [], [], [], []
    with _EvalMode(model):
        for t in range(num_finished):
            if isinstance(loaders[t], torch.Tensor):
                raise ValueError(f"loaders[{t}] must yield batches x [B, ...] or (x, ...) tuples; it is a tensor of "
                                 f"shape {tuple(loaders[t].shape)}, whose iteration gives its rows: pass [X] or a "
                                 "DataLoader instead")
            for batch in loaders[t]:
                x = _inputs(batch).to(device)
                if x.dim() < 2:
                    raise ValueError(f"loaders[{t}] must yield batches x [B, ...] or (x, ...) tuples; it yielded a "
                                     f"tensor of shape {tuple(x.shape)}")
                if flip and x.dim() != 4:
                    raise ValueError(f"flip=True mirrors images [B, C, H, W]; task {t}'s inputs are {tuple(x.shape)}")
                if reads_input and x.dim() != 4:
                    raise ValueError(f"reads={reads!r}: the router's CNN reads images [B, C, H, W]; task {t}'s "
                                     f"inputs are {tuple(x.shape)}")
                for view in (x, x.flip(-1)) if flip else (x,):
                    if reads_body:
                        f, a = _features(model, view, num_finished, activations=hidden > 0)
                        feats.append(f.float())
                        if a is not None:
                            acts.append(a)
                    if reads_input:
                        images.append(view.float())
                    targets.append(torch.full((view.shape[0],), t, dtype=torch.long, device=device))
    if not targets:
        raise ValueError("the routing loaders yielded no batch")
    targets = torch.cat(targets)
    counts = torch.bincount(targets, minlength=num_finished).float()
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the routing loaders of task(s) {empty} yielded no input: the router learns to pick a task "
                         "from that task's inputs, so every finished task needs some (give each loader a few hundred "
                         "inputs of its task)")
    feats = torch.cat(feats) if feats else None
    acts = torch.cat(acts) if acts else None
    images = torch.cat(images) if images else None
    if (feats is not None and not bool(torch.isfinite(feats).all())) or \
            (acts is not None and not bool(torch.isfinite(acts).all())):
        raise ValueError("the features of the finished tasks are not finite; the router cannot be trained on them")

    feature_dim = feats.shape[1] if feats is not None else _feature_dim(model, images[:1], num_finished)
    router = TaskRouter(feature_dim, num_finished, 0 if acts is None else acts.shape[1], hidden,
                        0 if images is None else images.shape[1], reads_body).to(device)
    router.flip.fill_(flip)
    with torch.no_grad():
        if init is not None:
            _warm_start(router, init)
        if feats is not None:
            _standardise(feats, router.feature_mean, router.feature_scale)
        if acts is not None:
            _standardise(acts, router.input_mean, router.input_scale)
        if images is not None:
            _standardise(images.transpose(0, 1).flatten(1).T, router.pixel_mean, router.pixel_scale)
    n = targets.shape[0]
    # balance the tasks: a task with more samples must not become the router's default answer
    class_weight = counts.sum() / (num_finished * counts)
    history = []
    if reads_body:
        body = [router.linear] + ([router.mlp] if router.mlp is not None else [])
        history += [dict(r, reader="body") for r in _train(
            lambda idx: router.body_logits(feats[idx], None if acts is None else acts[idx]),
            [p for m in body for p in m.parameters()], n, targets, class_weight, epochs, batch_size, lr,
            weight_decay, label_smoothing, generator, device)]
    if reads_input and num_finished > 1:
        history += [dict(r, reader="input") for r in _train(
            lambda idx: router.input_logits(_random_crop(images[idx], crop, generator)),
            list(router.conv.parameters()), n, targets, class_weight,
            conv_epochs, conv_batch_size, conv_lr, weight_decay, label_smoothing, generator, device)]
    # it is done: no later backward reaches it, and no gradient is left on it, so an optimizer built later from
    # model.parameters() (weight decay and momentum included) skips it: optimizers step every parameter whose
    # .grad is set, whatever its requires_grad
    router.requires_grad_(False)
    for p in router.parameters():
        p.grad = None
    model.router = router
    return history


def _head_logits(model, features, num_finished) -> list[torch.Tensor]:
    if hasattr(model, "logits"):  # the network's own head path (view mode), as model(x, task=t) uses
        return [model.logits(features, t) for t in range(num_finished)]
    return [model.heads[t](features) for t in range(num_finished)]


def predict(model, x: torch.Tensor, router: str = "learned") -> tuple[torch.Tensor, torch.Tensor]:
    """(tasks, classes), LongTensor[B] each: each sample's routed task and its class under that head.

    Runs in eval mode under ``torch.no_grad`` whatever the model's mode (batch norms normalise with their
    running statistics, none of which moves) and gives the model back in the mode it had. A sample holding
    NaN or inf is not refused: it gets a task and a class like any other, from NaN scores, which mean nothing
    (the other samples of the batch are unaffected); filter such inputs first where that matters.

    Raises ValueError for an unknown ``router``, an input that is not a batch [B, ...] (one sample of the shape the
    body was traced on, unbatched, included), no finished task, and
    ``"learned"`` without a router fitted on every finished task."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"predict expects a batch x [B, ...], got {got}; for one sample pass x.unsqueeze(0)")
    sample = getattr(getattr(model, "graph", None), "input_shape", None)  # one sample's shape, as traced
    if sample is not None and x.dim() == len(sample):  # one sample of what the body was traced on, unbatched
        raise ValueError(f"predict expects a batch x [B, {', '.join(map(str, sample))}] (the body was traced on "
                         f"one), got {tuple(x.shape)}; for one sample pass x.unsqueeze(0)")
    num_finished = _finished(model)
    learned = getattr(model, "router", None)
    if router == "learned":
        if learned is None:
            raise ValueError("no router is fitted: call model.fit_router(loaders) first, or use router='entropy'")
        if learned.num_tasks != num_finished:
            raise ValueError(f"the router was fitted on {learned.num_tasks} tasks but {num_finished} are finished; "
                             "call model.fit_router(loaders) again")
    with _EvalMode(model):
        # one pass of the body (with the layer activations when the router reads them)
        features, activations = _features(model, x, num_finished,
                                          activations=router == "learned" and learned.mlp is not None)
        logits = _head_logits(model, features, num_finished)
        if router == "learned":
            reads_input = learned.conv is not None
            scores = learned(features.float(), activations, x if reads_input else None)
            if bool(learned.flip):  # the mirror's probabilities too (the classes come from the input as it is)
                mirror = x.flip(-1)
                mirrored, mirrored_activations = features, None  # a CNN-only router reads no body features
                if learned.conv is None or bool(learned.reads_body):
                    mirrored, mirrored_activations = _features(model, mirror, num_finished,
                                                               activations=learned.mlp is not None)
                mirrored_scores = learned(mirrored.float(), mirrored_activations, mirror if reads_input else None)
                scores = scores.softmax(-1) + mirrored_scores.softmax(-1)
            tasks = scores.argmax(-1)
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
