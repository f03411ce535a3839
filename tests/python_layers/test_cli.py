"""The `eidetic` command end to end on the synthetic scenario: outputs, config handling, and --resume after a kill.

The kill is simulated deterministically: EIDETIC_CRASH_AFTER_CHECKPOINT=N makes the process exit (code 75) right
after writing the run's N-th checkpoint; the resumed run must end with the same results and weights, bit for bit,
as an uninterrupted one.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from python_layers import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["scenario=synthetic", "tasks=3", "widths=[16,16]", "max_epochs=3", "patience=1", "recovery_epochs=1",
        "step=0.25", "max_prune_steps=2", "batch_size=32", "router_epochs=3", "progress=false", "lr=1e-2",
        "threads=1", "dropout=0.1"]


def _run_cli(args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "python_layers.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _comparable(results: dict) -> dict:
    keep = ("accuracy_matrix", "routed_accuracy_matrix", "acc", "bwt", "fwt", "forgetting", "capacity",
            "baseline_accuracy", "routed_acc")
    out = {k: results[k] for k in keep}
    out["tasks"] = [{k: v for k, v in t.items() if k != "seconds"} for t in results["tasks"]]
    return out


def test_end_to_end_outputs(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("accuracy_matrix", "routed_accuracy_matrix", "acc", "bwt", "fwt", "forgetting", "capacity",
                "wall_seconds", "config", "versions"):
        assert key in results, key
    R = results["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert R[0][2] is None and R[0][1] is not None  # R[j-1][j]: the fresh head, for FWT
    assert all(R[i][j] is not None for i in range(3) for j in range(i + 1))
    # bwt is computed from the matrix, and eidetic's finished tasks never change
    assert results["bwt"] == pytest.approx(sum(R[2][j] - R[j][j] for j in range(2)) / 2) and results["bwt"] == 0
    assert results["forgetting"] == 0
    assert results["acc"] == pytest.approx(sum(R[2]) / 3) and results["acc"] > 0.8
    assert all(v is not None for v in results["routed_accuracy_matrix"][2])
    assert results["config"]["scenario"] == "synthetic" and results["config"]["widths"] == [16, 16]
    assert results["versions"]["torch"] == torch.__version__
    groups = results["capacity"]
    assert groups and all({"task 0", "task 1", "task 2", "free", "pruned"} <= set(v) for v in groups.values())
    # eidetic export: task 1 as a plain module, checked on its whole test set
    assert cli.main(["export", "--run", str(out), "--task", "1", "--out", str(tmp_path / "task1.pt")]) == 0
    report = cli.export(out, 1, tmp_path / "again.pt", log=lambda *_: None)
    assert report["same_argmax"] == 1.0 and report["export_accuracy"] == report["network_accuracy"]
    assert report["max_abs_logit_diff"] < 1e-4 and report["parameters"] < report["network_parameters_and_buffers"]
    module = torch.load(tmp_path / "task1.pt", weights_only=False)
    assert not any(type(m).__module__.startswith(("eidetic_kernels", "python_layers")) for m in module.modules())
    program = torch.export.load(report["torch_export"])  # any batch size, not only the example's
    example = program.example_inputs[0][0]
    for batch in (1, 5):
        x = torch.randn((batch,) + tuple(example.shape[1:]))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), module(x))
    assert cli.main(["export", "--run", str(out), "--task", "3", "--out", str(tmp_path / "x.pt")]) == 2
    # the run from Python: its network (router included) and its tasks' data give the run's own results
    from python_layers.run import load_run
    network, scenario = load_run(out)
    assert network.num_finished_tasks == 3 and not network.training and network.router is not None
    for t in range(3):
        test = scenario.tasks[t].test
        x, y = test.batch(torch.arange(len(test)))
        with torch.no_grad():
            assert float((network(x, task=t).argmax(-1) == y).float().mean()) == pytest.approx(R[2][t])
            tasks, classes = network.predict(x)
        assert float(((tasks == t) & (classes == y)).float().mean()) == pytest.approx(
            results["routed_accuracy_matrix"][2][t])
    with pytest.raises(cli.ConfigError, match="holds no run"):
        load_run(tmp_path)
    # the routed run's router is counted apart from the body and heads; the program keeps two example samples
    assert report["router_parameters_and_buffers"] > 0
    assert example.shape[0] == 2
    # and only those: not the storage of the test batch they were cut from (the archive would hold every sample)
    assert example.untyped_storage().nbytes() == example.numel() * example.element_size()
    # --out: never the .pt2 archive's own name, never a folder; refused before any work (exit status 2)
    for bad in (tmp_path / "task1.pt2", tmp_path):
        assert cli.main(["export", "--run", str(out), "--task", "1", "--out", str(bad)]) == 2
    with pytest.raises(cli.ConfigError, match=r"cannot end in \.pt2.*--out .*task1\.pt"):
        cli.export(out, 1, tmp_path / "task1.pt2", log=lambda *_: None)
    with pytest.raises(cli.ConfigError, match="is a folder"):
        cli.export(out, 1, tmp_path, log=lambda *_: None)
    assert all(sum(v.values()) == 16 for v in groups.values())
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0].startswith("task,phase,epoch,global_epoch") and len(lines) > 6
    for name in ("accuracy_matrix.png", "routed_accuracy_matrix.png", "task_accuracy.png", "capacity.png",
                 "config.yaml", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    # a second start in the same folder must not overwrite the run
    assert cli.main(["train", "--out", str(out), *TINY]) == 2


def test_resume_after_a_kill_gives_the_same_results(tmp_path):
    """Kill once inside a task (at a pruning-step checkpoint when the trainer has the hook) and once at the end of
    a task; the twice-resumed run ends bit-identical to the uninterrupted one."""
    args = [*TINY, "pruning=taylor"]
    whole = _run_cli(["train", "--out", str(tmp_path / "whole"), *args])
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["run"]["checkpoint_log"]
    assert log.count("task 0 end") == 1 and log[-1] == "task 2 end"
    if cli._trainer_supports_resume():
        mid_task = [i + 1 for i, entry in enumerate(log) if entry.startswith("task 1 step")]
        assert mid_task, log
        kill_points = [mid_task[-1], log.index("task 1 end") + 1]
    else:
        kill_points = [log.index("task 0 end") + 1, log.index("task 1 end") + 1]
    run_dir = tmp_path / "killed"
    killed = _run_cli(["train", "--out", str(run_dir), *args], {cli.CRASH_ENV: str(kill_points[0])})
    assert killed.returncode == cli.CRASH_EXIT_CODE, killed.stderr[-3000:]
    assert not (run_dir / "results.json").exists()
    again = _run_cli(["train", "--out", str(run_dir), "--resume"], {cli.CRASH_ENV: str(kill_points[1])})
    assert again.returncode == cli.CRASH_EXIT_CODE, again.stderr[-3000:]
    resumed = _run_cli(["train", "--out", str(run_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert _comparable(a) == _comparable(b)
    wa = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    wb = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert wa["run"]["checkpoint_log"] == wb["run"]["checkpoint_log"]
    assert wa["model"].keys() == wb["model"].keys()
    for k in wa["model"]:
        va, vb = wa["model"][k], wb["model"][k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
    assert wa["run"]["history"] == wb["run"]["history"]  # every epoch's loss and accuracy, exactly


def test_resume_without_a_checkpoint_starts_the_run_from_its_config(tmp_path, capsys):
    # no checkpoint and no config anywhere: a clear error
    assert cli.main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint.pt" in err and "--config" in err
    # a config on the command line: the run starts and ends as a plain start does
    assert cli.main(["train", "--out", str(tmp_path / "fresh"), *TINY]) == 0
    assert cli.main(["train", "--out", str(tmp_path / "started"), "--resume", *TINY]) == 0
    assert "holds no checkpoint.pt yet; starting the run" in capsys.readouterr().out
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    started = json.loads((tmp_path / "started" / "results.json").read_text())
    assert _comparable(started) == _comparable(fresh)
    # resuming a finished run changes none of its outputs
    before = {f.name: f.read_bytes() for f in (tmp_path / "fresh").iterdir()}
    assert cli.main(["train", "--out", str(tmp_path / "fresh"), "--resume"]) == 0
    assert "the run is finished (3 tasks); nothing to resume" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in (tmp_path / "fresh").iterdir()} == before
    # a run killed before its first checkpoint holds only config.yaml: --resume alone starts it from that
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.yaml").write_text((tmp_path / "fresh" / "config.yaml").read_text())
    assert cli.main(["train", "--out", str(early), "--resume"]) == 0
    assert _comparable(json.loads((early / "results.json").read_text())) == _comparable(fresh)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from python_layers import scenarios
    monkeypatch.setenv("EIDETIC_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(scenarios, "_shared_data_candidates", lambda: [tmp_path / "no-shared"])
    assert cli.main(["train", "--out", str(tmp_path / "r"), "scenario=split_mnist", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "EIDETIC_DATA" in err and str(tmp_path / "empty") in err and "../shared/data" in err
    assert not (tmp_path / "r").exists()  # no empty run folder left behind


def test_a_task_without_capacity_left_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """A task that kept every free neuron leaves the next one nothing: one error line saying what to change,
    and the finished task's checkpoint and history are on disk."""
    from python_layers import CapacityError, EideticNetwork
    prepare = EideticNetwork.prepare_for_task

    def full_after_task_0(self, task, *args, **kwargs):
        if task == 1:
            raise CapacityError("task 1 cannot start: no free neuron left in body.layers.0")
        return prepare(self, task, *args, **kwargs)

    monkeypatch.setattr(EideticNetwork, "prepare_for_task", full_after_task_0)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("task 1 cannot start") == 1 and "Traceback" not in err
    assert "its pruning stopped at max_prune_steps=2" in err  # TINY caps the pruning steps: the reason recorded
    assert (out / "checkpoint.pt").exists() and (out / "history.csv").read_text().count("\n") > 1


@pytest.mark.parametrize("reason, says", [
    ("accuracy dropped", "no pruning step stayed within stop_threshold=0.01"),
    ("nothing left to prune", "pruning never removes a layer's last free neuron"),
    ("max_prune_steps reached", "its pruning stopped at max_prune_steps=3"),
    ("no pruning", "it was not pruned")])
def test_the_capacity_error_gives_the_recorded_reason(reason, says):
    from types import SimpleNamespace

    from python_layers.run import Run
    state = {"history": [{"task": 0, "phase": "finish", "stop_reason": reason},
                         {"task": 1, "phase": "finish", "stop_reason": "accuracy dropped"}]}
    run = SimpleNamespace(cfg={"stop_threshold": 0.01, "max_prune_steps": 3})
    assert says in Run._why_kept(run, state, 0)


def test_config_values_a_scenario_refuses_are_config_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(cli.ConfigError, match="pruning=none.*tasks=1"):
        cli.load_config(None, {"pruning": "none", "tasks": 3})
    assert cli.load_config(None, {"pruning": "none", "tasks": 1})["pruning"] == "none"
    with pytest.raises(cli.ConfigError, match=r"max_prune_steps=0 prunes nothing.*tasks=1, or max_prune_steps >= 1"):
        cli.load_config(None, {"max_prune_steps": 0, "tasks": 3})
    assert cli.load_config(None, {"max_prune_steps": 0, "tasks": 1})["max_prune_steps"] == 0
    for bad in (0, 1, -2):
        with pytest.raises(cli.ConfigError, match=rf"classes_per_task must be >= 2 .*got {bad}"):
            cli.load_config(None, {"classes_per_task": bad})
    # more classes than the scenario has: refused before any data is read, as one error line
    assert cli.main(["train", "--out", str(tmp_path / "c"), "scenario=split_mnist", "classes_per_task=11",
                     "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "eidetic: error: classes_per_task for scenario split_mnist must be an int between 2 and 10" in err
    assert "Traceback" not in err
    from python_layers import scenarios

    def refuse(name, num_tasks, **kwargs):  # what a scenario does with more tasks than it has
        scenarios._check_num_tasks(name, num_tasks, 5)

    monkeypatch.setattr(scenarios, "build_scenario", refuse)
    assert cli.main(["train", "--out", str(tmp_path / "r"), "scenario=split_mnist", "tasks=7",
                     "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "eidetic: error: scenario split_mnist has at most 5 tasks, asked for 7" in err and "Traceback" not in err


def test_more_config_mistakes_are_one_error_line(tmp_path, capsys):
    with pytest.raises(cli.ConfigError, match="lr must be finite and > 0, got inf"):
        cli.load_config(None, {"lr": float("inf")})
    with pytest.raises(cli.ConfigError, match=r"override '16\]' is not key=value.*quoted as one shell word"):
        cli.parse_overrides(["widths=[16,", "16]"])
    afile = tmp_path / "afile"
    afile.write_text("")
    for args, says in ((["--out", str(afile)], "is a file; give a folder"),
                       (["--out", str(tmp_path / "r"), "model=convnet", "widths=[8]"],
                        "convnet: widths needs at least one conv width")):
        assert cli.main(["train", *args, "scenario=synthetic", "progress=false", "threads=1"]) == 2
        err = capsys.readouterr().err
        assert f"eidetic: error: " in err and says in err and "Traceback" not in err


@pytest.mark.parametrize("args, says", [
    (["--out", "{tmp}/afile/sub", "scenario=synthetic"], r"--out .*afile/sub: cannot create the folder"),
    (["--out", "{tmp}/r", "scenario=split_mnist", "augment=true"], r"augment=true is the crop and horizontal flip"),
    (["--out", "{tmp}/r", "scenario=synthetic", "widths=[64,64"], r"overrides .*did not find expected"),
], ids=["out under a file", "augment on MNIST", "yaml syntax"])
def test_more_mistakes_are_one_line(args, says, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert cli.main(["train", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"eidetic: error: {says}.*\n", err) and err.count("\n") == 1, err


def test_a_config_error_under_nproc_is_one_line_before_any_process_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "launch", lambda *a: pytest.fail("launched despite a config error"))
    assert cli.main(["train", "--nproc", "2", "--out", str(tmp_path / "r"), "scenario=synthetic", "lr=fast"]) == 2
    assert capsys.readouterr().err == "eidetic: error: lr must be a number, got 'fast'\n"


def test_config_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scenario: permuted_mnist\nlr: 2e-4\nwidths: [2000, 2000]\npruning: taylor\n")
    cfg = cli.load_config(path, cli.parse_overrides(["batch_size=64", "dropout=0.1", "tasks=4"]))
    assert cfg["lr"] == 2e-4 and isinstance(cfg["lr"], float)  # YAML 1.1 reads 2e-4 as a string
    assert cfg["widths"] == [2000, 2000] and cfg["batch_size"] == 64 and cfg["tasks"] == 4
    assert cfg["pruning"] == "taylor" and cfg["seed"] == 0  # defaults fill the rest
    with pytest.raises(cli.ConfigError, match="unknown config key.*learning_rate"):
        cli.load_config(None, {"learning_rate": 1})
    with pytest.raises(cli.ConfigError, match="pruning must be one of"):
        cli.load_config(None, {"pruning": "l3"})
    with pytest.raises(cli.ConfigError, match="max_epochs must be an integer"):
        cli.load_config(None, {"max_epochs": "many"})
    with pytest.raises(cli.ConfigError, match="key=value"):
        cli.parse_overrides(["lr"])


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"demo.yaml", "pmnist_small.yaml", "pmnist_paper.yaml",
                                         "split_cifar100_resnet.yaml", "split_cifar10.yaml"}
    for p in configs:
        cli.load_config(p)
    paper = cli.load_config(ROOT / "configs" / "pmnist_paper.yaml")
    assert (paper["tasks"], paper["widths"], paper["pruning"], paper["step"], paper["stop_threshold"],
            paper["dropout"], paper["batch_size"], paper["lr"]) == (10, [2000, 2000], "taylor", 0.05, 0.001, 0.1,
                                                                    256, 2e-4)


def test_help_explains_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in cli.OPTIONS:
        assert f"  {option.name} (default" in text, option.name
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    train_text = capsys.readouterr().out
    assert "--resume" in train_text and "--config" in train_text and "  router (default" in train_text


@pytest.mark.parametrize("model,extra", [("convnet", ["widths=[4,8]"]),
                                         ("resnet", ["widths=[4,8]", "blocks=[1,1]"])])
def test_conv_bodies_run_through_the_cli(tmp_path, model, extra):
    args = ["train", "--out", str(tmp_path / model), "scenario=synthetic", "tasks=2", f"model={model}",
            "max_epochs=1", "patience=1", "recovery_epochs=1", "step=0.5", "max_prune_steps=1", "stop_threshold=1", "batch_size=64",
            "router=entropy", "progress=false", "threads=1", *extra]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / model / "results.json").read_text())
    assert results["bwt"] == 0 and not math.isnan(results["acc"])


def test_adam_and_prune_lr_factor_reach_the_trainer(tmp_path, monkeypatch):
    from python_layers import trainer
    seen = []
    real = trainer.train_task

    def spy(model, loader, optimizer, **kwargs):
        seen.append((type(optimizer).__name__, kwargs.get("prune_lr_factor", 1.0)))
        return real(model, loader, optimizer, **kwargs)
    monkeypatch.setattr(trainer, "train_task", spy)
    out = tmp_path / "adam"
    assert cli.main(["train", "--out", str(out), *TINY, "tasks=1", "optimizer=adam", "prune_lr_factor=0.5"]) == 0
    assert seen == [("Adam", 0.5)]


def test_an_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run: one line with the --resume command and the shell's SIGINT status, not a traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "train", interrupted)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert f"eidetic train --out {out} --resume" in err and "Traceback" not in err


_BODIES = '''
import torch
import torch.nn as nn


class Block(nn.Module):  # a residual block of the user's own class
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def res_cnn(input_shape, width=4, widths=None):
    width = widths[0] if widths else width
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), Block(width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def mlp_and_width(input_shape, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.GELU()), width


def grouped(input_shape):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())


def images_out(input_shape):
    return nn.Conv2d(1, 4, 3)
'''


def test_a_body_of_your_own_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    """model: FILE.py:FUNCTION and MODULE:FUNCTION build the user's body (model_args reach the factory); the run
    keeps its finished tasks, resumes from another directory and exports."""
    (tmp_path / "my_bodies.py").write_text(_BODIES)
    monkeypatch.chdir(tmp_path)
    small = ["scenario=synthetic", "tasks=2", "max_epochs=1", "patience=1", "recovery_epochs=1", "step=0.5",
             "max_prune_steps=1", "stop_threshold=1", "batch_size=64", "router=entropy", "progress=false",
             "threads=1", "lr=1e-2"]
    assert cli.main(["train", "--out", "file", "model=my_bodies.py:res_cnn", "model_args={width: 6}", *small]) == 0
    results = json.loads((tmp_path / "file" / "results.json").read_text())
    assert results["bwt"] == 0 and not math.isnan(results["acc"])
    # the file is named by its absolute path, so the run resumes (and exports) from anywhere
    assert results["config"]["model"] == f"{tmp_path / 'my_bodies.py'}:res_cnn"
    assert results["config"]["model_args"] == {"width": 6}
    assert sum(results["capacity"]["body.0"].values()) == 6  # model_args' width
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "file"), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "the run is finished (2 tasks)" in said and f"{tmp_path / 'file' / 'capacity.png'}" in said
    assert cli.main(["export", "--run", str(tmp_path / "file"), "--task", "0", "--out",
                     str(tmp_path / "t0.pt")]) == 0
    exported = torch.load(tmp_path / "t0.pt", weights_only=False)
    assert isinstance(exported(torch.zeros(2, 1, 8, 8)), torch.Tensor)
    # an importable module, in a fresh process started in its directory (widths reach the factory)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "python_layers.cli", "train", "--out", "module",
                           "model=my_bodies:mlp_and_width", *small], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "module" / "results.json").read_text())
    assert results["config"]["model"] == "my_bodies:mlp_and_width" and results["bwt"] == 0


@pytest.mark.parametrize("args, says", [
    (["model=my_bodies.py:nope"], r"model '.*my_bodies.py:nope': .*my_bodies.py defines no 'nope' \(it defines "
                                  r"Block, grouped, images_out, mlp_and_width, res_cnn\)"),
    (["model=missing.py:f"], r"model '.*missing.py:f': the file .*missing.py does not exist"),
    (["model=no_such_module:f"], r"model 'no_such_module:f': no module named 'no_such_module'"),
    (["model=my_bodies.py"], r"model must be mlp, convnet, resnet, resnet50, or MODULE:FUNCTION"),
    (["model=my_bodies.py:mlp_and_width", "model_args={depth: 2}"],
     r"model '.*' cannot be called as mlp_and_width\(input_shape, depth=...\): got an unexpected keyword"),
    (["model=mlp", "model_args={depth: 2}"], r"model_args \(depth\) are for a body of your own"),
    (["model=my_bodies.py:res_cnn", "widths=[4]", "model_args={widths: [4]}"],
     r"model_args sets widths, which the config sets as its own key"),
    (["model=my_bodies.py:grouped"], r"model '.*grouped': cannot convert body.1 \(Conv2d\): EideticConv2d supports groups=1 only"),
    (["model=my_bodies.py:images_out"], r"model '.*images_out': the body returns \(2, 4, 6, 6\) for a batch of 2 "
                                        r"inputs \(1, 8, 8\); it must return features \[B, F\]"),
], ids=["no function", "no file", "no module", "no function named", "unexpected argument", "args to a built-in",
        "set twice", "refused layer", "not features"])
def test_mistakes_in_a_body_of_your_own_are_one_line(args, says, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_bodies.py").write_text(_BODIES)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--out", "r", "scenario=synthetic", "progress=false", "threads=1", *args]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"eidetic: error: {says}.*\n", err) and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_an_edited_body_file_neither_resumes_nor_exports(tmp_path, monkeypatch, capsys):
    """A run records the body it trained: after the file changed (an activation inside a block's forward), resume
    and export are one-line errors instead of changing finished tasks; restored, the run resumes. A body file
    imports the modules beside it from any directory, as `python file.py` does."""
    (tmp_path / "my_bodies.py").write_text("from sibling import *\n" + _BODIES)
    sibling = "WIDTH = 4\n\n\ndef helper():\n    return WIDTH\n"  # a function: the body file's import is followed
    (tmp_path / "sibling.py").write_text(sibling)
    model = f"model={tmp_path / 'my_bodies.py'}:res_cnn"
    args = ["scenario=synthetic", "tasks=2", "max_epochs=1", "patience=1", "recovery_epochs=1", "step=0.5",
            "max_prune_steps=1", "stop_threshold=1", "batch_size=64", "router=entropy", "progress=false",
            "threads=1"]
    killed = _run_cli(["train", "--out", str(tmp_path / "run"), model, *args], {cli.CRASH_ENV: "1"})
    assert killed.returncode == cli.CRASH_EXIT_CODE, killed.stderr[-3000:]
    source = (tmp_path / "my_bodies.py").read_text()
    (tmp_path / "my_bodies.py").write_text(source.replace("torch.relu(x + ", "torch.tanh(x + "))
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the body file still finds sibling.py
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"eidetic: error: model '.*my_bodies.py:res_cnn' builds another body than the one this run "
                        r"trained .*did .*my_bodies.py change\?.*\n", err), err
    (tmp_path / "my_bodies.py").write_text(source)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    (tmp_path / "my_bodies.py").write_text(source.replace("nn.ReLU(), Block(width)", "nn.GELU(), Block(width)"))
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--task", "0", "--out", str(tmp_path / "t.pt")]) == 2
    assert "builds another body than the one this run trained" in capsys.readouterr().err
    # a module constant the forward reads, outside any class: the file changed, refused as well
    (tmp_path / "my_bodies.py").write_text(source.replace("import torch\n", "import torch\nUNUSED_BY_REPR = 2\n", 1))
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--task", "0", "--out", str(tmp_path / "t.pt")]) == 2
    assert "builds another body than the one this run trained" in capsys.readouterr().err
    (tmp_path / "my_bodies.py").write_text(source)
    # a module the body file imports changed: the refusal names that file, not the body file
    (tmp_path / "sibling.py").write_text(sibling + "# edited\n")
    refused = _run_cli(["export", "--run", str(tmp_path / "run"), "--task", "0", "--out", str(tmp_path / "t.pt")])
    assert refused.returncode == 2 and "did " + str(tmp_path / "sibling.py") + " change?" in refused.stderr, \
        refused.stderr[-2000:]
    (tmp_path / "sibling.py").write_text(sibling)
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--task", "0", "--out", str(tmp_path / "t.pt")]) == 0


_DECLARED = '''
import torch
import torch.nn as nn
from python_layers import EideticNetwork, declare_graph


class Branchy(nn.Module):  # data-dependent control flow: the tracer cannot follow it
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 12), nn.Linear(12, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        if h.sum() > 0:
            h = h * 2
        return torch.relu(self.fc2(h))


def traced(input_shape):
    return Branchy(), 8


def declared(input_shape):
    body = Branchy()
    return EideticNetwork(body, 8, graph=declare_graph(body, inputs={"fc1": "raw", "fc2": ["fc1"]}, features=["fc2"]))
'''


def test_a_body_the_tracer_cannot_follow_runs_with_its_graph_declared(tmp_path, monkeypatch, capsys):
    """The factory may return a fresh EideticNetwork built with declare_graph; the tracer's refusal says so."""
    (tmp_path / "declared.py").write_text(_DECLARED)
    monkeypatch.chdir(tmp_path)
    small = ["scenario=synthetic", "tasks=2", "max_epochs=1", "patience=1", "recovery_epochs=1", "step=0.5",
             "max_prune_steps=1", "stop_threshold=1", "router=entropy", "progress=false", "threads=1"]
    assert cli.main(["train", "--out", "t", "model=declared.py:traced", *small]) == 2
    assert "the factory may return EideticNetwork(body, F, graph=declare_graph(...))" in capsys.readouterr().err
    assert cli.main(["train", "--out", "d", "model=declared.py:declared", *small]) == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert results["bwt"] == 0 and results["forgetting"] == 0


def test_errors_raised_by_your_own_body_code_keep_their_traceback(tmp_path, monkeypatch):
    (tmp_path / "raising.py").write_text("def body(input_shape):\n    raise ValueError('my own check failed')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="the factory raised ValueError: my own check failed") as info:
        cli.main(["train", "--out", "r", "scenario=synthetic", "progress=false", "threads=1", "model=raising.py:body"])
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(cli.ConfigError, match=r"model_args \{width:8\}: write \{width: 8\}, with a space"):
        cli.load_config(None, cli.parse_overrides(["model=raising.py:body", "model_args={width:8}"]))


def test_the_body_record_is_stable_and_follows_what_the_body_holds(tmp_path, monkeypatch):
    """body_fingerprint: the same body twice gives the same record (functions held in attributes by name, not by
    address); an edit of a helper file whose function the body holds, or of a plain attribute, changes it."""
    import sys as _sys
    from python_layers.models import body_fingerprint
    (tmp_path / "helpers_fp.py").write_text("import torch\ndef swish(x):\n    return x * torch.sigmoid(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "held.py").write_text(
        "import torch.nn as nn\nimport torch.nn.functional as F\nimport helpers_fp\n"
        "class Held(nn.Module):\n"
        "    def __init__(self, gain=1.0):\n"
        "        super().__init__()\n"
        "        self.fc, self.gain, self.acts, self.act = nn.Linear(4, 4), gain, (F.relu, 2), helpers_fp.swish\n"
        "    def forward(self, x):\n"
        "        return self.act(self.fc(x)) * self.gain\n")
    import importlib
    held = importlib.import_module("held")
    first = body_fingerprint(held.Held())
    assert body_fingerprint(held.Held()) == first
    assert body_fingerprint(held.Held(gain=2.0)) != first
    (tmp_path / "helpers_fp.py").write_text("import torch\ndef swish(x):\n    return x * torch.tanh(x)\n")
    assert body_fingerprint(held.Held()) != first
    for name in ("held", "helpers_fp"):
        _sys.modules.pop(name, None)


def test_the_body_record_follows_the_users_modules_the_body_file_imports(tmp_path, monkeypatch):
    """Code the body's forward calls without holding it (a module imported by the body's file, a function imported
    from one, and what those import in turn) is part of the record: editing it changes the record."""
    import importlib
    import sys as _sys
    from python_layers.models import body_fingerprint
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "deep_fp.py").write_text("GAIN = 2.0\n")
    (tmp_path / "scale_fp.py").write_text("from deep_fp import GAIN\nimport deep_fp\n"
                                          "def scale(x):\n    return x * deep_fp.GAIN\n")
    (tmp_path / "act_fp.py").write_text("import torch\ndef act(x):\n    return torch.relu(x)\n")
    (tmp_path / "calls_fp.py").write_text(
        "import torch.nn as nn\nimport scale_fp\nfrom act_fp import act\n"
        "class Calls(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return scale_fp.scale(act(self.fc(x)))\n")
    try:
        calls = importlib.import_module("calls_fp")
        first = body_fingerprint(calls.Calls())
        assert body_fingerprint(calls.Calls()) == first
        for name, edited in (("act_fp", "import torch\ndef act(x):\n    return torch.tanh(x)\n"),
                             ("scale_fp", "import deep_fp\ndef scale(x):\n    return x * deep_fp.GAIN * 2\n"),
                             ("deep_fp", "GAIN = 3.0\n")):
            before = body_fingerprint(calls.Calls())
            (tmp_path / f"{name}.py").write_text(edited)
            assert body_fingerprint(calls.Calls()) != before, name
    finally:
        for name in ("calls_fp", "scale_fp", "act_fp", "deep_fp"):
            _sys.modules.pop(name, None)


def test_overrides_on_both_sides_of_an_option_are_all_read(tmp_path, capsys):
    """`train lr=0.1 --out D tasks=0`: both overrides count (argparse alone leaves the second unrecognised);
    anything else unknown is still an error."""
    out = str(tmp_path / "run")
    assert cli.main(["train", "scenario=synthetic", "--out", out, "tasks=0"]) == 2
    assert "tasks must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["train", "tasks=0", "--out", out, "scenario=synthetic"]) == 2
    assert "tasks must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "scenario=synthetic", "--out", out, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_another_run_writes_is_refused(tmp_path, capsys):
    """Two runs writing one folder would mix checkpoints and results: while one holds the folder (here this
    process, through the lock a run takes), another ``eidetic train`` there is a one-line error naming the holder,
    with one process or several, and the folder is left as it was."""
    import platform
    from python_layers.run import run_folder_lock
    out = tmp_path / "r"
    out.mkdir()
    with run_folder_lock(out):
        for extra in ([], ["--nproc", "2"]):
            assert cli.main(["train", "--out", str(out), *extra, *TINY]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"eidetic: error: {out} is in use by another eidetic run (process {os.getpid()} "
                                  f"on {platform.node()})") and "--resume" in err, err
    assert sorted(p.name for p in out.iterdir()) == [".eidetic.lock"]


def test_a_capacity_error_gives_one_consistent_advice(tmp_path, capsys):
    """A first task whose first pruning step already fell below the threshold keeps every neuron: the error says
    why and what to change, without advising a larger and a smaller step at once, and that a resume cannot change it
    (the settings a resume may change are others)."""
    out = tmp_path / "r"
    args = [a for a in TINY if not a.startswith(("widths=", "step="))]
    assert cli.main(["train", "--out", str(out), *args, "widths=[2,2]", "step=0.1", "stop_threshold=0.0"]) == 2
    err = capsys.readouterr().err
    assert "task 1 cannot start: no free neuron left" in err and "no pruning step stayed within" in err, err
    assert "smaller step" in err and "larger step" not in err
    assert "A resume keeps the run's settings" in err and "start a new run, with another --out" in err, err


def test_a_resume_trusts_the_checkpoint_not_the_files_beside_it(tmp_path, monkeypatch, capsys):
    """What the checkpoint holds decides a resume: a removed checkpoint.pt is refused (it would retrain and
    overwrite results.json), config.yaml edited is refused and removed or emptied is replaced by the checkpoint's
    config, other data under the same config are refused (an accuracy matrix would mix two data sets), damaged
    frozen values and a checkpoint that cannot be written are one-line errors, each with nothing changed."""
    import shutil

    import python_layers.checkpoints as checkpoints
    from python_layers.scenarios import Scenario

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    files = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}

    def copy(name, edit=None):
        out = tmp_path / name
        shutil.copytree(run, out)
        if edit is not None:
            edit(out)
        return out

    def refused(out, says):
        before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
        assert cli.main(["train", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert re.search(says, err), err
        assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before

    refused(copy("no_ckpt", lambda o: (o / "checkpoint.pt").unlink()),
            "holds results.json but no checkpoint.pt.*overwrite the run's results")
    refused(copy("ckpt_folder", lambda o: ((o / "checkpoint.pt").unlink(), (o / "checkpoint.pt").mkdir())),
            r"checkpoint.pt is not a file \(a folder\?\)")
    refused(copy("edited", lambda o: (o / "config.yaml").write_text(
        (o / "config.yaml").read_text().replace("seed: 0", "seed: 5"))),
        r"config \(given, or .*config.yaml\) differs from the run's in seed \(seed: run has 0, given 5\)")
    for name, edit in (("no_config", lambda o: (o / "config.yaml").unlink()),
                       ("empty_config", lambda o: (o / "config.yaml").write_text(""))):
        out = copy(name, edit)
        assert cli.main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
        assert "the run is finished (3 tasks); nothing to resume" in capsys.readouterr().out
        assert (out / "results.json").read_bytes() == files["results.json"]

    def damage(out):
        payload = torch.load(out / "checkpoint.pt", weights_only=True)
        key = next(k for k, v in payload["model"].items() if k.endswith("frozen_weight") and v.numel())
        payload["model"][key][0] += 1.0
        torch.save(payload, out / "checkpoint.pt")
    refused(copy("damaged", damage), "checkpoint.pt does not load into the run's network, so it is damaged.*frozen "
                                     "values")
    with monkeypatch.context() as m:
        m.setattr(Scenario, "digest", lambda self: "other data")
        refused(copy("other_data"), r"the data the config reads now .* are not those the run in .* trained on")

    def full_disk(payload, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 614272 vs 614164")
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    assert cli.main(["train", "--out", str(tmp_path / "full"), *TINY]) == 2
    assert "cannot write the checkpoint" in capsys.readouterr().err
    assert not list((tmp_path / "full").glob("*.tmp"))
