"""benchmarks/gpu.py times the eidetic layers on every requested backend in one run, side by side.

Run: .venv/bin/python -m pytest -q benchmarks/test_gpu_backends.py   (about half a minute on 2 CPU cores; the
quick mode runs on a CPU, the Triton rows under TRITON_INTERPRET=1 in a subprocess).
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_main(argv) -> Path:
    if torch.cuda.is_available():
        pytest.skip("the quick run on a CUDA machine times the GPU; these tests check the CPU smoke run")
    return gpu.main(argv)


def test_provider_names_and_labels():
    assert [gpu.eidetic_provider(b) for b in ("triton", "reference", "cpp")] == [
        "eidetic", "eidetic-reference", "eidetic-cpp"]
    assert [gpu.short_label(p) for p in ("eidetic", "eidetic-reference", "eidetic-cpp")] == [
        "eid", "eid-ref", "eid-cpp"]
    assert gpu.is_eidetic("eidetic-reference") and not gpu.is_eidetic("torch-prune")
    runs = gpu.provider_runs(["triton", "reference"])
    assert [p for p, _, _ in runs].count("eidetic") == 3 and [p for p, _, _ in runs].count("eidetic-reference") == 3
    assert all((b is None) == (not gpu.is_eidetic(p)) for p, _, b in runs)


def test_default_and_parsed_backends(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gpu.default_eidetic_backends(CPU) == ["reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    assert gpu.default_eidetic_backends(CPU) == ["triton", "reference"]
    assert gpu.parse_eidetic_backends(None, CPU) == ["triton", "reference"]
    assert gpu.parse_eidetic_backends(" Reference,triton,reference ", CPU) == ["reference", "triton"]
    monkeypatch.delenv("TRITON_INTERPRET")
    for bad in ("", "cuda", "triton"):  # empty, unknown, cannot run here
        with pytest.raises(ValueError):
            gpu.parse_eidetic_backends(bad, CPU)


def test_quick_run_forces_each_backend_and_restores_the_environment(tmp_path, monkeypatch):
    # EIDETIC_BACKEND=cpp cannot run a linear layer: the eidetic rows exist only if each row forces its backend
    monkeypatch.setenv("EIDETIC_BACKEND", "cpp")
    path = run_main(["--quick", "--only", "linear", "--eidetic-backends", "reference", "--out-dir", str(tmp_path)])
    assert os.environ["EIDETIC_BACKEND"] == "cpp"
    rows = read_rows(path)
    eid = [r for r in rows if r["provider"] == "eidetic-reference"]
    assert {float(r["frozen_share"]) for r in eid} == set(gpu.SHARES)
    assert {r["backend"] for r in eid} == {"reference"}
    assert {(r["pass"], r["metric"]) for r in eid} == {(p, "time_ms") for p in gpu.PASSES} | {
        ("train_step", "layer_bytes"), ("train_step", "step_bytes")}
    assert all(r["ratio_to_nn"] and r["ratio_to_torch_prune"] for r in eid)
    md = path.with_suffix(".md").read_text()
    assert "eid-ref/nn 50%" in md and "Not measured" not in md


def test_quick_run_with_triton_and_reference(tmp_path):
    """The default on a CPU under the Triton interpreter: both backends, each checked against torch-prune."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "EIDETIC_BACKEND"}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick", "--only", "linear", "--out-dir",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout
    (path,) = tmp_path.glob("*.csv")
    rows = read_rows(path)
    for provider, backend in (("eidetic", "triton"), ("eidetic-reference", "reference")):
        mine = [r for r in rows if r["provider"] == provider]
        assert {r["backend"] for r in mine} == {backend}
        assert len(mine) == len(gpu.SHARES) * (len(gpu.PASSES) + 2)
    md = path.with_suffix(".md").read_text()
    assert "| eid/nn 50% | eid-ref/nn 50% |" in md and "eid-ref/eid" in md


def test_an_error_in_one_backend_keeps_the_other_rows(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu, "check_layer", broken)
    with pytest.raises(SystemExit) as exc:
        run_main(["--quick", "--only", "linear", "--eidetic-backends", "reference", "--out-dir", str(tmp_path)])
    assert exc.value.code == 1
    (path,) = tmp_path.glob("*.csv")
    rows = read_rows(path)
    assert {r["provider"] for r in rows} == {"nn", "torch-prune"}
    md = path.with_suffix(".md").read_text()
    assert "Not measured" in md and "kernel exploded" in md


def _row(provider, share, value, backend="triton", metric="time_ms"):
    return dict(suite="layer", layer="linear", size=64, shape="x[16,64] -> 64", provider=provider,
                frozen_share=share, dtype="float32", backend=backend, metric=metric, value=value, min="", iqr="",
                rounds="", device="cuda", machine="m", logical_cpus=1, threads=1, load_1min="0", torch="t",
                triton="t", date="d", **{"pass": "forward"})


def test_summary_puts_the_backends_side_by_side():
    rows = [_row("nn", 0.0, 1.0, "torch")]
    for s in gpu.SHARES:
        rows += [_row("torch-prune", s, 2.0, "torch"), _row("eidetic", s, 8.0, "triton"),
                 _row("eidetic-reference", s, 4.0, "reference" + ("!MISMATCH" if s == 0.9 else ""))]
    gpu.add_ratios(rows)
    md = gpu.markdown_summary(rows)
    lines = md.splitlines()
    hdr = next(line for line in lines if line.startswith("| suite | layer | shape | pass | nn ms"))
    assert "| prune/nn 50% | eid/nn 50% | eid-ref/nn 50% | eid/prune 50% | eid-ref/prune 50% |" in hdr
    body = lines[lines.index(hdr) + 2]
    assert "| 2.00 | 8.00 | 4.00 | 4.00 | 2.00 |" in body and "4.00!" in body  # the 90% reference row failed
    ratio = next(line for line in lines if line.startswith("Time (float32), eid-ref/eid"))
    assert "0.50 | 0.50 | 0.50! |" in lines[lines.index(ratio) + 4]


def test_kernel_profile_smoke_run(tmp_path):
    """benchmarks.gpu_profile --quick profiles nn and the eidetic layer on each backend asked for, and writes
    one table per case."""
    if torch.cuda.is_available():
        pytest.skip("the quick run checks the CPU smoke run")
    from benchmarks import gpu_profile
    out = tmp_path / "profile.txt"
    assert gpu_profile.main(["--quick", "--backends", "reference", "--out", str(out), "--steps", "2"]) == 0
    text = out.read_text()
    for case in gpu.QUICK_LAYER_CASES:
        for provider in ("nn", "eidetic (reference)"):
            assert f"== {case.kind} {case.shape} float32 {provider}" in text
    assert "backend run: reference" in text and "FAILED" not in text

