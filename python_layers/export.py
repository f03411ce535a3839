"""Export one finished task as a plain torch.nn module: compact dense layers, no eidetic code needed to run it.

``export_task(model, t)`` re-traces the body with torch.fx and rebuilds it for task t alone:

* only the neurons task t's logits depend on are kept (``needed_neurons``: backwards from head t along live
  synapses; with forward transfer that is every neuron of tasks <= t, without it task t's own);
* each Linear/Conv becomes one ``nn.Linear``/``nn.Conv2d`` per block of the block-triangular product (the
  kept rows of a finished task, reading exactly that block's window), so the weights hold exactly the
  synapses task t uses; their outputs are concatenated in neuron order;
* each BatchNorm keeps its kept channels with their running statistics (eval mode);
* activations, pooling, flattening, residual adds and concatenations are the body's own traced ops.

The result is a ``torch.fx.GraphModule`` (``torch.save`` it; it loads with torch alone, and
``torch.export.export`` accepts it where the body's ops allow). It gives task t's logits within fp32
tolerance of ``model(x, task=t)``; ``export_task`` checks that on a random batch before returning.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import EideticBatchNorm2d, EideticConv2d, EideticLayer, EideticLinear
from eidetic_kernels.layers import _EideticBatchNorm
from eidetic_kernels.state import live_inputs, make_table

from .graph import _ROUNDING_BLOCKER, GraphError, Segment, trace_fx
from .network import task_index

__all__ = ["export_task", "needed_neurons"]


def _read_mask(layer: EideticLayer, rows: torch.Tensor) -> torch.Tensor:
    """Bool[in]: the inputs that neurons ``rows`` of ``layer`` read (live synapses)."""
    states = layer.task_state[rows].long()
    lo = layer.min_input_task[rows].long()
    mask = torch.zeros(layer.input_task.numel(), dtype=torch.bool, device=layer.input_task.device)
    for task, low in torch.unique(torch.stack([states, lo], 1), dim=0).tolist():
        mask |= live_inputs(layer.input_task, task, low)
    return mask


def needed_neurons(model, task: int) -> dict[int, torch.Tensor]:
    """{id(group): Bool[size]}: the neurons task ``task``'s logits depend on (batch norms over the raw input:
    every channel, they are input positions)."""
    graph = model.graph
    needed = {id(g): torch.full((g.size,), g.input_normalizer, dtype=torch.bool) for g in graph.groups}

    def mark(segments: list[Segment], features: torch.Tensor) -> bool:
        changed, offset = False, 0
        features = features.cpu()
        for s in segments:
            if s.source is not None:
                hit = features[offset:offset + s.width].view(s.count, s.repeat).any(1)
                grown = needed[id(s.source)] | hit
                if not torch.equal(grown, needed[id(s.source)]):
                    needed[id(s.source)], changed = grown, True
            offset += s.width
        return changed

    head = model.heads[task]
    mark(graph.features, _read_mask(head, torch.arange(head.num_neurons, device=head.task_state.device)))
    changed = True
    while changed:  # each pass only adds neurons: at most sum(sizes) passes
        changed = False
        for name, (layer, segments) in graph.inputs.items():
            rows = needed[id(graph.group_of(name))].nonzero().flatten().to(layer.task_state.device)
            if rows.numel() and mark(segments, _read_mask(layer, rows)):
                changed = True
    return needed


def _reads_the_input(model, task: int) -> bool:
    """Whether task ``task``'s logits depend on the network input: some neuron they read (through live synapses,
    layer after layer) reads a raw input feature. False when a layer on every path keeps none of the neurons the
    task reads there: the logits are then the head's biases."""
    graph = model.graph
    # input positions (a batch norm of the raw input, alone or coupled by a residual add) carry the input
    depends = {id(g): torch.full((g.size,), g.input_normalizer or g.raw_positions, dtype=torch.bool)
               for g in graph.groups}

    def features(segments: list[Segment]) -> torch.Tensor:  # Bool[width]: which features carry the input
        parts = [torch.ones(s.width, dtype=torch.bool) if s.source is None
                 else depends[id(s.source)].repeat_interleave(s.repeat) for s in segments]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def rows_reading(layer, carried: torch.Tensor) -> torch.Tensor:  # Bool[rows]: rows reading a carried feature
        out = torch.zeros(layer.num_neurons, dtype=torch.bool)
        states, lows = layer.task_state.cpu().long(), layer.min_input_task.cpu().long()
        live = (states >= 0) & (states <= task)  # a finished task's view: its neurons and earlier ones
        for state, low in torch.unique(torch.stack([states[live], lows[live]], 1), dim=0).tolist():
            if bool((live_inputs(layer.input_task.cpu(), state, low) & carried).any()):
                out |= live & (states == state) & (lows == low)
        return out

    changed = True
    while changed:  # each pass only adds neurons
        changed = False
        for name, (layer, segments) in graph.inputs.items():
            group = graph.group_of(name)
            grown = depends[id(group)] | rows_reading(layer, features(segments))
            if not torch.equal(grown, depends[id(group)]):
                depends[id(group)], changed = grown, True
    return bool(rows_reading(model.heads[task], features(graph.features)).any())


def _kept_features(segments: list[Segment], needed: dict) -> torch.Tensor:
    """Int64: the features (original positions) a reader of ``segments`` still gets, in their order."""
    parts, offset = [], 0
    for s in segments:
        if s.source is None:
            parts.append(torch.arange(s.width) + offset)
        else:
            kept = needed[id(s.source)].nonzero().flatten()
            parts.append((kept[:, None] * s.repeat + torch.arange(s.repeat)[None, :]).flatten() + offset)
        offset += s.width
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class _Builder:
    """The new graph, its root module and the nodes emitted for each Eidetic layer."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint.replace('.', '_')}_{self.count}"

    def module(self, hint: str, module: nn.Module, *args) -> fx.Node:
        name = self.name(hint)
        self.root.add_module(name, module)
        return self.graph.call_module(name, args)

    def constant(self, hint: str, value: torch.Tensor) -> fx.Node:
        name = self.name(hint)
        self.root.register_buffer(name, value)
        return self.graph.get_attr(name)

    def select(self, x: fx.Node, dim: int, positions: torch.Tensor, width: int, hint: str) -> fx.Node:
        """x[..., positions] along ``dim``: x itself, a slice, or a gather."""
        n = positions.numel()
        if n == width and bool((positions == torch.arange(width)).all()):
            return x
        if n and int(positions[-1]) - int(positions[0]) == n - 1 and bool((positions.diff() == 1).all()):
            return self.graph.call_method("narrow", (x, dim, int(positions[0]), n))
        return self.graph.call_function(torch.index_select, (x, dim, self.constant(hint + "_index", positions)))


def _weighted(builder: _Builder, name: str, layer, x: fx.Node, task: int, rows_kept: torch.Tensor,
              in_kept: torch.Tensor) -> fx.Node:
    """One Linear/Conv per block of ``layer`` as finished task ``task`` sees it, kept rows only."""
    conv = isinstance(layer, EideticConv2d)
    dim = 1 if conv else -1
    position = torch.full((layer.input_task.numel(),), -1, dtype=torch.long)
    position[in_kept] = torch.arange(in_kept.numel())
    kernel = tuple(layer.weight.shape[2:])
    k = 1
    for d in kernel:
        k *= d
    keep = torch.zeros(layer.num_neurons, dtype=torch.bool)
    keep[rows_kept] = True
    outputs, order = [], []
    table = make_table(layer.input_task, layer.task_state, layer.min_input_task, task)
    for blk in table.frozen_blocks:
        rows = blk.rows.cpu()
        sel = keep[rows].nonzero().flatten()
        if sel.numel() == 0:
            continue
        cols = torch.arange(*blk.col_range) if blk.col_range is not None else blk.cols.cpu()
        pos = position[cols]
        if bool((pos < 0).any()):
            raise GraphError(f"export: {name} reads features the export dropped (inconsistent layer graph)")
        n = rows.numel()
        weight = layer.frozen_weight.detach().narrow(0, blk.offset * k, n * blk.width * k)
        weight = weight.view((n, blk.width) + kernel)[sel].clone()
        bias = None if layer.frozen_bias is None else layer.frozen_bias.detach().narrow(0, blk.bias_start, n)[sel]
        if conv:
            part = nn.Conv2d(blk.width, sel.numel(), kernel, layer.stride, layer.padding, layer.dilation,
                             bias=bias is not None)
        else:
            part = nn.Linear(blk.width, sel.numel(), bias=bias is not None)
        part = part.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            part.weight.copy_(weight)
            if bias is not None:
                part.bias.copy_(bias)
        window = builder.select(x, dim, pos, in_kept.numel(), name)
        outputs.append(builder.module(f"{name}_task{blk.task}", part, window))
        order.append(rows[sel])
    if not outputs:
        raise GraphError(f"export: task {task} reads no neuron of {name}, yet its logits depend on the input (a "
                         f"skip connection carries the task's features around {name}); a compact module without "
                         f"{name} is not supported: keep at least one of the task's neurons there, or evaluate with "
                         f"model(x, task={task})")
    y = outputs[0] if len(outputs) == 1 else builder.graph.call_function(torch.cat, (outputs, dim))
    emitted = torch.cat(order)
    if not torch.equal(emitted, rows_kept):  # blocks out of neuron order (a layout that was not renumbered)
        where = torch.empty(layer.num_neurons, dtype=torch.long)
        where[emitted] = torch.arange(emitted.numel())
        y = builder.graph.call_function(torch.index_select, (y, dim, builder.constant(f"{name}_order",
                                                                                      where[rows_kept])))
    return y


def _batch_norm(layer: _EideticBatchNorm, channels: torch.Tensor) -> nn.Module:
    bn_cls = nn.BatchNorm2d if isinstance(layer, EideticBatchNorm2d) else nn.BatchNorm1d
    like = layer.running_mean if layer.running_mean is not None else layer.dense("weight")
    bn = bn_cls(channels.numel(), layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                device=like.device if like is not None else None, dtype=like.dtype if like is not None else None)
    with torch.no_grad():
        if layer.affine:
            bn.weight.copy_(layer.dense("weight")[channels])
            bn.bias.copy_(layer.dense("bias")[channels])
        if layer.running_mean is not None:
            bn.running_mean.copy_(layer.running_mean[channels])
            bn.running_var.copy_(layer.running_var[channels])
            bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    return bn.eval()


# the check's default tolerances (rtol = atol) by the logits' dtype: the blocks sum in another order than the
# network's, so the two differ by a few roundings of that dtype
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def export_task(model, task: int, example: torch.Tensor | None = None, rtol: float | None = None,
                atol: float | None = None) -> fx.GraphModule:
    """A plain torch.nn module (``torch.fx.GraphModule``) computing finished task ``task``'s logits.

    task: an int (or an integer scalar: numpy, a one-element tensor), a finished task.
    example: an input batch to check the export with (default: random, of the shape the body was traced on);
    rtol/atol: the tolerances of that check (default: ``CHECK_TOLERANCE`` of the logits' dtype, 1e-4 in fp32).
    Traced and built in eval mode (``self.training`` read in forward is baked in as False) and returned in eval
    mode; the network keeps its mode and the global RNG its state.
    Raises TypeError for a task that is not an integer, ValueError for a task that is not finished or an empty
    ``example``, GraphError when the body cannot be exported (it ties a constant to feature positions, its code
    assumes full widths, the task's logits read no neuron of the body, or it keeps no neuron of a layer a skip
    connection bypasses) or the check fails.
    """
    if not model.num_finished_tasks:
        raise ValueError(f"no task is finished yet: export a task after model.finish_task() (train_task ends "
                         f"with it), got task={task!r}")
    task = task_index(task, f"export one of the finished tasks 0..{model.num_finished_tasks - 1}")
    if not 0 <= task < model.num_finished_tasks:
        training = (f"; task {task} is prepared and not finished yet (model.finish_task() ends it)"
                    if task == model.current_task else "")
        raise ValueError(f"task must be a finished task (0..{model.num_finished_tasks - 1}), got {task!r}{training}")
    graph = model.graph
    if graph is None:
        raise RuntimeError("the layer graph is not built yet: call model.ensure_graph(x) with a batch first")
    if graph.renumber_blocked_by is not None and "one value per feature" in graph.renumber_blocked_by:
        raise GraphError(f"export: {graph.renumber_blocked_by}; a compact export would misalign it")
    needed = needed_neurons(model, task)
    if not _reads_the_input(model, task):
        raise GraphError(f"export: task {task}'s logits read no neuron of the body, so they are its head's biases "
                         "whatever the input (a layer on every path keeps none of the neurons the task reads: "
                         "finish_task said which); nothing to export")
    # traced and built in eval mode (what a deployed module runs: ``self.training`` read in forward is baked in),
    # with the global RNG as it was (the compact layers' initialisation draws from it before their values are set)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            exported = _build(model, graph, task, needed)
    finally:
        for m, mode in modes:
            m.training = mode
    _check(model, exported, task, example, rtol, atol)
    return exported


def _build(model, graph, task: int, needed: dict) -> fx.GraphModule:
    """The compact module of ``export_task`` (unchecked)."""
    traced = trace_fx(model, model.forward_features)
    builder = _Builder()
    env: dict[fx.Node, fx.Node] = {}
    # the graph's name of each layer: a graph declared on the body names it without the network's "body." prefix
    graph_name = {id(layer): name for name, layer in graph.layers.items()}
    output = None
    for node in traced.graph.nodes:
        if node.op == "output":
            output = node
            continue
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            if isinstance(module, (EideticLinear, EideticConv2d)):
                group = graph.group_of(graph_name[id(module)])
                _, segments = graph.inputs[graph_name[id(module)]]
                env[node] = _weighted(builder, node.target, module, env[node.args[0]], task,
                                      needed[id(group)].nonzero().flatten(), _kept_features(segments, needed))
            elif isinstance(module, _EideticBatchNorm):
                channels = needed[id(graph.group_of(graph_name[id(module)]))].nonzero().flatten()
                env[node] = builder.module(node.target, _batch_norm(module, channels), env[node.args[0]])
            elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
                # (no affine parameters, no running statistics: the tracer allows no other) as a function, which
                # does not compare the kept channels with num_features
                env[node] = builder.graph.call_function(F.instance_norm, (env[node.args[0]],), {"eps": module.eps})
            else:
                env[node] = builder.module(node.target, copy.deepcopy(module).eval(), *[env[a] for a in node.args])
        elif node.op == "get_attr":
            value = traced
            for part in node.target.split("."):
                value = getattr(value, part)
            env[node] = builder.constant(node.target, value.detach().clone()) if isinstance(value, torch.Tensor) \
                else builder.graph.node_copy(node, lambda n: env[n])
        else:
            env[node] = builder.graph.node_copy(node, lambda n: env[n])
    head = model.heads[task]
    logits = _weighted(builder, f"head{task}", head, env[output.args[0]], task,
                       torch.arange(head.num_neurons), _kept_features(graph.features, needed))
    builder.graph.output(logits)
    return fx.GraphModule(builder.root, builder.graph, class_name=f"EideticTask{task}").eval()


def _check(model, exported: nn.Module, task: int, example: torch.Tensor | None, rtol: float, atol: float) -> None:
    graph = model.graph
    if example is None:
        if graph.input_shape is None:
            raise GraphError("export: the graph was declared by hand; pass example=<an input batch> to check it")
        like = next(iter(graph.layers.values())).task_state.device
        dtype = model.heads[task].frozen_bias.dtype if model.heads[task].frozen_bias is not None else torch.float32
        example = torch.randn((4,) + tuple(graph.input_shape), generator=torch.Generator().manual_seed(0),
                              dtype=dtype).to(like)
    if isinstance(example, torch.Tensor) and (example.dim() == 0 or example.shape[0] == 0):
        raise ValueError(f"export: example must be a batch of at least one sample to check the module on, got shape "
                         f"{tuple(example.shape)}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            want = model(example, task=task)
            try:
                # forward, not __call__: fx's wrapper prints the generated code's traceback before re-raising
                got = exported.forward(example)
            except Exception as exc:
                # the op that names a layer width, when the tracer found one (prefix-width evaluation is
                # blocked by the same code)
                reason = model.graph.narrow_blocked_by
                if reason is not None and _ROUNDING_BLOCKER in reason:  # not about widths
                    reason = None
                where = (f": {reason}" if reason is not None
                         else "; the body's code probably assumes full layer widths (a reshape to a fixed size)")
                raise GraphError(f"export: the compact module fails on a batch ({type(exc).__name__}: {exc})"
                                 f"{where}") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    default = CHECK_TOLERANCE.get(want.dtype, 1e-4)
    rtol, atol = (default if t is None else t for t in (rtol, atol))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise GraphError(f"export: the compact module's logits differ from the network's (max |diff| {diff:.3g}, "
                         f"rtol {rtol:g}, atol {atol:g}; pass looser rtol/atol if that is rounding)")
