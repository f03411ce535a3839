"""EideticNetwork: a body, one head per task, and the bookkeeping of Eidetic Learning.

Task life cycle (paper Section 3): ``prepare_for_task(t)`` adds head t and checks that every layer
has free neurons; ``train_task`` trains, prunes iteratively and calls ``finish_task``, which
freezes the surviving free neurons for task t (their rows move to buffers, out of
``model.parameters()``), recycles the pruned ones with a fresh default init and freezes head t.

Evaluating a finished task t runs in *view mode*: every layer computes only the neurons of tasks
<= t (the rest act PRUNED and output exactly 0 without being computed), so nothing in the free
capacity, not even NaN or inf, can reach a finished task's logits.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import operator
import sys
import types
import warnings
import weakref
from typing import NoReturn

import torch
import torch.nn as nn

from eidetic_kernels import FREE, PRUNED, EideticConv2d, EideticLayer, EideticLinear, convert
from eidetic_kernels.layers import PrefixWidthMismatch, _channels_last, prepare_twins
from eidetic_kernels.ops.eager import compile_disabled
from eidetic_kernels.state import is_frozen

from .graph import (_FEATURE_NORM_MODULES, GraphError, changed_body_op, LayerGraph, NeuronGroup, buffer_values, feature_norm_error,
                    same_values, trace_module)
from .warn import user_stacklevel
from .pruning import fixed_by_user

__all__ = ["EideticNetwork", "CapacityError", "CapacityWarning", "HookedTrainingWarning"]

def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (read from its dict: this runs per forward)."""
    d = module.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"])


def task_index(task, hint: str) -> int:
    """``task`` as an int: an int, or an integer scalar (numpy, a one-element integer tensor); a bool or anything
    else is a TypeError that ends with ``hint``."""
    if isinstance(task, torch.Tensor) and task.numel() == 1 and not task.dtype.is_floating_point:
        task = int(task)
    try:
        if isinstance(task, bool):
            raise TypeError
        return operator.index(task)
    except TypeError:
        raise TypeError(f"task must be an int, got {type(task).__name__}; {hint}") from None


def _set_mode(layer: EideticLayer, view_task: int | None, constant_frozen: bool, narrow: int | None,
              active: bool = True) -> None:
    """A layer's per-forward mode. Plain attributes, written to the instance dict: nn.Module.__setattr__'s
    bookkeeping (for parameters, buffers and submodules, which these never are) costs more than the
    evaluation of a small layer, and this runs twice per layer per forward."""
    d = layer.__dict__
    d["view_task"], d["constant_frozen"], d["narrow"] = view_task, constant_frozen, narrow
    d["_network_forward"] = active


def _reset_mode(layer: EideticLayer) -> None:
    """The mode outside the network's forward (a layer recomputed there, e.g. by checkpointing, refuses)."""
    _set_mode(layer, None, False, None, active=False)


def _modes(layers) -> list[tuple]:
    """The layers' modes now, for ``_restore_modes``: a forward that runs inside another (a hook that calls
    the network) puts back the outer forward's modes, not the idle ones."""
    return [(lay.view_task, lay.constant_frozen, lay.narrow, lay._network_forward) for lay in layers]


def _restore_modes(layers, saved: list[tuple]) -> None:
    for layer, (view_task, constant_frozen, narrow, active) in zip(layers, saved):
        _set_mode(layer, view_task, constant_frozen, narrow, active)


# what a full layer means for the tasks to come (said by the capacity warning and error)
_FULL_LAYERS = ("Each task keeps at least one neuron of each layer that train_task prunes, so a layer of W neurons "
                "holds at most W tasks; to learn more, start a network with more neurons there (finished tasks do "
                "not move into it: keep this network for them, or model.export(t) each as a torch.nn module), and "
                "let each task keep fewer (a larger stop_threshold prunes further)")

_FROZEN_KEYS = ("frozen_weight", "frozen_bias", "running_mean", "running_var")


def frozen_fingerprint(state_dict: dict, prefix: str) -> dict[str, str]:
    """{layer name: SHA-256} of the frozen values in ``state_dict`` (keys ``prefix + layer + "." + name``): each
    Eidetic layer's frozen weight and bias storage and the running statistics of its frozen channels, as float64
    (every float dtype converts to it exactly, so a lossless dtype round trip of the network keeps it); layers
    with nothing frozen are left out. ``finish_task`` records it; a state dict whose frozen values were averaged
    or edited since no longer matches its own record. One digest per layer, so a partial state dict (some
    layers only) is checked layer by layer."""
    digests = {}
    for name, key, values in _frozen_values(state_dict, prefix):
        h = digests.setdefault(name, hashlib.sha256())
        h.update(key.encode())
        h.update(values)
    return {name: h.hexdigest() for name, h in digests.items()}


def _frozen_values(state_dict: dict, prefix: str):
    """(layer name, key, frozen values) of every Eidetic layer in ``state_dict``, in a fixed order."""
    layers = sorted(k[len(prefix):-len(".task_state")] for k, v in state_dict.items()
                    if k.startswith(prefix) and k.endswith(".task_state") and isinstance(v, torch.Tensor))
    for name in layers:
        task = state_dict[f"{prefix}{name}.task_state"]
        frozen = (task != FREE) & (task != PRUNED)
        for key in _FROZEN_KEYS:
            t = state_dict.get(f"{prefix}{name}.{key}")
            if not isinstance(t, torch.Tensor):
                continue
            if key.startswith("running"):
                t = t[frozen.to(t.device)]
            if t.numel():  # nothing frozen there (a new head, a layer of no finished task): no record
                yield name, key, t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()


_CONSTANT = "buffer "  # the fingerprint's keys for the body's buffers outside Eidetic layers: "buffer NAME"


def _entry_names(keys, prefix: str) -> list[str]:
    """Fingerprint keys as a reader finds them in the state dict: a layer, or a body buffer's key."""
    return [prefix + k[len(_CONSTANT):] if k.startswith(_CONSTANT) else f"{prefix}{k} (frozen values)" for k in keys]


def constant_fingerprint(state_dict: dict, prefix: str, names) -> dict[str, str]:
    """{"buffer NAME": SHA-256} of the body's buffers outside Eidetic layers in ``state_dict`` (key ``prefix +
    NAME``; ``names``: those to take, None for every entry), as float64 or int64 (a lossless dtype round trip
    keeps it). Every task's outputs read these constants, so ``finish_task`` records them with the frozen
    values: a state dict whose constants were edited since, or a partial one changing them, is refused."""
    out = {}
    for key, t in state_dict.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or not isinstance(t, torch.Tensor) or (names is not None and name not in names):
            continue
        t = t.detach().cpu()
        t = torch.view_as_real(t) if t.is_complex() else t
        t = t.to(torch.float64 if t.is_floating_point() else torch.int64).contiguous()
        h = hashlib.sha256(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        out[_CONSTANT + name] = h.hexdigest()
    return out


def _first_format_fingerprint(state_dict: dict, prefix: str) -> str:
    """The record of the first format (one digest of every layer): checkpoints saved before per-layer digests
    are checked with it on load, then recorded again per layer."""
    h = hashlib.sha256()
    for name, key, values in _frozen_values(state_dict, prefix):
        h.update(f"{name}.{key}".encode())
        h.update(values)
    return h.hexdigest()


def _subclasses(cls) -> list:
    out = []
    for sub in cls.__subclasses__():
        out += [sub] + _subclasses(sub)
    return out


def _forget_compiled_graphs() -> None:
    """Drop torch.compile's cached graphs of ``EideticNetwork``'s own code (its methods and the frames Dynamo
    resumes them in after a graph break). ``finish_task`` and a load replace the network's Parameters and frozen
    storage, on which every cached graph guards, so none of them can run again; left in the cache they count
    toward torch's ``recompile_limit`` (8 graphs per function), after which a compiled network ran eagerly
    (with ``fullgraph=True``: an error) from the ninth task on, or sooner when finished tasks are evaluated
    compiled. Graphs of other networks in the process are dropped too: they compile again on their next call."""
    reset = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "reset_code", None)
    if reset is None or "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return
    # the network's methods and its layers' (their cached frames guard on the same replaced Parameters)
    classes = [EideticNetwork] + [c for c in _subclasses(EideticLayer)]
    codes = list({f.__code__: None for cls in classes for c in cls.__mro__ if c.__module__.startswith(
        ("python_layers", "eidetic_kernels")) for f in vars(c).values() if inspect.isfunction(f)})
    try:  # the continuation frames Dynamo generated after graph breaks in them (torch internals: best effort)
        from torch._dynamo.resume_execution import ContinueExecutionCache
        resumed = [c for code in codes for c in ContinueExecutionCache.cache.get(code, {}).values()]
    except (ImportError, AttributeError):
        resumed = []
    for code in codes + [c for c in resumed if isinstance(c, types.CodeType)]:
        reset(code)


def _refuse_jit_trace() -> None:
    """Before anything is planned or cached: under torch.jit.trace sizes are traced tensors, and a plan built
    from them would be wrong for later calls too."""
    if torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace cannot record an EideticNetwork: its layers plan their work on the "
                           "host from the neuron states. Trace model.export(task) (a plain torch.nn module of a "
                           "finished task) instead, or use torch.export / torch.compile on it")


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module
    return any(getattr(_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                          "_global_backward_hooks", "_global_backward_pre_hooks"))

# attributes of the network that are not part of the body
_NON_BODY = ("heads", "router")


# key -> network whose traced body's containers carry the key (a plain string survives pickling and copies,
# where a weak reference would not pickle)
_TRACED_BODIES: "weakref.WeakValueDictionary[str, EideticNetwork]" = weakref.WeakValueDictionary()
_BODY_KEYS = itertools.count()


def _refuse_late_modules(parent: nn.Module, name: str, submodule) -> None:
    """A module added to (or replaced in) the body of a network whose layer graph is traced would run outside
    the graph: unmanaged capacity inside finished tasks' outputs. Refused where it is added (torch's global
    module-registration hook). ``_traced_body`` (a key of ``_TRACED_BODIES``) marks the body's containers,
    not its Eidetic layers and what they hold (their parametrizations); a copy of a container, which keeps the
    mark, is no longer in that network's body and takes anything. On the network itself, a module with no
    parameter and no layer to convert (a loss, a metric) under a new name is no part of the body's work and is
    let through (and guarded like the body from then on).
    (A container's ``insert``, ``del`` and ``pop`` bypass torch's hook: the next forward refuses them,
    ``EideticNetwork._check_body_structure``.)"""
    if isinstance(parent, EideticNetwork):
        if parent.__dict__.get("graph") is None or name in _NON_BODY:
            return None
        if name not in parent._modules and submodule is not None and \
                not any(True for _ in submodule.parameters()) and \
                not any(isinstance(m, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm, EideticLayer))
                        for m in submodule.modules()):
            # a new name (never one the traced forward runs); what it may hold later is guarded like the body
            key = parent.__dict__.get("_body_key")
            for m in submodule.modules():
                m.__dict__["_traced_body"] = key
            return None
        network = parent
    else:
        network = _TRACED_BODIES.get(parent.__dict__.get("_traced_body"))
        if network is None or network.__dict__.get("graph") is None or \
                not any(m is parent for _, m in network._body_modules()):
            return None
    if parent._modules.get(name) is submodule:
        return None  # the same module again
    what = f"remove module {name!r} from" if submodule is None else \
        f"add module {name!r} ({type(submodule).__name__}) to"
    where = "an EideticNetwork" if parent is network else "the body of an EideticNetwork"
    raise GraphError(f"cannot {what} {where} whose layer graph is traced: the graph would "
                     "not follow the change, so nothing would ever freeze what it adds, and finished tasks' "
                     "outputs would change. Build a new network with the body you want (a fresh EideticNetwork, "
                     "or load a checkpoint into one)")


torch.nn.modules.module.register_module_module_registration_hook(_refuse_late_modules)


class CapacityError(RuntimeError):
    """A new task finds some layer without any free neuron."""


class CapacityWarning(UserWarning):
    """A finished task left some layer without any free neuron (a next task could not start), or kept no neuron of
    a layer while training without forward transfer (its outputs then no longer depend on the input, unless a skip
    connection carries its features around that layer)."""


class BodyChangedWarning(UserWarning):
    """A state dict with finished tasks loaded into a body whose code computes otherwise (another activation, an
    added module, another constant): the finished tasks' outputs are not the ones they were trained to give."""


class LossyCastWarning(UserWarning):
    """A cast back up (``model.float()``) after a cast down (``model.half()``, ``model.to(torch.bfloat16)``)
    that rounded finished tasks' frozen weights: their outputs are not the ones they had when they finished."""


def _rounds_values(old: torch.dtype, new: torch.dtype) -> bool:
    """Whether casting the float dtype ``old`` to ``new`` can change a value: less precision or range (float16
    and bfloat16 each lose some of the other's values), or no float at all."""
    if not old.is_floating_point:
        return False
    if not new.is_floating_point:
        return True
    a, b = torch.finfo(old), torch.finfo(new)
    return b.eps > a.eps or b.max < a.max or b.tiny > a.tiny


class HookedTrainingWarning(UserWarning):
    """A module of the network has hooks, so its training computes full activation gradients (the frozen
    blocks' too) and its steps no longer get cheaper as tasks freeze; said once per network."""


class EideticNetwork(nn.Module):
    """A body (x -> [B, feature_dim]) with per-task linear heads, trained task after task.

    body:        any nn.Module; plain nn.Linear/Conv2d/BatchNorm1d/2d inside are converted to Eidetic
                 layers (same weights). ``None`` when a subclass defines its layers itself and overrides
                 ``forward_features``.
    feature_dim: width of the body output (the heads' input).
    graph:       a LayerGraph from ``declare_graph`` (names relative to the network, e.g. "body.fc") to skip
                 tracing; otherwise the graph is traced on the first batch the network sees.
    exact_activation_grads: False (default): while the network trains, frozen blocks are constants to
                 autograd and each layer computes input gradients only for inputs from FREE neurons. That is
                 exact for every parameter gradient and every Taylor score, and a step's cost falls as tasks
                 freeze; but gradients of intermediate activations (``autograd.grad`` on them) then miss the
                 paths through frozen neurons. True: full gradients everywhere. Whenever the input batch itself
                 requires grad (saliency maps, adversarial examples), or a module of the network has hooks
                 (``register_full_backward_hook``, or a forward hook that hooks its output), the gradients
                 are full too.

    Subclassing: override ``forward_features(self, x)`` to compute the body with your own layers, and/or
    ``forward(self, x, task=None)``, building on ``self.features(x, view_task)`` and ``self.logits(f, task)``.
    """

    def __init__(self, body: nn.Module | None, feature_dim: int, graph: LayerGraph | None = None,
                 exact_activation_grads: bool = False):
        super().__init__()
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int (the width of the body output), got {feature_dim!r}")
        if body is not None and not isinstance(body, nn.Module):
            raise TypeError(f"body must be an nn.Module, got {type(body).__name__}")
        self.feature_dim = feature_dim
        self.exact_activation_grads = bool(exact_activation_grads)
        self._neuron_order: dict[str, torch.Tensor] = {}  # group name -> first index of the neuron at each position
        self._constant_frozen = False  # set per forward: see exact_activation_grads
        if body is not None:
            _refuse_layers_of_another_network(body, self)  # before converting anything
        self.body = convert(body, "body") if body is not None else None  # errors name layers as the network does
        self.heads = nn.ModuleList()
        self.current_task: int | None = None
        self.num_finished_tasks = 0
        self._frozen_fingerprint: dict | None = None  # of the frozen storage, recorded by finish_task
        self.forward_transfer: dict[int, bool] = {}
        self.graph: LayerGraph | None = None
        # after any load (also as a submodule of a bigger model): input states follow the loaded states
        self.register_load_state_dict_post_hook(_sync_after_load)
        if graph is not None:
            self._attach_graph(graph)

    # ------------------------------------------------------------------------------------------------
    # the graph
    # ------------------------------------------------------------------------------------------------
    @property
    def groups(self) -> list[NeuronGroup]:
        """The layer graph's neuron groups (coupled layers sharing neuron states), in body order. RuntimeError
        before the graph is built (the first forward, or ``ensure_graph(x)``, builds it)."""
        if self.graph is None:
            raise RuntimeError("the layer graph is not built yet: call model.ensure_graph(x) with a batch "
                               "(the first forward does it)")
        return self.graph.groups

    def ensure_graph(self, x: torch.Tensor) -> LayerGraph:
        """Trace the body on batch ``x`` once (idempotent) and wire states."""
        if self.graph is None:
            self._build_graph(x)
        return self.graph

    @compile_disabled(reason="the layer graph is traced eagerly on the first batch: call model.ensure_graph(x) "
                             "(or run one forward) before torch.compile(fullgraph=True)")
    def _build_graph(self, x: torch.Tensor) -> None:
        # eagerly, also when the first forward is inside torch.compile: the tracer runs its own torch.fx trace
        self._convert_and_check()
        how = f"traced, in {'training' if self.training else 'eval'} mode on a batch of shape {tuple(x.shape)}"
        self._attach_graph(trace_module(self, self.forward_features, x), how=how)

    def _attach_graph(self, graph: LayerGraph, apply_settings: bool = True, how: str = "declared") -> None:
        if graph.feature_dim != self.feature_dim:
            raise GraphError(f"the body outputs {graph.feature_dim} features but feature_dim={self.feature_dim}")
        graph.heads = self.heads
        self.graph = graph
        self._graph_layers = list(graph.layers.values())  # set on every forward: cached
        for layer in self._graph_layers:
            layer.__dict__["_network_managed"] = True
            layer.__dict__.pop("_outside_graph", None)
        self._mark_layers_outside_graph(f"it did not run when the graph was {how}" if how != "declared" else
                                        "the declared graph does not hold it")
        self._record_body_constants()
        self.sync()  # first: the layers' input states, which set_min_input_task reads
        if apply_settings and self.current_task is not None:
            self._apply_forward_transfer(self.current_task)

    def _mark_layers_outside_graph(self, why: str) -> None:
        """A layer of the body that the graph does not hold (the traced batch did not run it, or it came later)
        belongs to no group: nothing would ever freeze it, so it refuses to run (``EideticLayer._check_call``).
        The body's containers refuse new modules from now on (``_refuse_late_modules``)."""
        held = {id(layer) for layer in self._graph_layers}
        for _, module in self._body_modules():
            if isinstance(module, EideticLayer) and id(module) not in held:
                module.__dict__["_outside_graph"] = why
        self._key_traced_body()

    def _key_traced_body(self) -> None:
        """Mark the body's containers (not its Eidetic layers, nor what they hold) with a key of this network in
        ``_TRACED_BODIES``: they refuse new modules (``_refuse_late_modules``)."""
        layer_names = [name for name, module in self._body_modules() if isinstance(module, EideticLayer)]
        key = self.__dict__["_body_key"] = f"{id(self)}-{next(_BODY_KEYS)}"
        _TRACED_BODIES[key] = self
        containers = []
        for name, module in self._body_modules():
            if name and not isinstance(module, EideticLayer) and \
                    not any(name.startswith(layer + ".") for layer in layer_names):
                module.__dict__["_traced_body"] = key
                containers.append((name, module, tuple(module._modules.items())))
        # what the containers hold now: an edit that bypasses torch's registration hook (a container's insert,
        # del or pop) is found by the next forward (_check_body_structure)
        self.__dict__["_traced_structure"] = (
            tuple((k, v) for k, v in self._modules.items() if k not in _NON_BODY), tuple(containers))

    def _check_body_structure(self) -> None:
        """GraphError when a container of the traced body no longer holds the modules it held when the graph was
        traced (``insert``, ``del``, ``pop`` edit a container without torch's registration hook, which
        ``_refuse_late_modules`` guards): the graph would not follow, and finished tasks' outputs would change.
        Nothing is changed: undoing the edit makes the network run again."""
        structure = self.__dict__.get("_traced_structure")
        if structure is None or torch.compiler.is_compiling():  # a compiled graph guards on the modules it inlined
            return
        children, containers = structure
        for k, v in children:
            if self._modules.get(k) is not v:
                self._refuse_edited_body("", self, children)
        for name, module, held in containers:
            if tuple(module._modules.items()) != held:
                self._refuse_edited_body(name, module, held)

    def _refuse_edited_body(self, name: str, module: nn.Module, held: tuple) -> NoReturn:
        now = [(k, v) for k, v in module._modules.items() if not any(v is w for _, w in held)]
        gone = [(k, v) for k, v in held if not any(v is w for w in module._modules.values())]
        if module is self:
            now = []  # the network takes new modules that are no part of the body (_refuse_late_modules)
        what = "; ".join([f"{type(v).__name__} {k!r} removed" for k, v in gone] +
                         [f"{type(v).__name__} {k!r} added" for k, v in now]) or "its modules reordered"
        where = "the EideticNetwork" if module is self else f"{name} ({type(module).__name__})"
        raise GraphError(f"{where} was edited after the layer graph was traced ({what}): the graph does not "
                         "follow such an edit, and finished tasks' outputs would change. Nothing was lost: undo "
                         "the edit to run this network again, or build a new network with the body you want "
                         "(a fresh EideticNetwork, or load a checkpoint into one)")

    def __setstate__(self, state) -> None:
        # a deep copy or an unpickled network: its containers carry a key of another network (or of none), and
        # get their own; a shallow copy shares the original's containers, which keep the original's key
        super().__setstate__(state)
        if self.__dict__.get("graph") is None:
            return
        for name, module in self._body_modules():
            owner = _TRACED_BODIES.get(module.__dict__.get("_traced_body"))
            if name and "_traced_body" in module.__dict__ and (
                    owner is None or not any(m is module for _, m in owner._body_modules())):
                self._key_traced_body()
                return

    def set_graph(self, graph: LayerGraph) -> None:
        """Use a hand-declared graph (declare_graph on this network, names like "body.fc") instead of tracing."""
        if self.graph is not None:
            raise RuntimeError("this network already has its layer graph; set_graph before the first forward")
        self._convert_and_check()
        self._attach_graph(graph)

    def sync(self) -> None:
        """Push producer states into every consumer's input_task (heads too). Call after any state change."""
        if self.graph is not None:
            self.graph.sync_inputs()
        for module in self.modules():  # loaded alone, a layer of the network keeps its frozen neurons
            if isinstance(module, EideticLayer):
                module.__dict__["_owned_by_network"] = True

    def _body_modules(self):
        """(name, module) of the body: everything but the heads (and a router, if any)."""
        for name, module in self.named_modules():
            if name and name.split(".")[0] in _NON_BODY:
                continue
            yield name, module

    def body_layers(self) -> dict[str, EideticLayer]:
        """Every Eidetic layer of the body by qualified name ("body.0"), heads and router excluded."""
        if self.graph is not None:
            return self.graph.layers
        return {name: m for name, m in self._body_modules() if isinstance(m, EideticLayer)}

    def _convert_and_check(self) -> None:
        """Convert plain layers (a subclass may add them after __init__) and reject stray parameters."""
        self._check_body_structure()  # before converting re-marks the body: an edit is refused, not adopted
        twins = {}  # one conversion for the whole body: a module under two names becomes one twin
        children = [(name, child) for name, child in self._modules.items()
                    if name not in _NON_BODY and child is not None]
        for _, child in children:
            _refuse_layers_of_another_network(child, self)
        for name, child in children:  # every twin first: a layer that cannot convert leaves the body as it was
            prepare_twins(child, name, twins)
        for name, child in children:
            new = convert(child, name, twins)
            if new is not child:
                setattr(self, name, new)
        if self.graph is not None:
            self._mark_layers_outside_graph("it was added to the body after the graph was traced")
        stray, kinds, owner = [], [], {}
        for name, module in self._body_modules():
            if isinstance(module, EideticLayer):
                module.qualified_name = name  # error messages name the layer as the network does
                _LAYER_OWNER[module] = weakref.ref(self)
                for p in module.parameters(recurse=False):
                    other = owner.setdefault(id(p), name)
                    if other != name:
                        raise GraphError(
                            f"layers {other} and {name} share a Parameter: weight sharing cannot be split into "
                            f"per-neuron states (freezing one would leave the other training the same weights). "
                            f"Give each place its own layer (copy.deepcopy), or keep one module and call it once")
                continue
            if isinstance(module, _FEATURE_NORM_MODULES) and any(True for _ in module.parameters(recurse=False)):
                # the norm itself is refused with or without its parameters: say so before asking to drop them
                # (without parameters the tracer refuses it where it reads across channels)
                # checked before any forward, so also for a module the body's forward never calls: said too
                raise GraphError(f"{feature_norm_error(f'{name} ({type(module).__name__})', 'norm over the features')}."
                                 f" (Checked on the body's modules before any forward: if the forward never calls "
                                 f"{name}, delete it from the body)")
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            stray += own
            if own and type(module).__name__ not in kinds:
                kinds.append(type(module).__name__)
        if stray:
            raise GraphError(
                f"parameters outside Eidetic layers: {stray[:5]}{' ...' if len(stray) > 5 else ''} (in "
                f"{', '.join(kinds)}, which EideticNetwork does not support). Every task would train them and change "
                "finished tasks' outputs; use Linear/Conv2d (groups=1)/BatchNorm1d/2d layers (converted to Eidetic "
                "layers), or register fixed values as buffers")

    # ------------------------------------------------------------------------------------------------
    # tasks
    # ------------------------------------------------------------------------------------------------
    def prepare_for_task(self, task: int, num_classes: int, forward_transfer: bool = True) -> EideticLinear:
        """Start task ``task`` (0, 1, 2, ... in order): add its head; returns the head.

        forward_transfer=False: the task's neurons read only the task's own neurons (disjoint
        sub-networks); layers reading the raw input still read it (raw inputs are task 0).

        Raises, with nothing changed: ValueError for a task out of order or a num_classes that is not a positive
        int, TypeError for a task that is not an int, RuntimeError while another task is prepared and not
        finished or for a finished task, ``CapacityError`` (a RuntimeError) when some layer has no FREE neuron
        left, ``GraphError`` for a body the tracer cannot follow (or that was edited after it was traced).
        """
        task = task_index(task, "tasks are numbered 0, 1, 2, ...")
        given = num_classes
        try:  # an integer scalar of numpy or torch (y.max() + 1) is taken as its int; bools and floats are not
            num_classes = None if isinstance(given, bool) else operator.index(given)
        except TypeError:
            num_classes = None
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {given!r}")
        if task < 0:
            raise ValueError(f"task ids are 0, 1, 2, ... in order: got {task}; the next task is "
                             f"{self.num_finished_tasks}")
        self._check_body_constants(f"preparing task {task}")
        if self.current_task is not None:
            if task == self.current_task:
                raise RuntimeError(f"task {task} is already prepared (and not finished): train it with "
                                   "model.train_task(...), or call model.finish_task() to freeze it as it is")
            raise RuntimeError(f"task {self.current_task} is prepared but not finished; train it with "
                               f"model.train_task(...) (or call model.finish_task()) before preparing task {task}")
        if task < self.num_finished_tasks:
            raise RuntimeError(f"task {task} is already finished: its neurons are frozen for good and it cannot be "
                               f"trained again; the next task is {self.num_finished_tasks}")
        if task != self.num_finished_tasks:
            raise ValueError(f"tasks are prepared in order 0, 1, 2, ...: the next task is {self.num_finished_tasks}, "
                             f"got {task}")
        self._convert_and_check()
        self._check_capacity(task, bool(forward_transfer))
        like = self._reference_tensor()
        head = EideticLinear(self.feature_dim, num_classes, device=like.device, dtype=like.dtype)
        head.qualified_name = f"heads.{task}"
        head.train(self.training)  # a network in eval mode stays in eval mode (a new module starts in train mode)
        self.heads.append(head)
        self.current_task = task
        self.forward_transfer[task] = bool(forward_transfer)
        if self.graph is not None:
            self.sync()  # first: the layers' input states, which set_min_input_task reads
            self._apply_forward_transfer(task)
        return head

    def _check_capacity(self, task: int, forward_transfer: bool = True) -> None:
        """Raises CapacityError when a layer has no FREE neuron for ``task`` (see ``_layers_without_capacity``)."""
        full = self._layers_without_capacity(forward_transfer)
        if full:
            raise CapacityError(
                f"task {task} cannot start: no free neuron left in {', '.join(full)} (every neuron is frozen for an "
                f"earlier task, and frozen neurons are never taken). Nothing changed: the finished tasks evaluate, "
                f"route and export as before. {_FULL_LAYERS}{self._user_frozen_hint(full)}")

    def _idle_user_frozen(self) -> list[str]:
        """After the first task: names of body layers with FREE neurons and no parameter that requires grad. They
        do not train and are not pruned, and finish_task freezes their FREE neurons untrained. (From the first
        task on, a layer frozen by the user gives task 0 all its neurons, as documented: not listed then.)"""
        if not self.num_finished_tasks:
            return []
        return [name for name, layer in self.body_layers().items()
                if fixed_by_user(layer) and bool((layer.task_state == FREE).any())]

    def _user_frozen_hint(self, full: list[str]) -> str:
        """For groups in ``full`` (names from ``_layers_without_capacity``) that a member frozen by the user
        (``requires_grad=False``, e.g. a batch norm's affine parameters) keeps from ever being pruned: a sentence
        naming that member, as the cause of the lost capacity; "" when there is none."""
        if self.graph is None:
            return ""
        frozen = []
        for name in full:
            group = next((g for g in self.graph.groups if g.name == name), None)
            members = [] if group is None else [n for n, layer in group.members if fixed_by_user(layer)]
            frozen.extend(m for m in members if m not in frozen)
        if not frozen:
            return ""
        return (f" ({', '.join(frozen)} {'has' if len(frozen) == 1 else 'have'} no parameter that requires grad, "
                "so train_task never prunes its neuron group and every neuron of it freezes with the task it "
                "trains; to let it prune, set requires_grad=True on those parameters)")

    def _layers_without_capacity(self, forward_transfer: bool = True) -> list[str]:
        """Names (neuron groups once the graph exists) of the layers a next task could not train: every layer
        with weights (Linear/Conv) needs a FREE neuron. A batch norm shares its neurons with its layer; one over
        the raw input is exempt (later tasks read its frozen channels like the raw input). So is a layer the
        user froze (``requires_grad=False``: never pruned, all frozen with task 0) when the task reads earlier
        tasks' features (forward transfer), and so is every layer whose neurons it shares (a residual add couples
        them: the user-frozen layer's neurons are never pruned, so neither are theirs). A batch norm the user froze
        does not exempt its layer: the capacity is lost and the error's hint names it (``_user_frozen_hint``)."""
        def user_frozen(name, layer):
            if self.graph is None:
                return fixed_by_user(layer)
            return any(isinstance(m, (EideticLinear, EideticConv2d)) and fixed_by_user(m)
                       for _, m in self.graph.group_of(name).members)

        full = [name for name, layer in self.body_layers().items()
                if isinstance(layer, (EideticLinear, EideticConv2d)) and not bool((layer.task_state == FREE).any())
                and not (forward_transfer and user_frozen(name, layer))]
        if full and self.graph is not None:  # name each group once (members share states)
            seen = []
            for name in full:
                g = self.graph.group_of(name).name
                if g not in seen:
                    seen.append(g)
            full = seen
        return full

    def _apply_forward_transfer(self, task: int) -> None:
        lo = 0 if self.forward_transfer.get(task, True) else task
        for name, layer in self.graph.inputs.items():
            layer[0].set_min_input_task(0 if name in self.graph.raw_input_layers else lo)
        self.heads[task].set_min_input_task(lo)

    @torch.no_grad()
    def finish_task(self, generator: torch.Generator | None = None) -> dict[str, int]:
        """Freeze the current task: FREE neurons (body and head) -> task t; PRUNED -> FREE, re-initialised.

        Returns {layer name: neurons frozen}. Layers install new Parameters (never resized in place, so
        autograd graphs still alive stay valid): an optimizer built before must be re-bound with
        ``eidetic_kernels.rebind_optimizer(optimizer)`` (``train_task`` does it); stepping it unbound
        raises ``StaleOptimizerError``.

        Raises RuntimeError, with nothing changed, when no task is prepared or the layer graph is not built yet
        (no forward has run: ``ensure_graph(x)``). Warns ``CapacityWarning`` when the task keeps every FREE
        neuron of a layer (the next task would find none) or, without forward transfer, none of a layer.
        """
        if self.current_task is None:
            raise RuntimeError("no task to finish: call model.prepare_for_task(t, num_classes) and train it first")
        task = self.current_task
        if self.graph is None and self.body_layers():
            # without the graph no layer knows which inputs are its producers' survivors: frozen unwired, every
            # later forward would read the wrong states, for good
            raise RuntimeError(f"finish_task changed nothing: the layer graph is not built yet, so the body's layers "
                               f"are not wired to each other. Call model.ensure_graph(x) with a batch of inputs (the "
                               f"first forward does it), then finish_task")
        self._check_body_constants(f"task {task} trained")
        frozen = {}
        head = self.heads[task]
        # a parametrized weight (weight_norm, ...) cannot follow its rows into frozen storage: refused here, before
        # any layer is renumbered or frozen, rather than by that layer halfway through
        for layer in list(self.body_layers().values()) + [head]:
            layer._check_no_parametrization("finish_task")
        # FREE neurons of layers the user froze after the first task were never trained: freezing them now uses up
        # that capacity for good (a linear probe: the body frozen, the head trained). train_task says so before
        # training; a loop of one's own hears it here
        idle = self._idle_user_frozen()
        if idle and self.__dict__.get("_said_idle_for_task") != task:
            warnings.warn(f"finish_task: {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} FREE neurons but no "
                          f"parameter that requires grad: they freeze for task {task} untrained, and no later task "
                          "can use them. To keep them free, prune them before finishing (group.prune), or set "
                          "requires_grad=True again before training", CapacityWarning, stacklevel=user_stacklevel())
        if self.graph is not None:
            # checked before anything changes: a group whose members disagree (a state changed on one member)
            # would fail at the end, after freezing, and leave no way to start another task
            for g in self.graph.groups:
                try:
                    g.check_consistent()
                except GraphError as exc:
                    raise GraphError(f"finish_task changed nothing: {exc}. Apply the same change to the other "
                                     f"members (or undo it), then call finish_task again") from None
            # 0. renumber task-major: the task's survivors right after the earlier tasks' blocks, the pruned
            # neurons after them; finished neurons never move, readers move with their producers
            self._renumber_task_major()
            # 1. every consumer (heads too) reads the states after freezing, so that 2. each layer's new
            # frozen block is laid out from its final inputs, whatever order the groups freeze in
            after = {id(g): torch.where(g.task_state == FREE, torch.full_like(g.task_state, task), g.task_state)
                     for g in self.graph.groups}
            self.graph.sync_inputs(override=after)
            for g in self.graph.groups:
                frozen[g.name] = [layer.freeze_free_neurons(task) for layer in g.layers][0]
            head.freeze_free_neurons(task)
            # 3. recycle the pruned neurons as FREE capacity, 4. push the final states everywhere
            for g in self.graph.groups:
                for layer in g.layers:
                    layer.recycle_pruned_neurons(generator)
        else:
            for name, layer in self.body_layers().items():
                frozen[name] = layer.freeze_free_neurons(task)
                layer.recycle_pruned_neurons(generator)
            head.freeze_free_neurons(task)
        self.current_task = None
        self.num_finished_tasks += 1
        if "_rounded_by" not in self.__dict__:  # this task's values are exact in the dtype it finished in
            self.__dict__.pop("_value_floor", None)
        self.sync()
        self._record_frozen_values()
        self._record_body_constants()
        _forget_compiled_graphs()
        if self.graph is not None:
            # the layers after such a group read only this task's neurons there without forward transfer, and
            # this task's and earlier ones' with it: none in either case
            transfer = self.forward_transfer.get(task, True)
            empty = [g.name for g in self.graph.groups if frozen.get(g.name) == 0 and not g.raw_positions and any(
                isinstance(layer, (EideticLinear, EideticConv2d)) for layer in g.layers) and (
                not transfer or not bool(((g.task_state >= 0) & (g.task_state < task)).any()))]
            if empty:
                why = "and trained without forward transfer" if not transfer else "(nor does an earlier task)"
                warnings.warn(f"task {task} kept no neuron of {', '.join(empty)} {why}: the layers reading "
                              f"{'it' if len(empty) == 1 else 'them'} get nothing of this task there, so unless a "
                              f"skip connection carries its features around, its outputs no longer depend on the "
                              f"input. Keep at least one neuron of each layer (prune fewer by hand; train_task "
                              f"always keeps one){', or train with forward transfer' if not transfer else ''}",
                              CapacityWarning, stacklevel=user_stacklevel())
        full = self._layers_without_capacity()
        if full:  # said now, while the run can still react, rather than when the next task cannot start
            kept = [f"{name} ({frozen[name]})" for name in full]  # both keyed by neuron group (the graph exists)
            hint = self._user_frozen_hint(full)
            if hint:  # the cause is a member the user froze: said by the hint
                fewer = ""
            elif self.__dict__.get("_unpruned_task") == task:
                fewer = ("train_task(pruning=None) kept every FREE neuron: prune (pruning='l2', 'l1' or 'taylor') "
                         "to leave neurons for later tasks. ")
            elif any(frozen[name] > 1 for name in full):
                fewer = ("A task can keep fewer (train_task prunes further with a larger stop_threshold; by hand, "
                         "group.prune or layer.prune_neurons before finish_task). ")
            else:  # the last FREE neuron of each: pruning never takes it
                fewer = "These were the layers' last FREE neurons, which pruning always leaves to the task. "
            warnings.warn(f"task {task} kept every neuron left in {', '.join(kept)}: no free neuron remains there "
                          f"for a next task. {fewer}{_FULL_LAYERS}{hint}",
                          CapacityWarning,
                          stacklevel=user_stacklevel())
        return frozen

    @torch.no_grad()
    def _renumber_task_major(self) -> None:
        perms = self.graph.task_major_permutations()
        if not perms:
            return
        features = self.graph.apply_permutations(perms)
        router = getattr(self, "router", None)
        if features is not None and router is not None:  # the router reads the body features too
            router.linear.weight.copy_(router.linear.weight[:, features.to(router.linear.weight.device)])
            for name in ("feature_mean", "feature_scale"):
                buf = getattr(router, name)
                buf.copy_(buf[features.to(buf.device)])
        for g in self.graph.groups:
            if id(g) in perms:
                order = self._neuron_order.get(g.name)
                order = torch.arange(g.size) if order is None else order
                self._neuron_order[g.name] = order[perms[id(g)].cpu()]

    def export(self, task: int, example: torch.Tensor | None = None, rtol: float | None = None,
               atol: float | None = None):
        """Finished task ``task`` as a plain torch.nn module (a ``torch.fx.GraphModule`` of compact Linear/Conv2d/
        BatchNorm layers and the body's own ops) that runs without eidetic: its weights are exactly the
        synapses the task uses. Checked against ``self(x, task=task)`` on ``example`` (default: a random
        batch) within ``rtol``/``atol`` (default: by the logits' dtype, ``export.CHECK_TOLERANCE``). Raises as
        ``python_layers.export.export_task`` (TypeError / ValueError for a task that is not a finished one or an
        empty ``example``, GraphError for a body whose neurons cannot be compacted). Traced in eval mode, returned
        in eval mode; the network keeps its mode and the global RNG its state. Paper: the network of a finished
        task is the sub-network of its frozen neurons (Section 3)."""
        from .export import export_task
        return export_task(self, task, example, rtol, atol)

    def neuron_positions(self, group: str) -> torch.Tensor:
        """Int64[size]: the current position of each neuron of group ``group`` (a member layer's name, as in
        ``model.groups``), indexed by the position it had when the network was built.

        ``finish_task`` renumbers neurons task-major (each task's neurons contiguous, finished ones never
        move), so ``layer.neuron_task[model.neuron_positions(name)[i]]`` is the state of the neuron that was
        index i at the start. Raises RuntimeError before the graph is built, KeyError (naming the layers) for
        a name that is no layer of the graph.
        """
        if self.graph is None:
            raise RuntimeError("the layer graph is not built yet: call model.ensure_graph(x) with a batch first")
        g = self.graph.group_of(group)
        order = self._neuron_order.get(g.name)
        if order is None:
            return torch.arange(g.size)
        return torch.empty_like(order).scatter_(0, order, torch.arange(g.size))

    # ------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The body computation. Override in a subclass that defines its layers itself (body=None)."""
        if self.body is None:
            raise NotImplementedError("EideticNetwork(body=None, ...) needs a subclass that overrides "
                                      "forward_features(self, x)")
        return self.body(x)

    def _resolve_task(self, task) -> int:
        if task is None:
            if self.current_task is None:
                raise RuntimeError("no task is being trained: pass task=t for a finished task "
                                   f"(0..{self.num_finished_tasks - 1}) or call prepare_for_task first"
                                   if self.num_finished_tasks else
                                   "no task is prepared: call model.prepare_for_task(0, num_classes) first")
            return self.current_task
        task = task_index(task, "one task for the whole batch (to choose per sample, use model.predict(x))")
        if not 0 <= task < len(self.heads):
            known = f"tasks 0..{len(self.heads) - 1} exist" if len(self.heads) else "no task exists yet"
            raise ValueError(f"unknown task {task}: {known} (prepare_for_task adds one)")
        return task

    def view_for(self, task: int) -> int | None:
        """The view a task evaluates in: its own id once finished, None (everything) while training."""
        return None if task == self.current_task else task

    def _record_body_constants(self) -> None:
        """Copies of the body's buffers outside Eidetic layers (``_check_body_constants``); a plain attribute."""
        self.__dict__["_body_constant_values"] = buffer_values(self._body_modules())

    def _check_body_constants(self, when: str) -> None:
        """RuntimeError when a buffer of the body outside Eidetic layers (a constant every task reads) changed
        since the last finished task: finished tasks' outputs would change with it. It is set back first, so
        they do not."""
        saved = self.__dict__.get("_body_constant_values")
        if not saved or not self.num_finished_tasks:
            return
        changed = []
        for name, module, key, _, values in saved:
            b = module._buffers.get(key)
            if b is None:
                continue  # removed since: no task reads it
            old = values.to(b.device)  # recorded in the dtype of the network's last cast (_apply)
            # the dtype too: re-registered in float16, a buffer equals the recorded values rounded to it
            if b.dtype == old.dtype and same_values(b, old):
                continue
            changed.append(name)
            with torch.no_grad():
                if old.shape == b.shape and old.dtype == b.dtype:
                    b.copy_(old)
                else:  # re-registered with another shape or dtype: the recorded buffer goes back
                    module._buffers[key] = old.clone()
        if changed:
            raise RuntimeError(
                f"buffer(s) {', '.join(changed)} of the body changed after task {self.num_finished_tasks - 1} "
                f"finished ({when}): the body's forward (or code outside it) wrote or re-registered them, and every "
                "task's outputs read them, so finished tasks would change with them. They are set back to the values "
                "(and dtype) recorded at the last finish_task (or load). Keep the body's buffers fixed once a task is "
                "finished: a schedule that changes with training (a warm-up factor, a step count) belongs in the "
                "training loop, not in the body; to cast the network, cast the EideticNetwork itself "
                "(model.to(dtype), model.half()), which records the cast values")

    def _record_frozen_values(self) -> None:
        """The fingerprint of the frozen values now (``_live_fingerprint``), saved with the state dict."""
        self._frozen_fingerprint = self._live_fingerprint()

    def _live_fingerprint(self, names=None) -> dict[str, str]:
        """The Eidetic layers' frozen storage and statistics (``frozen_fingerprint``) and the body's buffers outside
        them (constants every task reads, ``constant_fingerprint``), as this network holds them now; ``names``:
        only those fingerprint entries (None: all)."""
        wanted = None if names is None else set(names)
        digests = frozen_fingerprint(
            {f"{name}.{key}": t for name, m in self.named_modules() if isinstance(m, EideticLayer)
             and (wanted is None or name in wanted)
             for key, t in ((k, getattr(m, k, None)) for k in _FROZEN_KEYS + ("task_state",))
             if isinstance(t, torch.Tensor)}, "")
        digests.update(constant_fingerprint(
            {name: b for name, _, _, b, _ in buffer_values(self._body_modules())}, "",
            None if wanted is None else {n[len(_CONSTANT):] for n in wanted if n.startswith(_CONSTANT)}))
        return digests

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half(): a lossy cast changes the frozen values the network itself holds, so they are
        # recorded again (its own state dict must keep loading, e.g. train_task's restores); a move to another
        # device changes no value, and is not hashed again
        dtypes = self._frozen_dtypes()
        out = super()._apply(fn, recurse)
        after = self._frozen_dtypes()
        if getattr(self, "_frozen_fingerprint", None) is not None and after != dtypes:
            # a cast down (model.half()) is what the user asked for; casting back up after it is where a user
            # expects the finished tasks' outputs back, and does not get them: that cast warns. The floor is the
            # least precise dtype the frozen values have been held in since they were finished (or loaded).
            old = next((d for d in dtypes if d.is_floating_point), None)
            new = next((d for d in after if d.is_floating_point), None)
            if self.num_finished_tasks and old is not None and new is not None:
                floor = self.__dict__.setdefault("_value_floor", old)
                rounded = self.__dict__.get("_rounded_by")
                if _rounds_values(floor, new):
                    self.__dict__["_value_floor"] = new
                    if rounded is None:
                        self.__dict__["_rounded_by"] = (floor, new, self.num_finished_tasks)
                elif rounded is not None and not _rounds_values(rounded[0], new):
                    del self.__dict__["_rounded_by"]
                    self.__dict__["_value_floor"] = new  # the rounded values are the network's from here on
                    (was, to), tasks = (str(d).replace("torch.", "") for d in rounded[:2]), rounded[2]
                    warnings.warn(
                        f"an earlier cast ({was} -> {to}) rounded the frozen weights of finished tasks 0..{tasks - 1}, "
                        f"and casting back does not restore them: those tasks' outputs differ from the ones they had "
                        "when they finished (they stay fixed from here on, at the rounded values). To get them back, "
                        "load a state_dict saved before that cast; to run in lower precision without this, cast a "
                        "copy (copy.deepcopy(model).half()) or use torch.autocast", LossyCastWarning,
                        stacklevel=user_stacklevel())
            self._record_frozen_values()
        saved = self.__dict__.get("_body_constant_values")
        if saved:  # the recorded body buffers follow the network's casts and moves, as the buffers do
            with torch.no_grad():
                self.__dict__["_body_constant_values"] = [(name, module, key, b, fn(values))
                                                          for name, module, key, b, values in saved]
        return out

    def _frozen_dtypes(self) -> list:
        return [t.dtype for m in self.modules() if isinstance(m, EideticLayer)
                for t in (getattr(m, k, None) for k in _FROZEN_KEYS) if isinstance(t, torch.Tensor)] + \
            [b.dtype for _, _, _, b, _ in buffer_values(self._body_modules())]

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a clear error instead of TorchScript's on an annotation."""
        raise RuntimeError("TorchScript (torch.jit.script) cannot compile an EideticNetwork: its layers plan their "
                           "work on the host from the neuron states. Script model.export(task) (a plain torch.nn "
                           "module of a finished task) instead, or use torch.compile / torch.export on it")

    def _frozen_as_constants(self, x: torch.Tensor) -> bool:
        """Whether this forward treats frozen blocks as constants to autograd (see exact_activation_grads): not
        when asked for exact gradients, when the input needs a gradient, or when a module of the body has
        hooks (a backward hook, or a forward hook that may hook the output tensor, would see partial
        gradients). torch's global module hooks (profilers, FlopCounterMode) do not count: tools that count
        work, not gradients, register them."""
        if self.exact_activation_grads or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if not torch.is_grad_enabled():
            return True  # no gradient at all: nothing to be partial
        hooked = self._hooked_module()
        if hooked is None:
            return True
        if self.training and self.num_finished_tasks and not self.__dict__.get("_said_hooked"):
            self.__dict__["_said_hooked"] = True  # once per network (not a module attribute: no state dict entry)
            warnings.warn(f"module {hooked!r} of the network has hooks, so training computes full activation "
                          "gradients, through the frozen blocks too: steps cost what they did with nothing "
                          "frozen instead of getting cheaper as tasks freeze. Remove the hooks to train faster, "
                          "or build the network with exact_activation_grads=True to ask for full gradients "
                          "(no warning then)", HookedTrainingWarning, stacklevel=user_stacklevel())
        return False

    def _hooked_module(self) -> str | None:
        """The name of a module of the network (the router aside) with hooks of its own, or None."""
        router = self._modules.get("router")
        stack = [m for m in self._modules.values() if m is not None and m is not router]
        while stack:  # a walk over the children dicts: this runs on every training forward
            module = stack.pop()
            if _has_hooks(module):
                return next(n for n, m in self.named_modules() if m is module)
            stack.extend(m for m in module._modules.values() if m is not None)
        return None

    def _set_view(self, view_task: int | None, constant_frozen: bool = False) -> None:
        layers = self._graph_layers if self.graph is not None else list(self.body_layers().values())
        for layer in layers:
            _set_mode(layer, view_task, constant_frozen, None)

    def features(self, x: torch.Tensor, view_task: int | None = None) -> torch.Tensor:
        """Body output [B, feature_dim]; with ``view_task=t`` (finished) only neurons of tasks <= t are computed
        (the others are exactly 0: the shape never changes).

        Feature j is the output of the neuron now at position j: ``finish_task`` renumbers neurons
        task-major, so positions change from task to task (``neuron_positions`` maps them).
        """
        _refuse_jit_trace()
        if view_task is not None:
            view_task = self._resolve_task(view_task)
            if view_task >= self.num_finished_tasks:
                raise ValueError(f"view_task={view_task} is not finished; views exist for finished tasks only "
                                 f"(0..{self.num_finished_tasks - 1})")
        self.ensure_graph(x)
        self._check_body_structure()
        layers = self._graph_layers
        saved = _modes(layers)
        # frozen blocks are constants to autograd unless asked otherwise or the input itself needs a gradient
        constant = self._constant_frozen = self._frozen_as_constants(x)
        self._set_view(view_task, constant)
        try:
            return self.forward_features(x)
        finally:
            _restore_modes(layers, saved)
            self._constant_frozen = constant  # for logits(), also after a forward nested in this one

    def logits(self, features: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Head ``task`` on body features (view mode for a finished task)."""
        task = self._resolve_task(task)
        head = self.heads[task]
        saved = _modes([head])
        _set_mode(head, self.view_for(task), self._constant_frozen, None, head._network_forward)
        try:
            return head(features)
        finally:
            _restore_modes([head], saved)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits of head ``task`` (default: the task being trained). Bit-stable once the task is finished.

        A finished task in eval mode runs at *prefix width* when the body allows it (``narrow_eval_blocked_by``
        is None): neurons are task-major, so the neurons of tasks <= t are each layer's first ones, and every
        activation inside the body keeps only them instead of a zero tail. The products are the view's own,
        so the logits are those of ``logits(features(x, view_task=t), t)``, bit for bit; only work on the
        zero tail is saved. ``features()`` and hooks always see full-width tensors: modules with hooks, train
        mode, a subclass overriding ``features``/``logits``, or a body that reads its feature sizes run at full
        width. Each layer checks the width it reads: an input of the wrong size raises the full-width error.
        """
        _refuse_jit_trace()
        task = self._resolve_task(task)
        view = self.view_for(task)
        if view is not None and self.narrow_eval_blocked_by(x) is None:
            return self._narrow_logits(x, task)
        return self.logits(self.features(x, view_task=view), task)

    def narrow_eval_blocked_by(self, x: torch.Tensor | None = None, task: int | None = None) -> str | None:
        """Why ``forward`` evaluates finished tasks at full width (None: at prefix width; see ``forward``).
        With ``task`` (a finished task), also whether its neurons are every layer's first ones."""
        if self.graph is None:
            if x is None:
                return "the layer graph is not built yet"
            self.ensure_graph(x)
        if self.graph.narrow_blocked_by is not None:
            return self.graph.narrow_blocked_by
        if torch.compiler.is_compiling():
            return "torch.compile traces the full-width graph"
        cls = type(self)
        if cls.features is not EideticNetwork.features or cls.logits is not EideticNetwork.logits:
            return f"{cls.__name__} overrides features() or logits(), which forward() then calls at full width"
        coupled = next((g.name for g in self.graph.groups if g.raw_positions and g.weight_members()), None)
        if coupled is not None:
            return (f"{coupled} is coupled with a batch norm of the raw input: its neurons are input positions, "
                    "which prefix width does not narrow")
        if _global_hooks():
            return "global module hooks are registered"
        if x is not None and _channels_last(x):
            return ("the input is channels_last, where pooling and means vectorise over channels and round by width "
                    "(prefix width could change a finished task's last bits)")
        # every module but the router (a walk over the children dicts: this runs on every forward)
        router = self._modules.get("router")
        stack = [self]
        while stack:
            module = stack.pop()
            if isinstance(module, EideticConv2d) and _channels_last(module.weight):
                name = next(n for n, m in self.named_modules() if m is module)
                return (f"{name} is channels_last (its outputs are), where pooling and means vectorise over "
                        "channels and round by width (prefix width could change a finished task's last bits)")
            if module.training or (module is not self and _has_hooks(module)):
                name = next(n for n, m in self.named_modules() if m is module) or "the network"
                if module.training:
                    return f"{name} is in train mode (model.eval() turns prefix width on)"
                return f"{name} has hooks, which see full-width activations and gradients"
            stack.extend(m for m in module._modules.values() if m is not None and m is not router)
        if task is not None:
            widths = self._narrow_widths(self._resolve_task(task))
            if isinstance(widths, str):
                return widths
        return None

    def _narrow_widths(self, task: int) -> dict | str:
        """{layer: the input width it reads at prefix width (channels, for a batch norm)} for finished task
        ``task``, or why its neurons are not every layer's first ones. Layers of raw-input groups (a batch norm
        of the raw input) are left out: they run their full-width view. Read-only: the answer is cached until
        the graph, the head or a layer's states change (each layer's plan token, ``EideticLayer.plan_token``)."""
        head = self.heads[task]
        layers = self._graph_layers + [head]
        key = (self.graph, *(layer.plan_token() for layer in layers))
        cache = self.__dict__.setdefault("_narrow_widths_cache", {})
        if cache and next(iter(cache.values()))[0][0] is not self.graph:
            cache.clear()  # a rebuilt graph (or a load): drop the entries that hold the old one
        hit = cache.get(task)
        if hit is not None and len(hit[0]) == len(key) and all(a is b for a, b in zip(hit[0], key)):
            return hit[1]
        widths = self._compute_narrow_widths(task, head, layers)
        cache[task] = (key, widths)
        return widths

    def _compute_narrow_widths(self, task: int, head, layers: list) -> dict | str:
        for layer in layers:
            _set_mode(layer, task, False, None)
        try:
            width = {}
            for g in self.graph.groups:
                if g.raw_positions:
                    continue
                n = g.members[0][1].narrow_width()
                if n is None:
                    return f"{g.name}'s neurons of tasks <= {task} are not its first ones"
                if n == 0:  # pooling and the engine's products want one feature at least
                    return f"{g.name} keeps no neuron of tasks <= {task}"
                width[id(g)] = n

            def reads(segments):
                return sum((s.count if s.source is None or s.source.raw_positions else width[id(s.source)])
                           * s.repeat for s in segments)

            widths = {layer: reads(segments) for layer, segments in self.graph.inputs.values()}
            for g in self.graph.groups:
                if not g.raw_positions:
                    widths.update({layer: width[id(g)] for layer in g.layers if layer not in widths})
            if head.narrow_width() is None:
                return f"head {task}'s neurons are not all of task {task}"
            widths[head] = reads(self.graph.features)
            return widths
        finally:
            for layer in layers:
                _reset_mode(layer)

    def _narrow_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """``forward`` of finished task ``task`` at prefix width (each layer reads the width ``_narrow_widths``
        gives). An input of the wrong size, found by a layer at prefix width, runs at full width instead, where
        it gets the error a full-width forward raises."""
        widths = self._narrow_widths(task)
        if isinstance(widths, str):
            return self.logits(self.features(x, view_task=task), task)
        self._check_body_structure()
        head = self.heads[task]
        self._constant_frozen = self._frozen_as_constants(x)
        layers = self._graph_layers + [head]
        saved = _modes(layers)
        for layer in layers:
            _set_mode(layer, task, self._constant_frozen, widths.get(layer))
        try:
            return head(self.forward_features(x))
        except PrefixWidthMismatch:
            pass
        finally:
            _restore_modes(layers, saved)
        return self.logits(self.features(x, view_task=task), task)

    # ------------------------------------------------------------------------------------------------
    # reporting
    # ------------------------------------------------------------------------------------------------
    def capacity(self) -> dict[str, dict[str, int]]:
        """Per neuron group (per layer before the graph exists): neurons owned by each finished task,
        free, pruned. Keys "task 0", "task 1", ..., "free", "pruned". Counts only: inside the network, task t's
        neurons are the contiguous block after the earlier tasks' (see ``neuron_positions``)."""
        if self.graph is not None:
            states = {g.name: g.task_state for g in self.graph.groups}
        else:
            states = {name: layer.task_state for name, layer in self.body_layers().items()}
        out = {}
        for name, s in states.items():
            row = {f"task {t}": int((s == t).sum()) for t in range(self.num_finished_tasks)}
            extra = sorted(int(t) for t in torch.unique(s) if 0 <= int(t) < FREE and int(t) >= self.num_finished_tasks)
            row.update({f"task {t}": int((s == t).sum()) for t in extra})
            row["free"] = int((s == FREE).sum())
            row["pruned"] = int((s == PRUNED).sum())
            out[name] = row
        return out

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, finished_tasks={self.num_finished_tasks}, "
                f"current_task={self.current_task}")

    # ------------------------------------------------------------------------------------------------
    # training and routing (python_layers.trainer / python_layers.routing)
    # ------------------------------------------------------------------------------------------------
    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What ``DistributedDataParallel`` leaves alone (it reads this when it wraps the network): parameters
        that cannot get a gradient (the empty trainable storage of finished heads, layers the user froze) and
        every buffer (neuron states are the same on every process by construction; running statistics are
        synchronised by the trainer after each epoch; gloo cannot even send the int16 states)."""
        names = [name for name, p in self.named_parameters() if p.numel() == 0 or not p.requires_grad]
        names += [name for name, _ in self.named_buffers()]
        return names + list(getattr(self, "_ddp_ignore_extra", []))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self._ddp_ignore_extra = list(names)

    def train_task(self, loader, optimizer, pruning: str = "l2", step: float = 0.05, stop_threshold: float = 0.01,
                   max_epochs: int = 50, patience: int = 5, recovery_epochs: int = 5, **kwargs):
        """Train the current task, prune it iteratively, freeze it (see python_layers.trainer)."""
        from .trainer import train_task
        return train_task(self, loader, optimizer, pruning=pruning, step=step, stop_threshold=stop_threshold,
                          max_epochs=max_epochs, patience=patience, recovery_epochs=recovery_epochs, **kwargs)

    def fit_router(self, loaders, **kwargs):
        """Train the task classifier over the body features of every finished task (python_layers.routing)."""
        from .routing import fit_router
        return fit_router(self, loaders, **kwargs)

    def predict(self, x: torch.Tensor, router: str = "learned"):
        """(tasks, classes), LongTensor[B] each, with no task id given (``python_layers.routing.predict``: eval
        mode under no_grad whatever this network's mode, which it keeps; paper Section 3, "task routing")."""
        from .routing import predict
        return predict(self, x, router)

    # ------------------------------------------------------------------------------------------------
    # state dict: heads and counters travel with it
    # ------------------------------------------------------------------------------------------------
    def get_extra_state(self):
        graph = None
        if self.graph is not None:  # the structure travels too: a loaded network needs no batch to know it
            graph = self.graph.to_spec({id(m): name for name, m in self.named_modules()})
        return {"version": 2, "num_finished_tasks": self.num_finished_tasks, "current_task": self.current_task,
                "frozen_fingerprint": self._frozen_fingerprint,
                "forward_transfer": dict(self.forward_transfer), "feature_dim": self.feature_dim, "graph": graph,
                "neuron_order": {k: v.tolist() for k, v in self._neuron_order.items()}}  # plain python, as the graph

    def set_extra_state(self, state) -> None:
        if state.get("feature_dim", self.feature_dim) != self.feature_dim:
            raise ValueError(f"the state dict is for feature_dim={state['feature_dim']}, this network has "
                             f"{self.feature_dim}")
        self.num_finished_tasks = int(state["num_finished_tasks"])
        self._frozen_fingerprint = state.get("frozen_fingerprint")
        self.current_task = state["current_task"]
        self.forward_transfer = dict(state["forward_transfer"])
        self._neuron_order = {k: torch.as_tensor(v, dtype=torch.long) for k, v in state.get("neuron_order", {}).items()}
        # built after every tensor is loaded (see _sync_after_load)
        self._pending_graph = state.get("graph") if self.graph is None else None
        self._loaded_body_ops = (state.get("graph") or {}).get("body_ops")  # checked once the load is over

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # plain layers a subclass added after __init__ become the Eidetic layers the state dict was saved from
        self._convert_and_check()
        # torch loads this module first, then its children, then runs the post-load hook: checked here, a
        # state dict of another body is refused before any tensor or counter of this network changes
        self._check_layer_sizes(state_dict, prefix)
        self._check_record(state_dict.get(prefix + "_extra_state"))
        self._check_finished_tasks(state_dict, prefix, strict)
        self._load_errors = error_msgs  # torch's own errors so far and to come, read by _sync_after_load
        # a state dict of another dtype (a float32 checkpoint into a half network): its values are cast as they
        # load, so the record it brings (of its own values) is taken again from the loaded ones
        own = dict(itertools.chain(self.named_parameters(), self.named_buffers()))
        self.__dict__["_load_casts"] = any(
            isinstance(t, torch.Tensor) and k[len(prefix):] in own and t.dtype != own[k[len(prefix):]].dtype
            for k, t in state_dict.items() if k.startswith(prefix))
        self._match_heads(state_dict, prefix)
        load = self.__dict__["_load_marks"] = {"active": True}
        for name, module in self.named_modules():  # the states this load brings, checked above as a whole
            if isinstance(module, EideticLayer):
                # only a layer whose states and frozen storage all come with them: the fingerprint covers those;
                # one with part of them is checked by the layer against its own
                keys = ["task_state"] + [k for k in ("min_input_task", "input_task", "frozen_weight",
                                                     "frozen_bias", "running_mean", "running_var")
                                         if isinstance(getattr(module, k, None), torch.Tensor)]
                if all(f"{prefix}{name}.{k}" in state_dict for k in keys):
                    module.__dict__["_network_loading"] = (load, error_msgs, state_dict[f"{prefix}{name}.task_state"])
                else:
                    module.__dict__.pop("_network_loading", None)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        except BaseException:
            load["active"] = False  # a load that stopped lends its marks to no later load
            raise

    def _check_layer_sizes(self, state_dict, prefix: str) -> None:
        """RuntimeError (as torch's size mismatch) when a body layer in ``state_dict`` has other sizes than this
        network's: neurons, inputs or kernel. Heads and the router are rebuilt to the state dict's sizes."""
        for name, module in self._body_modules():
            if not isinstance(module, EideticLayer):
                continue
            checks = [("neurons", "task_state", lambda t: tuple(t.shape)),
                      ("inputs", "input_task", lambda t: tuple(t.shape))]
            if isinstance(module, (EideticLinear, EideticConv2d)):
                checks.append(("inputs and kernel (weight.shape[1:])", "weight", lambda t: tuple(t.shape[1:])))
            for what, key, size in checks:
                saved, own = state_dict.get(f"{prefix}{name}.{key}"), getattr(module, key, None)
                if isinstance(saved, torch.Tensor) and isinstance(own, torch.Tensor) and size(saved) != size(own):
                    raise RuntimeError(
                        f"Error(s) in loading state_dict for {type(self).__name__}: size mismatch for "
                        f"{prefix}{name}: {what} {size(saved)} in the state dict, {size(own)} in this network. "
                        f"Build the network with the body the state dict was saved from (the same widths and "
                        f"kernel sizes); nothing of this network was loaded.")

    def _check_record(self, extra) -> None:
        """RuntimeError, before anything loads, for a network record (the state dict's ``_extra_state``) whose
        counters are not those ``get_extra_state`` writes: a task count that is not an integer >= 0, a current
        task that is neither None nor the next task."""
        if not isinstance(extra, dict):
            return  # no record: _check_finished_tasks decides whether the state dict may load without one

        def count(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        finished, current = extra.get("num_finished_tasks"), extra.get("current_task")
        problem = None
        if not count(finished):
            problem = f"num_finished_tasks is {finished!r}, not an integer >= 0"
        elif current is not None and (not count(current) or current != finished):
            problem = f"current_task is {current!r}, neither None nor the next task ({finished})"
        if problem:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: its network record (_extra_state) is "
                f"not one this library wrote: {problem}. Load a state dict saved by EideticNetwork.state_dict() "
                "with torch.save/torch.load, unedited. Nothing of this network was loaded.")

    def _check_finished_tasks(self, state_dict, prefix: str, strict: bool = True) -> None:
        """RuntimeError, before anything loads, for a state dict that would change a finished task:

        * neuron states that are not FREE, PRUNED or a task the state dict says is finished (integer buffers
          that were averaged or computed, e.g. by ``AveragedModel(use_buffers=True)``);
        * frozen values (weights, biases, batch-norm statistics of frozen channels) other than those recorded
          by ``finish_task`` in the state dict's ``frozen_fingerprint``: an average or edit of the frozen
          storage. A state dict of other finished tasks (another run, an earlier checkpoint) loads, replacing
          this network's, as a load should."""
        extra = state_dict.get(prefix + "_extra_state")
        finished = extra.get("num_finished_tasks") if isinstance(extra, dict) else None
        layers = [(name, m) for name, m in self.named_modules() if isinstance(m, EideticLayer)]
        if not isinstance(extra, dict):
            def touches_tasks(name, layer) -> bool:  # brings frozen neurons, or would unfreeze this network's
                saved = state_dict.get(f"{prefix}{name}.task_state")
                if not isinstance(saved, torch.Tensor) or saved.shape != layer.task_state.shape:
                    return False
                own = layer.task_state
                saved = saved.to(own.device, own.dtype)
                return bool(is_frozen(saved).any()) or not torch.equal(saved[is_frozen(own)], own[is_frozen(own)])
            holding = [name for name, layer in layers if touches_tasks(name, layer)]
            constants = [name for name, _, _, b, _ in buffer_values(self._body_modules())
                         if self.num_finished_tasks and isinstance(state_dict.get(prefix + name), torch.Tensor)
                         and not same_values(state_dict[prefix + name].to(b), b)]
            if constants and not holding:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: it changes the body's buffer(s) "
                    f"{', '.join(prefix + n for n in constants)}, constants every task's outputs read, and holds "
                    f"no network record (\"{prefix}_extra_state\") saying which finished tasks they belong to: "
                    f"loading it would change this network's {self.num_finished_tasks} finished task(s). Load a "
                    "whole state dict of this library (torch.save/torch.load keeps the record), or leave these "
                    "buffers out of a partial one. Nothing of this network was loaded.")
            if holding:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: Missing key(s) in state_dict: "
                    f"\"{prefix}_extra_state\". The state dict holds neuron states ({prefix}{holding[0]}, ...) that "
                    "are frozen or would unfreeze this network's, but not the network's own record (finished "
                    "tasks, graph, fingerprint), without which its tasks "
                    "cannot be kept apart: save and load it with torch.save/torch.load (a tensors-only format "
                    "such as safetensors drops that entry), and keep that entry in a partial state dict "
                    "(strict=False). Nothing of this network was loaded.")
        for name, _ in layers:
            saved = state_dict.get(f"{prefix}{name}.task_state")
            if not isinstance(saved, torch.Tensor) or finished is None:
                continue
            bad = saved[(saved != FREE) & (saved != PRUNED) & ((saved < 0) | (saved >= finished))]
            if bad.numel():
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: {prefix}{name}.task_state holds "
                    f"{sorted(set(bad.tolist()))[:5]}, which are neither FREE, PRUNED nor one of the state dict's "
                    f"{finished} finished tasks: its integer buffers were computed (an average of state dicts, as "
                    "AveragedModel(use_buffers=True) makes?), or it was taken with state_dict() and kept without "
                    "copying while the network trained on (keep copy.deepcopy(model.state_dict())). Load a state "
                    "dict this library saved; average only the trainable parameters. Nothing of this network was "
                    "loaded.")
        for name, layer in layers:  # states that freeze neurons come with their values
            saved = state_dict.get(f"{prefix}{name}.task_state")
            if not isinstance(saved, torch.Tensor) or not bool(is_frozen(saved).any()):
                continue
            keys = [f"{prefix}{name}.{k}" for k in ("weight", "bias", "frozen_weight", "frozen_bias")
                    if getattr(layer, k, None) is not None]
            missing = [k for k in keys if k not in state_dict]
            if missing:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: it holds {prefix}{name}.task_state, "
                    f"which freezes neurons, but not {', '.join(missing)}: a layer's neuron states and its storages "
                    "load together. Keep those keys in the (partial) state dict, or leave out the layer's states "
                    "too. Nothing of this network was loaded.")
        if isinstance(extra, dict):
            tasks = _recorded_tasks(extra)
            heads = sum(1 for k in state_dict if k.startswith(prefix + "heads.") and k.endswith(".task_state"))
            if tasks and not heads and len(self.heads) != tasks:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: the state dict records {tasks} "
                    f"task(s) but holds no head, and this network has {len(self.heads)} head(s): a partial state "
                    "dict without heads (a body's or a router's entries) needs a network whose heads are those "
                    "tasks'. Load the whole state dict (its heads too), or its heads first. Nothing of this "
                    "network was loaded.")
        recorded = extra.get("frozen_fingerprint") if isinstance(extra, dict) else None
        if isinstance(recorded, str):  # the first record format: one digest of the whole state dict
            changed = _first_format_fingerprint(state_dict, prefix) != recorded
        else:  # layer by layer: a partial state dict (strict=False) is checked on the layers it holds
            held = frozen_fingerprint(state_dict, prefix) if recorded else {}
            if recorded:  # the body's constants the record holds (records from before they were recorded: none)
                held.update(constant_fingerprint(state_dict, prefix,
                                                 {k[len(_CONSTANT):] for k in recorded if k.startswith(_CONSTANT)}))
            # a layer the record holds frozen values of, whose states come without any (all FREE, say): edited
            emptied = {name for name in (recorded or {}) if not name.startswith(_CONSTANT) and name not in held
                       and f"{prefix}{name}.task_state" in state_dict
                       and any(f"{prefix}{name}.{key}" in state_dict for key in _FROZEN_KEYS)}
            differ = sorted({name for name, digest in (recorded or {}).items() if name in held and held[name] != digest}
                            | {name for name in held if name not in recorded} | emptied)
            changed = bool(differ)
            left_out = [name for name in (recorded or {}) if name not in held]
            if left_out and not differ:
                # a partial state dict: its record becomes this network's, so what it leaves out must be this
                # network's own values (another run's record with some of its layers would leave the rest unmatched)
                own = self._live_fingerprint(left_out)
                foreign = sorted(name for name in left_out if own.get(name) != recorded[name])
                modules = dict(self.named_modules())
                missing = [name for name in foreign if not name.startswith(_CONSTANT) and name not in modules]
                if missing:
                    raise RuntimeError(
                        f"Error(s) in loading state_dict for {type(self).__name__}: it is partial, and it leaves out "
                        f"{', '.join(_entry_names(missing, prefix))}, which its record (\"{prefix}_extra_state\") "
                        f"describes and this network does not have (a fresh network has no heads yet). Load the "
                        "whole state dict (with strict=True), or load into the network it was saved from. Nothing "
                        "of this network was loaded.")
                if foreign:
                    raise RuntimeError(
                        f"Error(s) in loading state_dict for {type(self).__name__}: it is partial, and this network's "
                        f"{', '.join(_entry_names(foreign, prefix))}, which it leaves out, do not match its record "
                        f"(\"{prefix}_extra_state\"): the record is another network's (or another dtype's: load "
                        "into a network of the state dict's dtype, then cast), and would not describe this network "
                        "after the load. Load that network's whole state dict, or a partial one without its record. "
                        "Nothing of this network was loaded.")
        if changed:
            names = ", ".join(_entry_names(differ, prefix)) if not isinstance(recorded, str) else "its layers"
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: its frozen values (weights, biases, "
                "batch-norm statistics of frozen channels, the body's buffers) are not those its finished tasks were "
                f"frozen with ({names}): loading it would change their outputs. An average of whole state dicts "
                "(EMA or SWA with AveragedModel(use_buffers=True)) or an edit does this: average only the trainable "
                "parameters (FREE neurons and the current head); so does a state dict taken with state_dict() and "
                "kept without copying while the network trained on (keep copy.deepcopy(model.state_dict())). "
                "Nothing of this network was loaded.")

    def _match_heads(self, state_dict, prefix: str) -> None:
        """Re-create the heads the state dict holds (keeping existing ones of the right size, so an
        optimizer holding their parameters stays valid). A full network state dict (with its extra
        state) also drops heads it does not hold; a partial one (strict=False) never drops any."""
        key = prefix + "heads.{}.task_state"
        n = 0
        while key.format(n) in state_dict:
            n += 1
        extra = state_dict.get(prefix + "_extra_state")
        # a whole network's state dict holds the head of each task it records; any other is partial (strict=False:
        # the body's keys and the record, or some heads), and drops nothing
        tasks = _recorded_tasks(extra) if isinstance(extra, dict) else None
        full = tasks is not None and n == tasks and all(
            f"{prefix}{name}.task_state" in state_dict for name, m in self._body_modules()
            if isinstance(m, EideticLayer))
        like = self._reference_tensor()
        for i in range(n):
            num_classes = state_dict[key.format(i)].numel()
            if i < len(self.heads) and self.heads[i].out_features == num_classes:
                continue
            head = EideticLinear(self.feature_dim, num_classes, device=like.device, dtype=like.dtype)
            head.qualified_name = f"heads.{i}"
            if i < len(self.heads):
                self.heads[i] = head
            else:
                self.heads.append(head)
        while full and len(self.heads) > n:
            del self.heads[len(self.heads) - 1]
        self._match_router(state_dict, prefix, full)

    def _match_router(self, state_dict, prefix: str, full: bool) -> None:
        """The task router of python_layers.routing (model.router) travels with the state dict too."""
        key = prefix + "router.linear.weight"
        router = getattr(self, "router", None)
        if key in state_dict:
            num_tasks, feature_dim = state_dict[key].shape
            if router is None or tuple(router.linear.weight.shape) != (num_tasks, feature_dim):
                from .routing import TaskRouter
                like = self._reference_tensor()  # the device; the dtype is the saved router's own
                router = TaskRouter(feature_dim, num_tasks).to(device=like.device, dtype=state_dict[key].dtype)
                router.requires_grad_(False)  # as fit_router leaves it: never part of a task's training
                self.router = router
        elif full and router is not None:
            del self.router

    def _reference_tensor(self) -> torch.Tensor:
        for _, module in self._body_modules():
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t is not None and t.dtype.is_floating_point:
                    return t
        return torch.empty(0)


def _recorded_tasks(extra: dict) -> int:
    """The tasks a network record (``_extra_state``, its counters checked by ``_check_record``) has heads for:
    the finished ones and the one in training."""
    return extra["num_finished_tasks"] + (extra.get("current_task") is not None)


# layer -> weakref of the network that holds it (outside the layer: a pickled or copied layer carries none)
_LAYER_OWNER: "weakref.WeakKeyDictionary[EideticLayer, weakref.ref]" = weakref.WeakKeyDictionary()


def _refuse_layers_of_another_network(body: nn.Module, network: "EideticNetwork") -> None:
    """GraphError when an Eidetic layer of ``body`` is a layer of another live EideticNetwork: two networks would
    keep their tasks in the same neurons, and each would prune, freeze and recycle the other's. A deep copy of a
    network makes new layers, which its original does not hold: those are not refused."""
    for name, module in body.named_modules():
        ref = _LAYER_OWNER.get(module) if isinstance(module, EideticLayer) else None
        other = ref() if ref is not None else None
        if other is not None and other is not network and any(m is module for m in other.modules()):
            where = getattr(module, "qualified_name", None) or name or type(module).__name__
            raise GraphError(f"{where} is a layer of another EideticNetwork ({other.num_finished_tasks} finished "
                             f"tasks): its neurons hold that network's tasks, and both networks would prune, freeze "
                             f"and recycle them. Build this network on a copy (copy.deepcopy(body)), or load the "
                             f"other's state dict into a network on a fresh body. Nothing was changed")


def _sync_after_load(module: EideticNetwork, incompatible_keys) -> None:
    # the load is over: its marks vouch for nothing more (a load that stopped never gets here, but its marks
    # hold its own list of errors, which no later load passes: EideticLayer._check_owned_load)
    marks = module.__dict__.pop("_load_marks", None)
    if marks is not None:
        marks["active"] = False
    for layer in module.modules():
        if isinstance(layer, EideticLayer):
            layer.__dict__.pop("_network_loading", None)
    casts = module.__dict__.pop("_load_casts", False)
    errors = module.__dict__.pop("_load_errors", None)
    if not errors:  # the loaded values are the network's now, rounded or not
        module.__dict__.pop("_rounded_by", None)
        module.__dict__.pop("_value_floor", None)
    if errors:  # torch raises them next (size mismatches, ...): its message, not one from a half-loaded sync
        module.__dict__.pop("_pending_graph", None)
        return
    spec = module.__dict__.pop("_pending_graph", None)
    recorded = module.__dict__.pop("_loaded_body_ops", None)
    if recorded is not None and module.num_finished_tasks:
        changed = changed_body_op(module, recorded)
        if changed is not None:
            warnings.warn(f"this network's body computes otherwise than the body the state dict's "
                          f"{module.num_finished_tasks} finished task(s) were trained with ({changed}): their outputs "
                          f"will not be the ones they had. Load into the body they were trained with",
                          BodyChangedWarning, stacklevel=user_stacklevel())
    if spec is not None and module.graph is None:
        # the loaded states (min_input_task included) are already right: do not re-apply task settings
        module._attach_graph(LayerGraph.from_spec(spec, module), apply_settings=False,
                             how="traced (as the checkpoint's layer graph records)")
    module.sync()
    module._record_body_constants()  # the loaded values are the body's constants now
    _forget_compiled_graphs()  # a load replaces the frozen storage (and Parameters whose shapes change)
    record = module._frozen_fingerprint
    if casts and record is not None or isinstance(record, str) or (
            isinstance(record, dict) and module.num_finished_tasks and buffer_values(module._body_modules())
            and not any(k.startswith(_CONSTANT) for k in record)):
        # values cast as they loaded, a record from before per-layer digests, or before the body's buffers were
        # recorded (checked on load as far as it goes): recorded again, whole, from the loaded values
        module._record_frozen_values()
