"""Training on 2 processes (gloo, CPU): every rank holds bit-identical weights and neuron states after every
epoch, pruning step and finished task; finished tasks never change under DDP; bad launches fail fast."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from python_layers import EideticNetwork
from python_layers import distributed as dist_mod
from python_layers.trainer import train_task
from tests.python_layers.synthetic import CLASSES, make_tasks, mlp_body

WORLD = 2


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _train_worker(rank: int, init_file: str, out: str, pruning: str, wrap: bool) -> None:
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        tasks = make_tasks(num_tasks=3, seed=3)
        probe = torch.cat([x[::8] for _, x, _ in tasks])
        model = EideticNetwork(*mlp_body(width=16))
        hashes, snapshots = [], {}

        def record(event):
            hashes.append((event["event"], dist_mod.state_hash(model)))

        for t, (batches, _, _) in enumerate(tasks):
            model.prepare_for_task(t, CLASSES)
            loader = DataLoader(TensorDataset(batches.x, batches.y), batch_size=16, shuffle=True,
                                generator=torch.Generator().manual_seed(t))
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)
            # the user's own DDP wrapper, or the network with distributed=True
            target = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
            train_task(target, loader, optimizer, pruning=pruning, step=0.25, stop_threshold=0.1, max_epochs=4,
                       patience=2, recovery_epochs=2, progress=False, callback=record, distributed=not wrap)
            hashes.append(("task", dist_mod.state_hash(model)))
            model.eval()
            with torch.no_grad():
                snapshots[t] = model(probe, task=t).clone()
                for s in range(t):  # the no-forgetting check under DDP, with AdamW weight decay
                    assert torch.equal(model(probe, task=s), snapshots[s]), f"task {s} changed after task {t}"
        torch.save({"hashes": hashes, "states": [layer.task_state.clone() for layer in model.body_layers().values()]},
                   os.path.join(out, f"rank{rank}.pt"))
        del target  # before the process group (see _uneven_worker)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pruning, wrap", [("taylor", False), ("l2", True)])
def test_ranks_stay_bit_identical_and_nothing_is_forgotten(pruning, wrap, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_train_worker, args=(init_file, str(tmp_path), pruning, wrap), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert len(r0["hashes"]) == len(r1["hashes"]) > 6
    kinds = {kind for kind, _ in r0["hashes"]}
    assert {"epoch", "prune_step", "task"} <= kinds
    for (kind, a), (_, b) in zip(r0["hashes"], r1["hashes"]):
        assert a == b, f"the ranks' states differ after a {kind} event"
    for a, b in zip(r0["states"], r1["states"]):
        assert torch.equal(a, b)
    assert any(bool((s == 2).any()) for s in r0["states"]), "task 2 froze neurons"


def _config_worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    try:
        dist_mod.check_same("seed=0" if rank == 0 else "seed=1", "the run configuration")
    except RuntimeError as exc:
        with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
            f.write(str(exc))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_configs_fail_fast(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_config_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        message = (tmp_path / f"err{r}.txt").read_text()
        assert "disagree on the run configuration" in message and "same configuration and seed" in message


def test_single_process_is_unchanged():
    assert not dist_mod.active() and dist_mod.rank() == 0 and dist_mod.world_size() == 1
    loader = [1, 2]
    assert dist_mod.shard(loader) is loader
    with pytest.raises(ValueError, match="initialised process group"):
        model = EideticNetwork(*mlp_body(width=8))
        model.prepare_for_task(0, CLASSES)
        model.train_task(make_tasks(1)[0][0], torch.optim.SGD(model.parameters(), lr=0.1), distributed=True,
                         progress=False)


def _uneven_setup():
    """An MLP and an InMemoryLoader of 47 samples in batches of 10 (4 batches of 10 and one of 7): 3 processes
    read 4, 3, 3 rows of each full batch and 3, 2, 2 of the last, so no batch is padded."""
    from python_layers.scenarios import ImageSet, InMemoryLoader
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (47, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (47,), generator=g)
    torch.manual_seed(0)
    model = EideticNetwork(*mlp_body(width=16, dropout=0.0))
    model.prepare_for_task(0, CLASSES)
    return model, InMemoryLoader(ImageSet(images, labels, (0.5,), (0.25,)), batch_size=10, seed=1)


def _uneven_worker(rank: int, init_file: str, out: str) -> None:
    from python_layers.trainer import run_epoch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        model, loader = _uneven_setup()
        trained = dist_mod.wrap(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss, acc = run_epoch(trained, dist_mod.shard(loader), optimizer, torch.device("cpu"), progress=False,
                              distributed=True)
        sizes = [x.shape[0] for x, _ in loader]  # after the epoch: this pass draws the next permutation
        torch.save({"sizes": sizes, "loss": loss, "acc": acc, "state": model.state_dict()},
                   os.path.join(out, f"rank{rank}.pt"))
        # the DDP wrapper goes before the process group: a gloo group destroyed from the wrapper's deallocation
        # after destroy_process_group can wait forever for its threads
        del trained
    finally:
        dist.destroy_process_group()


def test_uneven_shards_train_the_global_batch(tmp_path):
    """3 processes on batches of 10 (shares of 4, 3 and 3 rows, no padding) take the steps one process takes:
    each process's loss is weighted by its share, so the step is the global batch's mean; the epoch's loss and
    accuracy count every sample once."""
    from python_layers.trainer import run_epoch
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_uneven_worker, args=(init_file, str(tmp_path)), nprocs=3, join=True)
    model, loader = _uneven_setup()
    loss, acc = run_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.5), torch.device("cpu"),
                          progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert [r["sizes"] for r in ranks] == [[4, 4, 4, 4, 3], [3, 3, 3, 3, 2], [3, 3, 3, 3, 2]]
    for r in ranks:
        assert r["acc"] == acc and abs(r["loss"] - loss) <= 1e-5
        weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert len(weights) >= 6
        for key, value in weights.items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


# ----- the CLI: eidetic train --nproc N -------------------------------------------------------------------------

def _sampler_worker(rank: int, init_file: str, out: str) -> None:
    from torch.utils.data import BatchSampler, SequentialSampler, SubsetRandomSampler, WeightedRandomSampler
    _init(rank, init_file)
    try:
        torch.manual_seed(100 + rank)  # each process draws otherwise: rank 0's draw must be the one used
        data = TensorDataset(torch.arange(100))
        seen = {}
        weights = torch.zeros(100)
        weights[40:50] = 1.0
        for name, sampler in (("subset", SubsetRandomSampler(range(30))),
                              ("weighted", WeightedRandomSampler(weights, 40, replacement=True))):
            loader = dist_mod.shard(DataLoader(data, batch_size=10, sampler=sampler))
            seen[name] = [[b[0].tolist() for b in loader] for _ in range(2)]  # two epochs
        try:
            dist_mod.shard(DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 10, False)))
        except ValueError as exc:
            seen["batch_sampler"] = str(exc)
        torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_sampler_of_the_users_is_shared_out_not_dropped(tmp_path):
    """A DataLoader's own sampler (a subset, weights) keeps choosing the samples over 2 processes: each global
    batch of 10 is rank 0's draw, 5 rows to each process, none outside the sampler's; a batch_sampler is a clear
    error."""
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_sampler_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for epoch in range(2):
        a, b = r0["subset"][epoch], r1["subset"][epoch]
        assert [len(x) for x in a] == [len(x) for x in b] == [5, 5, 5]
        rows = [i for batch in a + b for i in batch]
        assert sorted(rows) == list(range(30)), "every row of the subset once per epoch, no other row"
        a, b = r0["weighted"][epoch], r1["weighted"][epoch]
        assert [len(x) for x in a] == [len(x) for x in b] == [5, 5, 5, 5]
        assert all(40 <= i < 50 for batch in a + b for i in batch), "only rows with weight"
    assert r0["subset"][0] != r0["subset"][1], "a new draw every epoch"
    for r in (r0, r1):
        assert "batch_sampler" in r["batch_sampler"] and "batch_size= and sampler=" in r["batch_sampler"]


def _bn_tail_worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        x = torch.randn(12, 20)
        y = (x[:, 0] > 0).long()
        model = EideticNetwork(torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.BatchNorm1d(16),
                                                   torch.nn.ReLU()), 16)
        model.prepare_for_task(0, 2)
        model.ensure_graph(x[:2])
        before = dist_mod.state_hash(model)
        try:  # one process reads batches of 10 and 2; each of two reads 5 and 1
            model.train_task(DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True),
                             torch.optim.AdamW(model.parameters(), lr=1e-3), max_epochs=1, patience=1,
                             recovery_epochs=1, progress=False, distributed=True)
            message = ""
        except ValueError as exc:
            message = str(exc)
        with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
            f.write(message + "\n" + str(before == dist_mod.state_hash(model)))
    finally:
        dist.destroy_process_group()


def test_a_last_batch_of_one_sample_per_process_is_said_before_training(tmp_path):
    """A DataLoader whose global last batch of 2 leaves each of 2 processes 1 sample: a clear error before any
    step, on every rank, naming the batch norm as the network names it and the processes' shares."""
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_bn_tail_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        message, unchanged = (tmp_path / f"err{r}.txt").read_text().rsplit("\n", 1)
        assert "BatchNorm layer 'body.1'" in message and "each of the 2 processes reads batch_size / 2" in message
        assert "Checked before training" in message and unchanged == "True"


def _states(checkpoint):
    return {k: v for k, v in torch.load(checkpoint, weights_only=True)["model"].items() if k.endswith("task_state")}


def test_cli_two_processes_then_kill_and_resume_with_one(tmp_path):
    """``--nproc 2`` trains the same run as one process (ACC within half a point, BWT exactly 0); a 2-process run
    killed inside a task and resumed with 1 process ends with the neuron states of the uninterrupted 2-process
    run (the global batch does not depend on the number of processes)."""
    from python_layers import cli
    from tests.python_layers.test_cli import TINY, _run_cli
    args = [*TINY, "pruning=l2", "dropout=0.0"]
    one = _run_cli(["train", "--out", str(tmp_path / "one"), *args])
    two = _run_cli(["train", "--nproc", "2", "--out", str(tmp_path / "two"), *args])
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["processes"] == 2 and b["bwt"] == 0.0
    assert abs(a["acc"] - b["acc"]) <= 0.005
    log = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["run"]["checkpoint_log"]
    kill_at = [i + 1 for i, entry in enumerate(log) if entry.startswith("task 1 step")][-1]
    killed = _run_cli(["train", "--nproc", "2", "--out", str(tmp_path / "killed"), *args], {cli.CRASH_ENV: str(kill_at)})
    assert killed.returncode != 0 and not (tmp_path / "killed" / "results.json").exists()
    resumed = _run_cli(["train", "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, again = _states(tmp_path / "two" / "checkpoint.pt"), _states(tmp_path / "killed" / "checkpoint.pt")
    assert whole.keys() == again.keys()
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
    c = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert c["bwt"] == 0.0 and abs(c["acc"] - b["acc"]) <= 0.005
    assert c["processes_by_session"] == [2, 1] and c["processes"] == 1


def test_an_error_inside_the_processes_is_one_line(tmp_path):
    """A task without capacity, found by every process mid-run: rank 0 prints the one ``eidetic: error`` line
    (no torchrun report, no traceback), warnings print once, and the exit status is the CLI's 2. The same for
    missing data."""
    from tests.python_layers.test_cli import _run_cli
    run = _run_cli(["train", "--nproc", "2", "--out", str(tmp_path / "r"), "scenario=synthetic", "tasks=3",
                    "widths=[8]", "max_epochs=1", "threads=1", "step=0.01", "max_prune_steps=1", "progress=false"])
    lines = run.stderr.splitlines()
    errors = [line for line in lines if line.startswith("eidetic: error: task 2 cannot start: no free neuron")]
    capacity = [line for line in lines if line.startswith("eidetic: warning: task 1 kept every neuron left in")]
    assert run.returncode == 2 and len(errors) == 1 and len(capacity) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr and "FAILED" not in run.stderr
    # missing data is each machine's own: said once by the machine's first process
    missing = tmp_path / "no-such-folder"
    run = _run_cli(["train", "--nproc", "2", "--out", str(tmp_path / "m"), "scenario=split_mnist",
                    f"data_root={missing}", "threads=1", "progress=false"])
    assert run.returncode == 2 and run.stderr.count(f"eidetic: error: data_root={missing} is not a folder") == 1
    assert "Traceback" not in run.stderr and "FAILED" not in run.stderr, run.stderr[-3000:]


def test_the_launcher_in_process_prints_one_line_and_puts_back_the_signal_handlers(tmp_path, monkeypatch, capsys):
    """cli.main with --nproc 2 in this process: the processes' error comes back as the launcher's one line (they
    leave it in a folder: a process stopped by the launcher before it could print loses nothing), and torchrun's
    signal handlers are gone afterwards (Ctrl-C is a KeyboardInterrupt again)."""
    from python_layers import cli
    from tests.python_layers.test_cli import ROOT
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    missing = tmp_path / "no-such-folder"
    status = cli.main(["train", "--nproc", "2", "--out", str(tmp_path / "r"), "scenario=split_mnist",
                       f"data_root={missing}", "threads=1", "progress=false"])
    assert status == 2
    assert capsys.readouterr().err == f"eidetic: error: data_root={missing} is not a folder; give the folder " \
        "that holds the data sets (or leave data_root unset to search $EIDETIC_DATA, then ../shared/data)\n"
    assert {s: signal.getsignal(s) for s in before} == before and cli.ERROR_DIR_ENV not in os.environ


def test_a_stopped_launcher_stops_the_processes_and_says_how_to_resume(tmp_path):
    """SIGTERM to ``eidetic train --nproc 2`` (a scheduler's stop): the processes stop, the launcher says how
    to continue (once, no traceback) and exits with 128 + 15; the run folder keeps its last checkpoint."""
    from tests.python_layers.test_cli import ROOT
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "python_layers.cli", "train", "--nproc", "2", "--out", str(out),
                             "scenario=synthetic", "tasks=8", "widths=[256]", "step=0.02", "threads=1",
                             "progress=false"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the test could stop it"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    said = f"eidetic: stopped by SIGTERM; continue the run with: eidetic train --out {out} --resume"
    assert proc.returncode == 128 + signal.SIGTERM and err.count(said) == 1, err[-3000:]
    assert "Traceback" not in err and (out / "checkpoint.pt").exists()


def _warning_worker(rank: int, init_file: str, out: str) -> None:
    import warnings
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        model = EideticNetwork(*mlp_body(width=8))
        model.prepare_for_task(0, CLASSES)
        batches = make_tasks(num_tasks=1, train_per_class=8)[0][0]
        loader = DataLoader(TensorDataset(batches.x, batches.y), batch_size=8)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            # no pruning: the task keeps every neuron, which finish_task warns of
            train_task(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), pruning=None, max_epochs=1,
                       progress=False, distributed=True)
        with open(os.path.join(out, f"warn{rank}.txt"), "w") as f:
            f.write("\n".join(str(w.message) for w in record))
    finally:
        dist.destroy_process_group()


def test_rank_0_says_the_warnings_of_a_distributed_train_task(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_warning_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    said = [(tmp_path / f"warn{r}.txt").read_text() for r in range(WORLD)]
    assert "task 0 kept every neuron left in" in said[0] and said[1] == "", said


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_launcher_takes_its_processes_with_it_and_frees_the_run_folder(tmp_path):
    """``kill -9`` of ``eidetic train --nproc 2``: its processes end too, instead of training on and writing the run
    folder that a resumed run then writes as well; the folder, held while they ran, is free for ``--resume`` at
    once."""
    from python_layers.config import ConfigError
    from python_layers.run import run_folder_lock
    from tests.python_layers.test_cli import ROOT
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "python_layers.cli", "train", "--nproc", "2", "--out", str(out),
                             "scenario=synthetic", "tasks=8", "widths=[256]", "step=0.02", "threads=1",
                             "progress=false"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the test could stop it"
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        # the folder was new: the launcher could not lock it, the process that created it (rank 0) holds it
        with pytest.raises(ConfigError, match=r"in use by another eidetic run \(process (\d+)"):
            with run_folder_lock(out):
                pass
        proc.kill()
        proc.wait(timeout=30)
        # without the parent-death signal they train on until their next collective with the launcher's store
        # (20 s or more here), or to the end of the run
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "the processes outlived their launcher"
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    # free for a resumed run: at once as a rule; under a loaded machine the kernel may take a moment to release the
    # lock of a process killed by the parent-death signal, so a few seconds are allowed, and a holder left after
    # them is named with its state
    deadline = time.monotonic() + 10
    while True:
        try:
            with run_folder_lock(out):
                break
        except ConfigError as exc:
            if time.monotonic() > deadline:
                holder = re.search(r"process (\d+)", str(exc))
                state = _alive(int(holder.group(1))) if holder else None
                raise AssertionError(f"the run folder stayed locked after the processes ended: {exc} (holder alive: "
                                     f"{state}; workers {workers})") from None
            time.sleep(0.1)


def test_state_hash_covers_batch_norm_and_changes_with_any_value():
    """0-dim buffers (a batch norm's num_batches_tracked) are hashed too; any changed bit changes the hash."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    before = dist_mod.state_hash(model)
    assert before == dist_mod.state_hash(model)
    model[1].num_batches_tracked += 1
    assert dist_mod.state_hash(model) != before
