"""The layer graph of a body: which neurons produce the inputs of every Eidetic layer.

It is found, not declared. ``trace_body`` traces the body with torch.fx (every Eidetic layer
and every torch.nn layer is a leaf), runs the traced graph once on an example batch to learn
the shapes, and propagates per tensor the *provenance* of its feature/channel dim: a list of
segments ``(source, count, repeat)``, where ``source`` is a neuron group (or ``None`` for the
raw network input), ``count`` its number of neurons and ``repeat`` how many consecutive
features each neuron covers (a conv channel flattened into ``H*W`` features). Example: a
conv with 8 channels whose ``[N, 8, 4, 4]`` output is flattened has provenance
``[(conv, 8, 16)]``; ``torch.cat([a, b], 1)`` concatenates the segments of ``a`` and ``b``.

Neuron groups are built with union-find: a Linear/Conv starts a group of its output neurons;
a BatchNorm over those channels joins it (the same neurons); adding (or multiplying) two
tensors couples their sources neuron by neuron, so the two branches of a residual block with
a projection skip, and an identity skip's block input and output, are pruned, frozen and
recycled together (paper Section 3.1, "Residual connections").

Whatever the tracer cannot follow (an op that mixes features, slicing, a module with its own
parameters that is not an Eidetic layer, data-dependent control flow) is a ``GraphError``
naming the op; ``declare_graph`` then states the coupling by hand.
"""
from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from eidetic_kernels import EideticLayer, convert
from eidetic_kernels.layers import EideticConv2d, EideticLinear, _EideticBatchNorm, channels_last_strides
from eidetic_kernels.state import FREE, PRUNED, STATE_DTYPE

from .pruning import fixed_by_user

__all__ = ["GraphError", "NeuronGroup", "LayerGraph", "Segment", "trace_body", "trace_module", "declare_graph"]

_DECLARE_HINT = ("If the body is right as written and the op keeps each neuron's features its own, declare its "
                 "coupling by hand with python_layers.declare_graph(...) and pass it as EideticNetwork(body, "
                 "feature_dim, graph=...); an op that mixes features across neurons (softmax or a norm over "
                 "features, a mean over channels) cannot be made safe that way: a finished task's output would "
                 "change with later tasks' neurons.")


class GraphError(RuntimeError):
    """The layer graph cannot be derived (or a declared one is inconsistent)."""


def feature_norm_error(where: str, kind: str) -> GraphError:
    """The refusal of a norm over the neurons of a layer (LayerNorm, GroupNorm, RMSNorm, local response norm):
    per-neuron task states cannot make it safe, so no hint to declare the graph."""
    return GraphError(
        f"{where} is a {kind}, which EideticNetwork cannot support: it normalises across the neurons of a layer, "
        "so a finished task's outputs would change whenever a later task's neurons change (declaring the graph by "
        "hand would not make it safe). Use BatchNorm1d/2d, which normalises each neuron on its own and keeps a "
        "finished task's statistics, or InstanceNorm1d/2d (affine=False) to normalise each channel per sample")


@dataclass(frozen=True)
class Segment:
    """``count`` neurons of ``source`` (a group; ``None`` = raw input), each covering ``repeat`` features."""

    source: object  # NeuronGroup after building (an int proto id while tracing); None: raw network input
    count: int
    repeat: int = 1

    @property
    def width(self) -> int:
        """Features this segment covers: ``count`` neurons × ``repeat`` (H × W after a flatten)."""
        return self.count * self.repeat


def _width(segments: Iterable[Segment]) -> int:
    return sum(s.width for s in segments)


# ------------------------------------------------------------------------------------------------
# groups and the graph
# ------------------------------------------------------------------------------------------------
class NeuronGroup:
    """Neurons shared by coupled layers: a Linear/Conv and the BatchNorms normalising its channels,
    or the output neurons of residual branches added together. Every member has ``size`` neurons,
    and neuron ``i`` of every member is the same neuron: state changes go through the group."""

    def __init__(self, index: int, members: list[tuple[str, EideticLayer]], graph: "LayerGraph | None" = None):
        if not members:
            raise GraphError("a neuron group needs at least one member layer")
        sizes = {layer.num_neurons for _, layer in members}
        if len(sizes) != 1:
            desc = ", ".join(f"{n} ({layer.num_neurons})" for n, layer in members)
            raise GraphError(f"coupled layers must have the same number of neurons: {desc}")
        self.index = index
        self.members = list(members)
        self.size = sizes.pop()
        # named after its first layer with weights: a batch norm of the raw input coupled with a conv (a residual
        # add) is not what a user widens when the group runs out of capacity
        self.name = next((n for n, layer in members if isinstance(layer, (EideticLinear, EideticConv2d))),
                         members[0][0])
        self._graph = graph
        # batch norm applied directly to the raw input: its frozen channels stay readable by every later
        # task like the raw input itself (so a task may start with none of them free)
        self.input_normalizer = False
        # its neurons are positions of the raw input (a batch norm over it, alone or coupled with a layer by a
        # residual add): never renumbered, since the input cannot move with them
        self.raw_positions = False

    # ----- reading -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[EideticLayer]:
        """The member layers (Linear/Conv and the batch norms of their channels), in ``members`` order."""
        return [layer for _, layer in self.members]

    @property
    def task_state(self) -> torch.Tensor:
        """Int16[size]: FREE, PRUNED or the task that froze each neuron (a copy)."""
        return self.members[0][1].task_state.clone()

    def weight_members(self) -> list[EideticLayer]:
        """Members with synapse weights (Linear/Conv); BatchNorms carry per-channel affine only."""
        return [layer for layer in self.layers if isinstance(layer, (EideticLinear, EideticConv2d))]

    def check_consistent(self) -> None:
        """Raises GraphError when the members' states differ (one member's state was changed alone, e.g. by
        ``layer.prune_neurons`` on a layer coupled with a batch norm): the error names the neurons."""
        first = self.members[0][1].task_state
        for name, layer in self.members[1:]:
            if not torch.equal(layer.task_state, first):
                differ = (layer.task_state != first).nonzero().flatten().tolist()
                shown = ", ".join(str(i) for i in differ[:8]) + (", ..." if len(differ) > 8 else "")
                raise GraphError(f"coupled layers {self.name} and {name} disagree on the states of neurons {shown}; "
                                 "change states through the group, which changes every member (model.groups: "
                                 "group.prune(idx), not layer.prune_neurons(idx) on one member)")

    # ----- state changes: every member at once, then the consumers' inputs -----------------------
    def _index(self, neurons) -> torch.Tensor:
        return self.members[0][1]._indices(neurons)

    def prune(self, neurons) -> None:
        """FREE -> PRUNED in every member (neuron ids in 0..size-1, or a bool mask).

        Raises ValueError (changing nothing) for a neuron that is not FREE, and for a group with a member the
        user froze (``requires_grad=False``: ``python_layers.pruning.fixed_by_user``)."""
        idx = self._index(neurons)
        fixed = [name for name, layer in self.members if fixed_by_user(layer)]
        if fixed and idx.numel():
            # the user froze it (a pretrained stem): pruning would zero outputs the user meant to keep as they are
            raise ValueError(f"group {self.name}: {fixed[0]} is frozen by the user (requires_grad=False on all its "
                             f"parameters), so its neurons are never pruned. Call {fixed[0]}.requires_grad_(True) "
                             f"first to prune it. Nothing was pruned")
        self.members[0][1].prune_neurons(idx)  # validates (only FREE) before anything else changes
        for _, layer in self.members[1:]:
            layer.prune_neurons(idx)
        self._changed()

    def unprune(self, neurons) -> None:
        """PRUNED -> FREE in every member, keeping stored values (undo a pruning step)."""
        idx = self._index(neurons)
        self.members[0][1].unprune_neurons(idx)
        for _, layer in self.members[1:]:
            layer.unprune_neurons(idx)
        self._changed()

    def freeze(self, task: int) -> int:
        """FREE -> ``task`` in every member; returns the number of neurons frozen."""
        n = self.members[0][1].freeze_free_neurons(task)
        for _, layer in self.members[1:]:
            layer.freeze_free_neurons(task)
        self._changed()
        return n

    def recycle(self, generator: torch.Generator | None = None) -> int:
        """PRUNED -> FREE with torch's default init in every member; returns how many."""
        n = self.members[0][1].recycle_pruned_neurons(generator)
        for _, layer in self.members[1:]:
            layer.recycle_pruned_neurons(generator)
        self._changed()
        return n

    def _changed(self) -> None:
        if self._graph is not None:
            self._graph.sync_inputs()

    def __repr__(self) -> str:
        names = ", ".join(n for n, _ in self.members)
        return f"NeuronGroup({self.index}, size={self.size}, members=[{names}])"


def _segment_states(segments: list[Segment], device, override: dict | None = None) -> torch.Tensor:
    """Int16[width]: the state of every feature a segment list describes (raw input: task 0).

    ``override``: {id(group): state vector} used instead of those groups' current states.
    """
    parts = []
    for s in segments:
        if s.source is None:
            state = torch.zeros(s.count, dtype=STATE_DTYPE, device=device)
        elif override is not None and id(s.source) in override:
            state = override[id(s.source)].to(device)
        else:
            state = s.source.members[0][1].task_state.to(device)
        parts.append(state.repeat_interleave(s.repeat) if s.repeat != 1 else state)
    if not parts:
        return torch.zeros(0, dtype=STATE_DTYPE, device=device)
    return torch.cat(parts)


class LayerGraph:
    """Neuron groups, what each Eidetic layer reads, and what the body outputs.

    ``inputs[name]`` is (layer, segment list of the features it reads); ``features`` the segment
    list of the body output. ``raw_input_layers`` are the layers reading the raw input (directly or
    through a batch norm over it): their ``min_input_task`` stays 0 even without forward transfer,
    since raw inputs belong to task 0. ``heads`` (set by EideticNetwork) are layers reading the body
    output: ``sync_inputs`` keeps their ``input_task`` current too.

    ``renumber_blocked_by``: why the neurons of this graph must keep their positions (None: they can be
    renumbered task-major, see ``renumber_task_major``): the body ties a constant to feature positions,
    or the graph was declared by hand without saying it may be renumbered.

    ``narrow_blocked_by``: why a finished task cannot be evaluated at prefix width (None: it can, see
    ``EideticNetwork.forward``): only a traced body whose computation does not depend on the size of its
    feature dims can; a declared graph says nothing about the body's code.
    """

    def __init__(self, groups: list[NeuronGroup], inputs: dict[str, tuple[EideticLayer, list[Segment]]],
                 features: list[Segment], raw_input_layers: set[str], renumber_blocked_by: str | None = None):
        self.renumber_blocked_by = renumber_blocked_by
        self.narrow_blocked_by: str | None = "the body was not traced"
        self.body_ops: list[str] | None = None  # what the traced body computes, op by op (see body_ops)
        self.input_shape: tuple[int, ...] | None = None  # one sample's shape, when traced from a batch
        self.groups = groups
        for g in groups:
            g._graph = self
        self.inputs = inputs
        self.features = features
        self.feature_dim = _width(features)
        self.raw_input_layers = set(raw_input_layers)
        self.heads: Iterable[EideticLayer] = ()
        self._group_of = {name: g for g in groups for name, _ in g.members}

    @property
    def layers(self) -> dict[str, EideticLayer]:
        """Every Eidetic layer of the body by qualified name (group members and consumers)."""
        out = {name: layer for g in self.groups for name, layer in g.members}
        out.update({name: layer for name, (layer, _) in self.inputs.items()})
        return out

    def group_of(self, name: str) -> NeuronGroup:
        """The neuron group of layer ``name`` (its qualified name in the network, as ``model.groups`` shows it).
        KeyError naming the graph's layers for another name."""
        try:
            return self._group_of[name]
        except KeyError:
            raise KeyError(f"{name!r} is no layer of the layer graph: name one of {sorted(self._group_of)}") \
                from None

    def feature_task(self, override: dict | None = None) -> torch.Tensor:
        """Int16[feature_dim]: the state of each body output feature (raw input features: task 0)."""
        device = self.groups[0].members[0][1].task_state.device if self.groups else None
        return _segment_states(self.features, device, override)

    def input_task(self, name: str) -> torch.Tensor:
        """Int16[in_features or in_channels]: the state of each input of layer ``name``, from its producers'
        states (raw network inputs: task 0), on the layer's device."""
        layer, segments = self.inputs[name]
        return _segment_states(segments, layer.input_task.device)

    def sync_inputs(self, override: dict | None = None) -> None:
        """Push every producer's states into each consumer's ``input_task`` (heads included).

        ``override``: {id(group): state vector} to push instead of those groups' current states (finishing a
        task sets every consumer's inputs to the states after freezing before any layer freezes).
        Cheap when nothing changed: a layer's cached plans are dropped only when its inputs moved.
        """
        if override is None:
            for g in self.groups:
                g.check_consistent()
        for name, (layer, segments) in self.inputs.items():
            _set_input(layer, _segment_states(segments, layer.input_task.device, override))
        heads = list(self.heads)
        if heads:
            features = self.feature_task(override)
            for head in heads:
                _set_input(head, features)

    # ----- task-major renumbering ------------------------------------------------------------------------
    def task_major_permutations(self) -> dict:
        """{id(group): perm} that moves each group's FREE neurons before its PRUNED ones, both in index
        order, over the positions the trainable (FREE and PRUNED) neurons hold; frozen neurons stay.

        Called by ``finish_task`` before freezing: the FREE neurons become the task's block right after
        the earlier tasks' blocks, and the PRUNED ones the trailing FREE capacity. Groups that are already
        in that order, and groups whose neurons are raw input positions (a batch norm over the raw input,
        also when a residual add couples it with a layer), are left out. Empty when ``renumber_blocked_by`` is set.
        """
        perms = {}
        if self.renumber_blocked_by is not None:
            return perms
        for g in self.groups:
            if g.input_normalizer or g.raw_positions:
                continue
            state = g.members[0][1].task_state
            positions = ((state == FREE) | (state == PRUNED)).nonzero().flatten()
            trainable = state[positions]
            order = torch.cat([positions[trainable == FREE], positions[trainable == PRUNED]])
            if torch.equal(order, positions):
                continue
            perm = torch.arange(g.size, device=state.device)
            perm[positions] = order
            perms[id(g)] = perm
        return perms

    def column_permutation(self, segments: list[Segment], perms: dict, device) -> torch.Tensor | None:
        """Int64[width]: the input permutation of a reader of ``segments`` when groups renumber by ``perms``
        (each neuron's ``repeat`` features move together); None when no feature moves."""
        parts, offset, moved = [], 0, False
        for s in segments:
            perm = perms.get(id(s.source)) if s.source is not None else None
            if perm is None:
                index = torch.arange(s.width, device=device)
            else:
                moved = True
                perm = perm.to(device)
                index = (perm[:, None] * s.repeat + torch.arange(s.repeat, device=device)[None, :]).flatten()
            parts.append(index + offset)
            offset += s.width
        return torch.cat(parts) if moved else None

    def apply_permutations(self, perms: dict) -> torch.Tensor | None:
        """Renumber every member of each group in ``perms`` and every reader (consumers and heads) alike.
        Returns the permutation of the body output features (None when none moved)."""
        for g in self.groups:
            if id(g) in perms:
                for layer in g.layers:
                    layer.permute_neurons(perms[id(g)])
        for layer, segments in self.inputs.values():
            cols = self.column_permutation(segments, perms, layer.input_task.device)
            if cols is not None:
                layer.permute_inputs(cols)
        device = self.groups[0].members[0][1].task_state.device if self.groups else None
        features = self.column_permutation(self.features, perms, device)
        if features is not None:
            for head in self.heads:
                head.permute_inputs(features)
        return features

    # ----- a plain-python description (travels in EideticNetwork's state dict) ----------------------------
    def to_spec(self, name_of: dict[int, str] | None = None) -> dict:
        """Groups, inputs and features as plain python (names via ``name_of[id(layer)]`` when given)."""
        def lname(name, layer):
            return name_of.get(id(layer), name) if name_of is not None else name

        index = {id(g): i for i, g in enumerate(self.groups)}

        def segs(segments):
            return [[None if s.source is None else index[id(s.source)], s.count, s.repeat] for s in segments]

        layer_names = {name: lname(name, layer) for name, layer in self.layers.items()}
        return {
            "groups": [{"name": g.name, "members": [lname(n, layer) for n, layer in g.members],
                        "input_normalizer": g.input_normalizer, "raw_positions": g.raw_positions}
                       for g in self.groups],
            "inputs": [[lname(n, layer), segs(segments)] for n, (layer, segments) in self.inputs.items()],
            "features": segs(self.features),
            "raw_input_layers": sorted(layer_names[n] for n in self.raw_input_layers),
            "renumber_blocked_by": self.renumber_blocked_by,
            "narrow_blocked_by": self.narrow_blocked_by,
            "rounding_checked": True,  # narrow_blocked_by covers ops that round by width
            "body_ops": self.body_ops,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }

    @classmethod
    def from_spec(cls, spec: dict, owner: nn.Module) -> "LayerGraph":
        """Rebuild a graph from ``to_spec`` output, looking the layers up in ``owner`` by name."""
        def layer(name):
            try:
                module = owner.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, EideticLayer):
                raise GraphError(f"the saved layer graph names {name!r}, which is not an Eidetic layer of this "
                                 "network: the state dict is for another architecture")
            return module

        groups = []
        for i, g in enumerate(spec["groups"]):
            group = NeuronGroup(i, [(n, layer(n)) for n in g["members"]])
            group.name = g["name"]
            group.input_normalizer = bool(g.get("input_normalizer", False))
            group.raw_positions = bool(g.get("raw_positions", group.input_normalizer))
            groups.append(group)

        def segs(items):
            return [Segment(None if src is None else groups[src], int(count), int(repeat))
                    for src, count, repeat in items]

        inputs = {n: (layer(n), segs(items)) for n, items in spec["inputs"]}
        # a spec without the key comes from a first-version checkpoint: that graph keeps its neurons' positions
        blocked = spec.get("renumber_blocked_by", "the checkpoint predates task-major renumbering")
        graph = cls(groups, inputs, segs(spec["features"]), set(spec["raw_input_layers"]), renumber_blocked_by=blocked)
        graph.narrow_blocked_by = spec.get("narrow_blocked_by", "the checkpoint predates prefix-width evaluation")
        if graph.narrow_blocked_by is None and not spec.get("rounding_checked", False):
            # traced before ops that round by width were looked for: look now, in the body's code (any such op,
            # on features or not: the spec no longer says which tensors hold features)
            graph.narrow_blocked_by = _rounding_op_in(owner)
        shape = spec.get("input_shape")
        graph.input_shape = None if shape is None else tuple(shape)
        graph.body_ops = spec.get("body_ops")
        return graph

    def describe(self) -> str:
        """A readable listing of the graph: each group's size and members, then each layer's input segments."""
        lines = []
        for g in self.groups:
            lines.append(f"group {g.index} {g.name}: {g.size} neurons, members {[n for n, _ in g.members]}")
        for name, (_, segments) in self.inputs.items():
            lines.append(f"{name} reads {_describe(segments)}")
        lines.append(f"features: {_describe(self.features)}")
        return "\n".join(lines)

    __str__ = describe


def _describe(segments: list[Segment]) -> str:
    parts = []
    for s in segments:
        src = "raw input" if s.source is None else s.source.name
        parts.append(f"{src}[{s.count}]" + (f"x{s.repeat}" if s.repeat != 1 else ""))
    return " + ".join(parts) if parts else "nothing"


def _set_input(layer: EideticLayer, states: torch.Tensor) -> None:
    if states.numel() != layer.input_task.numel():
        raise GraphError(f"{type(layer).__name__} reads {layer.input_task.numel()} features but its producers "
                         f"give {states.numel()}")
    if not torch.equal(layer.input_task, states.to(layer.input_task.device)):
        layer.set_input_task(states)


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.PReLU, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d)
_RESHAPE_MODULES = (nn.Flatten,)
# ops over the spatial dims of each channel alone: resizing, padding, per-sample per-channel normalisation
_SPATIAL_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d,
                    nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.CircularPad1d, nn.CircularPad2d, nn.InstanceNorm1d,
                    nn.InstanceNorm2d)
_SPATIAL_FUNCTIONS = {F.interpolate, F.upsample, F.pad}
# norms whose statistics run over the channel (neuron) dim: every output reads every neuron of the layer
_FEATURE_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.RMSNorm)
_FEATURE_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.local_response_norm, F.rms_norm}
# moves of values inside each channel when their dims are spatial ones only (checked by ``spatial_dims``)
_MOVE_FUNCTIONS = {torch.roll, torch.flip}
_MOVE_METHODS = {"roll", "flip"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.celu, F.selu, F.leaky_relu, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.mish, F.softplus, F.softsign, F.tanhshrink, F.sigmoid, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp, torch.clamp,
    torch.clip, torch.dropout, torch.square, torch.sqrt, torch.nn.functional.logsigmoid,
    operator.neg, operator.pos, abs,
}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.lp_pool2d,
                   torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
                     torch.true_divide, torch.maximum, torch.minimum,
                     # comparisons: elementwise and exact (a mask for torch.where or masked_fill)
                     operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, torch.gt, torch.lt,
                     torch.ge, torch.le, torch.eq, torch.ne, torch.greater, torch.less, torch.greater_equal,
                     torch.less_equal, torch.not_equal}
_SELECT_FUNCTIONS = {torch.where}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_STACK_FUNCTIONS = {torch.stack, torch.hstack, torch.vstack, torch.dstack, torch.column_stack, torch.row_stack}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}

# Elementwise ops whose CPU kernels round an element differently in their vectorised loop and in its scalar
# remainder (transcendental functions: sigmoid, exp, erf, log1p, pow...). Which path an element takes depends on
# its offset in the flattened tensor, so at prefix width (fewer features per row) a finished task's neuron can get
# other bits than at full width: measured on an AVX2 CPU for sigmoid, SiLU, GELU, Mish and Softplus (1e-8 apart).
# Exactly rounded ops (+, -, *, /, sqrt, max/min, clamp, relu, hardswish, leaky_relu) give the same bits on
# either path. A body with any of these is evaluated at full width.
_ROUNDING_BY_WIDTH_MODULES = (nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus,
                              nn.Tanhshrink, nn.LogSigmoid, nn.LPPool1d, nn.LPPool2d)
_ROUNDING_BY_WIDTH_FUNCTIONS = {F.gelu, F.silu, F.elu, F.celu, F.selu, F.mish, F.softplus, F.tanhshrink, F.sigmoid,
                                F.tanh, F.logsigmoid, F.lp_pool1d, F.lp_pool2d, torch.sigmoid, torch.tanh,
                                torch.exp}
_ROUNDING_BY_WIDTH_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_"}
_ROUNDING_BLOCKER = "whose CPU rounding depends on the tensor's width"
# interpolation that weighs neighbours: torch's CPU kernels vectorise it by channel count (nearest copies values)
_INTERPOLATING_MODES = ("linear", "bilinear", "bicubic", "trilinear")
_POW_FUNCTIONS = {operator.pow, torch.pow}
# exponents torch computes with exactly rounded ops (x*x, x*x*x, sqrt, 1/x, 1/(x*x), 1/sqrt)
_EXACT_POWERS = (0, 1, 2, 3, 0.5, -0.5, -1, -2)

_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "clamp",
                        "clamp_", "clip", "square", "sqrt", "contiguous", "clone", "float", "to", "type_as",
                        "detach"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "__add__", "__radd__",
                   "__mul__", "__rmul__", "__sub__", "__rsub__", "__truediv__", "maximum", "minimum",
                   "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "masked_fill"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_NONTENSOR_METHODS = {"size", "dim", "numel"}
# methods of a constant that take only the shape, dtype or device of their tensor argument
_LIKE_METHODS = {"expand_as", "view_as", "reshape_as", "type_as", "to", "new_zeros", "new_ones", "new_full",
                 "new_empty"}

_NONTENSOR = object()  # a node whose value is not a tensor (a size, an int)
_CONST = object()      # a tensor that does not come from the input (a buffer, a constant)
_RAW_PARTS = object()  # a tuple of tensors computed from the raw input alone (x.split(...), x.chunk(...))


class _Tracer(fx.Tracer):
    """Eidetic layers and torch.nn layers are leaves; module names come from ``owner``."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self._names = {id(m): name for name, m in owner.named_modules()}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, EideticLayer) or super().is_leaf_module(m, module_qualified_name)

    def path_of_module(self, mod: nn.Module) -> str:
        name = self._names.get(id(mod))
        if name is None:
            raise GraphError(f"{type(mod).__name__} is called in the body but is not a submodule of it")
        return name


class _Root(nn.Module):
    """Traceable stand-in whose forward is ``fn`` (e.g. a network's forward_features)."""

    def __init__(self, fn: Callable):
        super().__init__()
        object.__setattr__(self, "_fn", fn)

    def forward(self, x):
        return self._fn(x)


class _Propagator:
    """Walks the traced graph once, propagating provenance and building proto groups (union-find)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.size: list[int] = []
        self.members: list[list[tuple[str, EideticLayer]]] = []
        self.parent: list[int] = []
        self.inputs: dict[str, tuple[EideticLayer, list[Segment]]] = {}
        self.raw_input_layers: set[str] = set()
        self.env: dict[fx.Node, object] = {}
        self.seen_layers: dict[int, str] = {}
        self.normalizers: set[int] = set()  # protos of batch norms over the raw input
        self.per_feature_constants: list[str] = []  # ops tying a constant to feature positions
        self.narrow_blockers: list[str] = []  # ops that prefix-width evaluation would change

    # ----- union-find ------------------------------------------------------------------------------
    def new_proto(self, name: str, layer: EideticLayer) -> int:
        self.size.append(layer.num_neurons)
        self.members.append([(name, layer)])
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, p: int) -> int:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: int, b: int, node: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise GraphError(f"{_node_desc(node)} couples {self.members[ra][0][0]} ({self.size[ra]} neurons) with "
                             f"{self.members[rb][0][0]} ({self.size[rb]} neurons); coupled layers need equal widths")
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.members[lo].extend(self.members[hi])
        self.members[hi] = []

    # ----- helpers -----------------------------------------------------------------------------------
    def shape(self, node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def value(self, arg):
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, torch.Tensor):
            return _CONST
        return _NONTENSOR

    def provenance(self, arg, node) -> list[Segment]:
        v = self.value(arg)
        if not isinstance(v, list):
            raise GraphError(f"{_node_desc(node)}: expected a tensor computed from the input. {_DECLARE_HINT}")
        return v

    def tensor_args(self, node) -> list:
        """The node's arguments that hold features, also inside lists, tuples and dicts (``torch.stack([h, h])``
        takes its tensors in a list: a rule that looked at the top level only took it for a constant)."""
        return [a for a in _nodes_in(node) if isinstance(self.value(a), list) or self.value(a) is _RAW_PARTS]

    def raw_only(self, node):
        """A function, method or stateless module whose every feature operand is raw network input, which belongs
        to no neuron: the input is the same for every task and never renumbered, so whatever the op does with it
        (x.permute(0, 3, 1, 2) for channels-last data, x.split(...) into the inputs of two branches, x.roll or a
        norm over the input features) changes no task's output. Its result is raw input too: a segment as wide as its dim 1, or
        ``_RAW_PARTS`` for a tuple. None when some operand holds neurons' features, none holds features, the op
        writes in place or also reads a buffer or constant tensor (it may write one, as F.batch_norm's running
        statistics: left to the other rules), or the result is not [N, features, ...]."""
        found = self.tensor_args(node)
        if (not found or "out" in node.kwargs or (isinstance(node.target, str) and node.target.endswith("_"))
                or any(self.value(a) is _CONST for a in _nodes_in(node))):
            return None
        for a in found:
            v = self.value(a)
            if v is not _RAW_PARTS and any(seg.source is not None for seg in v):
                return None
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and meta and all(len(getattr(m, "shape", ())) >= 2 for m in meta):
            return _RAW_PARTS
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        return [Segment(None, shape[1], 1)]

    # ----- node rules ----------------------------------------------------------------------------------
    def run(self, graph: fx.Graph) -> list[Segment]:
        output = None
        placeholders = 0
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = self.shape(node)
                if shape is None:
                    self.env[node] = _NONTENSOR
                    continue
                placeholders += 1
                if len(shape) < 2:
                    raise GraphError(f"the body input {node.name} has shape {shape}; expected a batch [N, features, ...] "
                                     "(for one sample pass x.unsqueeze(0))")
                self.env[node] = [Segment(None, shape[1], 1)]
            elif node.op == "get_attr":
                self.env[node] = _CONST if self.shape(node) is not None else _NONTENSOR
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op == "call_function":
                self.env[node] = self.call_function(node)
            elif node.op == "call_method":
                self.env[node] = self.call_method(node)
            elif node.op == "output":
                output = node
        if output is None:
            raise GraphError("the traced body has no output")
        result = output.args[0]
        prov = self.value(result)
        if not isinstance(prov, list):
            raise GraphError(f"the body must return one tensor [N, feature_dim] computed from its input; it returns "
                             f"{type(result).__name__}: return the features alone (for a body that returns more, "
                             "wrap it in a module whose forward returns body(x)[0], or override the network's "
                             "forward_features)")
        shape = self.shape(result)
        if shape is None or len(shape) != 2:
            raise GraphError(f"the body must return [N, feature_dim], got shape {shape}; flatten or pool it first")
        for node in graph.nodes:
            why = self.narrow_blocker(node)
            if why is not None:
                self.narrow_blockers.append(why)
        # a size the body reads first: export's error names it when the compact module fails on a batch
        self.narrow_blockers.sort(key=lambda why: _ROUNDING_BLOCKER in why)
        return prov

    # ----- prefix-width evaluation -----------------------------------------------------------------
    def _features_of_neurons(self, arg) -> bool:
        v = self.value(arg) if isinstance(arg, fx.Node) else None
        return isinstance(v, list) and any(s.source is not None for s in v)

    def _raw(self, arg) -> bool:
        v = self.value(arg) if isinstance(arg, fx.Node) else None
        return isinstance(v, list) and all(s.source is None for s in v)

    def narrow_blocker(self, node) -> str | None:
        """Why evaluating a finished task with activations of prefix width would change what ``node`` computes
        (None: it would not). At prefix width a tensor of neurons keeps only the neurons of tasks <= t, so the
        body must not depend on the feature dim's size: no size other than the batch's read from such a tensor,
        reshapes that say -1 for the merged feature dim, no concatenation of features, no squeeze without a dim."""
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            return None
        if self._raw(node) and _channels_innermost(node) and not any(
                self._raw(a) and _channels_innermost(a) for a in _nodes_in(node)):
            # the network checks a channels_last input and channels_last convs on every call; this layout is
            # made in the body from an input that is not (x.permute(0, 3, 1, 2) of [N, H, W, C] images)
            return (f"{_node_desc(node)} makes the input channels_last (channels innermost), and the layers' "
                    f"outputs follow: pooling and means vectorise over channels, {_ROUNDING_BLOCKER}")
        x = node.args[0]
        if not self._features_of_neurons(x):
            if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
                tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
                if isinstance(tensors, fx.Node):  # a tuple computed in the body (torch.cat(x.split(2, 1)[::-1]))
                    tensors = [tensors]
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                if dim % len(self.shape(node) or (0, 0)) == 1 and any(self._features_of_neurons(t) for t in tensors):
                    return f"{_node_desc(node)} concatenates features"
            return None
        target = node.target
        ndim = len(self.shape(x) or ())

        def batch_only(index) -> bool:  # a size of the batch dim: the same at any width
            return isinstance(index, int) and index in (0, -ndim)

        def batch_items(n) -> bool:  # every use of a size tuple reads its batch entry only
            return all(u.op == "call_function" and u.target is operator.getitem and batch_only(u.args[1])
                       for u in n.users)

        rounding = _rounds_by_width(self.owner, node)
        if rounding is not None:
            return (f"{_node_desc(node)} computes {rounding}, {_ROUNDING_BLOCKER} (vectorised and scalar code "
                    f"round it differently), so prefix width could change a finished task's bits")
        if node.op == "call_method" and target in ("contiguous", "to"):
            fmt = node.kwargs.get("memory_format", node.args[1] if target == "contiguous" and len(node.args) > 1
                                  else None)
            if fmt is not None and fmt not in (torch.contiguous_format, torch.preserve_format):
                return (f"{_node_desc(node)} changes the features' memory format: in channels_last, pooling and "
                        f"means vectorise over channels, {_ROUNDING_BLOCKER}")
        if node.op == "call_method" and target in ("size", "numel"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if target == "size" and (batch_only(dim) or (dim is None and batch_items(node))):
                return None
            return f"{_node_desc(node)} reads the feature count"
        if node.op == "call_function" and target is getattr and node.args[1:2] == ("shape",):
            return None if batch_items(node) else f"{_node_desc(node)} reads the feature count"
        if node.op == "call_function" and target in (len,):
            return None
        if (node.op == "call_method" and target in ("view", "reshape")) or \
                (node.op == "call_function" and target is torch.reshape):
            sizes = list(node.args[1:]) or list(node.kwargs.get("shape", ()))
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            if len(sizes) >= 2 and sizes[1] == -1:
                return None
            return f"{_node_desc(node)} names the feature count (write -1 for the feature dim)"
        if node.op == "call_module" and isinstance(self.owner.get_submodule(target),
                                                   nn.modules.instancenorm._InstanceNorm):
            return f"{_node_desc(node)} compares the channel count with its num_features"
        if (node.op == "call_method" and target == "squeeze") or target is torch.squeeze:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None or (isinstance(dim, int) and dim in (1, -len(self.shape(x) or ()) + 1)):
                return f"{_node_desc(node)} may squeeze the feature dim"
        return None

    def call_module(self, node):
        module = self.owner.get_submodule(node.target)
        name = node.target
        if isinstance(module, EideticLayer):
            if id(module) in self.seen_layers:
                raise GraphError(f"layer {name} is called twice in the body; weight sharing between places of the "
                                 f"graph cannot be split into per-neuron states. {_DECLARE_HINT}")
            self.seen_layers[id(module)] = name
        if (not isinstance(module, EideticLayer) and next(module.parameters(), None) is None
                and next(module.buffers(), None) is None):
            raw = self.raw_only(node)  # a module with no state of its own on the raw input alone (nn.Softmax)
            if raw is not None:
                return raw
        if isinstance(module, (EideticLinear, EideticConv2d)):
            prov = self.provenance(node.args[0], node)
            in_shape = self.shape(node.args[0])
            n_in = module.in_features if isinstance(module, EideticLinear) else module.in_channels
            if isinstance(module, EideticLinear) and in_shape is not None and len(in_shape) != 2:
                raise GraphError(f"{name} (EideticLinear) reads a {len(in_shape)}-D tensor {in_shape}; the tracer "
                                 f"follows linear layers over [N, features] only. {_DECLARE_HINT}")
            if isinstance(module, EideticConv2d) and in_shape is not None and len(in_shape) == 3:
                raise GraphError(f"{name} (EideticConv2d) reads an unbatched input {in_shape}; the layer graph is "
                                 f"traced on the first batch the network sees, which must be batched [N, C, H, W] "
                                 f"(for one sample pass x.unsqueeze(0)); unbatched inputs work once it is traced")
            if _width(prov) != n_in:
                raise GraphError(f"{name} reads {n_in} features but the tracer found {_width(prov)} producers")
            self.inputs[name] = (module, prov)
            if any(s.source is None for s in prov):
                self.raw_input_layers.add(name)
            return [Segment(self.new_proto(name, module), module.num_neurons, 1)]
        if isinstance(module, _EideticBatchNorm):
            prov = self.provenance(node.args[0], node)
            if len(prov) == 1 and prov[0].repeat == 1 and prov[0].count == module.num_neurons:
                seg = prov[0]
                if seg.source is None:  # batch norm of the raw input: its channels are neurons of their own
                    proto = self.new_proto(name, module)
                    self.normalizers.add(proto)
                    return [Segment(proto, module.num_neurons, 1)]
                root = self.find(seg.source)
                self.members[root].append((name, module))
                return [Segment(root, seg.count, 1)]
            raise GraphError(f"{name} (batch norm) normalises features from {len(prov)} producer segments "
                             f"({_describe_proto(self, prov)}); it must follow one Linear/Conv (or the raw input) "
                             f"whose neurons are its channels: after a concatenation (as in DenseNet), put one "
                             f"batch norm on each branch before torch.cat instead")
        if isinstance(module, _FEATURE_NORM_MODULES) and self.mixes_neurons(node, module) is not None:
            if self.mixes_neurons(node, module):
                raise self.refuse_feature_norm(node, f"{name} ({type(module).__name__})")
            return self.spatial(node, node.args[0])  # over each channel's own spatial values (no parameters here)
        if isinstance(module, _ELEMENTWISE_MODULES):
            # (PReLU's parameter is shared by every task: EideticNetwork rejects it as a stray parameter)
            return self.provenance(node.args[0], node)
        if isinstance(module, _POOL_MODULES):
            return self.same_channels(node, node.args[0])
        if isinstance(module, _RESHAPE_MODULES):
            return self.reshape(node, node.args[0])
        if isinstance(module, _SPATIAL_MODULES):
            if isinstance(module, nn.modules.instancenorm._InstanceNorm):
                if module.affine or module.track_running_stats:
                    raise GraphError(f"{name} ({type(module).__name__}) has affine parameters or running "
                                     "statistics, which every task would share and later tasks would change; use "
                                     "affine=False, track_running_stats=False (the defaults), or a BatchNorm")
                shape, want = self.shape(node.args[0]), 3 if isinstance(module, nn.InstanceNorm1d) else 4
                if shape is not None and len(shape) != want:
                    raise GraphError(f"{name} ({type(module).__name__}) normalises a {len(shape)}-D tensor {shape}: "
                                     "torch reads it as unbatched and normalises across the features (neurons), "
                                     f"which would mix tasks; give it {'[N, C, L]' if want == 3 else '[N, C, H, W]'}")
            return self.spatial(node, node.args[0])
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            raise GraphError(f"{name} is a plain {type(module).__name__}; convert the body first with "
                             "eidetic_kernels.convert(body) (EideticNetwork does this for you)")
        if any(True for _ in module.parameters(recurse=False)):
            raise GraphError(f"{name} is a {type(module).__name__}, a layer with parameters that EideticNetwork does "
                             "not support: its weights would belong to no task and change with every later task. "
                             "Supported layers: Linear, Conv2d (groups=1), BatchNorm1d/2d; parameter-free modules "
                             "(activations, pooling, dropout, flatten) may sit between them")
        raise GraphError(f"the tracer cannot follow module {name} ({type(module).__name__}): it may mix features. "
                         f"{_DECLARE_HINT}")

    def call_function(self, node):
        fn = node.target
        raw = self.raw_only(node)
        if raw is not None:
            return raw
        if fn in _ELEMENTWISE_FUNCTIONS:
            return self.note_constants(node, self.provenance(node.args[0], node))
        if fn in _FEATURE_NORM_FUNCTIONS and self.mixes_neurons(node, None) is not None:
            if self.mixes_neurons(node, None):
                raise self.refuse_feature_norm(node, _node_desc(node))
            if len(self.tensor_args(node)) == 1:  # weight and bias, if any, are constants over spatial positions
                return self.spatial(node, node.args[0])
        if fn is F.instance_norm and len(self.tensor_args(node)) == 1 and not any(
                (node.args[i] if len(node.args) > i else node.kwargs.get(k)) is not None
                for i, k in ((1, "running_mean"), (2, "running_var"))):
            return self.spatial(node, node.args[0])  # no running statistics to write: each channel alone
        if fn in _POOL_FUNCTIONS:
            return self.same_channels(node, node.args[0])
        if fn in _SELECT_FUNCTIONS and len(node.args) + len(node.kwargs) == 3:
            return self.select(node)
        if fn in _BINARY_FUNCTIONS:
            if fn in _INPLACE_FUNCTIONS and not isinstance(self.value(node.args[0]), list):
                raise self.write_error(node)
            return self.binary(node)
        if fn in _RESHAPE_FUNCTIONS:
            return self.reshape(node, node.args[0])
        if fn in _REDUCE_FUNCTIONS:
            return self.reduce(node, node.args[0])
        if fn in _CAT_FUNCTIONS:
            return self.cat(node)
        if fn in _SPATIAL_FUNCTIONS:
            return self.spatial(node, node.args[0] if node.args else node.kwargs.get("input"))
        if fn in _MOVE_FUNCTIONS and self.spatial_dims(node):
            return self.spatial(node, node.args[0] if node.args else node.kwargs.get("input"))
        if fn in _SPLIT_FUNCTIONS and isinstance(self.value(node.args[0]), list):
            raise self.split_error(node)
        if fn is getattr and isinstance(self.value(node.args[0]), list):
            # an attribute of a tensor of features: the same tensor (.data), a size (.shape) or a property; a
            # transpose (.T, .mT) moves the feature dim, which the tracer does not follow
            attr = node.args[1]
            if attr in ("data",):
                return self.value(node.args[0])
            if attr in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_leaf"):
                return _NONTENSOR
            raise GraphError(f"{_node_desc(node)} reads .{attr} of a tensor of features; the tracer follows .data "
                             f"and .shape only. {_DECLARE_HINT}")
        if fn is getattr or fn is len or (fn is operator.getitem and not isinstance(self.value(node.args[0]), list)):
            return _NONTENSOR if self.shape(node) is None else _CONST
        if fn is operator.getitem:
            if self.spatial_index(node):
                # a crop of the spatial dims or unit dims added after the channel dim: each channel's values
                # come from its own values only
                return self.channels_kept(node, node.args[0])
            raise self.split_error(node)
        if not self.tensor_args(node):
            return _NONTENSOR if self.shape(node) is None else _CONST
        if fn in _STACK_FUNCTIONS:
            raise GraphError(f"the tracer cannot follow {_node_desc(node)}: it stacks tensors of features along a "
                             f"new dim, which the tracer does not follow. Combine them with torch.cat along the "
                             f"channel dim, or elementwise (h1 + h2, torch.maximum(h1, h2)). {_DECLARE_HINT}")
        raise GraphError(f"the tracer cannot follow {_node_desc(node)}: it may mix features. {_DECLARE_HINT}")

    def call_method(self, node):
        name = node.target
        if name in _NONTENSOR_METHODS:
            return _NONTENSOR
        raw = self.raw_only(node)
        if raw is not None:
            return raw
        if not isinstance(self.value(node.args[0]), list):
            if not self.tensor_args(node):
                return _NONTENSOR if self.shape(node) is None else _CONST
            # a method of a constant with features as an argument: gamma * h (a LayerScale) is recorded as
            # gamma.mul(h); its value comes from the features
            if name.endswith("_"):
                raise self.write_error(node)
            if name in _BINARY_METHODS:
                return self.binary(node)
            if name in _LIKE_METHODS:
                return _CONST  # only the shape, dtype or device come from the features
            raise GraphError(f"the tracer cannot follow {_node_desc(node)}, a method of a constant applied to "
                             f"features: it may mix features. {_DECLARE_HINT}")
        if name in _ELEMENTWISE_METHODS:
            return self.note_constants(node, self.provenance(node.args[0], node))
        if name in _BINARY_METHODS:
            return self.binary(node)
        if name in _RESHAPE_METHODS:
            return self.reshape(node, node.args[0])
        if name in _REDUCE_METHODS:
            return self.reduce(node, node.args[0])
        if name in _MOVE_METHODS and self.spatial_dims(node):
            return self.spatial(node, node.args[0])
        if name in _SPLIT_METHODS:
            raise self.split_error(node)
        raise GraphError(f"the tracer cannot follow {_node_desc(node)}: it may mix features. {_DECLARE_HINT}")

    def spatial_dims(self, node) -> bool:
        """Whether a roll or flip (``torch.roll``/``torch.flip`` or the methods) moves values along dims after
        the channel dim only (h.roll(1, dims=2), h.flip(-1)): each channel's values then come from its own values.
        A roll without dims (over the flattened tensor) or along the batch or channel dim mixes neurons."""
        name = node.target if isinstance(node.target, str) else node.target.__name__
        rest = list(node.args[1:])
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        elif name == "roll":
            dims = rest[1] if len(rest) > 1 else None
        else:  # flip(dims) or, as a method, flip(*dims)
            dims = rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)
        shape = self.shape(node.args[0]) if node.args else None
        if dims is None or shape is None:
            return False
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
            return False
        return all(-len(shape) <= d < len(shape) and d % len(shape) >= 2 for d in dims)

    def spatial_index(self, node) -> bool:
        """Whether ``x[index]`` keeps the batch and channel dims where they are and touches only the dims after
        them: slices and ints crop the spatial dims (``h[:, :, 1:-1]``, ``h[..., :4]``) and ``None`` adds unit
        dims after the channel dim (an SE gate's ``g[:, :, None, None]`` or ``g[..., None, None]``)."""
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        ndim = len(self.shape(node.args[0]) or ())
        if ndim < 2 or index.count(Ellipsis) > 1:
            return False
        if not all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in index):
            return False
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        if consumed > ndim:
            return False
        # the index spelled out: the ellipsis (or the missing tail) stands for whole dims
        full = slice(None, None, None)
        fill = [full] * (ndim - consumed)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            entries = list(index[:at]) + fill + list(index[at + 1:])
        else:
            entries = list(index) + fill
        # dims 0 and 1 (batch, channel) come first, whole, with no unit dim added before them
        return len(entries) >= 2 and entries[0] == full and entries[1] == full

    def mixes_neurons(self, node, module) -> bool | None:
        """Whether a LayerNorm, RMSNorm, GroupNorm or local response norm (module or function) reads across the
        channel dim (None: its normalized shape is computed in forward and unknown here). A layer norm over the
        spatial dims only does not; a group norm with one channel per group does not either, but it is an
        instance norm that would not run on the narrower activations of an earlier task's evaluation."""
        shape = self.shape(node.args[0]) if node.args else None
        fn = module if module is not None else node.target
        if isinstance(fn, (nn.LayerNorm, nn.RMSNorm)) or fn in (F.layer_norm, F.rms_norm):
            normalized = fn.normalized_shape if module is not None else (
                node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape"))
            if isinstance(normalized, fx.Node):
                length = self.shape_length(normalized)  # h.shape[1:], h.size()[-2:]
            elif isinstance(normalized, (tuple, list)):
                length = len(normalized)  # its entries may be computed (h.shape[-1]), its length is not
            else:
                length = 1 if isinstance(normalized, int) else None
            if length is None:
                return None
            return shape is None or length >= len(shape) - 1
        return True

    def shape_length(self, node: fx.Node) -> int | None:
        """The length of a shape computed in forward from a tensor's shape (``h.shape[1:]``, ``h.size()[2:]``,
        ``h.shape[-1]``), or None."""
        if node.op != "call_function" or node.target is not operator.getitem:
            return None
        base, index = node.args
        if not isinstance(base, fx.Node) or isinstance(index, fx.Node):
            return None
        if base.op == "call_function" and base.target is getattr and base.args[1] == "shape":
            source = base.args[0]
        elif base.op == "call_method" and base.target == "size" and len(base.args) == 1 and not base.kwargs:
            source = base.args[0]
        else:
            return None
        shape = self.shape(source)
        if shape is None:
            return None
        picked = tuple(range(len(shape)))[index]
        return len(picked) if isinstance(picked, tuple) else 1

    def refuse_feature_norm(self, node, where: str) -> GraphError:
        """The error for a norm that reads across channels: GroupNorm with one channel per group names the
        instance norm it computes."""
        module = self.owner.get_submodule(node.target) if node.op == "call_module" else None
        shape = self.shape(node.args[0]) if node.args else None
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else (
            (node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups"))
            if node.target is F.group_norm else None)
        if groups is not None and shape is not None and len(shape) >= 2 and groups == shape[1]:
            return GraphError(
                f"{where} is a group norm with one channel per group, which is an instance norm: use "
                "nn.InstanceNorm1d/2d (affine=False) or F.instance_norm, which EideticNetwork follows (a group norm "
                "has a fixed channel count, and an earlier task's evaluation runs on fewer channels)")
        return feature_norm_error(where, "norm over the features")

    def write_error(self, node) -> GraphError:
        return GraphError(f"{_node_desc(node)} writes features into a buffer or constant in place: every task's "
                          "outputs read the body's buffers, so finished tasks would change as training goes on. "
                          "Keep buffers outside Eidetic layers fixed in forward (compute a new tensor instead)")

    def split_error(self, node) -> GraphError:
        return GraphError(
            f"{_node_desc(node)} splits, indexes or slices a tensor of features in a way the tracer does not "
            "follow (it follows crops of the spatial dims with slices and ints, h[:, :, 1:-1] or h[..., 1:-1], and unit "
            "dims added after the channel dim, g[:, :, None, None]). "
            "A layer whose parts are then combined with each other (a GLU, a * sigmoid(b) over the two halves of "
            "one layer) ties its own neurons in pairs, which per-neuron states cannot represent: use two layers, "
            f"one per part. Parts that stay apart (branches over channel groups) can be declared: {_DECLARE_HINT}")

    # ----- op families -----------------------------------------------------------------------------
    def same_channels(self, node, arg):
        """Pooling: batch and channel dims unchanged, over batched inputs only ([N, C, L] for a 1d pool,
        [N, C, H, W] for a 2d one: torch reads anything else as unbatched, and pools over the features)."""
        prov = self.provenance(arg, node)
        a, b = self.shape(arg), self.shape(node)
        module = self.owner.get_submodule(node.target) if node.op == "call_module" else None
        if getattr(module, "return_indices", False) or node.kwargs.get("return_indices"):
            raise GraphError(f"{_node_desc(node)} returns the pooled values and their indices "
                             "(return_indices=True); the tracer follows the values only: use return_indices=False")
        if a is None or b is None or a[:2] != b[:2]:
            raise GraphError(f"{_node_desc(node)} changes the channel dim ({a} -> {b}). {_DECLARE_HINT}")
        target = type(self.owner.get_submodule(node.target)) if node.op == "call_module" else node.target
        name = getattr(target, "__name__", str(target))
        want = 3 if "1d" in name else 4
        if len(a) != want:
            raise GraphError(f"{_node_desc(node)} pools a {len(a)}-D tensor {a}: torch reads it as unbatched and pools "
                             f"across the features (neurons), which would mix tasks; give it "
                             f"{'[N, C, L]' if want == 3 else '[N, C, H, W]'}. {_DECLARE_HINT}")
        return prov

    def spatial(self, node, arg):
        """Resizing, padding and instance normalisation: each channel's values from its own values only; batch
        and channel dims unchanged (a padding that reaches the channel dim changes it, and is refused)."""
        prov = self.provenance(arg, node)
        a, b = self.shape(arg), self.shape(node)
        if a is None or b is None or len(a) < 3 or a[:2] != b[:2]:
            raise GraphError(f"{_node_desc(node)} changes the batch or channel dim ({a} -> {b}), or reads a "
                             f"tensor without spatial dims; the tracer follows resizing and padding of the "
                             f"spatial dims of [N, C, ...] only. {_DECLARE_HINT}")
        return prov

    def channels_kept(self, node, arg):
        """An index that keeps the batch and channel dims in place ([N, C, ...] -> [N, C, ...])."""
        prov = self.provenance(arg, node)
        a, b = self.shape(arg), self.shape(node)
        if a is None or b is None or len(a) < 2 or len(b) < 2 or a[:2] != b[:2]:
            raise self.split_error(node)
        return prov

    def reshape(self, node, arg):
        """Reshapes that keep each feature's source: channel dim kept, or [N, C, *S] -> [N, C*prod(S)]."""
        prov = self.provenance(arg, node)
        a, b = self.shape(arg), self.shape(node)
        if a is None or b is None:
            raise GraphError(f"{_node_desc(node)}: unknown shapes")
        if len(a) >= 2 and len(b) >= 2 and a[:2] == b[:2] and math.prod(a[2:]) == math.prod(b[2:]):
            return prov  # channel dim untouched (e.g. squeeze of trailing 1s)
        if len(b) == 2 and a[0] == b[0] and len(a) >= 2 and b[1] == math.prod(a[1:]):
            spatial = math.prod(a[2:])  # channel-major: each channel covers its spatial positions
            # raw features are all task 0: a raw segment needs no repeat
            return [Segment(None, s.width * spatial, 1) if s.source is None else
                    Segment(s.source, s.count, s.repeat * spatial) for s in prov]
        raise GraphError(f"{_node_desc(node)} reshapes {a} -> {b}; the tracer follows only [N, C, *spatial] -> "
                         f"[N, C*spatial] (flatten) and reshapes that keep dims 0 and 1. {_DECLARE_HINT}")

    def reduce(self, node, arg):
        """mean/sum/amax over spatial dims only."""
        prov = self.provenance(arg, node)
        a = self.shape(arg)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None or a is None:
            raise GraphError(f"{_node_desc(node)} reduces over every dim; reduce over spatial dims only "
                             f"(e.g. x.mean((2, 3))). {_DECLARE_HINT}")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(a) for d in dims]
        if 0 in dims or 1 in dims:
            raise GraphError(f"{_node_desc(node)} reduces over the batch or feature dim (dims {dims} of shape {a}); "
                             f"only spatial dims (>= 2) can be reduced. {_DECLARE_HINT}")
        return prov

    def cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        provs = [self.provenance(t, node) for t in tensors]
        ndim = len(self.shape(node) or (0, 0))
        if dim % ndim == 1:
            return [s for p in provs for s in p]
        first = provs[0]
        for p in provs[1:]:
            self.couple(first, p, node)
        return first

    def binary(self, node):
        operands = list(node.args[:2]) + [node.kwargs[k] for k in ("other", "input") if k in node.kwargs]
        tensors = [a for a in operands if isinstance(self.value(a), list)]
        others = [a for a in operands if not isinstance(self.value(a), list)]
        out_shape = self.shape(node)
        if len(tensors) == 1:
            prov = self.value(tensors[0])
            if out_shape != self.shape(tensors[0]):
                raise GraphError(f"{_node_desc(node)} broadcasts {self.shape(tensors[0])} to {out_shape} with a "
                                 f"constant; the tracer cannot follow that. {_DECLARE_HINT}")
            return self.note_constants(node, prov)
        if len(tensors) == 2:
            a, b = tensors
            sa, sb = self.shape(a), self.shape(b)
            if sa is None or sb is None or len(sa) != len(sb) or sa[1] != sb[1]:
                raise GraphError(f"{_node_desc(node)} combines shapes {sa} and {sb}; the tracer couples only tensors "
                                 f"with the same feature dim. {_DECLARE_HINT}")
            return self.couple(self.value(a), self.value(b), node)
        if others and not tensors:
            return _CONST if out_shape is not None else _NONTENSOR
        raise GraphError(f"the tracer cannot follow {_node_desc(node)}. {_DECLARE_HINT}")

    def select(self, node):
        """``torch.where(condition, a, b)``: elementwise, so every operand that holds features is coupled with the
        others (as by an add); constants are noted as ``binary`` notes them."""
        tensors = self.tensor_args(node)
        out = self.shape(node)
        if not tensors:
            return _CONST if out is not None else _NONTENSOR
        for t in tensors:
            shape = self.shape(t)
            if shape is None or out is None or len(shape) != len(out) or shape[1] != out[1]:
                raise GraphError(f"{_node_desc(node)} broadcasts {shape} to {out}; the tracer couples only tensors "
                                 f"with the same feature dim. {_DECLARE_HINT}")
        prov = self.value(tensors[0])
        for t in tensors[1:]:
            prov = self.couple(prov, self.value(t), node)
        return self.note_constants(node, prov)

    def note_constants(self, node, prov: list[Segment]) -> list[Segment]:
        """A constant tensor with one value per feature (a [C] buffer multiplied into activations, a tensor
        argument of an elementwise function) ties values to neuron positions: renumbering the neurons
        (``EideticNetwork.finish_task``) would misalign it, so the graph records that it must not."""
        if not any(s.source is not None for s in prov):
            return prov  # raw input features never move
        out = self.shape(node)
        for arg in list(node.args) + list(node.kwargs.values()):  # a constant on either side (gamma * h)
            if isinstance(self.value(arg), list) or self.value(arg) is _NONTENSOR:
                continue
            shape = self.shape(arg) if isinstance(arg, fx.Node) else tuple(getattr(arg, "shape", ()))
            if out is None or shape is None:
                continue
            feature = len(shape) - (len(out) - 1)  # the constant's dim that broadcasts onto the feature dim
            if 0 <= feature < len(shape) and shape[feature] > 1:
                self.per_feature_constants.append(_node_desc(node))
        return prov

    def couple(self, a: list[Segment], b: list[Segment], node) -> list[Segment]:
        """Features combined elementwise: their sources become the same neurons (residual coupling)."""
        if [(s.count, s.repeat) for s in a] != [(s.count, s.repeat) for s in b]:
            hint = _DECLARE_HINT
            if _width(a) == _width(b) and 1 in (len(a), len(b)):
                # one layer's neurons would have to split into one group per branch of the concatenation
                hint = ("One layer's neurons cannot be coupled with a concatenation of several layers (an SE gate "
                        "or a residual add after torch.cat): apply the gate or the add to each branch before the "
                        "concatenation, each with its own layer")
            raise GraphError(f"{_node_desc(node)} combines features from {_describe_proto(self, a)} with "
                             f"{_describe_proto(self, b)}, which do not line up layer by layer. {hint}")
        for sa, sb in zip(a, b):
            if (sa.source is None) != (sb.source is None):
                raise GraphError(f"{_node_desc(node)} adds the raw network input to the outputs of "
                                 f"{_describe_proto(self, [sa if sa.source is not None else sb])}; raw inputs cannot "
                                 "be coupled with neurons (put a projection layer on the skip). " + _DECLARE_HINT)
            if sa.source is not None:
                self.union(sa.source, sb.source, node)
        return a

    def build(self, features: list[Segment]) -> LayerGraph:
        roots = sorted({self.find(p) for p in range(len(self.parent))})
        groups = {}
        normalizer_roots = {self.find(p) for p in self.normalizers}
        for i, r in enumerate(roots):
            groups[r] = NeuronGroup(i, self.members[r])
            groups[r].input_normalizer = r in normalizer_roots and not groups[r].weight_members()
            groups[r].raw_positions = r in normalizer_roots

        def resolve(segments):
            return [Segment(None if s.source is None else groups[self.find(s.source)], s.count, s.repeat)
                    for s in segments]

        inputs = {name: (layer, resolve(segs)) for name, (layer, segs) in self.inputs.items()}
        raw_readers = set(self.raw_input_layers)
        raw_readers.update(name for name, (_, segs) in inputs.items()
                           if any(s.source is not None and s.source.input_normalizer for s in segs))
        blocked = None
        if self.per_feature_constants:
            blocked = (f"{self.per_feature_constants[0]} combines the features with a constant holding one value "
                       "per feature")
        graph = LayerGraph(list(groups.values()), inputs, resolve(features), raw_readers, renumber_blocked_by=blocked)
        graph.narrow_blocked_by = blocked or (self.narrow_blockers[0] if self.narrow_blockers else None)
        return graph


def _channels_innermost(node: fx.Node) -> bool:
    """Whether the traced value of ``node`` is an [N, C, H, W] tensor torch treats as channels_last (convolutions of
    it return channels_last outputs): also a single channel permuted from [N, H, W, 1] images."""
    meta = node.meta.get("tensor_meta")
    shape, stride = getattr(meta, "shape", None), getattr(meta, "stride", None)
    return shape is not None and stride is not None and channels_last_strides(tuple(shape), tuple(stride))


def _nodes_in(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments, also inside lists, tuples and dicts."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _describe_proto(prop: _Propagator, segments: list[Segment]) -> str:
    parts = []
    for s in segments:
        src = "raw input" if s.source is None else prop.members[prop.find(s.source)][0][0]
        parts.append(f"{src}[{s.count}]" + (f"x{s.repeat}" if s.repeat != 1 else ""))
    return " + ".join(parts)


def _node_desc(node: fx.Node) -> str:
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
        module = getattr(node.target, "__module__", None) or ""
        what = f"function {module + '.' if module else ''}{target}"
    elif node.op == "call_method":
        what = f"tensor method .{node.target}()"
    elif node.op == "call_module":
        what = f"module {node.target}"
    else:
        what = f"{node.op} {node.target}"
    return f"{what} (node '{node.name}')"


def _trace_again(owner: nn.Module) -> fx.GraphModule | None:
    """fx trace of ``owner.forward_features`` with no lasting effect (tracing runs the body's Python: every buffer
    it writes is put back); None when ``owner`` has no ``forward_features`` or its code cannot be traced."""
    fn = getattr(owner, "forward_features", None)
    if fn is None:
        return None
    saved = buffer_values(owner.named_modules())
    try:
        return trace_fx(owner, fn)
    except GraphError:
        return None
    finally:
        _restore(saved)


def _rounding_op_in(owner: nn.Module) -> str | None:
    """Why ``owner.forward_features`` cannot run at prefix width because of an op that rounds by width (any
    such op in its traced code; None: there is none)."""
    if getattr(owner, "forward_features", None) is None:
        return None
    gm = _trace_again(owner)
    if gm is None:
        return "the body's code could not be traced again to look for ops that round by width"
    for node in gm.graph.nodes:
        what = _rounds_by_width(owner, node)
        if what is not None:
            return f"{_node_desc(node)} computes {what}, {_ROUNDING_BLOCKER}"
    return None


def _rounds_by_width(owner: nn.Module, node: fx.Node) -> str | None:
    """The name of the op ``node`` computes when its CPU rounding depends on the tensor's width, else None."""
    target = node.target
    if node.op == "call_module" and isinstance(owner.get_submodule(target), _ROUNDING_BY_WIDTH_MODULES):
        return type(owner.get_submodule(target)).__name__
    if node.op == "call_function" and target in _ROUNDING_BY_WIDTH_FUNCTIONS:
        return getattr(target, "__name__", str(target))
    if node.op == "call_method" and target in _ROUNDING_BY_WIDTH_METHODS:
        return target
    if node.op == "call_module" and isinstance(owner.get_submodule(target), (nn.Upsample, nn.UpsamplingBilinear2d)):
        mode = owner.get_submodule(target).mode
        if mode in _INTERPOLATING_MODES:
            return f"{mode} interpolation"
    if node.op == "call_function" and target in (F.interpolate, F.upsample):
        mode = node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")
        if isinstance(mode, fx.Node) or mode in _INTERPOLATING_MODES:
            return f"{mode} interpolation"
    if (node.op == "call_function" and target in _POW_FUNCTIONS) or \
            (node.op == "call_method" and target in ("pow", "pow_", "__pow__")):
        exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
        if isinstance(exponent, fx.Node) or exponent not in _EXACT_POWERS:
            return f"pow with exponent {exponent}"
    return None


def trace_fx(owner: nn.Module, fn: Callable) -> fx.GraphModule:
    """torch.fx trace of ``fn`` (calling submodules of ``owner``; Eidetic and torch.nn layers are leaves)."""
    tracer = _Tracer(owner)
    root = _Root(fn)
    try:
        graph = tracer.trace(root)
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"torch.fx cannot trace the body ({type(exc).__name__}: {exc}). Data-dependent control "
                         f"flow is the usual cause. {_DECLARE_HINT}") from exc
    targets = {}
    for node in graph.nodes:
        if node.op == "call_module":
            targets[node.target] = owner.get_submodule(node.target)
        elif node.op == "get_attr":
            obj = root
            try:
                for part in node.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                obj = owner
                for part in node.target.split("."):
                    obj = getattr(obj, part)
            targets[node.target] = obj
    gm = fx.GraphModule(targets, graph)
    return gm


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def _without_forward_hooks(owner: nn.Module):
    """The user's forward hooks stay silent during the shape pass: the batch it runs is the user's real forward's,
    which fires them once (as torch.nn would), not twice."""
    saved = [(m, name, getattr(m, name)) for m in owner.modules() for name in _HOOK_DICTS if hasattr(m, name)]
    for m, name, hooks in saved:
        setattr(m, name, type(hooks)())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def trace_module(owner: nn.Module, fn: Callable, example_input: torch.Tensor) -> LayerGraph:
    """Trace ``fn`` (which calls submodules of ``owner``; names are relative to ``owner``) on a batch."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"the example input must be a tensor batch, got {type(example_input).__name__}")
    # torch.fx runs the body's Python with its buffers as they are. A first trace lets a one-time initialisation
    # in forward (a table filled on the first call, with its Python flag) happen, as the first call would; a
    # buffer written again by the second (a step count, a schedule) would change every task's outputs as
    # training goes on
    before = buffer_values(owner.named_modules())
    trace_fx(owner, fn)
    settled = buffer_values(owner.named_modules())
    back_to = settled  # nothing the second trace or the shape pass writes stays
    try:
        gm = trace_fx(owner, fn)
        written = _written(settled)
        if written:
            back_to = before  # a body refused for its writes is left as it was
            raise GraphError(f"the body's forward writes its buffer(s) {', '.join(written)} on every call (they "
                             "changed while the layer graph was traced): every task's outputs read them, so "
                             "finished tasks would change as training goes on. Keep buffers outside Eidetic "
                             "layers fixed in forward; a schedule that changes with training (a warm-up factor, "
                             "a step count) belongs in the training loop")
        return _graph_of(owner, gm, example_input)
    finally:
        _restore(back_to)


def _graph_of(owner: nn.Module, gm: fx.GraphModule, example_input: torch.Tensor) -> LayerGraph:
    """The layer graph of a traced body: shapes from one pass over ``example_input``, then provenance."""
    # learn shapes with no side effects: eval mode (no running-stat updates, no dropout), no autograd
    modes = [(m, m.training) for m in owner.modules()]
    owner.eval()
    try:
        # ShapeProp prints a traceback of any failure before raising; the error below says it once
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), _without_forward_hooks(owner):
            ShapeProp(gm).propagate(example_input)
    except GraphError:
        raise
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:  # ShapeProp wraps what the body raised: report that
            cause = cause.__cause__
        if isinstance(cause, (TypeError, ValueError)) and cause is not exc:
            raise cause  # the body refused the input (wrong dtype, size, ...): the same error as on any batch
        raise GraphError(f"running the traced body on the example batch {tuple(example_input.shape)} failed "
                         f"({type(cause).__name__}: {cause})") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    prop = _Propagator(owner)
    features = prop.run(gm.graph)
    graph = prop.build(features)
    graph.input_shape = tuple(example_input.shape[1:])
    graph.body_ops = body_ops(owner, gm)
    return graph


def body_ops(owner: nn.Module, gm: fx.GraphModule) -> list[str]:
    """What the traced code of a body computes, one line per op: modules by name, type and settings (an Eidetic
    layer by name and type: its neuron counts change with every task; dropout without its rate, which changes no
    evaluation), functions and methods by name, with the constants they are given. Two bodies with the same lines compute the same function of the same weights."""
    def arg(a):
        if isinstance(a, fx.Node):
            return "%" + a.name
        if isinstance(a, (tuple, list)):
            return "(" + ", ".join(arg(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in a.items()) + "}"
        if a is None or isinstance(a, (bool, int, float, str, slice, type(Ellipsis), torch.dtype)):
            return repr(a)
        return type(a).__name__

    lines = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = owner.get_submodule(node.target)
            # dropout's rate changes no finished task's (eval) outputs
            plain = isinstance(m, (EideticLayer, nn.modules.dropout._DropoutNd))
            what = f"{node.target} {type(m).__name__}" + ("" if plain else f"({m.extra_repr()})")
        elif node.op == "call_function":
            what = f"{getattr(node.target, '__module__', None) or ''}.{getattr(node.target, '__name__', node.target)}"
        elif node.op in ("call_method", "get_attr"):
            what = f"{node.op} {node.target}"
        else:
            what = node.op
        lines.append(f"%{node.name} = {what} {arg(tuple(node.args))} {arg(dict(node.kwargs))}")
    return lines


def changed_body_op(owner: nn.Module, recorded: list[str]) -> str | None:
    """The first op where ``owner.forward_features`` now computes other than ``recorded`` (``body_ops`` of the body
    a state dict was trained with), said in words; None when they agree or the body cannot be traced again."""
    gm = _trace_again(owner)
    if gm is None:
        return None
    now = body_ops(owner, gm)
    for i, (a, b) in enumerate(zip(recorded, now)):
        if a != b:
            return f"op {i} was `{a}`, this body has `{b}`"
    if len(recorded) != len(now):
        return f"the state dict's body has {len(recorded)} ops, this body {len(now)}"
    return None


def buffer_values(modules) -> list[tuple]:
    """(name, module, key, buffer, copy of its values) of the buffers of ``modules`` ((name, module) pairs, as
    ``named_modules()`` gives) outside Eidetic layers, whose own buffers their forward updates."""
    out = []
    for name, module in modules:
        if not isinstance(module, EideticLayer):
            for key, b in module._buffers.items():
                if b is not None:
                    out.append((f"{name}.{key}" if name else key, module, key, b, b.detach().clone()))
    return out


def _written(saved: list[tuple]) -> list[str]:
    """Names of the buffers in ``saved`` that were written or replaced (``self.step = self.step + 1``) since."""
    return [name for name, module, key, b, values in saved
            if module._buffers.get(key) is not b or not same_values(b, values)]


def _restore(saved: list[tuple]) -> None:
    """Every buffer in ``saved`` back: the same tensor, with its saved values."""
    for name, module, key, b, values in saved:
        module._buffers[key] = b
        with torch.no_grad():
            b.copy_(values)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool((a == b).all())


def trace_body(body: nn.Module, example_input: torch.Tensor) -> LayerGraph:
    """Derive the layer graph of ``body`` (plain torch.nn layers are converted in place first).

    Layer names in the graph are relative to ``body``.
    """
    body = _convert_in_place(body)
    return trace_module(body, body.forward, example_input)


def _convert_in_place(body: nn.Module) -> nn.Module:
    new = convert(body)
    if new is not body:
        raise GraphError(f"the body is a single plain {type(body).__name__}; wrap it in nn.Sequential or pass the "
                         "converted layer (eidetic_kernels.convert returns a new module for it)")
    return body


# ------------------------------------------------------------------------------------------------
# declaring by hand
# ------------------------------------------------------------------------------------------------
def declare_graph(body: nn.Module, inputs: dict, features, couple: Iterable[Iterable[str]] = (),
                  renumber: bool = False) -> LayerGraph:
    """State the layer graph by hand when tracing cannot follow the body.

    body:     the module whose Eidetic layers are named (plain torch.nn layers are converted in place).
    inputs:   {consumer layer name: spec}, one entry for every Linear/Conv, saying which features it reads.
    features: spec of the body's output features.
    couple:   lists of layer names sharing neurons: a Linear/Conv with the BatchNorms over its channels, the
              output layers of residual branches that are added together. Every other layer is its own group.
    renumber: True states that the specs say everything that depends on a neuron's position (no constant
              holds one value per feature), so ``finish_task`` may renumber neurons task-major (faster: every
              window a slice). False (default): neurons keep the positions pruning left them in.

    A spec is a list of segments, in feature order; a segment is
        "layer"               every neuron of that layer's group, one feature each
        ("layer", repeat)     each neuron covering ``repeat`` consecutive features (a conv channel flattened)
        ("raw", count)        ``count`` raw network input features ("raw", count, repeat) likewise
    and "raw" alone means: only raw inputs (as many as the layer reads).

    Example, Conv(3->8) -> BN -> ReLU -> flatten of 8x4x4 -> Linear(128->10):
        declare_graph(body, inputs={"conv": "raw", "fc": [("conv", 16)]}, features=["fc"],
                      couple=[["conv", "bn"]])
    """
    body = _convert_in_place(body)
    named = {name: m for name, m in body.named_modules() if isinstance(m, EideticLayer)}

    def layer(name):
        if name not in named:
            raise GraphError(f"declare_graph: {name!r} is not an Eidetic layer of the body; layers: {sorted(named)}")
        return named[name]

    protos: dict[str, list[tuple[str, EideticLayer]]] = {}
    owner_of: dict[str, str] = {}
    for members in couple:
        members = list(members)
        if not members:
            continue
        key = members[0]
        for name in members:
            layer(name)
            if name in owner_of:
                raise GraphError(f"declare_graph: layer {name!r} appears in two coupled lists; merge them")
            owner_of[name] = key
        protos[key] = [(name, named[name]) for name in members]
    for name, m in named.items():
        if name not in owner_of:
            owner_of[name] = name
            protos[name] = [(name, m)]
    groups = {key: NeuronGroup(i, members) for i, (key, members) in enumerate(protos.items())}

    def segments(spec, width=None, where=""):
        if spec == "raw":
            if width is None:
                raise GraphError(f"declare_graph: {where}: say how many raw features with ('raw', count)")
            return [Segment(None, width, 1)]
        if isinstance(spec, (str, tuple)):
            spec = [spec]
        out = []
        for item in spec:
            if isinstance(item, str):
                item = (item,)
            item = tuple(item)
            if item[0] == "raw":
                if len(item) not in (2, 3):
                    raise GraphError(f"declare_graph: {where}: raw segment must be ('raw', count[, repeat])")
                out.append(Segment(None, int(item[1]), int(item[2]) if len(item) == 3 else 1))
            else:
                if len(item) not in (1, 2):
                    raise GraphError(f"declare_graph: {where}: segment must be 'layer' or ('layer', repeat)")
                layer(item[0])
                g = groups[owner_of[item[0]]]
                out.append(Segment(g, g.size, int(item[1]) if len(item) == 2 else 1))
        return out

    resolved = {}
    raw_layers = set()
    for name, spec in inputs.items():
        m = layer(name)
        if not isinstance(m, (EideticLinear, EideticConv2d)):
            raise GraphError(f"declare_graph: {name!r} is a {type(m).__name__}; only Linear/Conv layers read "
                             "inputs (couple a batch norm with its layer instead)")
        n_in = m.input_task.numel()
        segs = segments(spec, n_in, f"inputs of {name!r}")
        if _width(segs) != n_in:
            raise GraphError(f"declare_graph: {name!r} reads {n_in} features but its spec gives {_width(segs)}")
        resolved[name] = (m, segs)
        if any(s.source is None for s in segs):
            raw_layers.add(name)
    missing = [n for n, m in named.items() if isinstance(m, (EideticLinear, EideticConv2d)) and n not in resolved]
    if missing:
        raise GraphError(f"declare_graph: no inputs given for {missing}; every Linear/Conv needs an entry")
    feats = segments(features, None, "features")
    return LayerGraph(list(groups.values()), resolved, feats, raw_layers,
                      renumber_blocked_by=None if renumber else "the graph was declared by hand (declare_graph) "
                                                                "without renumber=True")
