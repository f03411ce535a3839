"""`eidetic train --resume` reads checkpoint.pt with torch.load(weights_only=True): every checkpoint a run writes
loads that way (RNG states included), and a file carrying pickled code is refused without running it."""
import pathlib
import random

import numpy as np
import pytest
import torch
import yaml

from python_layers import cli
from tests.python_layers.test_cli import TINY


class WritesMarker:
    """Unpickling this runs code: it writes a marker file (a harmless stand-in for os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.path), "unpickling ran code")


def draws():
    return (random.random(), random.getrandbits(64), np.random.standard_normal(3).tolist(),
            np.random.randint(0, 1 << 30, 4).tolist(), torch.rand(3).tolist())


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    cli._seed_everything(123)
    np.random.standard_normal()  # numpy now caches a Gaussian (has_gauss = 1)
    random.gauss(0, 1)  # python too (gauss_next)
    torch.save(cli.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    cli._seed_everything(7)  # elsewhere
    cli.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_every_checkpoint_of_a_run_loads_with_weights_only(tmp_path, monkeypatch):
    """The whole payload: run records, model, router, RNG states, and inside a task the optimizer, loader and
    trainer state (Taylor scores included)."""
    loaded = []
    real_save = cli.Run.save_checkpoint

    def save_and_load(self, state, in_task=None):
        real_save(self, state, in_task)
        payload = torch.load(self.checkpoint_path, weights_only=True)
        loaded.append(payload["run"]["in_task"] is not None)
        assert payload["run"]["format"] == cli.CHECKPOINT_FORMAT

    monkeypatch.setattr(cli.Run, "save_checkpoint", save_and_load)
    args = [a for a in TINY if not a.startswith("tasks=")] + ["tasks=2", "pruning=taylor"]
    cfg = cli.load_config(None, cli.parse_overrides(args))
    cli.train(cfg, tmp_path / "run", log=lambda *_: None)
    assert any(loaded) and not all(loaded) and loaded[-1] is False  # inside a task, and at the end of each


def resume_with(tmp_path, payload, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = cli.load_config(None, cli.parse_overrides(TINY))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(payload, run_dir / "checkpoint.pt")
    code = cli.main(["train", "--out", str(run_dir), "--resume"])
    return code, capsys.readouterr().err, run_dir / "checkpoint.pt"


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, capsys):
    # the payload is live: an unrestricted torch.load runs it
    probe = tmp_path / "probe"
    torch.save({"x": WritesMarker(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.read_text() == "unpickling ran code"

    marker = tmp_path / "marker"
    payload = {"run": {"format": cli.CHECKPOINT_FORMAT}, "model": {}, "router": None, "rng": WritesMarker(marker)}
    code, err, path = resume_with(tmp_path, payload, capsys)
    assert code == 2
    assert str(path) in err and "not a plain-tensor" in err
    assert not marker.exists()


@pytest.mark.parametrize("numpy_state", [False, True])
def test_an_older_checkpoint_format_is_a_clear_error(tmp_path, capsys, numpy_state):
    """Format 1 stored numpy's RNG state as numpy objects: refused by the safe load; any other format number is
    named."""
    rng = {"numpy": np.random.get_state()} if numpy_state else {}
    code, err, path = resume_with(tmp_path, {"run": {"format": 1}, "model": {}, "router": None, "rng": rng}, capsys)
    assert code == 2 and str(path) in err
    assert "format 1" in err and "start a new run" in err


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """A truncated checkpoint.pt (a copy cut short): `--resume` says which file and what to do, no traceback."""
    payload = {"run": {"format": cli.CHECKPOINT_FORMAT}, "model": {"w": torch.randn(4096)}, "router": None, "rng": {}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = cli.load_config(None, cli.parse_overrides(TINY))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(payload, run_dir / "checkpoint.pt")
    whole = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])
    code = cli.main(["train", "--out", str(run_dir), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(run_dir / "checkpoint.pt") in err and "is damaged" in err and "start a new run" in err
    assert "Traceback" not in err
