"""The three providers measured side by side, and the models of the end-to-end benchmark.

* ``nn``: plain torch.nn layers, no masking: the floor.
* ``torch-prune``: what users write today, and what the paper's reference code does
  (amazon-science/eideticnet-training): ``torch.nn.utils.prune`` gives ``weight_orig`` (the
  Parameter), a dense ``weight_mask`` buffer and ``weight = weight_orig * weight_mask`` recomputed
  in a forward pre-hook; a post-accumulate-grad hook zeroes the gradient of frozen rows; batch norm
  computes the training output and the eval output (frozen running statistics) and selects per
  channel. One more piece is needed for the promise to hold under AdamW: weight decay moves a row
  even when its gradient is zero, so an optimizer step post-hook copies the frozen rows back from
  a saved copy (see ``keep_frozen_rows``). Without it the comparison would not be like for like.
* ``eidetic``: ``eidetic_kernels`` layers on whatever backend the device selects; the requested
  share of neurons is frozen the way training does it (prune the rest, freeze, recycle).

In every case the frozen neurons belong to task 0 and the others are FREE (training task 1);
nothing is PRUNED in the steady state, because recycling turns the pruned neurons FREE again.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune_utils

from eidetic_kernels import FREE, PRUNED, FreeInputsWarning, convert
from eidetic_kernels.layers import EideticLayer
from eidetic_kernels.state import is_frozen, live_synapses

PROVIDERS = ("nn", "torch-prune", "eidetic")
FROZEN_TASK = 0

# ----------------------------------------------------------------------------------------------
# Which neurons are frozen
# ----------------------------------------------------------------------------------------------


def frozen_task_states(n: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """Int16[n]: ``round(share * n)`` neurons, chosen at random, frozen for task 0; the rest FREE.

    Random rather than a prefix: pruning scores scatter the surviving neurons over the layer.
    """
    k = int(round(share * n))
    state = torch.full((n,), FREE, dtype=torch.int16)
    if k:
        state[torch.randperm(n, generator=generator)[:k]] = FROZEN_TASK
    return state


# ----------------------------------------------------------------------------------------------
# torch-prune provider
# ----------------------------------------------------------------------------------------------


def _zero_rows_hook(rows: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        param.grad.masked_fill_(rows.view((-1,) + (1,) * (param.grad.dim() - 1)), 0)
    return hook


def apply_torch_prune(module: nn.Module, out_task: torch.Tensor, in_task: torch.Tensor | None = None) -> nn.Module:
    """Turn a Linear/Conv2d/BatchNorm2d into the torch.nn.utils.prune-style provider, in place.

    out_task: int16[out] per-neuron states; in_task: int16[in] states of the inputs (None: raw
    inputs, task 0). The mask is the live-synapse rule, dense and weight-shaped, as prune keeps it.
    """
    device = next(module.parameters()).device
    out_task = out_task.to(device)
    frozen_rows = is_frozen(out_task)
    live_rows = out_task != PRUNED
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        n_in = module.weight.shape[1]
        if in_task is None:
            in_task = torch.zeros(n_in, dtype=torch.int16)
        synapses = live_synapses(in_task.to(device), out_task)  # Bool[out, in]
        view = synapses.shape + (1,) * (module.weight.dim() - 2)
        weight_mask = synapses.view(view).expand_as(module.weight).to(module.weight.dtype).contiguous()
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        weight_mask = live_rows.to(module.weight.dtype)
    else:
        raise TypeError(f"torch-prune provider: unsupported module {type(module).__name__}")
    torch_prune_utils.custom_from_mask(module, "weight", weight_mask)
    if module.bias is not None:
        torch_prune_utils.custom_from_mask(module, "bias", live_rows.to(module.bias.dtype))
    module.register_buffer("frozen_rows", frozen_rows)
    if bool(frozen_rows.any()):
        frozen_index = frozen_rows.nonzero().flatten()
        module.register_buffer("frozen_index", frozen_index)
        for name in ("weight", "bias"):
            orig = getattr(module, name + "_orig", None)
            if orig is not None:
                orig.register_post_accumulate_grad_hook(_zero_rows_hook(frozen_rows))
                module.register_buffer(f"frozen_{name}_copy", orig.detach()[frozen_index].clone())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.register_buffer("frozen_running_mean", module.running_mean.clone())
            module.register_buffer("frozen_running_var", module.running_var.clone())
            module.register_forward_hook(_bn_frozen_channels_hook)
            module.register_forward_pre_hook(_bn_restore_before_eval)
    return module


def _bn_frozen_channels_hook(module, args, output):
    """Training: frozen channels take the eval output (frozen statistics), the rest the batch output."""
    if not module.training:
        return None
    x = args[0]
    eval_output = F.batch_norm(x, module.frozen_running_mean, module.frozen_running_var, module.weight,
                               module.bias, False, 0.0, module.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.where(module.frozen_rows.view(shape), eval_output, output)


@torch.no_grad()
def _restore_frozen_statistics(module) -> None:
    # The training forward moves every channel's running statistics; autograd saved them, so they
    # are put back later (after the optimizer step, or before an eval forward), as the paper's code does.
    module.running_mean.index_copy_(0, module.frozen_index, module.frozen_running_mean[module.frozen_index])
    module.running_var.index_copy_(0, module.frozen_index, module.frozen_running_var[module.frozen_index])


def _bn_restore_before_eval(module, args):
    if not module.training:
        _restore_frozen_statistics(module)


@torch.no_grad()
def restore_frozen_rows(model: nn.Module) -> None:
    """Copy frozen rows (and frozen BN statistics) back: what keeps torch-prune's promise under AdamW."""
    for module in model.modules():
        index = getattr(module, "frozen_index", None)
        if index is None:
            continue
        for name in ("weight", "bias"):
            copy = getattr(module, f"frozen_{name}_copy", None)
            if copy is not None:
                getattr(module, name + "_orig").index_copy_(0, index, copy)
        if getattr(module, "frozen_running_mean", None) is not None:
            _restore_frozen_statistics(module)


def keep_frozen_rows(optimizer: torch.optim.Optimizer, model: nn.Module):
    """After each step, copy frozen rows back (AdamW's weight decay moves rows with zero gradient)."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: restore_frozen_rows(model))


# ----------------------------------------------------------------------------------------------
# eidetic provider
# ----------------------------------------------------------------------------------------------


def apply_eidetic_states(layer: EideticLayer, out_task: torch.Tensor, in_task: torch.Tensor | None = None) -> None:
    """Give ``layer`` the states ``out_task`` (task 0 or FREE) the way training does: prune the
    neurons that stay FREE, freeze the survivors for task 0, recycle the pruned ones."""
    out_task = out_task.to(layer.task_state.device)
    if not bool(((out_task == FREE) | (out_task == FROZEN_TASK)).all()):
        raise ValueError("apply_eidetic_states expects states task 0 or FREE only")
    frozen = out_task == FROZEN_TASK
    if in_task is not None and hasattr(layer, "input_task"):  # first: inputs of frozen neurons never change
        layer.set_input_task(in_task)
    if bool(frozen.any()):
        stays_free = (~frozen).nonzero().flatten()
        if stays_free.numel():
            layer.prune_neurons(stays_free)
        with warnings.catch_warnings():  # the FREE inputs here stand for a producer's FREE neurons, as meant
            warnings.simplefilter("ignore", FreeInputsWarning)
            layer.freeze_free_neurons(FROZEN_TASK)
        layer.recycle_pruned_neurons()
    if not torch.equal(layer.task_state, out_task.to(layer.task_state.dtype)):
        raise AssertionError("eidetic layer did not reach the requested states")


def torch_prune_twin(eidetic_model: nn.Module, factory) -> nn.Module:
    """A torch-prune model built by ``factory()`` holding exactly the eidetic model's dense values
    and states: the two must compute the same function (checked before timing)."""
    twin = factory()
    eid = [m for m in eidetic_model.modules() if isinstance(m, EideticLayer)]
    plain = [m for m in twin.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
    if len(eid) != len(plain):
        raise ValueError(f"factory built {len(plain)} weighted layers, the eidetic model has {len(eid)}")
    ref = next(eidetic_model.parameters())
    twin.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for e, p in zip(eid, plain):
            p.weight.copy_(e.dense("weight"))
            if p.bias is not None:
                p.bias.copy_(e.dense("bias"))
            if getattr(e, "running_mean", None) is not None:
                p.running_mean.copy_(e.running_mean)
                p.running_var.copy_(e.running_var)
    for e, p in zip(eid, plain):
        apply_torch_prune(p, e.task_state, getattr(e, "input_task", None))
    return twin.train(eidetic_model.training)


# ----------------------------------------------------------------------------------------------
# Layers and models for the benchmarks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer-level benchmark shape."""

    kind: str  # linear | conv2d | batchnorm2d
    size: int  # width (linear) or channels
    batch: int
    spatial: int = 0  # H = W of the input (conv2d, batchnorm2d)

    @property
    def shape(self) -> str:
        if self.kind == "linear":
            return f"x[{self.batch},{self.size}] -> {self.size}"
        return f"x[{self.batch},{self.size},{self.spatial},{self.spatial}]" + (" k3" if self.kind == "conv2d" else "")

    def make_torch_layer(self, device=None, dtype=None) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.size, self.size, device=device, dtype=dtype)
        if self.kind == "conv2d":
            return nn.Conv2d(self.size, self.size, 3, padding=1, device=device, dtype=dtype)
        if self.kind == "batchnorm2d":
            return nn.BatchNorm2d(self.size, device=device, dtype=dtype)
        raise ValueError(f"unknown layer kind {self.kind!r}")

    def make_input(self, generator: torch.Generator, device=None, dtype=None) -> torch.Tensor:
        shape = (self.batch, self.size) if self.kind == "linear" else (self.batch, self.size, self.spatial,
                                                                        self.spatial)
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def make_layer(provider: str, case: LayerCase, share: float, seed: int = 0, device=None,
               dtype=None) -> nn.Module:
    """The layer of ``case`` as ``provider`` holds it, with ``share`` of its neurons frozen (training mode)."""
    torch.manual_seed(seed)
    layer = case.make_torch_layer(device, dtype)
    states = frozen_task_states(case.size, share, torch.Generator().manual_seed(seed + 1))
    if provider == "nn":
        pass
    elif provider == "torch-prune":
        apply_torch_prune(layer, states)
    elif provider == "eidetic":
        layer = convert(layer)
        apply_eidetic_states(layer, states)
    else:
        raise ValueError(f"unknown provider {provider!r}; use one of {PROVIDERS}")
    return layer.train()


def mlp() -> nn.Sequential:
    """The paper's Permuted-MNIST MLP: 784-2000-2000-10."""
    return nn.Sequential(nn.Linear(784, 2000), nn.ReLU(), nn.Linear(2000, 2000), nn.ReLU(), nn.Linear(2000, 10))


def small_cnn() -> nn.Sequential:
    """A small CIFAR-style CNN with batch norm (3x32x32 -> 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


MODELS = {"mlp": (mlp, (784,)), "cnn": (small_cnn, (3, 32, 32))}


def finished_network(model: nn.Sequential, in_shape: tuple, tasks: int, share: float, seed: int = 0):
    """An ``EideticNetwork`` whose body is ``model`` without its last Linear (the head), with ``tasks``
    finished tasks each keeping ``round(share * n)`` neurons of every group of n, chosen at random (as
    pruning leaves them), prepared for task ``tasks``. No training: for each task, prune the other FREE
    neurons, ``finish_task`` (which freezes the kept ones and recycles the pruned). Heads have
    ``model[-1].out_features`` classes. Raises ValueError when the tasks would use every neuron.
    """
    from python_layers import EideticNetwork

    head = model[-1]
    body = nn.Sequential(*list(model)[:-1])
    net = EideticNetwork(body, head.in_features)
    net.ensure_graph(torch.zeros((2,) + tuple(in_shape), device=head.weight.device, dtype=head.weight.dtype))
    generator = torch.Generator().manual_seed(seed)
    for t in range(tasks):
        net.prepare_for_task(t, head.out_features)
        for group in net.groups:
            if group.input_normalizer:
                continue
            free = (group.task_state == FREE).nonzero().flatten()
            keep = round(share * group.size)
            if keep < 1 or free.numel() <= keep:
                raise ValueError(f"task {t}: {group.name} has {free.numel()} FREE neurons; keeping {keep} per task "
                                 f"leaves none for the next task (use a smaller share or fewer tasks)")
            group.prune(free[torch.randperm(free.numel(), generator=generator)[keep:].to(free.device)])
        net.finish_task(generator=generator)
    net.prepare_for_task(tasks, head.out_features)
    return net.train()


def mlp_1024() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


# Networks trained task after task: (factory, input shape, batch)
TASK_MODELS = {"mlp1024": (mlp_1024, (784,), 256), "mlp2000": (mlp, (784,), 1024), "cnn": (small_cnn, (3, 32, 32), 64)}


def model_input(name: str, batch: int, generator: torch.Generator, device=None, dtype=None):
    shape = MODELS[name][1] if name in MODELS else TASK_MODELS[name][1]
    x = torch.randn((batch,) + shape, generator=generator).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return x, y


def _layer_states(model: nn.Sequential, n_inputs: int, share: float, generator: torch.Generator):
    """[(module, out_task, in_task)] for each weighted layer, following the feature states through
    the Sequential. The last Linear is the current task's head: all FREE."""
    weighted = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
    head = weighted[-1]
    states = []
    features = torch.zeros(n_inputs, dtype=torch.int16)  # raw inputs: task 0
    for m in weighted:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            states.append((m, features, None))  # channels are the producer's neurons
            continue
        n_out = m.weight.shape[0]
        out = torch.full((n_out,), FREE, dtype=torch.int16) if m is head else frozen_task_states(n_out, share,
                                                                                                  generator)
        states.append((m, out, features))
        features = out
    return states


def make_model(provider: str, name: str, share: float, seed: int = 0, device=None, dtype=None) -> nn.Module:
    """The benchmark model ``name`` as ``provider`` holds it, ``share`` of each hidden layer frozen."""
    factory, in_shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(device=device, dtype=dtype)
    states = _layer_states(model, in_shape[0], share, torch.Generator().manual_seed(seed + 1))
    if provider == "nn":
        return model.train()
    if provider == "torch-prune":
        for module, out, inp in states:
            apply_torch_prune(module, out, inp)
        return model.train()
    if provider == "eidetic":
        index = {id(m): i for i, m in enumerate(model)}
        model = convert(model)
        for module, out, inp in states:
            apply_eidetic_states(model[index[id(module)]], out, inp)
        return model.train()
    raise ValueError(f"unknown provider {provider!r}; use one of {PROVIDERS}")


def make_optimizer(provider: str, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with torch's defaults (lr 1e-3, weight decay 0.01) for every provider."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if provider == "torch-prune":
        keep_frozen_rows(opt, model)
    return opt


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def backend_of(model: nn.Module) -> str:
    """Backends the eidetic layers of ``model`` used last (``torch`` for plain torch modules)."""
    names = sorted({m.last_backend for m in model.modules() if isinstance(m, EideticLayer) and m.last_backend})
    return "+".join(names) if names else "torch"


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _collect_tensors(value, out: list, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_tensors(v, out, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_tensors(v, out, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _collect_tensors(getattr(value, f.name), out, depth + 1)


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def held_storages(model: nn.Module) -> dict:
    """{storage: bytes} of every tensor the model holds: parameters, buffers and tensor attributes
    (torch-prune's recomputed ``weight``, eidetic's cached plans). Gradients are not included."""
    tensors: list = []
    for m in model.modules():
        tensors.extend(p for p in m._parameters.values() if p is not None)
        tensors.extend(b for b in m._buffers.values() if b is not None)
        for key, value in vars(m).items():
            if key.startswith("_") and key not in ("_plans",):
                continue
            _collect_tensors(value, tensors)
    found = {}
    for t in tensors:
        if t.numel() == 0:
            continue
        key, nbytes = _storage_key(t)
        found[key] = nbytes
    return found


def held_bytes(model: nn.Module) -> int:
    return sum(held_storages(model).values())


def training_step_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, run_forward, run_backward) -> dict:
    """Bytes of one training step, counted the same way for every provider (CPU has no peak counter):

    held (parameters + buffers + tensor attributes) + saved for backward by autograd (unique
    storages not already held) + gradients + AdamW state, all after the step.
    """
    optimizer.zero_grad(set_to_none=True)
    saved: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        saved[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    run_backward(out)
    grads = {}
    for p in model.parameters():
        if p.grad is not None:
            key, nbytes = _storage_key(p.grad)
            grads[key] = nbytes
    optimizer.step()
    held = held_storages(model)
    state = {}
    for per_param in optimizer.state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                key, nbytes = _storage_key(v)
                state[key] = nbytes
    saved_only = {k: v for k, v in saved.items() if k not in held}
    total = sum(held.values()) + sum(saved_only.values()) + sum(grads.values()) + sum(state.values())
    return {"layer_bytes": sum(held.values()), "saved_bytes": sum(saved_only.values()),
            "grad_bytes": sum(grads.values()), "optimizer_bytes": sum(state.values()), "step_bytes": total}
