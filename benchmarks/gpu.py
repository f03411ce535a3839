"""GPU suite: nn vs torch-prune vs eidetic on each backend, fp32 and bf16, sizes up to 8192; same CSV as the CPU suite.

    python -m benchmarks.gpu [--out-dir DIR] [--dtypes float32,bfloat16] [--only linear,conv2d,...]
                             [--eidetic-backends triton,reference]
    python -m benchmarks.gpu --quick        # tiny shapes; also runs on a CPU (reference backend, + Triton
                                            # under TRITON_INTERPRET=1)

Backends: the eidetic layers are timed on every backend of ``--eidetic-backends`` in the same run (default:
``triton,reference`` wherever Triton runs — CUDA, or a CPU under TRITON_INTERPRET=1 — else ``reference``), each
case with its own correctness check. Each row forces its backend with EIDETIC_BACKEND and restores the variable
afterwards; a value already in the environment does not choose the backends. Provider names: ``eidetic`` is
the Triton backend (the CUDA default, as in the first GPU CSV), ``eidetic-reference`` / ``eidetic-cpp`` the
others; the ``backend`` column says what each row ran (``backend_of``: e.g. fp64 GEMMs run the reference even
when Triton is forced).

Method (the device tool's METHOD.md):
* correct first: before timing, each eidetic case is compared with the torch-prune twin holding the
  same values (‖Δ‖/‖ref‖ for the output, dX and dW, fp32 < 1e-3, bf16 < 2e-2); NaN fails. Failures are
  printed and marked in the CSV (backend column gets ``!MISMATCH``), never hidden. An error raised by one
  backend's case is printed with its traceback and the run goes on with the next one; the summary lists it and
  the run exits with status 1.
* timing: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed before each run), median and
  IQR of the runs; on top of that each call takes the next of several input sets (rotating inputs),
  so repeated runs do not read one buffer from cache. One untimed call first (JIT compilation).
* memory: ``layer_bytes`` as on the CPU (parameters + buffers + tensor attributes); ``step_bytes`` is
  the real peak of ``torch.cuda.max_memory_allocated`` over one training step, minus what was
  allocated before the layer/model was built (the inputs).
On a CPU (``--quick`` only) the timer is the median of perf_counter over a few calls.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.conftest import cpu_model, load_average, package_version
from benchmarks.cpu_report import MEMORY_METRICS, RESULTS_DIR, add_ratios, write_csv
from benchmarks.providers import (MODELS, LayerCase, backend_of, held_bytes, make_layer, make_model, make_optimizer,
                                  model_input, torch_prune_twin, train_step, training_step_bytes)
from eidetic_kernels.backends import BACKEND_NAMES, BackendUnavailable, available

SHARES = (0.0, 0.5, 0.9)
PASSES = ("forward", "backward", "forward_backward")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # tf32 may be on in the fast path; bf16 operands
ROTATE_BYTES = 256 * 2 ** 20  # rotate among input sets until they span more than any L2 (H200: 60 MiB)
EIDETIC = "eidetic"  # provider prefix of every eidetic row

FULL_LAYER_CASES = [
    LayerCase("linear", 1024, 4096), LayerCase("linear", 4096, 4096), LayerCase("linear", 8192, 4096),
    LayerCase("conv2d", 256, 32, 32), LayerCase("conv2d", 1024, 32, 16),
    LayerCase("batchnorm2d", 256, 64, 56), LayerCase("batchnorm2d", 8192, 64, 7),
]
FULL_E2E_BATCH = {"mlp": 4096, "cnn": 512}
QUICK_LAYER_CASES = [LayerCase("linear", 64, 16), LayerCase("conv2d", 8, 2, 8), LayerCase("batchnorm2d", 16, 4, 8)]
QUICK_E2E_BATCH = {"mlp": 8, "cnn": 4}


# ----------------------------------------------------------------------------------------------
# backends and providers
# ----------------------------------------------------------------------------------------------


def eidetic_provider(backend: str) -> str:
    """Provider name of the eidetic rows run on ``backend``: ``eidetic`` for Triton (the CUDA default, so the
    name means what it meant in the first GPU CSV), ``eidetic-<backend>`` for the others."""
    return EIDETIC if backend == "triton" else f"{EIDETIC}-{backend}"


def is_eidetic(provider: str) -> bool:
    return provider == EIDETIC or provider.startswith(EIDETIC + "-")


def short_label(provider: str) -> str:
    """Column label of an eidetic provider in the summary: eid (Triton), eid-ref, eid-cpp."""
    rest = provider[len(EIDETIC):]
    return "eid" + {"-reference": "-ref"}.get(rest, rest)


def default_eidetic_backends(device: torch.device) -> list[str]:
    """Triton where it runs (CUDA, or a CPU under TRITON_INTERPRET=1), then the reference backend."""
    return (["triton"] if available("triton", device, "linear") is None else []) + ["reference"]


def parse_eidetic_backends(text: str | None, device: torch.device) -> list[str]:
    """The backends of ``--eidetic-backends`` (comma list, order kept, duplicates dropped); ValueError says why
    one cannot run here."""
    if text is None:
        return default_eidetic_backends(device)
    names = list(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    if not names:
        raise ValueError("--eidetic-backends is empty; name at least one of " + ", ".join(BACKEND_NAMES))
    for name in names:
        if name not in BACKEND_NAMES:
            raise ValueError(f"--eidetic-backends: {name!r} is not a backend; use {', '.join(BACKEND_NAMES)}")
        if name == "cpp" and device.type != "cpu":
            raise ValueError(f"--eidetic-backends: the C++ backend runs on the CPU only, not on {device}")
        why = available(name, device, "linear") if name != "cpp" else None
        if why is not None:
            raise ValueError(f"--eidetic-backends: {name} cannot run on {device}: {why}")
    return names


def provider_runs(eidetic_backends) -> list[tuple[str, float, str | None]]:
    """(provider, frozen share, forced backend or None) in the order they run for one case: nn, torch-prune,
    then each eidetic backend at every share (so a run stopped early has every backend of the cases it did)."""
    return ([("nn", 0.0, None)] + [("torch-prune", s, None) for s in SHARES]
            + [(eidetic_provider(b), s, b) for b in eidetic_backends for s in SHARES])


# ----------------------------------------------------------------------------------------------
# timers
# ----------------------------------------------------------------------------------------------


def time_ms(fn, device: torch.device, grad_to_none=None, quick: bool = False) -> tuple[float, float, float]:
    """(median, min, IQR) in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench
        med, low, q1, q3 = do_bench(fn, warmup=25, rep=50 if quick else 200, grad_to_none=grad_to_none,
                                    quantiles=[0.5, 0.0, 0.25, 0.75])
        return med, low, q3 - q1
    times = []
    for i in range(2 + (3 if quick else 10)):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        if i >= 2:  # the first two are warm-up
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), min(times), q[2] - q[0]


class Rotating:
    """Calls ``fn(k)`` with k cycling over the input sets."""

    def __init__(self, n: int):
        self.n, self.k = n, -1

    def next(self) -> int:
        self.k = (self.k + 1) % self.n
        return self.k


def n_input_sets(bytes_per_set: int) -> int:
    return int(min(4, max(1, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1)))))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_now(device) -> int:
    """CUDA bytes allocated before a provider builds its layer/model (0 on a CPU). Garbage from the check
    (layer, twin, graphs caught in a reference cycle) is collected first: freed later, during the measured
    step, it would lower the step's bytes."""
    if device.type != "cuda":
        return 0
    gc.collect()
    _sync(device)
    return torch.cuda.memory_allocated(device)


@contextlib.contextmanager
def eidetic_backend(forced: str | None):
    """Force EIDETIC_BACKEND inside the block (None: leave the default selection)."""
    old = os.environ.get("EIDETIC_BACKEND")
    if forced is not None:
        os.environ["EIDETIC_BACKEND"] = forced
    try:
        yield
    finally:
        if forced is not None:
            if old is None:
                os.environ.pop("EIDETIC_BACKEND", None)
            else:
                os.environ["EIDETIC_BACKEND"] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class Problems:
    """What a run could not measure: ``skipped`` (a requested backend has no implementation of the op here) or
    ``error`` (an exception in one eidetic provider's case; the run goes on and exits with status 1)."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def skip(self, what: str, exc: Exception) -> None:
        print(f"    {what}: skipped ({exc})", flush=True)
        self.items.append(("skipped", f"{what}: {exc}"))

    def error(self, what: str, exc: Exception) -> None:
        traceback.print_exc()
        print(f"    {what}: FAILED ({type(exc).__name__}: {exc}); going on with the next case", flush=True)
        self.items.append(("error", f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def errors(self) -> int:
        return sum(kind == "error" for kind, _ in self.items)


def run_provider(what: str, backend: str | None, problems: Problems, measure) -> list[dict]:
    """``measure()`` with ``backend`` forced (None: nothing forced; EIDETIC_BACKEND is restored afterwards). An
    eidetic provider's error is recorded in ``problems`` and yields no rows; nn's and torch-prune's propagate."""
    try:
        with eidetic_backend(backend):
            return measure()
    except BackendUnavailable as exc:
        if backend is None:
            raise
        problems.skip(what, exc)
    except Exception as exc:  # noqa: BLE001 - printed with its traceback, listed in the summary, exit status 1
        if backend is None:
            raise
        problems.error(what, exc)
    return []


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------


def check_layer(layer, case: LayerCase, device, dtype) -> float:
    """Worst relative error of eidetic vs its torch-prune twin over output, dX and dW (fresh inputs)."""
    g = torch.Generator().manual_seed(1234)
    twin = torch_prune_twin(torch.nn.Sequential(layer), lambda: torch.nn.Sequential(case.make_torch_layer()))
    x = case.make_input(g, device, dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), twin(x2)
    grad_out = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(grad_out)
    y2.backward(grad_out)
    free = layer.task_state == 32767
    errs = [rel_err(y, y2), rel_err(x.grad, x2.grad)]
    if layer.weight.grad is not None and bool(free.any()):
        errs.append(rel_err(layer.weight.grad, twin[0].weight_orig.grad[free]))
    layer.zero_grad(set_to_none=True)
    return max(errs, key=lambda e: (math.isnan(e), e))


def layer_rows(case: LayerCase, dtype, device, quick: bool, eidetic_backends=("reference",),
               problems: Problems | None = None) -> list[dict]:
    rows, problems = [], problems or Problems()
    g = torch.Generator().manual_seed(0)
    probe = case.make_input(g, device, dtype)
    k = n_input_sets(2 * probe.numel() * probe.element_size())
    xs = [case.make_input(g, device, dtype).requires_grad_() for _ in range(k)]
    grads = [torch.randn(probe.shape, generator=g).to(device, dtype) for _ in range(k)]
    del probe
    for provider, share, backend in provider_runs(eidetic_backends):
        what = f"layer {case.kind} {case.shape} {_dtype_name(dtype)} {provider} {share:.0%}"
        rows += run_provider(what, backend, problems,
                             lambda: _layer_provider_rows(case, provider, share, backend, xs, grads, dtype, device,
                                                          quick))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _layer_provider_rows(case, provider, share, backend, xs, grads, dtype, device, quick) -> list[dict]:
    """The rows of one provider at one frozen share (the eidetic backend, if any, is already forced)."""
    rows, note, kind = [], "", EIDETIC if backend is not None else provider
    for x in xs:  # a gradient left by the previous provider would count in its base, not in this step
        x.grad = None
    if backend is not None:
        err = check_layer(make_layer(kind, case, share, device=device, dtype=dtype), case, device, dtype)
        ok = err <= TOLERANCE[dtype]
        note = "" if ok else "!MISMATCH"
        print(f"    check {case.kind}-{case.size} {dtype} {share:.0%} {provider}: rel err {err:.2e} "
              f"{'ok' if ok else 'FAILED'}", flush=True)
    base_alloc = _allocated_now(device)
    layer = make_layer(kind, case, share, device=device, dtype=dtype)
    layer(xs[0]).backward(grads[0])  # untimed: JIT compilation, lazy plans
    params = list(layer.parameters())
    common = dict(suite="layer", layer=case.kind, size=case.size, shape=case.shape, provider=provider,
                  frozen_share=share, dtype=_dtype_name(dtype), backend=backend_of(layer) + note, device=device.type)
    k = len(xs)
    for pass_name in PASSES:
        rot = Rotating(k)
        if pass_name == "forward":
            fn = lambda: layer(xs[rot.next()])  # noqa: E731
        elif pass_name == "backward":
            ys = [layer(x) for x in xs]
            fn = lambda: (lambda i: ys[i].backward(grads[i], retain_graph=True))(rot.next())  # noqa: E731
        else:
            fn = lambda: (lambda i: layer(xs[i]).backward(grads[i]))(rot.next())  # noqa: E731
        med, low, iqr = time_ms(fn, device, grad_to_none=params + xs, quick=quick)
        rows.append(dict(common, **{"pass": pass_name, "metric": "time_ms", "value": med, "min": low,
                                    "iqr": iqr, "rounds": ""}))
        ys = None
    for x in xs:  # the timed runs leave some input's gradient: the memory step counts dX of xs[0] only
        x.grad = None
    opt = make_optimizer(kind, layer)
    rows += memory_rows(layer, opt, lambda: layer(xs[0]), lambda y: y.backward(grads[0]), device, base_alloc, common)
    return rows


def memory_rows(model, opt, run_forward, run_backward, device, base_alloc, common) -> list[dict]:
    if device.type == "cuda":
        def step():
            opt.zero_grad(set_to_none=True)
            run_backward(run_forward())
            opt.step()
        step()  # optimizer state exists, as in the middle of training
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        step_bytes = torch.cuda.max_memory_allocated(device) - base_alloc
        layer_bytes = held_bytes(model)
    else:
        stats = training_step_bytes(model, opt, run_forward, run_backward)
        step_bytes, layer_bytes = stats["step_bytes"], stats["layer_bytes"]
    return [dict(common, **{"pass": "train_step", "metric": m, "value": v, "min": "", "iqr": "", "rounds": 1})
            for m, v in (("layer_bytes", layer_bytes), ("step_bytes", step_bytes))]




# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------


def e2e_rows(name: str, batch: int, dtype, device, quick: bool, eidetic_backends=("reference",),
             problems: Problems | None = None) -> list[dict]:
    rows, problems = [], problems or Problems()
    g = torch.Generator().manual_seed(0)
    x0, _ = model_input(name, batch, g, device, dtype)
    k = n_input_sets(x0.numel() * x0.element_size())
    batches = [model_input(name, batch, g, device, dtype) for _ in range(k)]
    del x0
    for provider, share, backend in provider_runs(eidetic_backends):
        what = f"e2e {name} batch {batch} {_dtype_name(dtype)} {provider} {share:.0%}"
        rows += run_provider(what, backend, problems,
                             lambda: _e2e_provider_rows(name, batch, provider, share, backend, batches, dtype, device,
                                                        quick))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _e2e_provider_rows(name, batch, provider, share, backend, batches, dtype, device, quick) -> list[dict]:
    """The rows of one provider at one frozen share (the eidetic backend, if any, is already forced)."""
    note, kind = "", EIDETIC if backend is not None else provider
    if backend is not None:
        probe = make_model(kind, name, share, device=device, dtype=dtype)
        twin = torch_prune_twin(probe, MODELS[name][0])
        err = rel_err(probe(batches[0][0]), twin(batches[0][0]))
        ok = err <= TOLERANCE[dtype]
        note = "" if ok else "!MISMATCH"
        print(f"    check {name} {dtype} {share:.0%} {provider}: rel err {err:.2e} {'ok' if ok else 'FAILED'}",
              flush=True)
        del probe, twin
    base_alloc = _allocated_now(device)
    model = make_model(kind, name, share, device=device, dtype=dtype)
    opt = make_optimizer(kind, model)
    train_step(model, opt, *batches[0])  # untimed: compilation, AdamW state
    common = dict(suite="e2e", layer=name, size=batch, shape=f"batch {batch}", provider=provider,
                  frozen_share=share, dtype=_dtype_name(dtype), backend=backend_of(model) + note, device=device.type)
    rot = Rotating(len(batches))
    med, low, iqr = time_ms(lambda: train_step(model, opt, *batches[rot.next()]), device, quick=quick)
    rows = [dict(common, **{"pass": "train_step", "metric": "time_ms", "value": med, "min": low, "iqr": iqr,
                            "rounds": ""})]
    x, y = batches[0]
    return rows + memory_rows(model, opt, lambda: model(x), lambda out: F.cross_entropy(out, y).backward(),
                              device, base_alloc, common)


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def _pct(share) -> str:
    return f"{int(round(100 * float(share)))}%"


def _cell(r, field="ratio_to_nn") -> str:
    """A ratio with two decimals; ``!`` after it when its row failed the correctness check."""
    if r is None or r.get(field) in ("", None):
        return ""
    return f"{float(r[field]):.2f}" + ("!" if "!MISMATCH" in str(r.get("backend", "")) else "")


def markdown_summary(rows: list[dict], problems: Problems | None = None) -> str:
    """cpu_report's tables with one column per eidetic provider (backend) side by side, a table comparing each
    other backend with Triton directly, and what the run could not measure."""
    if not rows:
        return "(no rows)\n"
    head = rows[0]
    eid = list(dict.fromkeys(r["provider"] for r in rows if is_eidetic(r["provider"])))
    labels = {p: short_label(p) for p in eid}
    ran = {p: sorted({r["backend"] for r in rows if r["provider"] == p}) for p in eid}
    lines = [f"Machine: {head['machine']} ({head['logical_cpus']} logical CPUs, {head['threads']} torch threads, "
             f"1-min load average {head['load_1min']}), "
             f"device {head['device']}, torch {head['torch']}, triton {head['triton']}, run {head['date']} UTC.",
             "Eidetic providers: " + "; ".join(f"`{labels[p]}` = {p} (backend column: {', '.join(ran[p])})"
                                               for p in eid) + "." if eid else "Eidetic providers: none.",
             "A ratio followed by `!` comes from a row that failed its correctness check (`!MISMATCH`).", ""]
    shares = sorted({r["frozen_share"] for r in rows if r["provider"] != "nn"})
    dtypes = sorted({r["dtype"] for r in rows})
    index = {}
    for r in rows:
        index.setdefault((r["suite"], r["layer"], r["size"], r["pass"], r["provider"],
                          0.0 if r["provider"] == "nn" else r["frozen_share"], r["metric"], r["dtype"]), r)

    def get(suite, layer, size, pss, provider, share, metric, dtype):
        return index.get((suite, layer, size, pss, provider, 0.0 if provider == "nn" else share, metric, dtype))

    def table(hdr, body):
        return ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)] + [
            "| " + " | ".join(map(str, cells)) + " |" for cells in body] + [""]

    for dtype in dtypes:
        cases = list(dict.fromkeys((r["suite"], r["layer"], r["size"], r["shape"], r["pass"]) for r in rows
                                   if r["metric"] == "time_ms" and r["dtype"] == dtype and r["provider"] == "nn"))
        cases.sort(key=lambda c: (c[0] != "e2e",) + c[:3] + (c[4],))
        hdr = ["suite", "layer", "shape", "pass", "nn ms"]
        for s in shares:
            hdr += ([f"prune/nn {_pct(s)}"] + [f"{labels[p]}/nn {_pct(s)}" for p in eid]
                    + [f"{labels[p]}/prune {_pct(s)}" for p in eid])
        body = []
        for suite, layer, size, shape, pss in cases:
            base = get(suite, layer, size, pss, "nn", 0.0, "time_ms", dtype)
            cells = [suite, layer, shape, pss, f"{base['value']:.3g}"]
            for s in shares:
                cells.append(_cell(get(suite, layer, size, pss, "torch-prune", s, "time_ms", dtype)))
                cells += [_cell(get(suite, layer, size, pss, p, s, "time_ms", dtype)) for p in eid]
                cells += [_cell(get(suite, layer, size, pss, p, s, "time_ms", dtype), "ratio_to_torch_prune")
                          for p in eid]
            body.append(cells)
        lines += [f"Time ({dtype}; median; ratios < 1 mean faster than the denominator):", ""] + table(hdr, body)

        if EIDETIC in eid:  # each other backend against Triton, directly: the CUDA default is decided here
            for p in (q for q in eid if q != EIDETIC):
                body = []
                for suite, layer, size, shape, pss in cases:
                    cells = [suite, layer, shape, pss]
                    for s in shares:
                        a = get(suite, layer, size, pss, p, s, "time_ms", dtype)
                        b = get(suite, layer, size, pss, EIDETIC, s, "time_ms", dtype)
                        bad = any(r is not None and "!MISMATCH" in str(r["backend"]) for r in (a, b))
                        cells.append(f"{a['value'] / b['value']:.2f}" + ("!" if bad else "")
                                     if a and b and b["value"] else "")
                    body.append(cells)
                lines += [f"Time ({dtype}), {labels[p]}/{labels[EIDETIC]}: {p} over eidetic on Triton (< 1: "
                          f"{p} is faster):", ""] + table(["suite", "layer", "shape", "pass"]
                                                          + [_pct(s) for s in shares], body)

        mem_cases = list(dict.fromkeys((r["suite"], r["layer"], r["size"], r["shape"]) for r in rows
                                       if r["metric"] == "layer_bytes" and r["dtype"] == dtype
                                       and r["provider"] == "nn"))
        if mem_cases:
            mem_cases.sort(key=lambda c: (c[0] != "e2e",) + c[:3])
            hdr = ["suite", "layer", "shape", "nn layer MiB", "nn step MiB"]
            for s in shares:
                for m in ("layer", "step"):
                    hdr += [f"{m} prune/nn {_pct(s)}"] + [f"{m} {labels[p]}/nn {_pct(s)}" for p in eid]
            body = []
            for suite, layer, size, shape in mem_cases:
                lb = get(suite, layer, size, "train_step", "nn", 0.0, "layer_bytes", dtype)
                sb = get(suite, layer, size, "train_step", "nn", 0.0, "step_bytes", dtype)
                cells = [suite, layer, shape, f"{lb['value'] / 2**20:.3g}", f"{sb['value'] / 2**20:.3g}" if sb else ""]
                for s in shares:
                    for metric in MEMORY_METRICS:
                        cells += [_cell(get(suite, layer, size, "train_step", prov, s, metric, dtype))
                                  for prov in ["torch-prune"] + eid]
                body.append(cells)
            lines += [f"Memory ({dtype}; layer = parameters + buffers + tensor attributes; step = peak allocated "
                      "over a training step on CUDA, layer + saved for backward + gradients + AdamW state on a "
                      "CPU):", ""] + table(hdr, body)
    if problems is not None and problems.items:
        lines += ["Not measured:", ""] + [f"* {kind}: {text}" for kind, text in problems.items] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> Path | None:
    """Runs the suite and writes the CSV and its .md; returns the CSV's path (None without a device to run on).
    Exits with status 1 after writing them when an eidetic case raised (the summary lists it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (smoke test; runs on a CPU)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the CSV goes (default: benchmarks/results; --quick: a temporary folder)")
    ap.add_argument("--dtypes", default=None, help="default float32,bfloat16 (float32 only on a CPU)")
    ap.add_argument("--only", default="", help="comma list of linear,conv2d,batchnorm2d,mlp,cnn (default: all)")
    ap.add_argument("--eidetic-backends", default=None, metavar="LIST",
                    help="comma list of the backends the eidetic rows run on, each timed and checked in the same "
                         "run (reference, triton, cpp); default: triton,reference where Triton runs (CUDA, or a "
                         "CPU under TRITON_INTERPRET=1), else reference. EIDETIC_BACKEND does not choose them")
    args = ap.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        machine = torch.cuda.get_device_name(device)
    elif args.quick:
        device = torch.device("cpu")
        machine = cpu_model()
    else:
        print("benchmarks.gpu: no CUDA device here; run it on a GPU machine, or use --quick for a CPU smoke run "
              "(the CPU suite is `make bench`)")
        return None
    try:
        eidetic_backends = parse_eidetic_backends(args.eidetic_backends, device)
    except ValueError as exc:
        ap.error(str(exc))
    dtypes = [getattr(torch, d.strip()) for d in (args.dtypes or ("float32,bfloat16" if device.type == "cuda"
                                                                  else "float32")).split(",") if d.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    layer_cases = QUICK_LAYER_CASES if args.quick else FULL_LAYER_CASES
    e2e_batch = QUICK_E2E_BATCH if args.quick else FULL_E2E_BATCH
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="eidetic-gpu-quick-")) if args.quick else RESULTS_DIR)
    print(f"benchmarks.gpu on {machine} ({device}), torch {torch.__version__}, triton {package_version('triton')}, "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, dtypes {[str(d) for d in dtypes]}", flush=True)
    print("  eidetic backends: " + ", ".join(f"{b} (provider {eidetic_provider(b)})" for b in eidetic_backends)
          + (f"; EIDETIC_BACKEND={os.environ['EIDETIC_BACKEND']} in the environment applies to none of them"
             if os.environ.get("EIDETIC_BACKEND") else ""), flush=True)

    started, load_start = time.time(), load_average()
    rows, problems, stopped = [], Problems(), ""
    # a run stopped early (Ctrl-C, SIGTERM from `timeout`, an error outside the eidetic rows) still writes the
    # rows it measured; each case runs every provider and backend before the next case starts
    old_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for dtype in dtypes:
            for case in layer_cases:
                if only and case.kind not in only:
                    continue
                t0 = time.time()
                print(f"  layer {case.kind} {case.shape} {dtype}", flush=True)
                rows += layer_rows(case, dtype, device, args.quick, eidetic_backends, problems)
                print(f"    ({time.time() - t0:.1f} s)", flush=True)
            for name, batch in e2e_batch.items():
                if only and name not in only:
                    continue
                t0 = time.time()
                print(f"  e2e {name} batch {batch} {dtype}", flush=True)
                rows += e2e_rows(name, batch, dtype, device, args.quick, eidetic_backends, problems)
                print(f"    ({time.time() - t0:.1f} s)", flush=True)
    except KeyboardInterrupt:
        stopped = "stopped early"
    except Exception:  # noqa: BLE001 - an nn/torch-prune case or the CUDA context: keep what was measured
        traceback.print_exc()
        stopped = "stopped by the error above"
    finally:
        signal.signal(signal.SIGTERM, old_sigterm)
    if stopped:
        print(f"benchmarks.gpu: {stopped}; writing the {len(rows)} rows measured so far", flush=True)
        problems.items.append(("error" if "error" in stopped else "stopped", f"the run {stopped} after "
                                                                            f"{time.time() - started:.0f} s"))
    date = _dt.datetime.now(_dt.timezone.utc).isoformat()[:19]
    common = {"date": date, "machine": machine, "logical_cpus": os.cpu_count(),
              "load_1min": f"{load_start} -> {load_average()}", "torch": torch.__version__,
              "triton": package_version("triton"), "threads": torch.get_num_threads()}
    rows = [dict(common, **r) for r in rows]
    add_ratios(rows)
    prefix = "gpu" if device.type == "cuda" else "cpu-quick-gpu-script"
    path = write_csv(rows, out_dir, prefix, machine, date)
    summary = markdown_summary(rows, problems)
    path.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"wrote {path} ({len(rows)} rows) in {time.time() - started:.0f} s", flush=True)
    if problems.errors:
        print(f"benchmarks.gpu: {problems.errors} error(s), listed under 'Not measured' above", flush=True)
        sys.exit(1)
    return path


if __name__ == "__main__":
    main()  # without a GPU and without --quick it explains and exits 0: a skip, not a failure
