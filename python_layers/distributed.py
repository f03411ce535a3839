"""Training on many processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every rank holds the whole network; ``DistributedDataParallel`` averages the gradients of each step, so
every rank applies the same update and keeps bit-identical weights. What Eidetic Learning adds on top:

* decisions: training loss and accuracy are summed over the ranks before any decision, Taylor scores too;
  the neurons each pruning step removes are chosen on rank 0 and broadcast (``broadcast_object``), so every
  rank prunes, restores, freezes and recycles the same neurons;
* batch norm: DDP's per-step buffer broadcast is off (it would send every frozen weight each step); the
  running statistics are broadcast from rank 0 after every epoch instead (the same values DDP's default keeps);
* the wrapper: state changes install new Parameters (``finish_task``), so the trainer builds a fresh DDP
  wrapper for every ``train_task`` call; Parameters that cannot get a gradient (empty trainable storage of
  finished heads, parameters the user froze) and all buffers are excluded from it, so nothing relies on
  DDP's unused-parameter detection;
* data: each rank reads ``1/world`` of every global batch (``shard``), so the global batch and the averaged
  gradient do not depend on the number of processes.

All of it is a no-op in a single process (``active()`` is False).
"""
from __future__ import annotations

import hashlib
import inspect
import io
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["active", "rank", "world_size", "init_from_env", "wrap", "all_reduce_sum", "barrier", "broadcast_object",
           "sync_running_stats", "broadcast_state", "state_hash", "check_same", "shard", "SamplerShard"]


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), once.

    Backend: NCCL for CUDA devices, gloo otherwise. Returns whether this process is one of many.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return active()


def wrap(model: torch.nn.Module) -> DistributedDataParallel:
    """A DDP wrapper of ``model`` for one task's training (see the module docstring for what it leaves out)."""
    ignore = [name for name, p in model.named_parameters() if p.numel() == 0 or not p.requires_grad]
    ignore += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device = next((p.device for p in model.parameters() if p.numel()), torch.device("cpu"))
    ids = [device] if device.type == "cuda" else None
    # no buffer sync on each forward (all buffers are ignored anyway); the keyword was renamed in torch 2.13
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **sync)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (the same result on every rank)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it (any picklable value), on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def sync_running_stats(model: torch.nn.Module, src: int = 0) -> None:
    """Give every rank the batch-norm running statistics of rank ``src`` (frozen channels are equal anyway)."""
    if not active():
        return
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "running_var", "num_batches_tracked") and buf is not None:
            dist.broadcast(buf, src=src)


@torch.no_grad()
def broadcast_state(model: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer as rank ``src`` has it (after a state change that drew random numbers:
    recycled neurons are re-initialised from each process's own generator)."""
    if not active():
        return
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        # floating tensors only: integer state (neuron states, counts) follows from the same decisions
        if t.numel() and t.is_floating_point():
            dist.broadcast(t.data, src=src)


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (weights, neuron states, running statistics), bit for bit."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            # reshape first: a 0-dim tensor (num_batches_tracked) cannot be viewed as bytes
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            buf = io.BytesIO()
            torch.save(value, buf)
            h.update(buf.getvalue())
    return h.hexdigest()


def check_same(value: str, what: str) -> None:
    """Raise RuntimeError on every rank unless all ranks pass the same ``value`` (e.g. a config hash)."""
    if not active():
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        ranks = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise RuntimeError(f"the processes disagree on {what} ({ranks}); launch every rank with the same "
                           "configuration and seed")


class SamplerShard(torch.utils.data.Sampler):
    """This rank's share of a sampler of the user's (``SubsetRandomSampler``, ``WeightedRandomSampler``, one of
    their own) over ``world`` processes: every epoch rank 0 draws the sampler's indices and broadcasts them, so
    every rank reads the same order whatever its random state; the order is padded by repeating its first indices
    to a multiple of ``world`` (cut to one with ``drop_last``), and rank r reads positions r, r + world, ... (as
    ``DistributedSampler`` does). Iterating it is a collective: every rank iterates it once per epoch."""

    def __init__(self, sampler, rank: int, world: int, drop_last: bool = False):
        self.sampler, self.rank, self.world, self.drop_last = sampler, rank, world, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.world if self.drop_last else -(-n // self.world)

    def __iter__(self):
        order = broadcast_object([int(i) for i in self.sampler] if self.rank == 0 else None)
        if self.drop_last:
            order = order[:len(order) - len(order) % self.world]
        elif order and len(order) % self.world:
            pad = self.world - len(order) % self.world
            order = order + (order * (1 + pad // len(order)))[:pad]
        return iter(order[self.rank::self.world])


def shard(loader):
    """The loader this rank reads: ``loader.shard(rank, world)`` when it can shard itself (InMemoryLoader:
    1/world of every global batch); a torch DataLoader is rebuilt with batch_size / world per rank and a sampler
    that gives each rank its share of every global batch: a ``DistributedSampler`` for the loader's default
    samplers (``shuffle=True`` or not; the same shuffling on every rank), ``SamplerShard`` for a sampler of the
    user's (its indices as rank 0 draws them). Raises ValueError for a DataLoader with its own ``batch_sampler``
    or a ``batch_size`` the number of processes does not divide, TypeError for anything else."""
    if not active():
        return loader
    if hasattr(loader, "shard"):
        return loader.shard(rank(), world_size())
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        world = world_size()
        if loader.batch_size is None:
            raise ValueError(f"a DataLoader with its own batch_sampler ({type(loader.batch_sampler).__name__}) cannot "
                             f"be shared by {world} processes: give it batch_size= and sampler= instead (each process "
                             f"then reads batch_size / {world} samples of every global batch in the sampler's order)")
        if loader.batch_size % world:
            raise ValueError(f"the DataLoader's batch_size ({loader.batch_size}) must be a multiple of the "
                             f"{world} processes: each reads batch_size / {world} samples of every global batch")
        sampler = loader.sampler
        if type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                                  and sampler._num_samples is None):
            sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank(),
                                         shuffle=type(sampler) is RandomSampler, drop_last=loader.drop_last)
        else:  # the user's sampler (a subset, weights, replacement): its indices, shared out
            sampler = SamplerShard(sampler, rank(), world, loader.drop_last)
        workers = {} if not loader.num_workers else dict(
            prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
        return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                          **workers)
    raise TypeError(f"cannot shard a {type(loader).__name__} over {world_size()} processes: give train_task a torch "
                    "DataLoader (it gets a DistributedSampler) or a loader with a shard(rank, world) method")
