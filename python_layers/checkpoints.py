"""The files behind ``eidetic train --resume``: ``checkpoint.pt`` written atomically and read safely, and the RNG
states it carries.

A checkpoint is ``{"run": the run's records (format, config, matrices, history, loop state), "model": state dict,
"router": None or {"num_tasks", "state"}, "rng": rng_state()}``, tensors and plain containers only, so it loads
with ``torch.load(weights_only=True)``: a file from elsewhere cannot run code while it loads.
``EIDETIC_CRASH_AFTER_CHECKPOINT=N`` makes a run exit (code ``CRASH_EXIT_CODE``) right after writing its N-th
checkpoint: a deterministic "kill" for tests (``Run.save_checkpoint`` acts on it).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

__all__ = ["CHECKPOINT_FORMAT", "CRASH_ENV", "CRASH_EXIT_CODE", "seed_everything", "rng_state", "set_rng_state",
           "write_checkpoint", "read_checkpoint"]

CRASH_ENV = "EIDETIC_CRASH_AFTER_CHECKPOINT"
CRASH_EXIT_CODE = 75
CHECKPOINT_FORMAT = 2  # 2: RNG states as tensors and plain containers (loads with weights_only=True)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's legacy global RNG and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The torch, CUDA, numpy and python RNG states as tensors and plain containers, so a checkpoint holding them
    loads with ``torch.load(weights_only=True)``: torch/CUDA ByteTensors; numpy's legacy MT19937 state as
    ``{"name", "keys": int64 [624], "pos", "has_gauss", "cached_gaussian"}``; python's ``random`` state as
    ``[version, int64 [625], gauss_next]``."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state()`` returned (its tensors may sit on any device)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a kill mid-write leaves the previous checkpoint intact.
    Raises ConfigError (the temporary file removed) when the file cannot be written (a full disk)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk reaches torch's writer as a RuntimeError
        try:
            tmp.unlink()
        except OSError:
            pass
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        intact = "the previous checkpoint is intact: " if path.is_file() else ""
        raise ConfigError(f"cannot write the checkpoint {path} ({first}): is the disk full, or the folder not "
                          f"writable? {intact}make room (or copy the run folder where there is), then continue "
                          f"with: eidetic train --out {path.parent} --resume") from exc


def read_checkpoint(path: Path) -> dict:
    """The payload of the checkpoint at ``path``, every tensor on the CPU (RNG states must be CPU tensors; the
    model, router and optimizer copy to their own device).

    Raises ConfigError for a file holding anything but tensors and plain containers (other pickled objects, or
    format 1 checkpoints, which held numpy objects), for a format other than ``CHECKPOINT_FORMAT`` and for a damaged
    (truncated) file.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError) as exc:  # torch's reader on a truncated or overwritten file
        raise ConfigError(
            f"{path} is damaged (torch cannot read it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
            f" Checkpoints are written to a temporary file and renamed, so a kill does not cause this: the file was "
            f"cut or changed after it was written (a copy, a full disk). Restore it from a copy, or start a new run"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path} is not a plain-tensor eidetic checkpoint: it holds pickled Python objects "
            "that torch.load(weights_only=True) refuses, since unpickling them could run arbitrary code "
            f"(checkpoints of format 1 hold numpy objects and are refused too; this eidetic reads format "
            f"{CHECKPOINT_FORMAT}); start a new run. torch: {_unpickler_reason(exc)}"
        ) from exc
    run = payload.get("run") if isinstance(payload, dict) else None
    if not isinstance(run, dict) or run.get("format") != CHECKPOINT_FORMAT:
        found = run.get("format") if isinstance(run, dict) else None
        raise ConfigError(f"{path} has checkpoint format {found}, this eidetic writes {CHECKPOINT_FORMAT}; "
                          "start a new run")
    return payload


def _unpickler_reason(exc: Exception) -> str:
    # torch's message is a page of advice; the line naming the refused global is the part worth showing
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return line.split(". Please")[0]  # the rest explains how to allowlist it
    return lines[0] if lines else type(exc).__name__
