"""The config schema of `eidetic train`: defaults, types, choices and ranges, error messages that name the key,
and the help text generated from the schema."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from python_layers import config
from python_layers.config import ConfigError, load_config, parse_overrides


def test_the_schema_holds_every_key_with_a_default_and_help():
    assert [f.name for f in config.OPTIONS] == list(config.KEYS) == list(config.default_config())
    defaults = config.default_config()
    for f in config.OPTIONS:
        assert f.metadata["help"], f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # model_args: {}
        assert defaults[f.name] == default, f.name
    assert defaults["scenario"] == "split_mnist" and defaults["lr"] == 1e-3 and defaults["widths"] is None
    assert config.RESUME_MAY_CHANGE <= set(config.KEYS)


def test_help_is_generated_from_the_schema():
    text = config.keys_help()
    flat = " ".join(text.split())
    for f in config.OPTIONS:
        assert f"  {f.name} (default " in text, f.name
        assert " ".join(f.metadata["help"].split()) in flat, f.name
    assert '  scenario (default "split_mnist")' in text and "  lr (default 0.001)" in text
    assert "  tasks (default unset)" in text and "  progress (default true)" in text
    assert max(len(line) for line in text.splitlines()) <= 110


def test_file_then_overrides_into_a_plain_dict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scenario: split_cifar10\nlr: 2e-4\nwidths: [20, 10]\nprogress: 'off'\nseed: 3\n")
    cfg = load_config(path, parse_overrides(["seed=4", "tasks=", "augment=yes", "weight_decay=1", "device=cuda:1"]))
    assert type(cfg) is dict and type(cfg["widths"]) is list
    assert cfg["lr"] == 2e-4 and cfg["widths"] == [20, 10] and cfg["progress"] is False
    assert cfg["seed"] == 4 and cfg["tasks"] is None and cfg["augment"] is True  # overrides win
    assert cfg["weight_decay"] == 1.0 and isinstance(cfg["weight_decay"], float) and cfg["device"] == "cuda:1"
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg  # what config.yaml holds
    assert set(cfg) == set(config.KEYS)


def test_an_empty_file_is_all_defaults_and_says_so(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.warns(UserWarning, match="holds no config keys: running every default"):
        assert load_config(path) == config.default_config()
    assert load_config(None, {"device": "cuda:1"})["device"] == "cuda:1"


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": 1, "widht": 3}, "unknown config key(s) learning_rate, widht; valid keys: scenario, tasks"),
    ({"pruning": "l3"}, "pruning must be one of l1, l2, taylor, none; got 'l3'"),
    ({"scenario": 5}, "scenario must be one of permuted_mnist, split_mnist"),
    ({"max_epochs": "many"}, "max_epochs must be an integer, got 'many'"),
    ({"max_epochs": 2.5}, "max_epochs must be an integer, got 2.5"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"lr": True}, "lr must be a number, got True"),
    ({"progress": "maybe"}, "progress must be true or false, got 'maybe'"),
    ({"widths": [10, "x"]}, "widths must be a list of integers, got [10, 'x']"),
    ({"widths": 10}, "widths must be a list of integers, got 10"),
    ({"widths": []}, "widths must be a non-empty list of positive integers, got []"),
    ({"widths": [16, -4]}, "widths must be a non-empty list of positive integers, got [16, -4]"),
    ({"blocks": [0]}, "blocks must be a non-empty list of positive integers, got [0]"),
    ({"tasks": 0}, "tasks must be >= 1, got 0"),
    ({"threads": 0}, "threads must be >= 1, got 0"),
    ({"train_samples_per_task": 0}, "train_samples_per_task must be >= 1, got 0"),
    ({"test_samples_per_task": -1}, "test_samples_per_task must be >= 1, got -1"),
    ({"stop_threshold": -1}, "stop_threshold must be in [0, 1], got -1"),
    ({"max_prune_steps": -1}, "max_prune_steps must be >= 0, got -1"),
    ({"device": "gpu"}, "device must be auto or a torch device (cpu, cuda, cuda:1, ...), got gpu"),
    ({"device": [1]}, "device must be a string, got [1]"),
    ({"lr": None}, "lr may not be empty (null); default is 0.001"),
    ({"router": None}, "router may not be empty (null); default is 'learned'"),
    ({"step": 0}, "step must be in (0, 1], got 0"),
    ({"step": 1.5}, "step must be in (0, 1], got 1.5"),
    ({"dropout": 1}, "dropout must be in [0, 1), got 1"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"router_epochs": -1}, "router_epochs must be >= 1, got -1"),
    ({"router_input_epochs_last": 0}, "router_input_epochs_last must be >= 1, got 0"),
    ({"router_input_epochs_last": 2.5}, "router_input_epochs_last must be an integer, got 2.5"),
    ({"router_warm_start": "sometimes"}, "router_warm_start must be true or false, got 'sometimes'"),
    ({"router_input_crop": -1}, "router_input_crop must be >= 0, got -1"),
])
def test_bad_values_are_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_optional_keys_take_null():
    cfg = load_config(None, {"tasks": None, "widths": None, "data_root": None, "threads": 2})
    assert cfg["tasks"] is None and cfg["widths"] is None and cfg["threads"] == 2


def test_router_fit_keys():
    defaults = config.default_config()
    assert defaults["router_input_epochs_last"] is None and defaults["router_warm_start"] is False
    assert defaults["router_input_crop"] == 0
    cfg = load_config(None, parse_overrides(["router_input_epochs_last=8", "router_warm_start=true",
                                             "router_input_crop=4"]))
    assert cfg["router_input_epochs_last"] == 8 and cfg["router_warm_start"] is True and cfg["router_input_crop"] == 4
    assert load_config(None, parse_overrides(["router_input_epochs_last="]))["router_input_epochs_last"] is None
    text = " ".join(config.keys_help().split())
    assert "router_input_epochs_last (default unset)" in text and "router_warm_start (default false)" in text
    assert "router_input_crop (default 0)" in text


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of config keys, got list"):
        load_config(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("widths: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("max_epochs: many\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) learning_rate \(in .*wrong.yaml\)"):
        load_config(wrong)
    wrong.write_text("max_epochs: many\n")
    with pytest.raises(ConfigError, match=r"max_epochs must be an integer, got 'many' \(in .*wrong.yaml\)"):
        load_config(wrong)


def test_override_syntax():
    assert parse_overrides(["lr=2e-4", "widths=[100,100]", "tasks=", "data_root=/data/x"]) == {
        "lr": 2e-4, "widths": [100, 100], "tasks": None, "data_root": "/data/x"}
    assert parse_overrides(None) == {} and parse_overrides([]) == {}
    with pytest.raises(ConfigError, match="override 'lr' is not key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate' in override 'learning_rate=1'"):
        parse_overrides(["learning_rate=1"])
    with pytest.raises(ConfigError, match="unknown config key 'lr.x'"):
        parse_overrides(["lr.x=1"])



CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_builds_its_body(path):
    from python_layers.models import build_body
    cfg = load_config(path)
    shape = {"permuted_mnist": (1, 28, 28), "split_mnist": (1, 28, 28), "split_cifar10": (3, 32, 32),
             "split_cifar100": (3, 32, 32), "split_imagenette": (3, 64, 64), "synthetic": (1, 8, 8)}[cfg["scenario"]]
    with torch.device("meta"):  # shapes only: no memory for the big paper networks
        body, feature_dim = build_body(cfg["model"], shape, cfg["widths"], cfg["dropout"], cfg["blocks"])
    assert feature_dim > 0 and sum(p.numel() for p in body.parameters()) > 0


def test_paper_configs_follow_the_paper():
    root = Path(__file__).resolve().parents[2] / "configs"
    pmnist = load_config(root / "pmnist_paper.yaml")
    assert (pmnist["optimizer"], pmnist["weight_decay"], pmnist["widths"], pmnist["dropout"]) == ("adam", 0.0,
                                                                                               [2000, 2000], 0.1)
    assert (pmnist["batch_size"], pmnist["pruning"], pmnist["step"], pmnist["stop_threshold"]) == (256, "taylor",
                                                                                                 0.05, 0.001)
    assert (pmnist["patience"], pmnist["recovery_epochs"], pmnist["lr"], pmnist["prune_lr_factor"]) == (10, 5, 2e-4,
                                                                                                      0.5)
    cifar = load_config(root / "split_cifar100_resnet.yaml")
    assert (cifar["model"], cifar["tasks"], cifar["batch_size"], cifar["lr"], cifar["pruning"]) == (
        "resnet50", 5, 256, 1e-4, "l2")


@pytest.mark.parametrize("name, files", [("split_cifar100_resnet", "cifar-100-python"),
                                         ("imagenette_resnet18", "imagenette2-160")])
def test_paper_configs_without_their_data_name_the_files(name, files, tmp_path, monkeypatch):
    from python_layers import scenarios
    from python_layers.scenarios import DataNotFoundError, build_scenario
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("EIDETIC_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(scenarios, "_shared_data_candidates", lambda: [tmp_path / "no-shared"])
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    with pytest.raises(DataNotFoundError, match=files):
        build_scenario(cfg["scenario"], cfg["tasks"], classes_per_task=cfg["classes_per_task"])


def test_a_body_of_your_own_is_checked_and_named_by_its_absolute_file(tmp_path, monkeypatch):
    (tmp_path / "bodies.py").write_text("import torch.nn as nn\ndef tiny(input_shape):\n    return nn.Flatten()\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, parse_overrides(["model=bodies.py:tiny", "model_args={a: 1, b: [2, 3]}"]))
    assert cfg["model"] == f"{tmp_path / 'bodies.py'}:tiny" and cfg["model_args"] == {"a": 1, "b": [2, 3]}
    assert load_config(None, {"model": "os.path:join"})["model"] == "os.path:join"  # MODULE:FUNCTION as given
    for model, says in (("bodies.py:nope", "defines no 'nope'"), ("nothere.py:f", "does not exist"),
                        (":f", "model must be"), ("bodies.py:", "model must be"), ("cnn", "model must be"),
                        ("os.path:sep", "is a str, not a function")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, {"model": model})
    with pytest.raises(ConfigError, match=r"model_args must be a mapping of names to values"):
        load_config(None, parse_overrides(["model=bodies.py:tiny", "model_args=[1, 2]"]))
    # an override replaces the file's mapping whole (as every override wins), so a key can be taken out
    (tmp_path / "mine.yaml").write_text("model: bodies.py:tiny\nmodel_args: {hidden: 32, depth: 2}\n")
    assert load_config(tmp_path / "mine.yaml")["model_args"] == {"hidden": 32, "depth": 2}
    for override, want in (("model_args={}", {}), ("model_args={width: 8}", {"width": 8})):
        assert load_config(tmp_path / "mine.yaml", parse_overrides([override]))["model_args"] == want


def test_router_keys_the_chosen_router_does_not_read_are_said():
    """A router key of another router is said (it used to be silently nothing); the shipped configs say nothing."""
    import warnings
    with pytest.warns(UserWarning, match=r"router_input=input, router_input_epochs=7 take\(s\) no effect: "
                                         r"router=entropy"):
        load_config(None, {"scenario": "synthetic", "router": "entropy", "router_input": "input",
                           "router_input_epochs": 7})
    with pytest.warns(UserWarning, match=r"router_input_crop=4 take\(s\) no effect: router_input=body"):
        load_config(None, {"scenario": "synthetic", "router_input_crop": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, {"scenario": "synthetic", "router_input": "input", "router_input_crop": 4})
        for path in CONFIGS:
            load_config(path)
