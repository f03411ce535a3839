"""The ``eidetic`` command: ``eidetic train --config FILE.yaml --out RUN_DIR [--resume] [key=value ...]``.

A run trains the scenario's tasks in order with a fresh AdamW per task, measures after every task the test
accuracy of every task so far (with the true task id, and through the router without it), and writes into
RUN_DIR:

* ``results.json``: ``accuracy_matrix`` R[i][j] (test accuracy on task j after training task i; j = i + 1 is
  task j's fresh head before any training on it, later columns are null), ``routed_accuracy_matrix`` (same,
  through the router: right only when both the task and the class are right), ``acc``, ``bwt``, ``fwt``,
  ``forgetting`` (definitions in ``python_layers.metrics``), ``routed_acc``, ``baseline_accuracy`` (the
  untrained network, for FWT), ``capacity`` (neurons per task per layer group), ``wall_seconds``, ``config``,
  ``versions``, and per task its time, kept neurons and why pruning stopped;
* ``history.csv``: one row per epoch (task, phase, epoch, loss, training accuracy, test accuracy of the task in
  training, share of neurons pruned and frozen, overall and per group);
* ``accuracy_matrix.png``, ``routed_accuracy_matrix.png``, ``task_accuracy.png`` (each task's test accuracy over
  training, the paper's Figure 1), ``capacity.png`` (share of neurons frozen and pruned, Figure 3);
* ``config.yaml`` (the resolved config), ``checkpoint.pt`` (the latest checkpoint).

Checkpoints (``checkpoint.pt``, replaced atomically): after every task, and inside a task whenever the trainer
reports a state it can continue from (after training and after every kept pruning step: ``train_task``'s
``callback``/``resume_state``). Each holds the model, the optimizer, the trainer's loop state, the run's records
and the RNG states (torch, CUDA, numpy, python, the data loader's generator), so ``--resume`` continues a killed
run to the same final results, bit for bit, as an uninterrupted run (tests/python_layers/test_cli.py kills twice). ``EIDETIC_CRASH_AFTER_CHECKPOINT=N`` makes the process exit
(code 75) right after writing the run's N-th checkpoint: a deterministic "kill" for tests.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import distributed as dist_mod

__all__ = ["main", "train", "load_config", "default_config", "OPTIONS", "ConfigError"]

CRASH_ENV = "EIDETIC_CRASH_AFTER_CHECKPOINT"
CRASH_EXIT_CODE = 75
CHECKPOINT_FORMAT = 2  # 2: RNG states as tensors and plain containers (loads with weights_only=True)


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


# ----------------------------------------------------------------------------------------------------------------
# Config keys: name, default, kind, help. ``eidetic --help`` prints this table.
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    name: str
    default: object
    kind: str  # "str", "int", "float", "bool", "ints", "choice"
    help: str
    choices: tuple = ()
    optional: bool = False  # None allowed


OPTIONS = [
    Option("scenario", "split_mnist", "choice",
           "the task sequence: permuted_mnist (task 0 unpermuted), split_mnist (5 x 2 digits), split_cifar10 "
           "(5 x 2 classes), split_cifar100 (100/classes_per_task tasks), synthetic (tiny Gaussian clusters, "
           "for tests)",
           ("permuted_mnist", "split_mnist", "split_cifar10", "split_cifar100", "synthetic")),
    Option("tasks", None, "int", "how many tasks of the scenario to train, in order (default: all of them)",
           optional=True),
    Option("classes_per_task", None, "int",
           "classes per task of the split scenarios (default 2; split_cifar100: 10)", optional=True),
    Option("train_samples_per_task", None, "int",
           "keep a fixed, seeded subset of each task's training set (quick runs; default: all)", optional=True),
    Option("test_samples_per_task", None, "int", "the same for each task's test set (default: all)",
           optional=True),
    Option("augment", False, "bool", "random 4-pixel crop + horizontal flip of training images (CIFAR)"),
    Option("data_root", None, "str",
           "folder searched first for the data files (then $EIDETIC_DATA, then ../shared/data)", optional=True),
    Option("model", "mlp", "choice",
           "the body: mlp (Flatten, Linear-ReLU-Dropout per width), convnet (Conv3x3-BN-ReLU-MaxPool per width "
           "but the last, then Linear(last width)), resnet (CIFAR ResNet, projection skip in every block)",
           ("mlp", "convnet", "resnet")),
    Option("widths", None, "ints",
           "layer widths: mlp hidden widths (default [400, 400]); convnet conv channels then the fully connected "
           "width (default [32, 64, 256]); resnet channels per stage (default [64, 128, 256, 512])", optional=True),
    Option("blocks", None, "ints", "resnet: basic blocks per stage (default 2 each, ResNet-18)", optional=True),
    Option("dropout", 0.0, "float", "dropout probability after each hidden layer (0: none)"),
    Option("forward_transfer", True, "bool",
           "new tasks may read the frozen neurons of earlier tasks (false: disjoint subnetworks)"),
    Option("pruning", "l2", "choice",
           "neuron importance for iterative pruning: l1 / l2 (norm of incoming weights) or taylor (first-order "
           "Taylor score from the backward passes); none: no pruning, every free neuron freezes for the task",
           ("l1", "l2", "taylor", "none")),
    Option("step", 0.05, "float", "share of the task's free neurons pruned per pruning step, in every layer"),
    Option("stop_threshold", 0.01, "float",
           "stop pruning once training accuracy stays more than this (absolute, 0.01 = 1 point) below the best"),
    Option("max_epochs", 50, "int", "cap on training epochs per task before pruning"),
    Option("patience", 5, "int", "stop training a task after this many epochs without a better training accuracy"),
    Option("recovery_epochs", 5, "int", "cap on recovery epochs after each pruning step"),
    Option("max_prune_steps", None, "int", "cap on pruning steps per task (default: until nothing is left)",
           optional=True),
    Option("lr", 1e-3, "float", "AdamW learning rate (a fresh optimizer per task)"),
    Option("weight_decay", 0.01, "float", "AdamW weight decay"),
    Option("batch_size", 256, "int", "training batch size"),
    Option("eval_batch_size", 1000, "int", "batch size for test-set evaluation"),
    Option("seed", 0, "int", "seeds the weights, the batch order, dropout and the permutations"),
    Option("device", "auto", "str", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."),
    Option("threads", None, "int", "torch CPU threads (default: torch's choice)", optional=True),
    Option("router", "learned", "choice",
           "task routing for the no-task-id accuracy: learned (a task classifier on the body's features, fitted "
           "after every task on router_samples_per_task training inputs of each finished task), entropy (the "
           "head with the least normalised entropy), none", ("learned", "entropy", "none")),
    Option("router_samples_per_task", 2000, "int", "training inputs per finished task for the learned router"),
    Option("router_epochs", 30, "int", "epochs of the learned router's training"),
    Option("eval_every_epoch", True, "bool",
           "measure the task in training on its test set after every epoch (for the task-accuracy figure)"),
    Option("progress", True, "bool", "progress bars while training"),
]
OPTION_BY_NAME = {o.name: o for o in OPTIONS}
# keys that may change on --resume without changing the results
RESUME_MAY_CHANGE = {"progress", "device", "threads", "data_root"}


def default_config() -> dict:
    return {o.name: copy.deepcopy(o.default) for o in OPTIONS}


def _coerce(option: Option, value):
    name = option.name
    if value is None:
        if option.optional:
            return None
        raise ConfigError(f"{name} may not be empty (null); default is {option.default!r}")
    kind = option.kind
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also "2e-4", which YAML 1.1 leaves a string
        if kind == "ints":
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                value = [value]
            out = [int(v) for v in value]
            if not out:
                raise ValueError
            return out
        if kind == "choice":
            value = str(value)
            if value not in option.choices:
                raise ConfigError(f"{name} must be one of {', '.join(option.choices)}; got {value!r}")
            return value
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {_kind_words(option)}, got {value!r}") from None


def _kind_words(option: Option) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number", "ints": "a list of integers",
            "str": "a string", "choice": "one of " + ", ".join(option.choices)}[option.kind]


def validate_config(raw: dict) -> dict:
    unknown = sorted(set(raw) - set(OPTION_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(OPTION_BY_NAME)} "
                          "(see eidetic --help)")
    cfg = default_config()
    for key, value in raw.items():
        cfg[key] = _coerce(OPTION_BY_NAME[key], value)
    for key in ("step",):
        if not 0 < cfg[key] <= 1:
            raise ConfigError(f"step must be in (0, 1], got {cfg[key]}")
    for key in ("max_epochs", "patience", "recovery_epochs", "batch_size", "eval_batch_size",
                "router_samples_per_task", "router_epochs"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if not 0 <= cfg["dropout"] < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg['dropout']}")
    return cfg


def parse_overrides(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. lr=2e-4 or widths=[100,100])")
        key, text = pair.split("=", 1)
        key = key.strip()
        if key not in OPTION_BY_NAME:
            raise ConfigError(f"unknown config key {key!r} in override {pair!r}; valid keys: "
                              f"{', '.join(OPTION_BY_NAME)}")
        out[key] = yaml.safe_load(text) if text.strip() else None
    return out


def load_config(path=None, overrides=None) -> dict:
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        raw.update(loaded)
    raw.update(overrides or {})
    return validate_config(raw)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available here; use device=cpu or auto")
    return device


def _seed_everything(seed: int) -> None:
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


def versions(device: torch.device) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(device)}
    for pkg in ("eidetic", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    out["EIDETIC_BACKEND"] = os.environ.get("EIDETIC_BACKEND")
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _trainer_accepts(name: str) -> bool:
    from . import trainer
    return name in inspect.signature(trainer.train_task).parameters


def _trainer_supports_resume() -> bool:
    """Pruning-step checkpoints need the trainer's ``callback`` hook and its ``resume_state`` keyword."""
    return _trainer_accepts("callback") and _trainer_accepts("resume_state")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _fmt_row(row) -> str:
    return " ".join("   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}" for v in row)


def format_matrix(matrix, label: str) -> str:
    lines = [f"{label} (row i: after training task i; column j: test on task j)"]
    for i, row in enumerate(matrix):
        lines.append(f"  after task {i:2d}: {_fmt_row(row)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data, task: int, batch_size: int, device) -> float:
    """Test accuracy of ``task`` with its true task id (head ``task``)."""
    from .scenarios import InMemoryLoader

    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in InMemoryLoader(data, batch_size, shuffle=False, device=device):
            correct += int((model(x, task=task).argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(data))


@torch.no_grad()
def evaluate_routed(model, data, task: int, batch_size: int, device, router: str) -> float:
    """Test accuracy without the task id: right when the router picks ``task`` and that head the right class."""
    from .scenarios import InMemoryLoader

    correct = 0
    for x, y in InMemoryLoader(data, batch_size, shuffle=False, device=device):
        tasks, classes = model.predict(x, router=router)
        correct += int(((tasks == task) & (classes == y)).sum())
    return correct / max(1, len(data))


@torch.no_grad()
def baseline_accuracy(model, scenario, batch_size: int, device, seed: int) -> list[float]:
    """b[j] for FWT: the untrained network's test accuracy on task j through a fresh default-init linear head
    (one per task, from a local generator so the run's RNG stream is untouched)."""
    from .scenarios import InMemoryLoader

    g = torch.Generator().manual_seed(seed * 1000 + 999)
    was_training = model.training
    model.eval()
    out = []
    try:
        for task in scenario.tasks:
            head = None
            correct = 0
            for x, y in InMemoryLoader(task.test, batch_size, shuffle=False, device=device):
                f = model.features(x).float()
                if head is None:
                    bound = 1 / math.sqrt(f.shape[1])
                    w = (torch.rand(task.num_classes, f.shape[1], generator=g) * 2 - 1) * bound
                    b = (torch.rand(task.num_classes, generator=g) * 2 - 1) * bound
                    head = (w.to(f.device), b.to(f.device))
                correct += int(((f @ head[0].T + head[1]).argmax(-1) == y).sum())
            out.append(correct / max(1, len(task.test)))
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def _unpickler_reason(exc: Exception) -> str:
    # torch's message is a page of advice; the line naming the refused global is the part worth showing
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return line.split(". Please")[0]  # the rest explains how to allowlist it
    return lines[0] if lines else type(exc).__name__


class Run:
    """One ``eidetic train`` run: its config, RUN_DIR, model and records; checkpoints and resume."""

    def __init__(self, cfg: dict, out_dir, log=print):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.log = log
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.session_start = time.perf_counter()
        self.distributed = dist_mod.active()  # torchrun (eidetic train --nproc N): rank 0 writes every file
        self.writer = dist_mod.rank() == 0
        self.crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None

    # ----- building --------------------------------------------------------------------------------------------
    def build(self):
        from .network import EideticNetwork
        from .models import build_body
        from .scenarios import build_scenario

        cfg = self.cfg
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.device = _resolve_device(cfg["device"])
        options = {}
        if cfg["classes_per_task"] is not None:
            options["classes_per_task"] = cfg["classes_per_task"]
        self.scenario = build_scenario(cfg["scenario"], cfg["tasks"], seed=cfg["seed"], data_root=cfg["data_root"],
                                       train_samples_per_task=cfg["train_samples_per_task"],
                                       test_samples_per_task=cfg["test_samples_per_task"], **options)
        if self.device.type == "cuda":
            self.scenario.to(self.device)  # the whole data set on the GPU: batches are gathered there
        self.num_tasks = self.scenario.num_tasks
        _seed_everything(cfg["seed"])
        body, feature_dim = build_body(cfg["model"], self.scenario.input_shape, cfg["widths"], cfg["dropout"],
                                       cfg["blocks"])
        self.feature_dim = feature_dim
        self.model = EideticNetwork(body, feature_dim).to(self.device)
        if getattr(self.model, "graph", None) is None and hasattr(self.model, "ensure_graph"):
            x, _ = self.scenario.tasks[0].train.batch(torch.arange(min(2, len(self.scenario.tasks[0].train))))
            self.model.ensure_graph(x.to(self.device))

    def fresh_state(self) -> dict:
        T = self.num_tasks
        return {"format": CHECKPOINT_FORMAT, "config": self.cfg, "next_task": 0, "in_task": None,
                "accuracy_matrix": [[None] * T for _ in range(T)],
                "routed_accuracy_matrix": [[None] * T for _ in range(T)],
                "baseline_accuracy": None, "history": [], "evaluations": [], "task_start_epochs": [],
                "epochs_done": 0, "tasks": [], "elapsed_seconds": 0.0, "checkpoints_written": 0,
                "checkpoint_log": []}

    def _loader(self, task: int, on_epoch_end=None):
        from .scenarios import InMemoryLoader
        return InMemoryLoader(self.scenario.tasks[task].train, self.cfg["batch_size"], shuffle=True,
                              seed=self.cfg["seed"] * 1000 + task, device=self.device, augment=self.cfg["augment"],
                              on_epoch_end=on_epoch_end)

    def _optimizer(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg["lr"],
                                 weight_decay=self.cfg["weight_decay"])

    # ----- checkpoints -----------------------------------------------------------------------------------------
    def _model_state(self):
        state = self.model.state_dict()
        router = getattr(self.model, "router", None)
        if router is not None:  # saved apart: the network rebuilds it, it is not one of its own layers
            state = {k: v for k, v in state.items() if not k.startswith("router.")}
        return state, (None if router is None else {"num_tasks": router.num_tasks, "state": router.state_dict()})

    def save_checkpoint(self, state: dict, in_task: dict | None = None) -> None:
        state["in_task"] = in_task
        state["elapsed_seconds_at_save"] = state["elapsed_seconds"] + (time.perf_counter() - self.session_start)
        model_state, router = self._model_state()
        state["checkpoints_written"] += 1
        state.setdefault("checkpoint_log", []).append(
            f"task {state['next_task'] - 1} end" if in_task is None else
            f"task {in_task['task']} step {in_task['trainer_state'].get('steps_done')}")
        payload = {"run": state, "model": model_state, "router": router, "rng": rng_state()}
        if self.writer:
            tmp = self.checkpoint_path.with_name("checkpoint.pt.tmp")
            torch.save(payload, tmp)
            os.replace(tmp, self.checkpoint_path)  # a kill mid-write leaves the previous checkpoint intact
        if self.distributed:
            dist_mod.barrier()  # no process runs ahead of a checkpoint being written (or of a simulated kill)
        if self.crash_after is not None and state["checkpoints_written"] == self.crash_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)  # simulated kill, for the resume test

    def load_checkpoint(self) -> tuple[dict, dict]:
        """The run state and RNG states of ``checkpoint.pt``, after loading the model and router from it.

        The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a file
        from elsewhere cannot run code while it loads. Raises ConfigError for a file holding anything else
        (other pickled objects, or format 1 checkpoints, which held numpy objects) and for another format.
        """
        import pickle

        try:
            # on the CPU: RNG states must be CPU tensors; the model, router and optimizer copy to their device
            payload = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"{self.checkpoint_path} is not a plain-tensor eidetic checkpoint: it holds pickled Python objects "
                "that torch.load(weights_only=True) refuses, since unpickling them could run arbitrary code "
                f"(checkpoints of format 1 hold numpy objects and are refused too; this eidetic reads format "
                f"{CHECKPOINT_FORMAT}); start a new run. torch: {_unpickler_reason(exc)}"
            ) from exc
        run = payload.get("run") if isinstance(payload, dict) else None
        if not isinstance(run, dict) or run.get("format") != CHECKPOINT_FORMAT:
            found = run.get("format") if isinstance(run, dict) else None
            raise ConfigError(f"{self.checkpoint_path} has checkpoint format {found}, this eidetic writes "
                              f"{CHECKPOINT_FORMAT}; start a new run")
        self.model.load_state_dict(payload["model"])
        if hasattr(self.model, "sync"):
            self.model.sync()
        if payload["router"] is not None:
            from .routing import TaskRouter
            router = TaskRouter(self.feature_dim, payload["router"]["num_tasks"]).to(self.device)
            router.load_state_dict(payload["router"]["state"])
            router.requires_grad_(False)
            self.model.router = router
        state = payload["run"]
        state["elapsed_seconds"] = state.pop("elapsed_seconds_at_save", state["elapsed_seconds"])
        return state, payload["rng"]

    # ----- records ---------------------------------------------------------------------------------------------
    def _group_sizes(self) -> dict:
        return {g.name: int(g.size) for g in getattr(self.model, "groups", [])}

    def _record(self, state: dict, rec: dict, offset: int, test_accuracy=None) -> dict:
        rec = dict(rec)
        rec["global_epoch"] = offset + int(rec.get("epoch") or 0)
        rec["test_accuracy"] = test_accuracy
        rec["group_sizes"] = self._group_sizes()
        state["history"].append(rec)
        return rec

    # ----- the loop --------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.build()
        cfg, T = self.cfg, self.num_tasks
        rng = None
        if resume:
            state, rng = self.load_checkpoint()
            self.log(f"resuming {self.out} at task {state['in_task']['task'] if state['in_task'] else state['next_task']}"
                     f" (checkpoint {state['checkpoints_written']})")
        else:
            state = self.fresh_state()
            if self.writer:
                with open(self.out / "config.yaml", "w") as f:
                    yaml.safe_dump(cfg, f, sort_keys=False)
        step_checkpoints = _trainer_supports_resume()
        if not step_checkpoints and not resume:
            self.log("note: the trainer offers no callback/resume_state hook: checkpoints are written after every "
                     "task only (a resumed run restarts the task it was killed in)")
        if rng is not None:
            set_rng_state(rng)  # last: nothing after this may draw from the run's RNG before training resumes

        for t in range(state["next_task"], T):
            self._train_one_task(state, t, step_checkpoints)
        return self.finish(state)

    def _train_one_task(self, state: dict, t: int, step_checkpoints: bool) -> None:
        cfg, model, task = self.cfg, self.model, self.scenario.tasks[t]
        in_task = state["in_task"] if state["in_task"] and state["in_task"]["task"] == t else None
        task_clock = time.perf_counter()
        # the task's test accuracy after every epoch (Figure 1), measured when the trainer ends a pass over the
        # loader: eval mode, no gradient, no random draw, so training is unchanged
        epoch_test_accuracy: dict[int, float] = {}

        def on_epoch_end(epoch: int) -> None:
            epoch_test_accuracy[epoch] = evaluate(model, task.test, t, cfg["eval_batch_size"], self.device)

        loader = self._loader(t, on_epoch_end if cfg["eval_every_epoch"] else None)
        if in_task is None:
            model.prepare_for_task(t, task.num_classes, forward_transfer=cfg["forward_transfer"])
            if t == 0:
                state["baseline_accuracy"] = baseline_accuracy(model, self.scenario, cfg["eval_batch_size"],
                                                               self.device, cfg["seed"])
            else:  # R[t-1][t]: the trained body with task t's fresh head, for FWT
                state["accuracy_matrix"][t - 1][t] = evaluate(model, task.test, t, cfg["eval_batch_size"],
                                                              self.device)
            state["task_start_epochs"].append(state["epochs_done"])
            optimizer = self._optimizer()
            resume_state = None
            task_seconds_before = 0.0
        else:
            optimizer = self._optimizer()
            optimizer.load_state_dict(in_task["optimizer"])
            loader.load_state_dict(in_task["loader"])
            resume_state = in_task["trainer_state"]
            task_seconds_before = in_task["task_seconds"]
            # the records the trainer made before the kill are in state["history"] already

        offset = state["epochs_done"]
        kwargs = dict(pruning=None if cfg["pruning"] == "none" else cfg["pruning"], step=cfg["step"],
                      stop_threshold=cfg["stop_threshold"], max_epochs=cfg["max_epochs"], patience=cfg["patience"],
                      recovery_epochs=cfg["recovery_epochs"], progress=cfg["progress"] and self.writer,
                      device=self.device)
        if self.distributed:
            kwargs["distributed"] = True
        if cfg["max_prune_steps"] is not None:
            kwargs["max_prune_steps"] = cfg["max_prune_steps"]
        seen_epochs = {r["epoch"] for r in state["history"] if r.get("task") == t and r.get("phase") in
                       ("train", "recover")}

        def record_epoch(rec: dict) -> None:
            if rec["epoch"] in seen_epochs:
                return
            acc = epoch_test_accuracy.get(rec["epoch"])
            self._record(state, rec, offset, acc)
            seen_epochs.add(rec["epoch"])
            if acc is not None:
                state["evaluations"].append({"global_epoch": offset + rec["epoch"], "task": t, "test_accuracy": acc,
                                             "training_task": t})

        if step_checkpoints:
            def callback(event: dict) -> None:
                rec = event.get("record")
                if rec is not None and rec.get("phase") in ("train", "recover"):
                    record_epoch(rec)
                if event.get("event") == "prune_step" and event.get("trainer_state") is not None:
                    self.save_checkpoint(state, {
                        "task": t, "trainer_state": event["trainer_state"], "optimizer": optimizer.state_dict(),
                        "loader": loader.state_dict(),
                        "task_seconds": task_seconds_before + time.perf_counter() - task_clock})
            kwargs["callback"] = callback
            if resume_state is not None:
                kwargs["resume_state"] = resume_state

        history = model.train_task(loader, optimizer, **kwargs)

        # records the callback did not see (all of them without the hook; the closing ones with it)
        finish = None
        for rec in history:
            if rec.get("phase") in ("train", "recover"):
                record_epoch(rec)
            else:
                self._record(state, rec, offset)
                if rec.get("phase") == "finish":
                    finish = rec
        epochs = max([r["epoch"] for r in history if r.get("epoch") is not None] or [0])
        state["epochs_done"] = offset + epochs

        # row t of both matrices
        for j in range(t + 1):
            acc = evaluate(model, self.scenario.tasks[j].test, j, cfg["eval_batch_size"], self.device)
            state["accuracy_matrix"][t][j] = acc
            state["evaluations"].append({"global_epoch": state["epochs_done"], "task": j, "test_accuracy": acc,
                                         "training_task": t})
        if cfg["router"] != "none":
            if cfg["router"] == "learned":
                self._fit_router(t)
            for j in range(t + 1):
                state["routed_accuracy_matrix"][t][j] = evaluate_routed(
                    model, self.scenario.tasks[j].test, j, cfg["eval_batch_size"], self.device, cfg["router"])
        seconds = task_seconds_before + time.perf_counter() - task_clock
        state["tasks"].append({"task": t, "name": task.name, "seconds": seconds, "epochs": epochs,
                               "train_accuracy": None if finish is None else finish.get("train_accuracy"),
                               "kept_neurons": None if finish is None else finish.get("kept"),
                               "stop_reason": None if finish is None else finish.get("stop_reason")})
        state["next_task"] = t + 1
        self.log(self._summary_line(state, t, seconds, epochs, finish))
        self.save_checkpoint(state, None)

    def _fit_router(self, t: int) -> None:
        from .scenarios import InMemoryLoader
        cfg = self.cfg
        loaders = []
        for j in range(t + 1):
            data = self.scenario.tasks[j].train.subset(cfg["router_samples_per_task"], cfg["seed"] * 1000 + 700 + j)
            loaders.append(InMemoryLoader(data, cfg["eval_batch_size"], shuffle=False, device=self.device,
                                          task_label=j))
        from . import routing
        params = inspect.signature(routing.fit_router).parameters
        kwargs = {}
        if "generator" in params:  # its own stream: the router's shuffling leaves the run's RNG alone
            kwargs["generator"] = torch.Generator().manual_seed(cfg["seed"] * 1000 + 800 + t)
        if "epochs" in params:
            kwargs["epochs"] = cfg["router_epochs"]
        routing.fit_router(self.model, loaders, **kwargs)
        if self.distributed:  # every process fits the same router; rank 0's copy is the one all keep
            dist_mod.broadcast_state(self.model.router)

    def _summary_line(self, state, t, seconds, epochs, finish) -> str:
        row = state["accuracy_matrix"][t][:t + 1]
        routed = state["routed_accuracy_matrix"][t][:t + 1]
        kept = (finish or {}).get("kept") or {}
        sizes = self._group_sizes()
        kept_share = (sum(kept.values()) / max(1, sum(sizes.values()))) if kept and sizes else None
        parts = [f"task {t + 1}/{self.num_tasks} done in {seconds:.1f}s ({epochs} epochs)",
                 f"test acc {row[t]:.4f}"]
        if routed[t] is not None:
            parts.append(f"routed {routed[t]:.4f}")
        if kept_share is not None:
            parts.append(f"kept {kept_share:.1%} of neurons")
        if finish and finish.get("stop_reason"):
            parts.append(f"pruning stopped: {finish['stop_reason']}")
        parts.append("accuracies so far [" + ", ".join(f"{a:.4f}" for a in row) + "]")
        return " | ".join(parts)

    # ----- outputs ---------------------------------------------------------------------------------------------
    def finish(self, state: dict) -> dict:
        from . import metrics
        from .plots import plot_run

        R = metrics.as_matrix(state["accuracy_matrix"])
        summary = metrics.summarize(R, state["baseline_accuracy"])
        routed = state["routed_accuracy_matrix"]
        routed_summary = (metrics.summarize(metrics.as_matrix(routed)) if self.cfg["router"] != "none"
                          else {"acc": None, "bwt": None, "forgetting": None})
        wall = state["elapsed_seconds"] + (time.perf_counter() - self.session_start)
        results = {
            "accuracy_matrix": R, "routed_accuracy_matrix": routed,
            "acc": summary["acc"], "bwt": summary["bwt"], "fwt": summary["fwt"],
            "forgetting": summary["forgetting"], "forgetting_per_task": metrics.forgetting_per_task(R),
            "routed_acc": routed_summary["acc"], "routed_bwt": routed_summary["bwt"],
            "baseline_accuracy": state["baseline_accuracy"],
            "metric_definitions": {
                "acc": "mean_j R[T-1][j] (Lopez-Paz & Ranzato 2017)",
                "bwt": "1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017)",
                "fwt": "1/(T-1) sum_{j>=1} (R[j-1][j] - b[j]); R[j-1][j]: task j's fresh head before training on "
                       "it; b[j]: untrained network, fresh head (Lopez-Paz & Ranzato 2017)",
                "forgetting": "mean_{j<T-1} (max_{j<=l<=T-2} R[l][j] - R[T-1][j]) (Chaudhry et al. 2018)",
                "routed": "a sample counts when the router picks its task and that head its class"},
            "capacity": self.model.capacity(),
            "tasks": state["tasks"],
            "task_start_epochs": state["task_start_epochs"],
            "scenario": {"name": self.scenario.name, "source": self.scenario.source, "num_tasks": self.num_tasks,
                         "input_shape": list(self.scenario.input_shape),
                         "train_sizes": [len(t.train) for t in self.scenario.tasks],
                         "test_sizes": [len(t.test) for t in self.scenario.tasks], **self.scenario.notes},
            "checkpoint_granularity": "pruning step" if _trainer_supports_resume() else "task",
            "wall_seconds": wall,
            "processes": dist_mod.world_size(),
            "config": self.cfg,
            "versions": versions(self.device),
        }
        results = metrics.to_jsonable(results)
        if not self.writer:
            return results
        _write_json(self.out / "results.json", results)
        self._write_history_csv(state["history"])
        results["plots"] = {k: str(v) for k, v in plot_run(results, state["history"], state["evaluations"],
                                                            self.out).items()}
        _write_json(self.out / "results.json", results)
        return results

    def _write_history_csv(self, history) -> None:
        groups = list(self._group_sizes())
        base = ["task", "phase", "epoch", "global_epoch", "step", "loss", "train_accuracy", "test_accuracy",
                "pruned_share", "frozen_share"]
        columns = base + [f"pruned_share[{g}]" for g in groups] + [f"frozen_share[{g}]" for g in groups] + \
            ["stop_reason"]
        with open(self.out / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for rec in history:
                row = {k: rec.get(k) for k in base if not k.endswith("_share")}
                sizes = rec.get("group_sizes") or {}
                for key in ("pruned_share", "frozen_share"):
                    shares = rec.get(key)
                    if isinstance(shares, dict):
                        n = sum(sizes.get(g, 1) for g in shares)
                        row[key] = sum(v * sizes.get(g, 1) for g, v in shares.items()) / max(1, n)
                        for g, v in shares.items():
                            row[f"{key}[{g}]"] = v
                    else:
                        row[key] = shares
                row["stop_reason"] = rec.get("stop_reason")
                writer.writerow(row)


def train(cfg: dict, out_dir, resume: bool = False, log=print) -> dict:
    """Run (or resume) ``eidetic train`` in-process; returns the results dict also written to results.json."""
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: {out} holds no checkpoint.pt; start the run without --resume")
        saved = load_config(out / "config.yaml") if (out / "config.yaml").is_file() else None
        if saved is not None:
            changed = sorted(k for k in saved if saved[k] != cfg.get(k) and k not in RESUME_MAY_CHANGE)
            if changed:
                raise ConfigError(f"--resume: the config differs from the run's in {', '.join(changed)} ("
                                  + "; ".join(f"{k}: run has {saved[k]!r}, given {cfg.get(k)!r}" for k in changed)
                                  + "); resume with the run's own config (just --out and --resume) or start anew")
    elif ckpt.is_file():
        raise ConfigError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it, or choose "
                          "another --out")
    threads = torch.get_num_threads()
    if dist_mod.init_from_env(_resolve_device(cfg["device"])):
        # every process must train the same run: compare the config (seed included) before anything else
        dist_mod.check_same(hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                            "the run configuration (config file, overrides and seed)")
        if dist_mod.rank() != 0:
            log = _quiet
    try:
        return Run(cfg, out, log).run(resume)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the run)."""


def launch(nproc: int, argv: list[str]) -> int:
    """``eidetic train --nproc N ...``: the same command on N local processes through ``torchrun --standalone``
    (gloo on CPU, NCCL on GPU); returns torchrun's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "python_layers.cli", *argv]
    return subprocess.call(cmd)


def export(run_dir, task: int, out, log=print) -> dict:
    """``eidetic export``: task ``task`` of the run in ``run_dir`` as a plain torch.nn module saved to ``out``
    (``torch.save``; plus ``out`` with suffix ``.pt2`` from ``torch.export`` where the body allows).

    Checks the module against the network on the task's whole test set; returns the report (also logged):
    test accuracy of both, share of test samples with the same argmax, max |logit difference|, parameters.
    """
    from .scenarios import InMemoryLoader

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no run (config.yaml and checkpoint.pt); train one with eidetic train")
    run = Run(load_config(run_dir / "config.yaml"), run_dir, log)
    run.build()
    run.load_checkpoint()
    model = run.model.eval()
    if not isinstance(task, int) or not 0 <= task < model.num_finished_tasks:
        raise ConfigError(f"--task {task}: the run has finished tasks 0..{model.num_finished_tasks - 1}")
    data = run.scenario.tasks[task].test
    batches = list(InMemoryLoader(data, run.cfg["eval_batch_size"], shuffle=False, device=run.device))
    module = model.export(task, example=batches[0][0])
    same = correct_model = correct_module = 0
    diff = 0.0
    with torch.no_grad():
        for x, y in batches:
            a, b = model(x, task=task), module(x)
            diff = max(diff, float((a - b).abs().max()))
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            correct_model += int((a.argmax(-1) == y).sum())
            correct_module += int((b.argmax(-1) == y).sum())
    n = max(1, len(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module, out)
    report = {"task": task, "out": str(out), "test_samples": len(data), "network_accuracy": correct_model / n,
              "export_accuracy": correct_module / n, "same_argmax": same / n, "max_abs_logit_diff": diff,
              "parameters": sum(p.numel() for p in module.parameters()),
              "network_parameters_and_buffers": sum(t.numel() for t in list(model.parameters()) +
                                                    list(model.buffers()) if t.dtype.is_floating_point)}
    try:
        program = torch.export.export(module, (batches[0][0],))
        torch.export.save(program, out.with_suffix(".pt2"))
        report["torch_export"] = str(out.with_suffix(".pt2"))
    except Exception as exc:  # noqa: BLE001 - the body's ops decide; the torch.save file is the export
        report["torch_export"] = f"not possible for this body ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    log(f"task {task}: {report['parameters']} parameters (the network holds {report['network_parameters_and_buffers']}"
        f" values); test accuracy {report['export_accuracy']:.4f} (network {report['network_accuracy']:.4f}); "
        f"same argmax on {report['same_argmax']:.2%} of {len(data)} test samples; max |logit diff| "
        f"{diff:.2e}\nsaved {out}; torch.export: {report['torch_export']}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _keys_help() -> str:
    lines = ["config keys (in FILE.yaml, or as key=value overrides on the command line; overrides win):"]
    for o in OPTIONS:
        default = "unset" if o.default is None else json.dumps(o.default)
        lines.append(f"  {o.name} (default {default})")
        words = o.help.split()
        line = "      "
        for w in words:
            if len(line) + len(w) > 110:
                lines.append(line.rstrip())
                line = "      "
            line += w + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    description = ("Eidetic Learning experiments: train a sequence of tasks without forgetting, then report the "
                   "accuracy matrix, ACC/BWT/FWT/forgetting, capacity and plots.")
    epilog = ("example:\n  eidetic train --config configs/pmnist_small.yaml --out runs/pmnist_small\n"
              "  eidetic train --config configs/demo.yaml --out runs/demo lr=2e-4 widths=[100,100]\n"
              "  eidetic train --out runs/pmnist_small --resume      # continue a killed run\n\n"
              "outputs in RUN_DIR: results.json, history.csv, accuracy_matrix.png, routed_accuracy_matrix.png, "
              "task_accuracy.png,\n  capacity.png, config.yaml, checkpoint.pt\n"
              "data: $EIDETIC_DATA first, else ../shared/data next to the project; never downloaded\n\n"
              + _keys_help())
    parser = argparse.ArgumentParser(prog="eidetic", description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tr = sub.add_parser("train", help="train a task sequence (see the config keys below)", description=description,
                        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", metavar="FILE.yaml", help="experiment config (YAML mapping of the keys below)")
    tr.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for results, plots and checkpoints")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in RUN_DIR from its last checkpoint (same final results as an "
                         "uninterrupted run)")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train on N processes of this machine (torchrun --standalone; gloo on CPU, NCCL on GPU); "
                         "for several machines run torchrun yourself (see the README)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. lr=2e-4")
    ex = sub.add_parser("export", help="save one finished task as a plain torch.nn module",
                        description="Save finished task T of a run as a plain torch.nn module of compact layers "
                                    "(torch.save; loads with torch alone), checked on the task's test set.")
    ex.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder written by eidetic train")
    ex.add_argument("--task", required=True, type=int, metavar="T", help="the finished task to export")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to torch.save the module (and FILE.pt2)")
    return parser


def main(argv=None) -> int:
    from .scenarios import DataNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export":
        try:
            export(args.run, args.task, args.out)
        except (ConfigError, DataNotFoundError) as exc:
            print(f"eidetic: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command != "train":
        parser.print_help()
        return 2
    if args.nproc < 1:
        print("eidetic: error: --nproc must be >= 1", file=sys.stderr)
        return 2
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        argv = list(sys.argv[1:] if argv is None else argv)
        rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
        return launch(args.nproc, rest)
    try:
        overrides = parse_overrides(args.overrides)
        config_path = args.config
        if args.resume and config_path is None and (Path(args.out) / "config.yaml").is_file():
            config_path = Path(args.out) / "config.yaml"
        if config_path is None and not overrides:
            raise ConfigError("give --config FILE.yaml (or key=value overrides, e.g. scenario=synthetic)")
        cfg = load_config(config_path, overrides)
        results = train(cfg, args.out, resume=args.resume)
    except (ConfigError, DataNotFoundError) as exc:
        print(f"eidetic: error: {exc}", file=sys.stderr)
        return 2
    if dist_mod.rank() != 0:
        return 0  # rank 0 prints the run's results
    print(format_matrix(results["accuracy_matrix"], "accuracy matrix, true task id (oracle)"))
    if results["config"]["router"] != "none":
        print(format_matrix(results["routed_accuracy_matrix"],
                            f"accuracy matrix, {results['config']['router']} router (no task id)"))
    print(_final_line(results))
    print(f"results: {Path(args.out) / 'results.json'}; plots: " + ", ".join(results.get("plots", {}).values()))
    return 0


def _final_line(results: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    return (f"ACC {f(results['acc'])}  BWT {f(results['bwt'])}  FWT {f(results['fwt'])}  forgetting "
            f"{f(results['forgetting'])}  routed ACC {f(results.get('routed_acc'))}  wall {results['wall_seconds']:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
