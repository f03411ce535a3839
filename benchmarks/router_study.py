"""What limits the learned task router: router variants compared on one trained run, the body never retrained.

    python -m benchmarks.router_study extract --run RUN_DIR --cache FILE.pt [--samples N] [--flip]
    python -m benchmarks.router_study compare --cache FILE.pt [--out FILE.json] [--only NAME ...]
    python -m benchmarks.router_study refit --run RUN_DIR [--out FILE.json] [KEY=VALUE ...]
    python -m benchmarks.router_study sequence --run RUN_DIR [--out FILE.json] [KEY=VALUE ...]

``extract`` loads RUN_DIR's last checkpoint (an ``eidetic train`` run), runs its body once, in the view of every
finished task, over (a) each task's router data, exactly the inputs ``Run._fit_router`` uses
(``router_samples_per_task`` training inputs of each task), and (b) each task's whole test set, and saves per body
layer several summaries of its output (see ``_summaries``), the body features and every head's logits.
``--flip`` adds the same for horizontally flipped inputs (test-time augmentation and flipped router data).

``compare`` trains router variants on the cached values (one thread, seconds each) and reports for each the task
accuracy and the routed accuracy on the test sets (a sample counts when its task and its class are right), next
to ACC with the true task id. The routing data are the same training inputs the run's router reads; no data
reach the body.

``refit`` loads RUN_DIR's last checkpoint (read only), fits the run's own router again with the config keys given
(e.g. ``router_input=both``) exactly as ``Run._fit_router`` does after the last task, and reports ACC with the
task id, routed ACC through that router, and the seconds the fit took: a router the product runs, measured on a
body trained once.

``sequence`` does what a run does with its router, on the trained body of RUN_DIR: for t = 0, 1, ..., fits the
router on tasks 0..t exactly as ``Run._fit_router(t)`` (warm starts, epochs of the last fit, all config keys
given) with the network seen as having finished tasks 0..t, and measures row t of the routed accuracy matrix.
That is the run's own sequence of routers: in the view of tasks 0..t the trained body and heads 0..t compute
what they computed right after task t (a neuron of task s reads only neurons of tasks <= s). Reports the routed
matrix, routed ACC, the gap and each fit's seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from eidetic_kernels import EideticConv2d, EideticLinear
from eidetic_kernels.layers import EideticBatchNorm1d, EideticBatchNorm2d


# ----------------------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------------------
def _summaries(name: str, module, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample summaries [B, C] of one layer's output [B, C] or [B, C, H, W], keyed ``kind:name``.

    Linear/Conv: ``pre`` (the output; a conv output averaged over positions); conv also ``std``
    (standard deviation over positions). BatchNorm: ``relu`` (mean over positions of relu(output), the activation
    the next layer reads in a plain block), ``max`` (max over positions).
    """
    out = {}
    o = output.float()
    if o.dim() == 2:
        if isinstance(module, (EideticLinear,)):
            out[f"pre:{name}"] = o
            out[f"relu:{name}"] = o.clamp_min(0)
        else:
            out[f"relu:{name}"] = o.clamp_min(0)
        return out
    flat = o.flatten(2)
    if isinstance(module, EideticConv2d):
        out[f"pre:{name}"] = flat.mean(-1)
        out[f"std:{name}"] = flat.std(-1, correction=0)
    else:
        out[f"relu:{name}"] = flat.clamp_min(0).mean(-1)
        out[f"max:{name}"] = flat.amax(-1)
    return out


def _pass(model, x, num_finished):
    from python_layers.routing import _head_logits
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.body_layers().items():
        if isinstance(m, (EideticLinear, EideticConv2d, EideticBatchNorm1d, EideticBatchNorm2d)):
            handles.append(m.register_forward_hook(lambda mod, a, o, n=name: seen.update(_summaries(n, mod, o))))
    try:
        f = model.features(x, view_task=num_finished - 1)
    finally:
        for h in handles:
            h.remove()
    seen["features"] = f.float()
    heads = _head_logits(model, f, num_finished)
    width = max(z.shape[-1] for z in heads)
    seen["heads"] = torch.stack([F.pad(z.float(), (0, width - z.shape[-1]), value=float("-inf")) for z in heads], 1)
    return seen


def extract(run_dir: Path, cache: Path, samples: int | None, flip: bool) -> None:
    from python_layers.config import load_config
    from python_layers.run import Run
    from python_layers.scenarios import InMemoryLoader

    cfg = load_config(run_dir / "config.yaml")
    run = Run(cfg, run_dir, log=lambda *a: None)
    run.build()
    torch.set_num_threads(1)
    run.load_checkpoint()
    model = run.model.eval()
    T = model.num_finished_tasks
    samples = samples or cfg["router_samples_per_task"]
    parts = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for split in ("router", "test"):
            rows, task_ids, labels = [], [], []
            for j, task in enumerate(run.scenario.tasks[:T]):
                data = (task.train.subset(samples, cfg["seed"] * 1000 + 700 + j) if split == "router" else task.test)
                for x, y in InMemoryLoader(data, 500, shuffle=False):
                    out = _pass(model, x, T)
                    if flip:
                        out.update({f"flip/{k}": v for k, v in _pass(model, x.flip(3), T).items()})
                    rows.append({k: v.half() if k not in ("heads",) else v for k, v in out.items()})
                    task_ids.append(torch.full((x.shape[0],), j))
                    labels.append(y)
            parts[split] = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            parts[split]["task"] = torch.cat(task_ids)
            parts[split]["label"] = torch.cat(labels)
    acc = [float(r) for r in torch.tensor(
        [[float(v) if v is not None else float("nan") for v in row] for row in _results(run_dir)["accuracy_matrix"]]
    )[-1]] if (run_dir / "results.json").is_file() else None
    torch.save({"parts": parts, "num_tasks": T, "config": cfg, "oracle_per_task": acc,
                "extract_seconds": time.perf_counter() - t0}, cache)
    print(f"cached {cache}: {T} tasks, router {len(parts['router']['task'])} / test {len(parts['test']['task'])} "
          f"inputs, {len([k for k in parts['router'] if ':' in k])} layer summaries, "
          f"{time.perf_counter() - t0:.1f}s")


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------------
def _inputs(part: dict, kinds: tuple[str, ...], prefix: str = "") -> torch.Tensor:
    keys = [k for k in part if k.startswith(prefix) and ":" in k[len(prefix):]
            and k[len(prefix):].split(":")[0] in kinds]
    cols = [part[k].float() for k in sorted(keys)]
    if "features" in kinds:
        cols.append(part[prefix + "features"].float())
    return torch.cat(cols, 1)


def _mlp(d_in, hidden, depth, d_out, dropout=0.0):
    if depth == 0 or hidden == 0:
        return nn.Linear(d_in, d_out)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def train_router(x, target, num_out, hidden=256, depth=2, epochs=30, lr=1e-2, wd=0.05, smoothing=0.1, batch=256,
                 dropout=0.0, seed=0, weights=None, input_noise=0.0):
    """An MLP on standardised x (float [N, D]) to ``target`` (long [N]); returns (net, mean, scale)."""
    torch.manual_seed(seed)
    mean = x.mean(0)
    std = x.std(0, correction=0)
    scale = torch.where(std > 1e-6, std, torch.ones_like(std))
    z = (x - mean) / scale
    net = _mlp(x.shape[1], hidden, depth, num_out, dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    n = z.shape[0]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-n // batch))
    counts = torch.bincount(target, minlength=num_out).float()
    w = counts.sum() / (num_out * counts.clamp_min(1)) if weights is None else weights
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            zi = z[idx]
            if input_noise:
                zi = zi + input_noise * torch.randn_like(zi)
            loss = F.cross_entropy(net(zi), target[idx], weight=w, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net, mean, scale


def _apply(net, mean, scale, x):
    with torch.no_grad():
        return net((x - mean) / scale)


def routed(task_logp: torch.Tensor, part: dict, T: int, head_prefix: str = "") -> dict:
    """Task accuracy and routed accuracy (mean over tasks) of task scores [N, T] on ``part``."""
    tasks = task_logp.argmax(-1)
    heads = part[head_prefix + "heads"]
    classes = heads[torch.arange(len(tasks)), tasks].argmax(-1)
    ok_task = tasks == part["task"]
    ok = ok_task & (classes == part["label"])
    per = [float(ok[part["task"] == t].float().mean()) for t in range(T)]
    return {"task_acc": float(ok_task.float().mean()), "routed": sum(per) / T, "routed_per_task": per}


def head_scores(part: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-head confidence [N, T]: max log-softmax, logsumexp (energy), negative normalised entropy."""
    z = part[prefix + "heads"].float()
    z = torch.where(torch.isfinite(z), z, torch.full_like(z, -1e9))
    logp = z.log_softmax(-1)
    p = logp.exp()
    c = torch.isfinite(part[prefix + "heads"]).sum(-1).clamp_min(2).float()
    ent = -(p * logp).nan_to_num().sum(-1) / c.log()
    return {"maxlogp": logp.amax(-1), "energy": z.logsumexp(-1), "negent": -ent}


def compare(cache: Path, only: list[str] | None, out: Path | None, seeds: int, per_task: int | None = None) -> dict:
    torch.set_num_threads(1)
    blob = torch.load(cache, weights_only=False)
    P, T = blob["parts"], blob["num_tasks"]
    R, S = P["router"], P["test"]
    if per_task is not None:  # the first per_task router inputs of each task
        keep = torch.cat([torch.nonzero(R["task"] == t).flatten()[:per_task] for t in range(T)])
        R = {k: v[keep] for k, v in R.items()}
    has_flip = "flip/features" in R
    # oracle: the true head's argmax
    cls = S["heads"][torch.arange(len(S["task"])), S["task"]].argmax(-1)
    oracle = sum(float((cls == S["label"])[S["task"] == t].float().mean()) for t in range(T)) / T
    report = {"cache": str(cache), "num_tasks": T, "router_inputs": len(R["task"]), "oracle_acc": oracle,
              "results": {}}
    print(f"{cache}: {T} tasks, {len(R['task'])} router inputs, oracle ACC {oracle:.4f}")
    hs_R, hs_S = head_scores(R), head_scores(S)

    def log(name, res, secs):
        report["results"][name] = dict(res, seconds=secs)
        print(f"  {name:58s} task {res['task_acc']:.4f}  routed {res['routed']:.4f}  gap "
              f"{100 * (oracle - res['routed']):5.2f}  ({secs:.0f}s)", flush=True)

    def run(name, kinds, target="task", seeds_=1, tta=False, aug=False, **kw):
        if only and not any(o in name for o in only):
            return None
        t0 = time.perf_counter()
        xr = _inputs(R, kinds)
        yr = R["task"] if target == "task" else R["task"] * 2 + R["label"]
        if aug and has_flip:
            xr = torch.cat([xr, _inputs(R, kinds, "flip/")])
            yr = torch.cat([yr, yr])
        n_out = T if target == "task" else 2 * T
        logps = []
        for s in range(seeds_):
            net, m, sc = train_router(xr, yr, n_out, seed=s, **kw)
            lp = _apply(net, m, sc, _inputs(S, kinds)).log_softmax(-1)
            if tta and has_flip:
                lp = torch.stack([lp, _apply(net, m, sc, _inputs(S, kinds, "flip/")).log_softmax(-1)]).logsumexp(0) \
                    - math.log(2)
            logps.append(lp)
        lp = torch.stack(logps).logsumexp(0) - math.log(len(logps))
        if target != "task":
            lp = lp.view(-1, T, 2).logsumexp(-1)
        res = routed(lp, S, T)
        log(name, res, time.perf_counter() - t0)
        return lp

    base = run("means (Linear, conv) + features, MLP 256x2", ("pre", "features"))
    run("means + features, 3 seeds averaged", ("pre", "features"), seeds_=3)
    run("features only, linear", ("features",), hidden=0)
    run("features only, MLP 256x2", ("features",))
    run("relu means (BN) + features, MLP 256x2", ("relu", "features"))
    run("relu+max (BN) + features, MLP 256x2", ("relu", "max", "features"))
    run("pre+std (conv) + features", ("pre", "std", "features"))
    run("all summaries, MLP 256x2", ("pre", "std", "relu", "max", "features"))
    run("all summaries, MLP 1024x2", ("pre", "std", "relu", "max", "features"), hidden=1024)
    run("all summaries, MLP 1024x2, dropout .3", ("pre", "std", "relu", "max", "features"), hidden=1024,
        dropout=0.3)
    run("all summaries, MLP 256x2, 100 epochs", ("pre", "std", "relu", "max", "features"), epochs=100)
    run("all summaries, joint (task, class) target", ("pre", "std", "relu", "max", "features"), target="joint")
    run("means + features, joint target", ("pre", "features"), target="joint")
    if has_flip:
        run("all summaries, flipped router data + TTA", ("pre", "std", "relu", "max", "features"), aug=True,
            tta=True)
        run("all summaries, joint, flip + TTA", ("pre", "std", "relu", "max", "features"), target="joint",
            aug=True, tta=True)
        run("all summaries, flip + TTA, 15 epochs", ("pre", "std", "relu", "max", "features"), aug=True, tta=True,
            epochs=15)
        run("all summaries, flip + TTA, 3 seeds", ("pre", "std", "relu", "max", "features"), aug=True, tta=True,
            seeds_=3)
        run("all summaries, flip + TTA, input noise 0.5", ("pre", "std", "relu", "max", "features"), aug=True,
            tta=True, input_noise=0.5)
    # router probability combined with each head's confidence, lambda on a grid (reported; not tuned on test)
    if base is not None:
        for key in ("maxlogp", "energy", "negent"):
            s = hs_S[key]
            s = (s - hs_R[key].mean(0)) / hs_R[key].std(0).clamp_min(1e-6)  # per head, on the router data
            for lam in (0.25, 0.5, 1.0, 2.0):
                res = routed(base + lam * s, S, T)
                log(f"means router + {lam} * {key} (per-head z-score)", res, 0.0)
        res = routed(hs_S["negent"], S, T)
        log("entropy routing", res, 0.0)
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _trained_run(run_dir: Path, pairs: list[str]):
    """RUN_DIR's ``Run`` with its last checkpoint loaded (config overrides ``pairs`` applied)."""
    from python_layers.config import load_config, parse_overrides
    from python_layers.run import Run

    cfg = load_config(run_dir / "config.yaml", dict(parse_overrides(pairs), progress=False))
    torch.set_num_threads(cfg["threads"] or 1)
    run = Run(cfg, run_dir, log=lambda *a: None)
    run.build()
    run.load_checkpoint()
    return run


def _report(run_dir: Path, pairs: list[str], oracle: list, routed_: list, out: Path | None, **extra) -> dict:
    """Oracle and routed accuracy of the last row, the gap in points, ``extra``; printed and written to ``out``."""
    T = len(oracle)
    report = {"run": str(run_dir), "overrides": pairs, "num_tasks": T, "oracle_acc": sum(oracle) / T,
              "routed_acc": sum(routed_) / T, "oracle_per_task": oracle, "routed_per_task": routed_,
              "gap_points": 100 * (sum(oracle) - sum(routed_)) / T, **extra,
              "load_average": list(os.getloadavg())}
    print(json.dumps({k: v for k, v in report.items() if k != "router_fits"}))
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def refit(run_dir: Path, pairs: list[str], out: Path | None) -> dict:
    from python_layers.run import evaluate, evaluate_routed

    run = _trained_run(run_dir, pairs)
    T = run.model.num_finished_tasks
    t0 = time.perf_counter()
    run._fit_router(T - 1)
    fit_seconds = time.perf_counter() - t0
    tasks = run.scenario.tasks[:T]
    bs = run.cfg["eval_batch_size"]
    oracle = [evaluate(run.model, task.test, j, bs, run.device) for j, task in enumerate(tasks)]
    routed_ = [evaluate_routed(run.model, task.test, j, bs, run.device, "learned") for j, task in enumerate(tasks)]
    return _report(run_dir, pairs, oracle, routed_, out, fit_seconds=fit_seconds)


def sequence(run_dir: Path, pairs: list[str], out: Path | None) -> dict:
    from python_layers.run import evaluate, evaluate_routed

    run = _trained_run(run_dir, pairs)
    model = run.model
    T = model.num_finished_tasks
    if getattr(model, "router", None) is not None:
        del model.router  # the run's own router: the sequence fits its routers from the first task on
    tasks = run.scenario.tasks[:T]
    bs = run.cfg["eval_batch_size"]
    oracle = [evaluate(model, task.test, j, bs, run.device) for j, task in enumerate(tasks)]
    rows, fits = [], []
    t0 = time.perf_counter()
    try:
        for t in range(T):
            model.num_finished_tasks = t + 1  # the network as it was right after task t
            fits.append(run._fit_router(t))
            rows.append([evaluate_routed(model, task.test, j, bs, run.device, "learned")
                         for j, task in enumerate(tasks[:t + 1])])
            print(f"task {t}: fit {fits[-1]['seconds']:.0f} s, routed {sum(rows[-1]) / (t + 1):.4f} "
                  f"[{', '.join(f'{a:.4f}' for a in rows[-1])}]", flush=True)
    finally:
        model.num_finished_tasks = T
    return _report(run_dir, pairs, oracle, rows[-1], out, routed_accuracy_matrix=rows, router_fits=fits,
                   fit_seconds=sum(f["seconds"] for f in fits), seconds=time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--cache", type=Path, required=True)
    e.add_argument("--samples", type=int, default=None)
    e.add_argument("--flip", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("--cache", type=Path, required=True)
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--only", nargs="*", default=None)
    c.add_argument("--seeds", type=int, default=1)
    c.add_argument("--per-task", type=int, default=None, help="use the first N router inputs of each task")
    r = sub.add_parser("refit")
    r.add_argument("--run", type=Path, required=True)
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("pairs", nargs="*", help="config overrides KEY=VALUE, e.g. router_input=both")
    q = sub.add_parser("sequence")
    q.add_argument("--run", type=Path, required=True)
    q.add_argument("--out", type=Path, default=None)
    q.add_argument("pairs", nargs="*", help="config overrides KEY=VALUE, e.g. router_warm_start=true")
    a = p.parse_args(argv)
    if a.cmd == "extract":
        extract(a.run, a.cache, a.samples, a.flip)
    elif a.cmd == "refit":
        refit(a.run, a.pairs, a.out)
    elif a.cmd == "sequence":
        sequence(a.run, a.pairs, a.out)
    else:
        compare(a.cache, a.only, a.out, a.seeds, a.per_task)


if __name__ == "__main__":
    main()
