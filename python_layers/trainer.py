"""Training one task the Eidetic way (paper Section 3), as ``train_task(model, loader, optimizer, ...)``.

The steps, in the order ``train_task`` runs them:

1. **Train** the current task's FREE neurons (and its head) until the training accuracy has not improved
   for ``patience`` epochs, or ``max_epochs``; keep the weights of the best epoch (the first to reach the best
   accuracy; the last epoch's own when it ties it).
2. **Prune iteratively**: each step prunes ``step`` of every neuron group's FREE neurons (the same share
   in every group; scores and normalisation in ``python_layers.pruning``), then **recovers** for up to
   ``recovery_epochs`` epochs, leaving early once the training accuracy is back within
   ``stop_threshold`` (an absolute fraction, 0.01 = one point) of the best seen, recovery epochs included (a
   drop of exactly the threshold is within it: ``within``). If it stays further
   below, the step is undone: the last good weights *and* optimizer state come back, and pruning ends.
   Pruning also ends cleanly when every group is down to one FREE neuron.
3. **Freeze** the surviving FREE neurons (and the head) for the task, 4. **recycle** the pruned ones with
   a fresh default init as FREE capacity for the next task, 5. **cut** the synapses from them into frozen
   neurons: all three are ``model.finish_task()``, which installs new Parameters; the optimizer given to
   ``train_task`` is re-bound to them (same param groups and hyperparameters, the replaced Parameters'
   state dropped), so it can be reused for the next task once that task's head is added to it
   (``optimizer.add_param_group({"params": model.heads[t].parameters()})`` after ``prepare_for_task(t, ...)``).

Every loop is capped by an epoch or step count; no stopping rule tests floats for equality.
"""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import inspect
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from eidetic_kernels import PRUNED, rebind_optimizer

from . import distributed as dist_mod
from . import pruning as pruning_mod
from .warn import user_stacklevel
from .network import CapacityWarning
from .pruning import frozen_share, pruned_share

try:  # progress bars are optional: without tqdm, every stream gets the plain line per epoch
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

# How often a live progress bar refreshes its loss and accuracy: reading them waits for the device to finish its
# queued work, so it is done at most this often (and once at the end of the epoch), never once per batch.
POSTFIX_SECONDS = 2.0

__all__ = ["train_task", "run_epoch", "snapshot", "restore"]


# ----- small pieces ---------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    for t in model.buffers():
        return t.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# the key pairs a dict batch may hold its inputs and labels under (the first found is taken)
BATCH_KEYS = (("x", "y"), ("input", "target"), ("inputs", "labels"), ("image", "label"), ("pixel_values", "labels"))


def batch_inputs(batch, what: str = "the loader"):
    """The inputs of a batch: a tensor, the first item of a tuple/list, or a dict's entry under a key of
    ``BATCH_KEYS``. TypeError otherwise, naming what is accepted."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key, _ in BATCH_KEYS:
            if key in batch:
                return _tensor(batch[key], "inputs")
        raise TypeError(f"{what} yielded a dict batch with keys {sorted(map(str, batch))}; its inputs must be under "
                        f"one of {[k for k, _ in BATCH_KEYS]}")
    if isinstance(batch, (tuple, list)) and batch:
        return _tensor(batch[0], "inputs")
    raise TypeError(f"{what} must yield inputs or (inputs, ...) tuples, got {type(batch).__name__}")


def _tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if type(value).__module__ == "numpy":
        return torch.as_tensor(value)
    raise TypeError(f"a batch's {what} must be a tensor (or a numpy array), got {type(value).__name__}: collate the "
                    f"samples into one tensor (torch.stack), as DataLoader's default collate does")


def _split_batch(batch):
    """(inputs, class labels) of a training batch: an (x, y, ...) tuple/list, or a dict with a key pair of
    ``BATCH_KEYS``. Labels of any integer dtype (or a numpy array, or a list of ints) come back as int64, what
    ``F.cross_entropy`` takes. TypeError for anything else, naming what is accepted."""
    if isinstance(batch, dict):
        pair = next(((kx, ky) for kx, ky in BATCH_KEYS if kx in batch and ky in batch), None)
        if pair is None:
            raise TypeError(f"a dict batch needs its inputs and labels under one of the key pairs {list(BATCH_KEYS)}; "
                            f"got keys {sorted(map(str, batch))}")
        x, y = batch[pair[0]], batch[pair[1]]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise TypeError("the loader must yield (inputs, class labels) pairs; got a "
                        f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}")
    if isinstance(y, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in y):
        y = torch.tensor(y, dtype=torch.int64)
    y = _tensor(y, "labels")
    if not y.dtype.is_floating_point and not y.dtype.is_complex and y.dtype not in (torch.bool, torch.int64):
        y = y.long()  # int32, uint8, ...: class indices all the same
    return _tensor(x, "inputs"), y


_EMPTY_LOADER = "the training loader yielded no batch; give train_task a loader with at least one batch"


def _empty_loader(loader) -> ValueError:
    """The error for a loader that yields no batch, with the likely cause where the loader tells it."""
    hint = ""
    if getattr(loader, "drop_last", False):
        hint = (" (drop_last=True drops an incomplete last batch: a task with fewer samples than batch_size has "
                "none left; lower batch_size)")
    return ValueError(_EMPTY_LOADER + hint)


def _peek(loader) -> torch.Tensor:
    """The first batch's inputs, without moving the loader's or torch's random state on (a resumed run must
    draw exactly what the uninterrupted one drew).

    Raises ValueError when the loader yields no batch.
    """
    rng = torch.random.get_rng_state()
    saved = loader.state_dict() if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict") else None
    try:
        try:
            batch = next(iter(loader))
        except StopIteration:
            raise _empty_loader(loader) from None
        x, _ = _split_batch(batch)
    finally:
        torch.random.set_rng_state(rng)
        if saved is not None:
            loader.load_state_dict(saved)
    return x


def within(acc: float, best: float, threshold: float) -> bool:
    """Whether ``acc`` is no more than ``threshold`` below ``best`` (the recovery test of a pruning step). A drop of
    exactly the threshold is within it, whatever the rounding of ``best - threshold`` (0.8 - 0.1 is
    0.7000000000000001, which an accuracy of 0.7 would miss): accuracies are counts over samples, so real
    differences are far above the tolerance."""
    drop = best - acc
    return drop <= threshold or math.isclose(drop, threshold, rel_tol=1e-9, abs_tol=1e-12)


def snapshot(model, optimizer):
    """Copies of the model's and the optimizer's state (the "last good" point)."""
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def restore(model, optimizer, snap) -> None:
    """The model's weights and the optimizer's state (moments, steps) of ``snap``; the param groups keep the
    hyperparameters they have now (a learning-rate schedule the user steps from the callback is not rewound)."""
    model_state, optimizer_state = snap
    model.load_state_dict(model_state)
    if hasattr(model, "sync"):
        model.sync()
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    # a copy: load_state_dict may keep our tensors, and the next steps update them in place
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)


def _shares(groups) -> tuple[dict, dict]:
    return ({g.name: pruned_share(g) for g in groups}, {g.name: frozen_share(g) for g in groups})


def _total_pruned(groups) -> float:
    n = sum(g.size for g in groups)
    return sum(pruned_share(g) * g.size for g in groups) / max(1, n)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _is_notebook_bar() -> bool:
    # tqdm.auto picks its widget bar inside Jupyter, whose output streams are not terminals yet show it live
    return tqdm is not None and any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


class _Progress:
    """An epoch's progress on ``sys.stderr``: a live tqdm bar on a terminal (or a Jupyter widget); anywhere else
    (a pipe, a log file) one plain line at the end of the epoch, so logs hold no carriage-return frames.

    The bar's loss and accuracy refresh at most every ``POSTFIX_SECONDS``: ``refresh_due()`` says when the
    caller should read its device counters and pass them to ``show``.
    """

    def __init__(self, total, desc: str, enabled: bool, pruned: float):
        self.desc, self.pruned, self.batches = desc, pruned, 0
        self.start = self.last_postfix = time.perf_counter()
        self.stream = sys.stderr
        self.bar = self.plain = None
        if not enabled:
            return
        if tqdm is not None and (_is_terminal(self.stream) or _is_notebook_bar()):
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)
        else:
            self.plain = True

    def update(self) -> None:
        self.batches += 1
        if self.bar is not None:
            self.bar.update(1)

    def refresh_due(self) -> bool:
        return self.bar is not None and time.perf_counter() - self.last_postfix >= POSTFIX_SECONDS

    def show(self, loss: float, acc: float) -> None:
        self.last_postfix = time.perf_counter()
        self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", pruned=f"{self.pruned:.1%}")

    def close(self, loss: float | None, acc: float | None) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain and loss is not None:
            seconds = time.perf_counter() - self.start
            # the bar's own postfix words, so a log reads like the terminal
            print(f"{self.desc}: loss={loss:.4f}, acc={acc:.3f}, pruned={self.pruned:.1%} "
                  f"({self.batches} batches, {seconds:.1f} s)", file=self.stream, flush=True)


# ----- batches of one sample and BatchNorm ---------------------------------------------------------------
class _OneValuePerChannel(Exception):
    """Raised by a forward pre-hook before a BatchNorm in training mode would normalise one value per channel."""

    def __init__(self, name: str, shape):
        super().__init__(name)
        self.name, self.shape = name, tuple(shape)


def _batch_norms(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every BatchNorm in ``model`` (torch's or eidetic's: the class name says BatchNorm), named
    as in the network (a DistributedDataParallel wrapper's ``module.`` left out)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return [(name, m) for name, m in model.named_modules() if "BatchNorm" in type(m).__name__]


@contextlib.contextmanager
def _one_value_guard(norms):
    """Forward pre-hooks that raise ``_OneValuePerChannel`` before a BatchNorm in training mode gets an input
    with one value per channel (N * spatial size == 1), the case torch refuses."""

    names = {id(m): name for name, m in norms}

    def check(module, args):
        name = names.get(id(module))
        x = args[0] if args else None
        if (name is not None and module.training and isinstance(x, torch.Tensor) and x.dim() >= 2
                and x.shape[1] > 0 and x.numel() == x.shape[1]):
            raise _OneValuePerChannel(name, x.shape)

    # a global hook, not one per module: a module's own hooks make the network compute full activation
    # gradients for that step (EideticNetwork._frozen_as_constants), which this check has no use for
    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _saved_buffers(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.clone()) for b in model.buffers()]


@torch.no_grad()
def _restore_buffers(saved) -> None:
    for b, value in saved:
        b.copy_(value)


def _batch_of_one_error(where: str, err: _OneValuePerChannel, unchanged: str) -> ValueError:
    world = dist_mod.world_size()
    if world > 1:
        where = (f"{where} of this process holds a single sample (each of the {world} processes reads "
                 f"batch_size / {world} samples of every batch, and its share of the data ends with 1 left over)")
        fix = ("Use drop_last=True on the DataLoader, or a batch size and data size that leave each process more "
               "than 1 sample in its last batch")
    else:
        where = f"{where} holds a single sample"
        fix = "Use drop_last=True on the DataLoader, or a batch size that does not leave a last batch of 1 sample"
    return ValueError(
        f"{where}, so BatchNorm layer '{err.name}' would get one value per channel (input {list(err.shape)}): a "
        "batch of size 1 cannot be normalised in training mode (torch raises 'Expected more than 1 value per "
        f"channel when training'). {fix}. {unchanged}")


def _forward(model, x: torch.Tensor, norms, batch: int) -> torch.Tensor:
    """``model(x)``; a batch of one sample runs under the BatchNorm guard (any other batch has N >= 2, so
    every BatchNorm gets more than one value per channel)."""
    if not norms or x.dim() == 0 or x.shape[0] != 1:
        return model(x)
    saved = _saved_buffers(model)  # earlier BatchNorms of this forward update their running statistics
    try:
        with _one_value_guard(norms):
            return model(x)
    except _OneValuePerChannel as err:
        _restore_buffers(saved)
        raise _batch_of_one_error(f"batch {batch} of the epoch", err,
                                  "That batch changed no weight and no running statistic.") from None


def _loader_yields_batch_of_one(loader) -> bool:
    """Whether the loader says it will yield a batch of one sample: a ``batch_size`` and ``drop_last`` (torch's
    DataLoader, InMemoryLoader) and a sample count (``len(loader.sampler)``, ``loader.dataset_size`` or
    ``len(loader.dataset)``). False when it does not say."""
    batch_size = getattr(loader, "batch_size", None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        return False
    if getattr(loader, "drop_last", False):
        return False
    for count in (lambda: len(loader.sampler), lambda: loader.dataset_size, lambda: len(loader.dataset)):
        try:
            n = count()
        except (AttributeError, TypeError, NotImplementedError):
            continue
        if isinstance(n, int) and not isinstance(n, bool):
            return n > 0 and (batch_size == 1 or n % batch_size == 1)
    return False


def _labels_checked(i: int, y: torch.Tensor) -> bool:
    """Whether batch ``i``'s labels are read before its step: every batch on the CPU (reading them costs
    microseconds there), an epoch's first batch elsewhere (a read waits for the device; one per epoch)."""
    return i == 0 or y.device.type == "cpu"


def _check_labels(y: torch.Tensor, num_classes: int, i: int = 0) -> None:
    """Class labels of the epoch's batch ``i`` against the head: a label outside [0, num_classes) is a
    ValueError naming the head's size, before that batch's step (and, for the first batch, before any weight
    of this call moves)."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor of class indices, got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    if not y.numel():
        return
    lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one read
    if lo < 0 or hi >= num_classes:
        where = "" if i == 0 else (f" in batch {i} of the epoch (the steps before it trained the current task "
                                   f"only; finished tasks are unchanged)")
        raise ValueError(f"labels range over [{lo}, {hi}]{where} but the task's head has {num_classes} classes, "
                         f"fixed when the task was prepared (prepare_for_task(task, num_classes)): map the task's "
                         f"classes to 0..{num_classes - 1} (labels are checked before every step on the CPU, on "
                         f"each epoch's first batch on other devices)")


def _check_batch_of_one(model, loader, device, norms) -> None:
    """Before any training: when the loader will yield a batch of one sample, run one sample through the model
    in training mode (no gradient; buffers, modes and RNG states put back) and raise the ValueError of
    ``_forward`` if a BatchNorm would get one value per channel. Loaders that do not say how they batch are
    checked batch by batch in ``run_epoch`` instead."""
    if not norms or not _loader_yields_batch_of_one(loader):
        return
    x = _peek(loader)[:1].to(device)
    modes = [(m, m.training) for m in model.modules()]
    saved = _saved_buffers(model)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _one_value_guard(norms):
            model.train()
            model(x)
    except _OneValuePerChannel as err:
        where = "every batch of the loader (batch_size=1)" if loader.batch_size == 1 else "the loader's last batch"
        raise _batch_of_one_error(where, err,
                                  "Checked before training: the model is unchanged.") from None
    finally:
        _restore_buffers(saved)
        for m, mode in modes:
            m.training = mode


def run_epoch(model, loader, optimizer, device, desc: str = "", progress: bool = True, taylor_layers=(),
              groups=(), distributed: bool = False, label_counts: torch.Tensor | None = None,
              num_classes: int | None = None) -> tuple[float, float]:
    """One training epoch of the current task; returns (mean loss, training accuracy).

    The accuracy is the share of correctly classified training samples seen during the epoch
    (dropout and batch statistics on), the paper's "training accuracy". Taylor scores are reset at the
    start, so afterwards they hold this epoch's backward passes, each batch's term weighted by (its rows / the
    first batch's rows)², so that every sample counts alike (``_weight_taylor_terms``).

    The loss sum and the correct count stay on the device during the epoch and are read once at its end
    (a live progress bar reads them at most every ``POSTFIX_SECONDS``), so a step never waits for the device.
    With ``progress``, a terminal shows a tqdm bar on stderr; elsewhere stderr gets one line per epoch.

    Raises ValueError when the loader yields no batch, or when a batch of one sample would reach a BatchNorm
    with one value per channel (before that forward pass: the model is left as the previous step left it).

    ``distributed``: ``model`` is a DistributedDataParallel wrapper and ``loader`` this process's shard; the
    loss, accuracy and Taylor scores returned or kept are sums over every process (``python_layers.distributed``).

    ``label_counts``: int64[num_classes] on ``device``; the epoch's labels are counted into it (over every
    process), which gives the accuracy of always answering the most frequent class (``_warn_at_chance``).
    ``num_classes``: the head's classes; labels are checked against it before each batch's forward (else after
    it, against the logits), so a refused batch moves no batch-norm statistic: every batch on the CPU, the
    epoch's first elsewhere (``_labels_checked``: a read of the labels waits for the device).
    """
    model.train()
    for layer in taylor_layers:
        layer.reset_taylor()
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = _Progress(total, desc, progress, _total_pruned(groups))
    norms = _batch_norms(model)
    loss_sum = correct = None  # device tensors, created from the first loss
    seen = 0
    first_rows = None  # the first batch's rows: Taylor terms of other sizes are weighted against it
    result = (None, None)
    try:
        for i, batch in enumerate(loader):
            x, y = _split_batch(batch)
            x, y = x.to(device), y.to(device)
            checked = _labels_checked(i, y)
            if checked and num_classes is not None:
                _check_labels(y, num_classes, i)
            optimizer.zero_grad(set_to_none=True)
            logits = _forward(model, x, norms, i + 1)
            if checked and num_classes is None:
                _check_labels(y, logits.shape[-1], i)
            n = y.shape[0]
            rows = n
            if distributed:
                # DDP averages the processes' gradients; shares may differ by a row (InMemoryLoader.shard), so
                # each process's summed loss is scaled by world / global batch: the step is the global mean
                global_n = getattr(loader, "global_rows", None)  # InMemoryLoader knows it: no collective
                if not isinstance(global_n, int):
                    global_n = torch.tensor(float(n), device=y.device)  # float32: exact to 2**24 rows
                    dist_mod.all_reduce_sum(global_n)
                rows = global_n
            taylor_before = _taylor_before(taylor_layers, rows, first_rows)
            if distributed:
                summed = F.cross_entropy(logits, y, reduction="sum")
                (summed * (dist_mod.world_size() / global_n)).backward()
                loss = summed.detach() / max(n, 1)
            else:
                loss = F.cross_entropy(logits, y)
                loss.backward()
            if taylor_before is not None:
                _weight_taylor_terms(taylor_layers, taylor_before, rows, first_rows)
            if first_rows is None and (isinstance(rows, torch.Tensor) or rows > 0):
                first_rows = rows  # the first batch with samples (an all-processes total: no host read)
            optimizer.step()
            if loss_sum is None:
                # float64 so a long epoch's sum keeps its digits (MPS has no float64)
                dtype = torch.float32 if loss.device.type == "mps" else torch.float64
                loss_sum = torch.zeros((), dtype=dtype, device=loss.device)
                correct = torch.zeros((), dtype=torch.int64, device=loss.device)
            loss_sum.add_(loss.detach().to(loss_sum.dtype), alpha=n)
            correct.add_((logits.detach().argmax(-1) == y).sum())
            if label_counts is not None:  # index_add_, not bincount: no wait for the device (bincount reads max(y))
                label_counts.index_add_(0, y, torch.ones_like(y, dtype=label_counts.dtype))
            seen += n
            bar.update()
            if bar.refresh_due():
                bar.show(float(loss_sum) / seen, int(correct) / seen)
        if distributed:
            totals = torch.stack([loss_sum.double(), correct.double(),
                                  torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)]) \
                if loss_sum is not None else torch.zeros(3, dtype=torch.float64, device=device)
            counted = [] if label_counts is None else [label_counts]
            dist_mod.all_reduce_sum(totals, *[layer.taylor_score for layer in taylor_layers], *counted)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        if seen == 0:
            raise _empty_loader(loader)
        result = (float(loss_sum) / seen, int(correct) / seen)
    finally:
        bar.close(*result)
    return result


def _taylor_before(taylor_layers, rows, first_rows):
    """Copies of the Taylor scores before a batch whose size may differ from the first batch's, else None. Sizes
    that are device tensors (the processes' total in distributed training) are not read on the host: every
    batch is weighted then."""
    if not taylor_layers or first_rows is None:
        return None
    if not isinstance(rows, torch.Tensor) and not isinstance(first_rows, torch.Tensor) and rows == first_rows:
        return None
    return [layer.taylor_score.clone() for layer in taylor_layers]


def _weight_taylor_terms(taylor_layers, before, rows, first_rows) -> None:
    """Weight a batch's Taylor term |mean_b Σ a·∂L/∂a| by (its rows / the first batch's rows)², so every sample
    counts alike: with the batch-mean loss, ∂L/∂a carries 1/rows, so a term scales as 1/rows, and a short last
    batch (one sample after 64-sample batches) would outweigh a full one 64 times."""
    if isinstance(rows, torch.Tensor) or isinstance(first_rows, torch.Tensor):
        scale = (torch.as_tensor(rows, dtype=torch.float32) / torch.as_tensor(first_rows, dtype=torch.float32)) ** 2
    else:
        scale = (rows / first_rows) ** 2
    for layer, old in zip(taylor_layers, before):
        layer.taylor_score.sub_(old).mul_(scale).add_(old)


def _check_args(pruning, step, stop_threshold, max_epochs, patience, recovery_epochs, max_prune_steps=None):
    if pruning is not None:
        pruning_mod.check_method(pruning)
        if not (isinstance(step, (int, float)) and 0 < step <= 1):
            raise ValueError(f"step must be the share of FREE neurons pruned per step, in (0, 1], got {step!r}")
    if not (isinstance(stop_threshold, (int, float)) and 0 <= stop_threshold <= 1):
        raise ValueError(f"stop_threshold is an absolute accuracy drop in [0, 1] (0.01 = one point), "
                         f"got {stop_threshold!r}")
    for name, value, low in (("max_epochs", max_epochs, 1), ("patience", patience, 1),
                             ("recovery_epochs", recovery_epochs, 1), ("max_prune_steps", max_prune_steps, 0)):
        if name == "max_prune_steps" and value is None:
            continue  # no limit
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_optimizer(model, optimizer, task) -> None:
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"{type(optimizer).__name__}.step needs a closure (it re-evaluates the loss several times "
                        "per step), and train_task steps once per batch without one: use a first-order optimizer "
                        "(SGD, Adam, AdamW, ...) with train_task, or your own loop with the network "
                        "(model.prepare_for_task / model.finish_task)")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    heads = getattr(model, "heads", None)
    if heads is not None and task < len(heads):
        head_params = [p for p in heads[task].parameters() if p.numel()]
        if head_params and not any(id(p) in held for p in head_params):
            raise ValueError(
                f"the optimizer does not hold the parameters of head {task}, so the task could not learn: "
                f"create the optimizer after model.prepare_for_task({task}, ...), or add them with "
                f"optimizer.add_param_group({{'params': model.heads[{task}].parameters()}})")
    missing = [name for name, p in model.named_parameters() if p.numel() and p.requires_grad and id(p) not in held]
    if missing:
        warnings.warn(f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model (e.g. "
                      f"{missing[0]}); they will not train", stacklevel=3)


# ----- the steps --------------------------------------------------------------------------------------
def train_task(model, loader, optimizer, pruning: str | None = "l2", step: float = 0.05,
               stop_threshold: float = 0.01, max_epochs: int = 50, patience: int = 5, recovery_epochs: int = 5,
               progress: bool = True, device=None, max_prune_steps: int | None = None, callback=None,
               resume_state: dict | None = None, distributed: bool = False,
               prune_lr_factor: float = 1.0) -> list[dict]:
    """Train, prune, freeze and recycle the current task of ``model`` (an ``EideticNetwork``).

    Many processes (``torchrun``): pass the network wrapped in ``DistributedDataParallel``, or the network
    with ``distributed=True``, in an initialised process group; every process calls ``train_task`` with the
    same arguments and its copy of the loader. The trainer shards the loader (``distributed.shard``), builds
    its own DDP wrapper for the task (Parameters are replaced when a task finishes, so a wrapper never
    outlives one), sums loss, accuracy and Taylor scores over the processes before every decision, prunes
    the neurons rank 0 chooses, and leaves every process with bit-identical weights and neuron states. Rank 0
    says the warnings for every process (the others' are silenced for the call); errors are raised on all.

    ``loader`` yields (inputs, class labels of the task) each time it is iterated (``_split_batch`` says which
    batch forms are taken; an iterator or generator, read once, is a TypeError); ``optimizer`` holds the
    model's trainable parameters (a fresh one per task, or one reused: its state for storage that shrank is
    dropped).
    ``pruning`` is "l1", "l2", "taylor" or None (no pruning: every FREE neuron freezes for the task; "none",
    as the CLI's config spells it, is taken as None).
    ``max_prune_steps`` caps the pruning steps (default: enough to exhaust every group).
    ``prune_lr_factor`` multiplies the optimizer's learning rates once, when pruning starts (the paper's
    Permuted MNIST setting halves it then, Section 4), and divides them back when the task finishes, so a reused
    optimizer starts every task at its own rates; 1.0 leaves them. Raises ValueError outside (0, 1].

    Returns the history: one dict per epoch with ``task``, ``phase`` ("train", "recover"), ``epoch``
    (1-based, counted over the whole call), ``step`` (pruning step, 0 while training), ``loss``,
    ``train_accuracy``, ``pruned_share`` and ``frozen_share`` ({group name: share of its neurons}); then
    one "restore" record if a step was undone (loss and accuracy of the state restored) and a last "finish"
    record (shares after freezing; loss and accuracy of the kept state; ``best_train_accuracy``;
    ``kept`` = {group name: neurons frozen for the task}; ``stop_reason``: "no pruning", "accuracy dropped",
    "nothing left to prune" or "max_prune_steps reached").

    Checkpointing inside a task: ``callback(event)`` gets ``{"event": "epoch", "record": r}`` after every
    epoch and ``{"event": "prune_step", "step": s, "trainer_state": state, "record": None}`` whenever the
    model and optimizer hold a good state to continue from (s = 0: training done; s >= 1: step s kept).
    Save the model, the optimizer, the RNG and loader states with ``state`` then; later, load them and call
    ``train_task(..., resume_state=state)`` with the same arguments to continue exactly from there.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model, distributed = model.module, True  # the trainer wraps the network itself, once per task
    if distributed and not dist_mod.active():
        raise ValueError("distributed=True needs an initialised process group of more than one process "
                         "(torchrun ... and torch.distributed.init_process_group, or eidetic train --nproc N)")
    quiet = distributed and dist_mod.rank() != 0
    with warnings.catch_warnings() if quiet else contextlib.nullcontext():
        if quiet:  # the processes take the same decisions: rank 0 says the warnings for all of them
            warnings.simplefilter("ignore")
        return _train_task(model, loader, optimizer, pruning, step, stop_threshold, max_epochs, patience,
                           recovery_epochs, progress, device, max_prune_steps, callback, resume_state, distributed,
                           prune_lr_factor)


def _train_task(model, loader, optimizer, pruning, step, stop_threshold, max_epochs, patience, recovery_epochs,
                progress, device, max_prune_steps, callback, resume_state, distributed, prune_lr_factor):
    task = getattr(model, "current_task", None)
    if task is None:
        raise ValueError("no task is prepared: call model.prepare_for_task(t, num_classes) before train_task")
    if isinstance(pruning, str) and pruning.lower() == "none":  # the config's spelling
        pruning = None
    _check_args(pruning, step, stop_threshold, max_epochs, patience, recovery_epochs, max_prune_steps)
    if not (isinstance(prune_lr_factor, (int, float)) and 0 < prune_lr_factor <= 1):
        raise ValueError(f"prune_lr_factor must be in (0, 1], got {prune_lr_factor!r}")
    if model.heads[task].out_features == 1 and resume_state is None:
        # cross-entropy over one class is 0 for every input: nothing learns, and the neurons the task keeps freeze
        # untrained (scenarios refuse such tasks; a loop of one's own may train a one-output head otherwise)
        warnings.warn(f"task {task}'s head has 1 class: train_task trains with cross-entropy, which is 0 for a single "
                      f"class, so nothing learns and the neurons the task keeps freeze untrained. Give a task at "
                      f"least 2 classes (a binary task: num_classes=2), or train a one-output head in a loop of your "
                      f"own", UserWarning, stacklevel=user_stacklevel())
    device = torch.device(device) if device is not None else _model_device(model)
    _check_optimizer(model, optimizer, task)
    if isinstance(loader, collections.abc.Iterator):  # a generator, iter(list): exhausted after one pass
        raise TypeError(f"train_task reads the loader once per epoch (and once more to trace the graph on the first "
                        f"task), and a {type(loader).__name__} can be read once: pass a re-iterable, such as a list "
                        f"of batches or a DataLoader")
    try:
        if len(loader) == 0:
            raise _empty_loader(loader)
    except TypeError:  # no len(): _peek or run_epoch find an empty loader out
        pass
    if getattr(model, "graph", None) is None:
        model.ensure_graph(_peek(loader).to(device))  # the graph is traced from a real batch
    _check_batch_of_one(model, loader, device, _batch_norms(model))
    if resume_state is None:
        _warn_pruned_left(model, task)
        _warn_frozen_by_user_after_task_0(model, task)
    run = _TaskRun(model, loader, optimizer, task, pruning, step, stop_threshold, recovery_epochs, progress, device,
                   callback, distributed, float(prune_lr_factor))
    try:
        if resume_state is None:
            run.train(max_epochs, patience)  # step 1
        else:
            run.resume(resume_state)
        if pruning is not None:
            _warn_at_chance(model, task, run.best_acc, pruning, run.label_counts)
            run.prune_with_recovery(max_prune_steps)  # step 2
    except BaseException:
        run.unscale_lr()  # a retry with the same optimizer starts from the task's own rates
        raise
    finally:
        for layer in run.taylor_layers:
            layer.enable_taylor(False)
    return run.finish()  # steps 3-5


def _warn_at_chance(model, task: int, best_acc: float, pruning: str, label_counts: list | None = None) -> None:
    """A task whose training accuracy never rose above chance: pruning stops only when the accuracy falls below
    its best, which it cannot, so nearly every neuron would be pruned. Said before pruning starts. Chance is the
    accuracy of always answering the most frequent class of the training labels (``label_counts``, counted over
    the training epochs), or 1/num_classes when they were not counted."""
    classes = model.heads[task].out_features
    total = sum(label_counts) if label_counts else 0
    if total:
        top = max(range(len(label_counts)), key=label_counts.__getitem__)
        chance = label_counts[top] / total
        said = f"always answering class {top}, the most frequent, gives {chance:.3f}"
    else:
        chance = 1.0 / max(classes, 1)
        said = f"1/{classes} = {chance:.3f}"
    if classes > 1 and chance < 1.0 and best_acc <= chance + 0.01:  # one class is always right: nothing to warn of
        warnings.warn(f"task {task}: the training accuracy never rose above chance (best {best_acc:.3f}; chance: "
                      f"{said}) before pruning; {pruning!r} pruning stops only when the accuracy falls below that "
                      "best, which at chance it hardly can, so the task may keep few neurons and answer one class "
                      "(unless the recovery epochs lift it). Check the labels (0..num_classes-1 of this task), the "
                      "learning rate, and max_epochs and patience (training stops after `patience` epochs without "
                      "a better accuracy, however the loss moves)", stacklevel=user_stacklevel())


def _warn_frozen_by_user_after_task_0(model, task: int) -> None:
    """Layers with FREE neurons whose parameters do not require grad, in a task after the first: they do not
    train, are not pruned, and finish_task freezes their FREE neurons for this task untrained, using up that
    capacity for good (``requires_grad_(False)`` on a whole model to evaluate it, never undone, does this).
    A layer frozen by the user from the start gives all its neurons to task 0 (documented), and has none left."""
    idle = model._idle_user_frozen() if hasattr(model, "_idle_user_frozen") else []
    if idle:
        # finish_task need not say it again (on the network itself, not a torch.compile wrapper of it)
        getattr(model, "_orig_mod", model).__dict__["_said_idle_for_task"] = task
        warnings.warn(f"task {task}: {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} FREE neurons but no "
                      "parameter that requires grad, so they will not train, and finish_task will freeze them "
                      "for this task untrained, using up that capacity for every later task. If the body was "
                      "frozen to evaluate it (model.requires_grad_(False)), undo that first with "
                      "model.requires_grad_(True)", CapacityWarning, stacklevel=user_stacklevel())


def _warn_pruned_left(model, task: int) -> None:
    """PRUNED neurons before training starts come from an earlier train_task of this task that stopped (an
    exception, Ctrl-C) after pruning: this call trains without them until finish_task recycles them. Said,
    with the way back, rather than silently training with less capacity."""
    groups = getattr(model, "groups", None) or []
    left = {g.name: int((g.task_state == PRUNED).sum()) for g in groups if not g.input_normalizer}
    left = {name: n for name, n in left.items() if n}
    if left:
        listed = ", ".join(f"{name}: {n}" for name, n in left.items())
        warnings.warn(f"task {task} starts training with PRUNED neurons ({listed}), left by an earlier train_task "
                      "of this task that stopped after pruning; they stay out of this task until finish_task "
                      "recycles them. To train with them, call group.unprune((group.task_state == PRUNED)"
                      ".nonzero().flatten()) for each of model.groups first, or continue the stopped call "
                      "exactly with train_task(..., resume_state=...)", stacklevel=user_stacklevel())


class _TaskRun:
    """The state of one train_task call: what a checkpoint inside the task must hold."""

    def __init__(self, model, loader, optimizer, task, pruning, step, stop_threshold, recovery_epochs, progress,
                 device, callback, distributed=False, prune_lr_factor=1.0):
        self.model, self.loader, self.optimizer, self.task = model, loader, optimizer, task
        self.distributed = distributed
        # what a training step runs: a DDP wrapper (built after the task's Parameters exist) or the network
        self.trained = dist_mod.wrap(model) if distributed else model
        if distributed:
            self.loader = dist_mod.shard(loader)
            if self.loader is not loader:  # a DataLoader rebuilt per process: its own last batch may hold 1 sample
                _check_batch_of_one(model, self.loader, device, _batch_norms(model))
        self.progress = progress and dist_mod.rank() == 0  # rank 0 speaks for every process
        self.method, self.step, self.stop_threshold = pruning, step, stop_threshold
        self.recovery_epochs, self.device, self.callback = recovery_epochs, device, callback
        self.groups = list(model.groups)
        self.taylor_layers = []
        if pruning == "taylor":
            self.taylor_layers = list({id(layer): layer for g in self.groups for _, layer in g.members}.values())
            for layer in self.taylor_layers:
                layer.enable_taylor(True)
        self.history: list[dict] = []
        self.epochs = 0  # counted over the whole call
        self.best_acc = -1.0  # best training accuracy seen
        self.kept_loss, self.kept_acc = math.nan, -1.0  # of the state that would be kept now
        self.steps_done = 0
        self.task_free = {g.name: int((g.task_state == pruning_mod.FREE).sum()) for g in self.groups}
        self.stop_reason = "no pruning"
        self.prune_lr_factor = prune_lr_factor
        # the training labels of the epochs before pruning, per class (_warn_at_chance); a list once counted
        self.label_counts: list | None = None
        self._counting = None
        self.lr_scaled = False  # the learning rates were multiplied by prune_lr_factor (once per task)

    # ----- one epoch, and checkpoints --------------------------------------------------------------------
    def epoch(self, phase: str, prune_step: int, desc: str) -> tuple[float, float]:
        self.epochs += 1
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle every epoch, the same on every rank
            sampler.set_epoch(self.epochs)
        if phase == "train" and self._counting is None:
            self._counting = torch.zeros(self.model.heads[self.task].out_features, dtype=torch.int64,
                                         device=self.device)
        loss, acc = run_epoch(self.trained, self.loader, self.optimizer, self.device, desc, self.progress,
                              self.taylor_layers, self.groups, self.distributed,
                              self._counting if phase == "train" else None,
                              self.model.heads[self.task].out_features)
        if phase == "train":
            self.label_counts = self._counting.tolist()
        if self.distributed:
            dist_mod.sync_running_stats(self.model)
        if not math.isfinite(loss):
            warnings.warn(f"task {self.task}: the training loss is {loss} in epoch {self.epochs} ({phase}); "
                          "lower the learning rate", stacklevel=4)
        pruned, frozen = _shares(self.groups)
        record = dict(task=self.task, phase=phase, epoch=self.epochs, step=prune_step, loss=loss, train_accuracy=acc,
                      pruned_share=pruned, frozen_share=frozen)
        self.history.append(record)
        if self.callback is not None:
            self.callback({"event": "epoch", "record": record})
        return loss, acc

    def checkpoint(self) -> None:
        if self.callback is None:
            return
        state = dict(version=1, task=self.task, pruning=self.method, step_share=self.step, steps_done=self.steps_done,
                     epochs=self.epochs, best_acc=self.best_acc, kept_loss=self.kept_loss, kept_acc=self.kept_acc,
                     task_free=dict(self.task_free), lr_scaled=self.lr_scaled, label_counts=self.label_counts,
                     taylor=[layer.taylor_score.clone() for layer in self.taylor_layers])
        self.callback({"event": "prune_step", "step": self.steps_done, "trainer_state": state, "record": None})

    def resume(self, state: dict) -> None:
        if state.get("version") != 1 or state.get("task") != self.task:
            raise ValueError(f"resume_state is for task {state.get('task')} (version {state.get('version')}); "
                             f"the model is preparing task {self.task}")
        if state["pruning"] != self.method or state["step_share"] != self.step:
            raise ValueError("resume with the same pruning and step as the interrupted call "
                             f"(it used pruning={state['pruning']!r}, step={state['step_share']!r})")
        self.steps_done, self.epochs, self.best_acc = state["steps_done"], state["epochs"], state["best_acc"]
        self.kept_loss, self.kept_acc, self.task_free = state["kept_loss"], state["kept_acc"], dict(state["task_free"])
        self.lr_scaled = bool(state.get("lr_scaled", False))  # a resumed optimizer already holds scaled rates
        self.label_counts = state.get("label_counts")  # absent in checkpoints of earlier versions
        for layer, score in zip(self.taylor_layers, state["taylor"]):
            layer.taylor_score.copy_(score)

    # ----- step 1 ----------------------------------------------------------------------------------------
    def train(self, max_epochs: int, patience: int) -> None:
        """Train until the training accuracy has not improved for ``patience`` epochs; keep the best epoch."""
        best_snap, since_best = None, 0
        for e in range(max_epochs):
            loss, acc = self.epoch("train", 0, f"task {self.task} · train {e + 1}/{max_epochs}")
            if acc > self.best_acc:
                self.best_acc, self.kept_loss, self.kept_acc, since_best = acc, loss, acc, 0
                # the epoch's Taylor scores too: the first pruning step ranks the neurons of the weights it keeps
                best_snap = ((snapshot(self.model, self.optimizer),
                              [layer.taylor_score.clone() for layer in self.taylor_layers])
                             if e + 1 < max_epochs else None)
            else:
                since_best += 1
                if since_best >= patience:
                    break
        last = self.history[-1]
        if last["train_accuracy"] == self.best_acc:  # the last epoch ties the best: its weights are kept, its loss
            self.kept_loss, self.kept_acc = last["loss"], last["train_accuracy"]
        elif best_snap is not None:
            state, scores = best_snap
            restore(self.model, self.optimizer, state)  # continue from the best epoch's weights
            for layer, score in zip(self.taylor_layers, scores):
                layer.taylor_score.copy_(score)
        self.checkpoint()

    # ----- step 2 ----------------------------------------------------------------------------------------
    def prune_with_recovery(self, max_prune_steps: int | None) -> None:
        # each step prunes >= 1 neuron, so this many steps exhaust every group: the loop cannot run forever
        cap = sum(max(0, n - 1) for n in self.task_free.values())
        if max_prune_steps is not None:
            cap = min(cap, int(max_prune_steps))
        if not self.lr_scaled and self.prune_lr_factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.prune_lr_factor
        self.lr_scaled = True
        last_good = snapshot(self.model, self.optimizer)  # after the scaling: a restore keeps the pruning rate
        for s in range(self.steps_done + 1, cap + 1):
            decide = dist_mod.broadcast_object if self.distributed else None  # rank 0 chooses for everyone
            if not pruning_mod.prune_step(self.groups, self.method, self.step, self.task_free, decide):
                self.stop_reason = "nothing left to prune"
                return
            self.model.sync()
            recovered = False
            for r in range(self.recovery_epochs):
                loss, acc = self.epoch("recover", s, f"task {self.task} · prune step {s} · "
                                                     f"recover {r + 1}/{self.recovery_epochs}")
                self.best_acc = max(self.best_acc, acc)
                if within(acc, self.best_acc, self.stop_threshold):
                    recovered = True
                    break
            if not recovered:
                restore(self.model, self.optimizer, last_good)
                pruned, frozen = _shares(self.groups)
                # the record of the restored state: its shares, loss and accuracy
                self.history.append(dict(task=self.task, phase="restore", epoch=self.epochs, step=s,
                                         loss=self.kept_loss, train_accuracy=self.kept_acc, pruned_share=pruned,
                                         frozen_share=frozen))
                self.stop_reason = "accuracy dropped"
                return
            self.steps_done, self.kept_loss, self.kept_acc = s, loss, acc
            last_good = snapshot(self.model, self.optimizer)
            self.checkpoint()
        can_prune = any(pruning_mod.prune_counts(g, self.step, self.task_free[g.name]) for g in self.groups)
        self.stop_reason = "max_prune_steps reached" if can_prune else "nothing left to prune"

    def unscale_lr(self) -> None:
        """Back to the rates the task started from (at the finish, or when the call stops with an exception): an
        optimizer reused for the next task, or for a retry, starts there. A division, not a saved copy: a schedule
        the user steps from the callback keeps its progress. (A ``resume_state`` saved while pruning expects the
        scaled rates: resume with the optimizer state saved beside it, as the CLI does.)"""
        if self.lr_scaled and self.prune_lr_factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] /= self.prune_lr_factor
        self.lr_scaled = False

    # ----- steps 3-5 -------------------------------------------------------------------------------------
    def finish(self) -> list[dict]:
        """Freeze the survivors, recycle the pruned, cut recycled -> frozen synapses (model.finish_task)."""
        kept = {g.name: int((g.task_state == pruning_mod.FREE).sum()) for g in self.groups}
        self.unscale_lr()
        if self.method is None:  # the capacity warning of finish_task then says why every neuron was kept
            getattr(self.model, "_orig_mod", self.model).__dict__["_unpruned_task"] = self.task
        finish_task(self.model, self.optimizer)
        if self.distributed:  # recycled neurons were re-initialised from each process's generator
            dist_mod.broadcast_state(self.model)
        pruned, frozen = _shares(self.model.groups)
        self.history.append(dict(task=self.task, phase="finish", epoch=self.epochs, step=None, loss=self.kept_loss,
                                 train_accuracy=self.kept_acc, best_train_accuracy=self.best_acc,
                                 pruned_share=pruned, frozen_share=frozen, kept=kept, stop_reason=self.stop_reason))
        return self.history


def finish_task(model, optimizer) -> None:
    """``model.finish_task()``, then re-bind ``optimizer`` to the Parameters it installed.

    Same param groups and hyperparameters; the state of every replaced Parameter is dropped.
    """
    model.finish_task()
    rebind_optimizer(optimizer)
