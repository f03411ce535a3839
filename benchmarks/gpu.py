"""GPU suite: nn vs torch-prune vs eidetic, fp32 and bf16, sizes up to 8192; same CSV as the CPU suite.

    python -m benchmarks.gpu [--out-dir DIR] [--dtypes float32,bfloat16] [--only linear,conv2d,...]
    python -m benchmarks.gpu --quick        # tiny shapes; also runs on a CPU (reference backend)

Method (the device tool's METHOD.md):
* correct first: before timing, each eidetic case is compared with the torch-prune twin holding the
  same values (‖Δ‖/‖ref‖ for the output, dX and dW, fp32 < 1e-3, bf16 < 2e-2); NaN fails. Failures are
  printed and marked in the CSV (backend column gets ``!MISMATCH``), never hidden.
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
import math
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.conftest import cpu_model, load_average, package_version
from benchmarks.cpu_report import RESULTS_DIR, add_ratios, markdown_summary, write_csv
from benchmarks.providers import (MODELS, LayerCase, backend_of, held_bytes, make_layer, make_model, make_optimizer,
                                  model_input, torch_prune_twin, train_step, training_step_bytes)
from eidetic_kernels.backends import BackendUnavailable

SHARES = (0.0, 0.5, 0.9)
PROVIDER_SHARES = [("nn", 0.0)] + [(p, s) for p in ("torch-prune", "eidetic") for s in SHARES]
PASSES = ("forward", "backward", "forward_backward")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # tf32 may be on in the fast path; bf16 operands
ROTATE_BYTES = 256 * 2 ** 20  # rotate among input sets until they span more than any L2 (H200: 60 MiB)

FULL_LAYER_CASES = [
    LayerCase("linear", 1024, 4096), LayerCase("linear", 4096, 4096), LayerCase("linear", 8192, 4096),
    LayerCase("conv2d", 256, 32, 32), LayerCase("conv2d", 1024, 32, 16),
    LayerCase("batchnorm2d", 256, 64, 56), LayerCase("batchnorm2d", 8192, 64, 7),
]
FULL_E2E_BATCH = {"mlp": 4096, "cnn": 512}
QUICK_LAYER_CASES = [LayerCase("linear", 64, 16), LayerCase("conv2d", 8, 2, 8), LayerCase("batchnorm2d", 16, 4, 8)]
QUICK_E2E_BATCH = {"mlp": 8, "cnn": 4}


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


def choose_backend(run_once) -> str | None:
    """None when the default backend runs; 'reference' when it has no implementation of the op yet."""
    try:
        run_once()
        return None
    except BackendUnavailable as exc:
        print(f"    default backend unavailable ({exc}); falling back to the reference backend", flush=True)
        with eidetic_backend("reference"):
            run_once()
        return "reference"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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


def layer_rows(case: LayerCase, dtype, device, quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    probe = case.make_input(g, device, dtype)
    k = n_input_sets(2 * probe.numel() * probe.element_size())
    xs = [case.make_input(g, device, dtype).requires_grad_() for _ in range(k)]
    grads = [torch.randn(probe.shape, generator=g).to(device, dtype) for _ in range(k)]
    del probe
    for provider, share in PROVIDER_SHARES:
        forced, note = None, ""
        if provider == "eidetic":
            layer = make_layer(provider, case, share, device=device, dtype=dtype)
            forced = choose_backend(lambda: layer(xs[0]))
            with eidetic_backend(forced):
                err = check_layer(layer, case, device, dtype)
            ok = err <= TOLERANCE[dtype]
            note = "" if ok else "!MISMATCH"
            print(f"    check {case.kind}-{case.size} {dtype} {share:.0%}: rel err {err:.2e} "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
        with eidetic_backend(forced):
            _sync(device)
            base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            layer = make_layer(provider, case, share, device=device, dtype=dtype)
            layer(xs[0]).backward(grads[0])  # untimed: JIT compilation, lazy plans
            backend = backend_of(layer) + note
            params = list(layer.parameters())
            common = dict(suite="layer", layer=case.kind, size=case.size, shape=case.shape, provider=provider,
                          frozen_share=share, dtype=str(dtype).replace("torch.", ""), backend=backend,
                          device=device.type)
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
            opt = make_optimizer(provider, layer)
            rows += memory_rows(layer, opt, lambda: layer(xs[0]), lambda y: y.backward(grads[0]), device,
                                base_alloc, common)
            del layer, opt, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
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


def e2e_rows(name: str, batch: int, dtype, device, quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x0, _ = model_input(name, batch, g, device, dtype)
    k = n_input_sets(x0.numel() * x0.element_size())
    batches = [model_input(name, batch, g, device, dtype) for _ in range(k)]
    del x0
    for provider, share in PROVIDER_SHARES:
        forced = None
        if provider == "eidetic":
            probe = make_model(provider, name, share, device=device, dtype=dtype)
            forced = choose_backend(lambda: probe(batches[0][0]))
            with eidetic_backend(forced):
                twin = torch_prune_twin(probe, MODELS[name][0])
                err = rel_err(probe(batches[0][0]), twin(batches[0][0]))
            ok = err <= TOLERANCE[dtype]
            print(f"    check {name} {dtype} {share:.0%}: rel err {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)
            del probe, twin
        with eidetic_backend(forced):
            _sync(device)
            base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            model = make_model(provider, name, share, device=device, dtype=dtype)
            opt = make_optimizer(provider, model)
            train_step(model, opt, *batches[0])  # untimed: compilation, AdamW state
            common = dict(suite="e2e", layer=name, size=batch, shape=f"batch {batch}", provider=provider,
                          frozen_share=share, dtype=str(dtype).replace("torch.", ""),
                          backend=backend_of(model) + ("" if provider != "eidetic" or ok else "!MISMATCH"),
                          device=device.type)
            rot = Rotating(k)
            med, low, iqr = time_ms(lambda: train_step(model, opt, *batches[rot.next()]), device, quick=quick)
            rows.append(dict(common, **{"pass": "train_step", "metric": "time_ms", "value": med, "min": low,
                                        "iqr": iqr, "rounds": ""}))
            x, y = batches[0]
            rows += memory_rows(model, opt, lambda: model(x), lambda out: F.cross_entropy(out, y).backward(),
                                device, base_alloc, common)
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (smoke test; runs on a CPU)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the CSV goes (default: benchmarks/results; --quick: a temporary folder)")
    ap.add_argument("--dtypes", default=None, help="default float32,bfloat16 (float32 only on a CPU)")
    ap.add_argument("--only", default="", help="comma list of linear,conv2d,batchnorm2d,mlp,cnn (default: all)")
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
    dtypes = [getattr(torch, d.strip()) for d in (args.dtypes or ("float32,bfloat16" if device.type == "cuda"
                                                                  else "float32")).split(",") if d.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    layer_cases = QUICK_LAYER_CASES if args.quick else FULL_LAYER_CASES
    e2e_batch = QUICK_E2E_BATCH if args.quick else FULL_E2E_BATCH
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="eidetic-gpu-quick-")) if args.quick else RESULTS_DIR)
    print(f"benchmarks.gpu on {machine} ({device}), torch {torch.__version__}, triton {package_version('triton')}, "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, dtypes {[str(d) for d in dtypes]}", flush=True)

    started, load_start = time.time(), load_average()
    rows = []
    # a run stopped early (Ctrl-C, or SIGTERM from `timeout`) still writes the rows it measured
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for dtype in dtypes:
            for case in layer_cases:
                if only and case.kind not in only:
                    continue
                print(f"  layer {case.kind} {case.shape} {dtype}", flush=True)
                rows += layer_rows(case, dtype, device, args.quick)
            for name, batch in e2e_batch.items():
                if only and name not in only:
                    continue
                print(f"  e2e {name} batch {batch} {dtype}", flush=True)
                rows += e2e_rows(name, batch, dtype, device, args.quick)
    except KeyboardInterrupt:
        print(f"benchmarks.gpu: stopped early; writing the {len(rows)} rows measured so far", flush=True)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat()[:19]
    common = {"date": date, "machine": machine, "logical_cpus": os.cpu_count(),
              "load_1min": f"{load_start} -> {load_average()}", "torch": torch.__version__,
              "triton": package_version("triton"), "threads": torch.get_num_threads()}
    rows = [dict(common, **r) for r in rows]
    add_ratios(rows)
    prefix = "gpu" if device.type == "cuda" else "cpu-quick-gpu-script"
    path = write_csv(rows, out_dir, prefix, machine, date)
    summary = markdown_summary(rows)
    path.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"wrote {path} ({len(rows)} rows) in {time.time() - started:.0f} s", flush=True)
    return path


if __name__ == "__main__":
    main()  # without a GPU and without --quick it explains and exits 0: a skip, not a failure
