"""The config schema of `eidetic train`: defaults, types, choices and ranges, error messages that name the key,
and the help text generated from the schema."""
import pytest
import yaml

from python_layers import config
from python_layers.config import ConfigError, load_config, parse_overrides


def test_the_schema_holds_every_key_with_a_default_and_help():
    assert [f.name for f in config.OPTIONS] == list(config.KEYS) == list(config.default_config())
    defaults = config.default_config()
    for f in config.OPTIONS:
        assert f.metadata["help"], f.name
        assert defaults[f.name] == f.default, f.name
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
    path.write_text("scenario: permuted_mnist\nlr: 2e-4\nwidths: [20, 10]\nprogress: 'off'\nseed: 3\n")
    cfg = load_config(path, parse_overrides(["seed=4", "tasks=", "augment=yes", "weight_decay=1", "device=cuda:1"]))
    assert type(cfg) is dict and type(cfg["widths"]) is list
    assert cfg["lr"] == 2e-4 and cfg["widths"] == [20, 10] and cfg["progress"] is False
    assert cfg["seed"] == 4 and cfg["tasks"] is None and cfg["augment"] is True  # overrides win
    assert cfg["weight_decay"] == 1.0 and isinstance(cfg["weight_decay"], float) and cfg["device"] == "cuda:1"
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg  # what config.yaml holds
    assert set(cfg) == set(config.KEYS)


def test_an_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == config.default_config()


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
    ({"widths": []}, "widths must be a non-empty list of integers, got []"),
    ({"device": [1]}, "device must be a string, got [1]"),
    ({"lr": None}, "lr may not be empty (null); default is 0.001"),
    ({"router": None}, "router may not be empty (null); default is 'learned'"),
    ({"step": 0}, "step must be in (0, 1], got 0"),
    ({"step": 1.5}, "step must be in (0, 1], got 1.5"),
    ({"dropout": 1}, "dropout must be in [0, 1), got 1"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"router_epochs": -1}, "router_epochs must be >= 1, got -1"),
])
def test_bad_values_are_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_optional_keys_take_null():
    cfg = load_config(None, {"tasks": None, "widths": None, "data_root": None, "threads": 2})
    assert cfg["tasks"] is None and cfg["widths"] is None and cfg["threads"] == 2


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

