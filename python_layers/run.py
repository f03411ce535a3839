"""One ``eidetic train`` run: train a scenario's tasks in order, measure, checkpoint, resume, write the outputs.

A run trains the scenario's tasks in order with a fresh optimizer per task (AdamW, or Adam), measures after every task the test
accuracy of every task so far (with the true task id, and through the router without it), and writes into
RUN_DIR:

* ``results.json``: ``accuracy_matrix`` R[i][j] (test accuracy on task j after training task i; j = i + 1 is
  task j's fresh head before any training on it, later columns are null), ``routed_accuracy_matrix`` (same,
  through the router fitted after task i: right only when both the task and the class are right;
  ``router_fits``: what each fit of the learned router did), ``entropy_routed_accuracy_matrix`` and
  ``entropy_routed_acc`` (the same through entropy routing), ``acc``, ``bwt``, ``fwt``,
  ``forgetting`` and ``forgetting_per_task`` (definitions in ``python_layers.metrics``), ``routed_acc`` and
  ``routed_bwt`` (the same from the routed matrix; its BWT need not be 0: each row has its own router),
  ``baseline_accuracy`` (the untrained network, for FWT), ``task_start_epochs`` (the global epoch each task's
  training started at, for the plots), ``capacity`` (neurons per task per layer group), ``wall_seconds``, ``config``,
  ``versions``, ``scenario`` (its name, sizes and ``data_files``: the data files read), ``metric_definitions``
  (each metric's formula and source), ``checkpoint_granularity`` (``"pruning step"``, or ``"task"`` where the
  trainer cannot resume inside a task), ``processes`` (of the last session) and ``processes_by_session`` (one
  entry per session, resumed ones included), and per task its time, kept neurons and why pruning stopped;
* ``history.csv``: one row per epoch (task, phase, epoch, loss, training accuracy, test accuracy of the task in
  training, share of neurons pruned and frozen, overall and per group);
* ``accuracy_matrix.png``, ``routed_accuracy_matrix.png``, ``task_accuracy.png`` (each task's test accuracy over
  training, the paper's Figure 1), ``capacity.png`` (share of neurons frozen and pruned, Figure 3);
* ``config.yaml`` (the resolved config), ``checkpoint.pt`` (the latest checkpoint, ``python_layers.checkpoints``).

Checkpoints are written after every task, and inside a task whenever the trainer reports a state it can continue
from (after training and after every kept pruning step: ``train_task``'s ``callback``/``resume_state``). Each
holds the model, the optimizer, the trainer's loop state, the run's records and the RNG states (torch, CUDA,
numpy, python, the data loader's generator), so a resumed run ends with the same results, bit for bit, as an
uninterrupted one. Under torchrun (``eidetic train --nproc N``) every process trains; rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import errno
import csv
import hashlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from . import distributed as dist_mod
from .checkpoints import (CHECKPOINT_FORMAT, CRASH_ENV, CRASH_EXIT_CODE, read_checkpoint, rng_state, seed_everything,
                          set_rng_state, write_checkpoint)
from .config import RESUME_MAY_CHANGE, ConfigError, load_config
from .network import CapacityError, CapacityWarning

__all__ = ["Run", "train", "export", "evaluate", "evaluate_routed", "baseline_accuracy", "versions",
           "resolve_device", "trainer_supports_resume"]


def resolve_device(name: str) -> torch.device:
    """The config's ``device``: ``auto`` is CUDA when available, else the CPU. Raises ConfigError for a CUDA
    device on a machine without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available here; use device=cpu or auto")
    return device


def versions(device: torch.device) -> dict:
    """What produced a run's results: python, torch, numpy, triton, platform, threads, device, GPU, backend and
    the git commit (``+dirty`` with uncommitted changes)."""
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


def trainer_accepts(name: str) -> bool:
    """Whether ``trainer.train_task`` takes the keyword ``name``."""
    from . import trainer
    return name in inspect.signature(trainer.train_task).parameters


def trainer_supports_resume() -> bool:
    """Pruning-step checkpoints need the trainer's ``callback`` hook and its ``resume_state`` keyword."""
    return trainer_accepts("callback") and trainer_accepts("resume_state")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _my_share(batches):
    """This process's rows of every batch (all of them in a single process): many processes evaluate a test
    set together, each a strided 1/N of every batch, and ``_total`` sums their counts."""
    rank, world = dist_mod.rank(), dist_mod.world_size()
    for x, y in batches:
        yield (x, y) if world == 1 else (x[rank::world], y[rank::world])


def _total(count: int, device) -> int:
    """``count`` summed over the processes (the same number on every rank)."""
    if not dist_mod.active():
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist_mod.all_reduce_sum(t)
    return int(t)


def evaluate(model, data, task: int, batch_size: int, device) -> float:
    """Test accuracy of ``task`` with its true task id (head ``task``)."""
    from .scenarios import InMemoryLoader

    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in _my_share(InMemoryLoader(data, batch_size, shuffle=False, device=device)):
            correct += int((model(x, task=task).argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    return _total(correct, device) / max(1, len(data))


@torch.no_grad()
def evaluate_routed(model, data, task: int, batch_size: int, device, router: str) -> float:
    """Test accuracy without the task id: right when the router picks ``task`` and that head the right class."""
    from .scenarios import InMemoryLoader

    correct = 0
    for x, y in _my_share(InMemoryLoader(data, batch_size, shuffle=False, device=device)):
        tasks, classes = model.predict(x, router=router)
        correct += int(((tasks == task) & (classes == y)).sum())
    return _total(correct, device) / max(1, len(data))


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
            for x, y in _my_share(InMemoryLoader(task.test, batch_size, shuffle=False, device=device)):
                f = model.features(x).float()
                if head is None:
                    bound = 1 / math.sqrt(f.shape[1])
                    w = (torch.rand(task.num_classes, f.shape[1], generator=g) * 2 - 1) * bound
                    b = (torch.rand(task.num_classes, generator=g) * 2 - 1) * bound
                    head = (w.to(f.device), b.to(f.device))
                correct += int(((f @ head[0].T + head[1]).argmax(-1) == y).sum())
            out.append(_total(correct, device) / max(1, len(task.test)))
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
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
        from .graph import GraphError
        from .models import body_fingerprint, build_body, is_custom_model
        from .scenarios import build_scenario

        cfg = self.cfg
        if cfg["threads"] is not None:
            torch.set_num_threads(cfg["threads"])
        self.device = resolve_device(cfg["device"])
        options = {}
        if cfg["classes_per_task"] is not None:
            options["classes_per_task"] = cfg["classes_per_task"]
        try:
            self.scenario = build_scenario(cfg["scenario"], cfg["tasks"], seed=cfg["seed"],
                                           data_root=cfg["data_root"],
                                           train_samples_per_task=cfg["train_samples_per_task"],
                                           test_samples_per_task=cfg["test_samples_per_task"], **options)
        except ValueError as exc:  # a scenario refusing the config's values (e.g. more tasks than it has)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from None
        self.data_digest = self.scenario.digest()  # before the move: a resumed run is refused other data
        if self.device.type == "cuda":
            self.scenario.to(self.device)  # the whole data set on the GPU: batches are gathered there
        self.num_tasks = self.scenario.num_tasks
        seed_everything(cfg["seed"])
        try:
            body, feature_dim = build_body(cfg["model"], self.scenario.input_shape, cfg["widths"], cfg["dropout"],
                                           cfg["blocks"], cfg.get("model_args"))
        except ValueError as exc:  # the config's model, widths and blocks do not fit together: a config error
            raise ConfigError(str(exc)) from None
        self.feature_dim = feature_dim
        # a body of the user's is recorded as it is built: an edited file must not resume (or export) a run
        self.body_sources: dict[str, str] = {}  # {source file: digest}, to name the files that changed
        self.body_fingerprint = (body_fingerprint(body, cfg["model"], self.body_sources)
                                 if is_custom_model(cfg["model"]) else None)
        try:
            network = body if isinstance(body, EideticNetwork) else EideticNetwork(body, feature_dim)
            self.model = network.to(self.device)
            if getattr(self.model, "graph", None) is None and hasattr(self.model, "ensure_graph"):
                x, _ = self.scenario.tasks[0].train.batch(torch.arange(min(2, len(self.scenario.tasks[0].train))))
                self.model.ensure_graph(x.to(self.device))
        except (GraphError, ValueError) as exc:  # a body of the user's that cannot be converted or traced: the
            # message says what to change
            if not is_custom_model(cfg["model"]):
                raise
            hint = (" In eidetic train, the factory may return EideticNetwork(body, F, graph=declare_graph(...)) "
                    "instead of the body." if isinstance(exc, GraphError) and "declare_graph" in str(exc) else "")
            raise ConfigError(f"model {cfg['model']!r}: {exc}{hint}") from None

    def fresh_state(self) -> dict:
        T = self.num_tasks
        return {"format": CHECKPOINT_FORMAT, "config": self.cfg, "next_task": 0, "in_task": None,
                "accuracy_matrix": [[None] * T for _ in range(T)],
                "routed_accuracy_matrix": [[None] * T for _ in range(T)],
                "entropy_routed_accuracy_matrix": [[None] * T for _ in range(T)],
                "baseline_accuracy": None, "history": [], "evaluations": [], "task_start_epochs": [],
                "epochs_done": 0, "tasks": [], "router_fits": [], "elapsed_seconds": 0.0, "checkpoints_written": 0,
                "checkpoint_log": [], "body_fingerprint": self.body_fingerprint, "data_digest": self.data_digest,
                "body_source_digests": sorted(self.body_sources.values())}

    def _loader(self, task: int, on_epoch_end=None):
        from .scenarios import InMemoryLoader
        return InMemoryLoader(self.scenario.tasks[task].train, self.cfg["batch_size"], shuffle=True,
                              seed=self.cfg["seed"] * 1000 + task, device=self.device, augment=self.cfg["augment"],
                              on_epoch_end=on_epoch_end)

    def _optimizer(self):
        cls = torch.optim.Adam if self.cfg["optimizer"] == "adam" else torch.optim.AdamW
        return cls([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg["lr"],
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
            write_checkpoint(self.checkpoint_path, payload)
        if self.distributed:
            dist_mod.barrier()  # no process runs ahead of a checkpoint being written (or of a simulated kill)
        if self.crash_after is not None and state["checkpoints_written"] == self.crash_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)  # simulated kill, for the resume test

    def load_checkpoint(self, resuming: bool = True) -> tuple[dict, dict]:
        """The run state and RNG states of ``checkpoint.pt``, after loading the model and router from it.

        Raises ConfigError for a file ``read_checkpoint`` refuses (pickled objects, another format).
        """
        payload = read_checkpoint(self.checkpoint_path)
        # the checkpoint's own config: config.yaml beside it can be edited, emptied or removed
        saved = payload["run"].get("config") or {}
        if resuming:
            check_resumed_config(saved, self.cfg, f"--resume: the config (given, or {self.out / 'config.yaml'})",
                                 "resume with the run's own config (just --out and --resume, with config.yaml as the "
                                 "run wrote it; where it is removed, the checkpoint's config is used) or start anew")
        else:
            check_resumed_config(saved, self.cfg, f"{self.out / 'config.yaml'}", "the file was edited after the "
                                 "run wrote it: restore the run's values (checkpoint.pt holds them)")
        recorded = payload["run"].get("data_digest")  # absent in checkpoints of earlier versions
        if recorded is not None and recorded != self.data_digest:
            raise ConfigError(
                f"the data the config reads now (scenario {self.cfg['scenario']!r}, data_root "
                f"{self.cfg['data_root']!r}: {self.scenario.source}) are not those the run in {self.out} trained on: "
                "its accuracy matrix would mix two data sets. Point data_root (or $EIDETIC_DATA) at the files the "
                "run started with (results.json names them under scenario), or start a new run")
        recorded = payload["run"].get("body_fingerprint")
        if recorded is not None and recorded != self.body_fingerprint:
            where = self.cfg["model"].rpartition(":")[0]
            known = payload["run"].get("body_source_digests")  # absent in checkpoints of earlier versions
            if known is not None:
                changed = sorted(f for f, d in self.body_sources.items() if d not in set(known))
                where = ", ".join(changed) if changed else f"{where} (its modules' settings)"
            raise ConfigError(
                f"model {self.cfg['model']!r} builds another body than the one this run trained ({self.out}): its "
                f"modules or their code changed since (did {where} change?). Its finished tasks' outputs would change "
                "with it: restore the body the run started with, or start a new run")
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as exc:  # e.g. frozen values that no longer match their fingerprint: a damaged file
            raise ConfigError(f"{self.checkpoint_path} does not load into the run's network, so it is damaged or "
                              f"not this run's; restore it from a copy. {str(exc).strip()}") from exc
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
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder for the run's files")
        self.build()  # first: a data or model error leaves no empty run folder behind
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way, no permission, read-only disk
            raise ConfigError(f"--out {self.out}: cannot create the folder ({exc.strerror}); give a folder "
                              "that can be created") from None
        with run_folder_lock(self.out) if _holds_lock(self.out) else contextlib.nullcontext():
            return self._run_in_folder(resume)

    def _run_in_folder(self, resume: bool) -> dict:
        cfg, T = self.cfg, self.num_tasks
        rng = None
        if resume:
            state, rng = self.load_checkpoint()
            done = self._finished_results(state)
            if done is not None:
                return done
            self._check_writable()
            self.log(f"resuming {self.out} at task {state['in_task']['task'] if state['in_task'] else state['next_task']}"
                     f" (checkpoint {state['checkpoints_written']})")
        else:
            self._check_writable()
            state = self.fresh_state()
            if self.writer:
                with open(self.out / "config.yaml", "w") as f:
                    yaml.safe_dump(cfg, f, sort_keys=False)
        # a run resumed with another number of processes says so (results.json: processes_by_session)
        state.setdefault("processes_by_session", []).append(dist_mod.world_size())
        step_checkpoints = trainer_supports_resume()
        if not step_checkpoints and not resume:
            self.log("note: the trainer offers no callback/resume_state hook: checkpoints are written after every "
                     "task only (a resumed run restarts the task it was killed in)")
        if rng is not None:
            set_rng_state(rng)  # last: nothing after this may draw from the run's RNG before training resumes

        for t in range(state["next_task"], T):
            self._train_one_task(state, t, step_checkpoints)
        return self.finish(state)

    def _check_writable(self) -> None:
        """ConfigError, before any training, when the run folder cannot be written (a read-only disk)."""
        if self.writer and not os.access(self.out, os.W_OK):
            raise ConfigError(f"{self.out} is not writable, and the run writes its checkpoints and results there: "
                              "make it writable, or copy the folder where it can be and resume the copy "
                              "(eidetic train --out COPY --resume)")

    def _finished_results(self, state: dict) -> dict | None:
        """results.json of a run whose every task is trained and whose outputs were all written, else None.

        Resuming such a run changes nothing: its results (wall_seconds, processes_by_session) stay as written."""
        path = self.out / "results.json"
        if state["next_task"] < self.num_tasks or state["in_task"] or not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):  # cut short while written: write it again
            return None
        if "plots" not in results:  # killed between results.json and the plots
            return None
        self.log(f"{self.out}: the run is finished ({self.num_tasks} tasks); nothing to resume, results.json "
                 "left as written")
        return results

    def _why_kept(self, state: dict, task: int) -> str:
        """Why finished task ``task`` kept every free neuron of some layer, from its recorded stop reason, and
        what to change for the next run."""
        reason = next((r.get("stop_reason") for r in reversed(state["history"])
                       if r.get("task") == task and r.get("phase") == "finish"), None)
        cfg = self.cfg
        if reason == "nothing left to prune":
            return ("pruning never removes a layer's last free neuron, and that one was all it had left there; "
                    "start again with wider layers, or a larger step so that earlier tasks keep fewer neurons")
        if reason == "max_prune_steps reached":
            return (f"its pruning stopped at max_prune_steps={cfg['max_prune_steps']}; start again with a larger "
                    f"max_prune_steps or step, or wider layers")
        if reason == "no pruning":
            return "it was not pruned; start again with a pruning method (l1, l2, taylor)"
        return (f"no pruning step stayed within stop_threshold={cfg['stop_threshold']} of its best training "
                f"accuracy; start again with a larger stop_threshold, a smaller step (a step prunes at least one "
                f"neuron of a layer: of a layer with n free neurons, at least 1/n) or wider layers")

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
            try:
                model.prepare_for_task(t, task.num_classes, forward_transfer=cfg["forward_transfer"])
            except CapacityError as exc:
                if self.writer:
                    self._write_history_csv(state["history"])
                if self.distributed:
                    dist_mod.barrier()  # every process stops here; none may end the run before the file is written
                raise ConfigError(
                    f"{exc}. Task {t - 1} kept every free neuron there: {self._why_kept(state, t - 1)}. Tasks "
                    f"0..{t - 1} are finished and saved ({self.out / 'checkpoint.pt'}, history.csv). A resume keeps the "
                    f"run's settings (its finished tasks were trained with them): start a new run, with another "
                    f"--out") from None
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
        if cfg["prune_lr_factor"] != 1.0:
            kwargs["prune_lr_factor"] = cfg["prune_lr_factor"]
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

        with warnings.catch_warnings():
            if t == self.num_tasks - 1:  # the last task may keep every neuron left
                warnings.simplefilter("ignore", CapacityWarning)
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
        router_fit = None
        if cfg["router"] != "none":
            if cfg["router"] == "learned":
                router_fit = self._fit_router(t)
            entropy = state.setdefault("entropy_routed_accuracy_matrix", [[None] * self.num_tasks
                                                                          for _ in range(self.num_tasks)])
            for j in range(t + 1):
                state["routed_accuracy_matrix"][t][j] = evaluate_routed(
                    model, self.scenario.tasks[j].test, j, cfg["eval_batch_size"], self.device, cfg["router"])
                # entropy routing needs no training: measured next to the learned router, for comparison
                entropy[t][j] = state["routed_accuracy_matrix"][t][j] if cfg["router"] == "entropy" else \
                    evaluate_routed(model, self.scenario.tasks[j].test, j, cfg["eval_batch_size"], self.device,
                                    "entropy")
        seconds = task_seconds_before + time.perf_counter() - task_clock
        state["tasks"].append({"task": t, "name": task.name, "seconds": seconds, "epochs": epochs,
                               "train_accuracy": None if finish is None else finish.get("train_accuracy"),
                               "kept_neurons": None if finish is None else finish.get("kept"),
                               "stop_reason": None if finish is None else finish.get("stop_reason")})
        if router_fit is not None:
            state.setdefault("router_fits", []).append(router_fit)
        state["next_task"] = t + 1
        self.log(self._summary_line(state, t, seconds, epochs, finish))
        self.save_checkpoint(state, None)

    def _fit_router(self, t: int) -> dict:
        """Fit the learned router on tasks 0..t (row t of ``routed_accuracy_matrix`` routes through it); returns
        what the fit did: seconds, epochs of each reader, whether it started from the previous task's router, and
        the last epoch's loss and accuracy on its own inputs per reader."""
        from .scenarios import InMemoryLoader
        cfg = self.cfg
        clock = time.perf_counter()
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
        if cfg["router_flip"]:
            kwargs["flip"] = True
        conv_epochs = None
        if cfg["router_input"] != "body":
            kwargs["reads"] = cfg["router_input"]
            last = t == self.num_tasks - 1 and cfg["router_input_epochs_last"] is not None
            conv_epochs = kwargs["conv_epochs"] = cfg["router_input_epochs_last" if last else "router_input_epochs"]
            if cfg["router_input_crop"]:
                kwargs["crop"] = cfg["router_input_crop"]
        previous = getattr(self.model, "router", None)
        warm = bool(cfg["router_warm_start"] and previous is not None and previous.num_tasks == t)
        if warm:  # the router fitted after task t-1 (restored with the checkpoint on resume)
            kwargs["init"] = previous
        # the router's initial weights draw from the run's RNG: forked, so the tasks after it train on the same
        # random numbers whatever the router's size
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            history = routing.fit_router(self.model, loaders, **kwargs)
        if self.distributed:  # every process fits the same router; rank 0's copy is the one all keep
            dist_mod.broadcast_state(self.model.router)
        last_epochs = {r.get("reader", "body"): {"loss": r["loss"], "accuracy": r["accuracy"]} for r in history}
        return {"after_task": t, "seconds": time.perf_counter() - clock,
                "epochs": cfg["router_epochs"] if cfg["router_input"] != "input" else None,
                "input_epochs": conv_epochs if t > 0 else None, "warm_start": warm, "last_epoch": last_epochs}

    def _summary_line(self, state, t, seconds, epochs, finish) -> str:
        row = state["accuracy_matrix"][t][:t + 1]
        routed = state["routed_accuracy_matrix"][t][:t + 1]
        kept = (finish or {}).get("kept") or {}
        sizes = self._group_sizes()
        kept_share = (sum(kept.values()) / max(1, sum(sizes.values()))) if kept and sizes else None
        parts = [f"task {t} ({t + 1} of {self.num_tasks}) done in {seconds:.1f}s ({epochs} epochs)",
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
        entropy = state.get("entropy_routed_accuracy_matrix")
        entropy_acc = (metrics.summarize(metrics.as_matrix(entropy))["acc"]
                       if self.cfg["router"] != "none" and entropy and None not in entropy[-1] else None)
        wall = state["elapsed_seconds"] + (time.perf_counter() - self.session_start)
        results = {
            "accuracy_matrix": R, "routed_accuracy_matrix": routed,
            "acc": summary["acc"], "bwt": summary["bwt"], "fwt": summary["fwt"],
            "forgetting": summary["forgetting"], "forgetting_per_task": metrics.forgetting_per_task(R),
            "routed_acc": routed_summary["acc"], "routed_bwt": routed_summary["bwt"],
            "entropy_routed_accuracy_matrix": entropy, "entropy_routed_acc": entropy_acc,
            "baseline_accuracy": state["baseline_accuracy"],
            "metric_definitions": {
                "acc": "mean_j R[T-1][j] (Lopez-Paz & Ranzato 2017)",
                "bwt": "1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017)",
                "fwt": "1/(T-1) sum_{j>=1} (R[j-1][j] - b[j]); R[j-1][j]: task j's fresh head before training on "
                       "it; b[j]: untrained network, another fresh head (Lopez-Paz & Ranzato 2017). Both are "
                       "untrained heads: near 0 by construction, not a measure of feature transfer (compare "
                       "R[j][j] with forward_transfer=false)",
                "forgetting": "mean_{j<T-1} (max_{j<=l<=T-2} R[l][j] - R[T-1][j]) (Chaudhry et al. 2018)",
                "routed": "a sample counts when the router picks its task and that head its class; row i routes "
                          "through the router fitted after task i (router_fits[i] with router=learned)",
                "entropy_routed": "the same through entropy routing (the head with the least normalised "
                                  "entropy), whatever the config's router"},
            "capacity": self.model.capacity(),
            "tasks": state["tasks"],
            "router_fits": state.get("router_fits", []),
            "task_start_epochs": state["task_start_epochs"],
            "scenario": {"name": self.scenario.name, "source": self.scenario.source, "num_tasks": self.num_tasks,
                         "input_shape": list(self.scenario.input_shape),
                         "train_sizes": [len(t.train) for t in self.scenario.tasks],
                         "test_sizes": [len(t.test) for t in self.scenario.tasks], **self.scenario.notes},
            "checkpoint_granularity": "pruning step" if trainer_supports_resume() else "task",
            "wall_seconds": wall,
            "processes": dist_mod.world_size(),  # of this session; every session's: processes_by_session
            "processes_by_session": state.get("processes_by_session", [dist_mod.world_size()]),
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


# set by ``cli.launch`` for its processes: the run folder whose lock the launcher holds for them
RUN_LOCK_ENV = "EIDETIC_RUN_LOCKED"
_LOCK_FILE = ".eidetic.lock"


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Hold an exclusive lock on the run folder ``out`` while a run writes there: two runs writing one folder would
    mix their checkpoints and results. ``fcntl.flock`` on ``out/.eidetic.lock``, which names the holder (process
    id and machine); the operating system releases it when the process ends, however it ends. Raises ConfigError
    when another process holds it. A no-op for a folder that does not exist yet (the run that creates it takes it
    then) and where ``fcntl`` is missing (Windows). Yields whether the lock is held."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    if not out.is_dir():
        yield False
        return
    path = out / _LOCK_FILE
    try:
        f = open(path, "a+")
    except OSError as exc:  # a read-only folder: a finished run's resume writes nothing, a run that does says so
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"{out} is in use by another eidetic run ({holder}): two runs writing one folder would "
                              "mix their checkpoints and results. Wait for it to end, or stop it (kill the process), "
                              f"then continue the run with: eidetic train --out {out} --resume") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {platform.node()}\n")
        f.flush()
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _holds_lock(out: Path) -> bool:
    """Whether this process takes the run folder's lock: rank 0, unless the launcher holds it for its processes."""
    if dist_mod.rank() != 0:
        return False
    held = os.environ.get(RUN_LOCK_ENV)
    return not held or Path(held).resolve() != out.resolve()


def train(cfg: dict, out_dir, resume: bool = False, log=print) -> dict:
    """Run (or resume) ``eidetic train`` in-process; returns the results dict also written to results.json.

    ``resume`` continues the run in ``out_dir`` from its checkpoint; where there is none yet (a run killed before
    its first checkpoint, or a new folder) the run starts from ``cfg``. Raises ConfigError when ``cfg`` differs
    from the resumed run's config in a key outside ``RESUME_MAY_CHANGE``, and when a run without ``resume`` would
    overwrite a checkpoint, or when another process is writing in ``out_dir`` (``run_folder_lock``).
    """
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not ckpt.is_file():  # checked first: the run would train, then fail writing it
        raise ConfigError(f"{ckpt} is not a file (a folder?): a run writes its checkpoint there. Move it away, or "
                          "choose another --out")
    if not ckpt.is_file() and (out / "results.json").is_file():
        raise ConfigError(f"{out} holds results.json but no checkpoint.pt: the checkpoint was removed or moved, and "
                          f"{'resuming' if resume else 'a new run'} would train from the start and overwrite the "
                          "run's results. Put checkpoint.pt back to resume it, or choose another --out (delete "
                          "results.json only to start the run over in this folder)")
    starting_fresh = resume and not ckpt.is_file()
    if starting_fresh:
        resume = False  # nothing to continue: the same run from its beginning
    elif resume:
        saved = load_config(out / "config.yaml") if _has_text(out / "config.yaml") else None
        if saved is not None:
            check_resumed_config(saved, cfg)  # and again against the checkpoint's own (Run.load_checkpoint)
    elif ckpt.is_file():
        raise ConfigError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it, or choose "
                          "another --out")
    threads = torch.get_num_threads()
    if dist_mod.init_from_env(resolve_device(cfg["device"])):
        # every process must train the same run: compare the config (seed included) before anything else
        dist_mod.check_same(hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                            "the run configuration (config file, overrides and seed)")
        if dist_mod.rank() != 0:
            log = _quiet
    if starting_fresh:
        log(f"--resume: {out} holds no checkpoint.pt yet; starting the run")
    try:
        return Run(cfg, out, log).run(resume)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting


def _has_text(path: Path) -> bool:
    """A file with something in it (an emptied config.yaml reads as every default)."""
    return path.is_file() and path.stat().st_size > 0


def check_resumed_config(saved: dict, cfg: dict, what: str = "--resume: the config",
                          advice: str = "resume with the run's own config (just --out and --resume) or start anew"
                          ) -> None:
    """ConfigError when ``cfg`` differs from the run's config ``saved`` in a key outside ``RESUME_MAY_CHANGE``
    (keys ``saved`` does not hold, from earlier versions, are not compared)."""
    changed = sorted(k for k in saved if saved[k] != cfg.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        raise ConfigError(f"{what} differs from the run's in {', '.join(changed)} ("
                          + "; ".join(f"{k}: run has {saved[k]!r}, given {cfg.get(k)!r}" for k in changed)
                          + f"); {advice}")


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the run)."""


def _export_program(module: torch.nn.Module, example: torch.Tensor):
    """``torch.export`` of an exported task that takes any batch size (the example's batch size where the
    body's ops tie the batch to it, e.g. a reshape to a fixed size)."""
    try:  # two samples (a copy: a view would keep, and torch.export.save write, the whole batch's storage): the
        # program keeps its example inputs, and any batch size is allowed
        return torch.export.export(module, (example[:2].clone(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception:  # noqa: BLE001 - some bodies specialise the batch: fall back to the example's size
        return torch.export.export(module, (example,))


def _check_export_path(out: Path) -> None:
    """Before any work: ``out`` names a file that can be written, and not the ``.pt2`` archive beside it."""
    if out.suffix == ".pt2":
        raise ConfigError(f"--out {out}: the torch.save file cannot end in .pt2, the torch.export archive is "
                          f"written beside it under that suffix; use e.g. --out {out.with_suffix('.pt')}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write, e.g. --out {out / 'task.pt'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {out}: not writable")


def _check_run_dir(run_dir: Path) -> None:
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir} holds no run (checkpoint.pt); train one with eidetic train")


def run_config(run_dir, overrides: dict | None = None) -> dict:
    """The config of the run in ``run_dir``: its config.yaml, or, where that file was removed or emptied, the
    config its checkpoint.pt holds; then ``overrides``. Raises ConfigError as ``load_config`` and
    ``read_checkpoint`` do."""
    run_dir = Path(run_dir)
    if _has_text(run_dir / "config.yaml") or not (run_dir / "checkpoint.pt").is_file():
        return load_config(run_dir / "config.yaml", overrides)
    return load_config(None, {**read_checkpoint(run_dir / "checkpoint.pt")["run"]["config"], **(overrides or {})})


def _loaded_run(run_dir: Path, log=print) -> Run:
    run = Run(run_config(run_dir), run_dir, log)
    run.build()
    run.load_checkpoint(resuming=False)
    return run


def load_run(run_dir):
    """(network, scenario) of the ``eidetic train`` run in ``run_dir``, as its last checkpoint left them.

    ``network``: the EideticNetwork (body built from the run's config, on the run's device, in eval mode) with
    every task the checkpoint holds and, when the run fitted one, its router: ``network(x, task=t)`` and
    ``network.predict(x)`` work as in the run. ``scenario``: the run's tasks; ``scenario.tasks[t].test.batch(rows)``
    (and ``.train``) gives (float32 inputs [B, C, H, W] normalised as the network reads them, int64 task-local
    labels [B]) for a LongTensor of rows in ``0..len(scenario.tasks[t].test) - 1``.
    Raises ConfigError for a folder that holds no run, a damaged checkpoint, and a body whose code changed since
    the run trained it."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    run = _loaded_run(run_dir, _quiet)
    return run.model.eval(), run.scenario


def export(run_dir, task: int, out, log=print) -> dict:
    """``eidetic export``: task ``task`` of the run in ``run_dir`` as a plain torch.nn module saved to ``out``
    (``torch.save``; plus ``out`` with suffix ``.pt2`` from ``torch.export`` where the body allows, its example
    inputs two test samples). Raises ConfigError for a folder that holds no run, a task that is not finished and
    an ``out`` that cannot be written or ends in ``.pt2``, before any work.

    Checks the module against the network on the task's whole test set; returns the report (also logged):
    test accuracy of both, share of test samples with the same argmax, max |logit difference|, parameters.
    """
    from .scenarios import InMemoryLoader

    run_dir, out = Path(run_dir), Path(out)
    _check_run_dir(run_dir)
    _check_export_path(out)
    run = _loaded_run(run_dir, log)
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
    try:
        torch.save(module, out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    router = getattr(model, "router", None)

    def values(module):
        return 0 if module is None else sum(t.numel() for t in list(module.parameters()) + list(module.buffers())
                                            if t.dtype.is_floating_point)
    report = {"task": task, "out": str(out), "test_samples": len(data), "network_accuracy": correct_model / n,
              "export_accuracy": correct_module / n, "same_argmax": same / n, "max_abs_logit_diff": diff,
              "parameters": sum(p.numel() for p in module.parameters()),
              # the body and the heads (what the export is cut from); the task router apart
              "network_parameters_and_buffers": values(model) - values(router),
              "router_parameters_and_buffers": values(router)}
    try:
        program = _export_program(module, batches[0][0])
        torch.export.save(program, out.with_suffix(".pt2"))
        report["torch_export"] = str(out.with_suffix(".pt2"))
    except Exception as exc:  # noqa: BLE001 - the body's ops decide; the torch.save file is the export
        report["torch_export"] = f"not possible for this body ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    router_note = f", its task router {report['router_parameters_and_buffers']} more" if router is not None else ""
    log(f"task {task}: {report['parameters']} parameters (the network's body and heads hold "
        f"{report['network_parameters_and_buffers']} values{router_note}); test accuracy "
        f"{report['export_accuracy']:.4f} (network {report['network_accuracy']:.4f}); "
        f"same argmax on {report['same_argmax']:.2%} of {len(data)} test samples; max |logit diff| "
        f"{diff:.2e}\nsaved {out}; torch.export: {report['torch_export']}")
    return report


