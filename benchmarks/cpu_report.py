"""pytest-benchmark JSON -> one CSV per run in benchmarks/results/ (and a Markdown summary beside it).

    python -m benchmarks.cpu_report benchmarks/results/last-cpu.json [--out-dir benchmarks/results]

Each row is one measurement: a time (``value`` = median over the rounds, in ms; ``min`` and ``iqr``
beside it) or a memory count (bytes),
with the machine, the versions, and its ratio to ``nn`` and to ``torch-prune`` measured in the
same run for the same case. ``benchmarks/gpu.py`` writes the same columns.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import re
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "machine", "device", "logical_cpus", "load_1min", "torch", "triton", "threads", "suite", "layer",
           "size", "shape", "pass", "provider", "frozen_share", "tasks", "dtype", "backend", "metric", "value", "min", "iqr",
           "rounds", "ratio_to_nn", "ratio_to_torch_prune"]
MEMORY_METRICS = ("layer_bytes", "step_bytes")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def add_ratios(rows: list[dict]) -> None:
    """Fill ratio_to_nn and ratio_to_torch_prune (same case, same metric, same dtype, same share)."""
    def case(r):
        return (r["suite"], r["layer"], r["size"], r["pass"], r["dtype"], r["metric"])

    nn_value = {case(r): r["value"] for r in rows if r["provider"] == "nn"}
    tp_value = {case(r) + (r["frozen_share"],): r["value"] for r in rows if r["provider"] == "torch-prune"}
    for r in rows:
        base = nn_value.get(case(r))
        r["ratio_to_nn"] = round(r["value"] / base, 4) if base else ""
        tp = tp_value.get(case(r) + (r["frozen_share"],))
        r["ratio_to_torch_prune"] = round(r["value"] / tp, 4) if tp and r["provider"] != "nn" else ""


def rows_from_pytest_benchmark(data: dict) -> list[dict]:
    info = data["machine_info"].get("eidetic", {})
    date = data.get("datetime", _dt.datetime.now(_dt.timezone.utc).isoformat())[:19]
    common = {"date": date, "machine": info.get("cpu_model") or data["machine_info"].get("cpu", {}).get("brand_raw",
                                                                                                        "unknown"),
              "logical_cpus": info.get("logical_cpus", ""), "load_1min": info.get("load_1min", ""),
              "torch": info.get("torch", ""),
              "triton": info.get("triton", ""), "threads": info.get("torch_threads", "")}
    rows = []
    for bench in data["benchmarks"]:
        e = bench["extra_info"]
        if "suite" not in e:
            continue
        base = dict(common, device=e["device"], suite=e["suite"], layer=e["layer"], size=e["size"], shape=e["shape"],
                    provider=e["provider"], frozen_share=e["frozen_share"], tasks=e.get("tasks", ""), dtype=e["dtype"],
                    backend=e["backend"])
        s = bench["stats"]
        rows.append(dict(base, **{"pass": e["pass_name"], "metric": "time_ms", "value": s["median"] * 1e3,
                                  "min": s["min"] * 1e3, "iqr": s["iqr"] * 1e3, "rounds": s["rounds"]}))
        for metric in MEMORY_METRICS:
            if metric in e:
                rows.append(dict(base, **{"pass": "train_step", "metric": metric, "value": e[metric], "min": "",
                                          "iqr": "", "rounds": 1}))
    add_ratios(rows)
    return rows


def write_csv(rows: list[dict], out_dir: Path, prefix: str, machine: str, date: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = date.replace("-", "").replace(":", "").replace("T", "-")[:13]  # YYYYMMDD-HHMM
    path = out_dir / f"{prefix}-{stamp}-{slug(machine)}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:  # a column a suite does not use (e.g. ``tasks`` outside the tasks suite) stays empty
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) and k in ("value", "min", "iqr")
                            else r.get(k, "")) for k in COLUMNS})
    return path


def replace_rows(path: Path, rows: list[dict], suite: str, section: str, marker: str) -> None:
    """Put ``rows`` (suite ``suite``) into the run's CSV at ``path`` in place of that suite's earlier rows, and
    ``section`` (a markdown table whose first line starts with ``marker``) into its .md in place of the earlier
    section, leaving every other suite and section as it is."""
    with open(path, newline="") as f:
        kept = [r for r in csv.DictReader(f) if r.get("suite") != suite]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in kept + rows:
            writer.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) and k in ("value", "min", "iqr")
                                 else r.get(k, "")) for k in COLUMNS})
    md = path.with_suffix(".md")
    if not md.exists():
        return
    lines = md.read_text().rstrip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
    if start is None:
        lines += [""] + section.rstrip().splitlines()
    else:  # the old section: its title, then lines up to the end of its table
        end, in_table = start + 1, False
        while end < len(lines) and not (in_table and not lines[end].startswith("|")):
            in_table |= lines[end].startswith("|")
            end += 1
        lines[start:end] = section.rstrip().splitlines()
    md.write_text("\n".join(lines) + "\n")


def _fmt_ratio(x) -> str:
    return "" if x in ("", None) else f"{float(x):.2f}"


def tasks_summary(rows: list[dict]) -> list[str]:
    """The curve of eidetic/nn against the number of finished tasks (suite "tasks"), one row per model and pass."""
    rows = [r for r in rows if r["suite"] == "tasks" and r["provider"] == "eidetic"]
    if not rows:
        return []
    counts = sorted({int(r["tasks"]) for r in rows})
    lines = ["Task after task (each finished task keeps 10% of every layer; eidetic/nn, median times; "
             "train_step = the next task's training step, eval_task0 = evaluating task 0 vs nn's forward):", "",
             "| model | pass | metric | " + " | ".join(f"{t} task{'s' if t > 1 else ''}" for t in counts) + " |",
             "|" + "---|" * (3 + len(counts))]
    keys = []
    for r in rows:
        key = (r["layer"], r["shape"], r["pass"] if r["metric"] == "time_ms" else "train_step", r["metric"])
        if key not in keys:
            keys.append(key)
    for layer, shape, pss, metric in keys:
        cells = []
        for t in counts:
            match = [r for r in rows if (r["layer"], r["shape"], r["metric"]) == (layer, shape, metric)
                     and int(r["tasks"]) == t and (metric != "time_ms" or r["pass"] == pss)]
            cells.append(_fmt_ratio(match[0]["ratio_to_nn"]) if match else "")
        lines.append(f"| {layer} {shape} | {pss} | {metric} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_summary(rows: list[dict]) -> str:
    """Tables for the README: end to end, layer times, memory, and the curve over finished tasks."""
    if not rows:
        return "(no rows)\n"
    curve = tasks_summary(rows)
    rows = [r for r in rows if r["suite"] != "tasks"]
    if not rows:
        return "\n".join(curve)
    head = rows[0]
    lines = [f"Machine: {head['machine']} ({head['logical_cpus']} logical CPUs, {head['threads']} torch threads, "
             f"1-min load average {head['load_1min']}), "
             f"device {head['device']}, torch {head['torch']}, triton {head['triton']}, run {head['date']} UTC.",
             f"Eidetic backend(s): {', '.join(sorted({r['backend'] for r in rows if r['provider'] == 'eidetic'}))}.",
             ""]
    shares = sorted({r["frozen_share"] for r in rows if r["provider"] != "nn"})
    dtypes = sorted({r["dtype"] for r in rows})

    def get(suite, layer, size, pss, provider, share, metric, dtype):
        for r in rows:
            if (r["suite"], r["layer"], r["size"], r["pass"], r["provider"], r["metric"], r["dtype"]) == (
                    suite, layer, size, pss, provider, metric, dtype) and (provider == "nn" or
                                                                          r["frozen_share"] == share):
                return r
        return None

    for dtype in dtypes:
        cases = []
        for r in rows:
            key = (r["suite"], r["layer"], r["size"], r["shape"], r["pass"])
            if r["metric"] == "time_ms" and r["dtype"] == dtype and r["provider"] == "nn" and key not in cases:
                cases.append(key)
        hdr = ["suite", "layer", "shape", "pass", "nn ms"]
        for s in shares:
            p = f"{int(round(100 * s))}%"
            hdr += [f"prune/nn {p}", f"eid/nn {p}", f"eid/prune {p}"]
        lines += [f"Time ({dtype}; median; ratios < 1 mean faster than the denominator):", "",
                  "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for suite, layer, size, shape, pss in sorted(cases, key=lambda c: (c[0] != "e2e",) + c[:2] + (c[2], c[4])):
            base = get(suite, layer, size, pss, "nn", 0, "time_ms", dtype)
            cells = [suite, layer, shape, pss, f"{base['value']:.3g}"]
            for s in shares:
                tp = get(suite, layer, size, pss, "torch-prune", s, "time_ms", dtype)
                ei = get(suite, layer, size, pss, "eidetic", s, "time_ms", dtype)
                cells += [_fmt_ratio(tp and tp["ratio_to_nn"]), _fmt_ratio(ei and ei["ratio_to_nn"]),
                          _fmt_ratio(ei and ei["ratio_to_torch_prune"])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")

        mem_cases = []
        for r in rows:
            key = (r["suite"], r["layer"], r["size"], r["shape"])
            if r["metric"] == "layer_bytes" and r["dtype"] == dtype and r["provider"] == "nn" and key not in mem_cases:
                mem_cases.append(key)
        if mem_cases:
            hdr = ["suite", "layer", "shape", "nn layer MiB", "nn step MiB"]
            for s in shares:
                p = f"{int(round(100 * s))}%"
                hdr += [f"layer prune/nn {p}", f"layer eid/nn {p}", f"step prune/nn {p}", f"step eid/nn {p}"]
            lines += [f"Memory ({dtype}; layer = parameters + buffers + tensor attributes; step = layer + saved for "
                      "backward + gradients + AdamW state):", "",
                      "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
            for suite, layer, size, shape in sorted(mem_cases, key=lambda c: (c[0] != "e2e",) + c[:3]):
                lb = get(suite, layer, size, "train_step", "nn", 0, "layer_bytes", dtype)
                sb = get(suite, layer, size, "train_step", "nn", 0, "step_bytes", dtype)
                cells = [suite, layer, shape, f"{lb['value'] / 2**20:.3g}", f"{sb['value'] / 2**20:.3g}" if sb else ""]
                for s in shares:
                    for metric in MEMORY_METRICS:
                        for prov in ("torch-prune", "eidetic"):
                            r = get(suite, layer, size, "train_step", prov, s, metric, dtype)
                            cells.append(_fmt_ratio(r and r["ratio_to_nn"]))
                lines.append("| " + " | ".join(map(str, cells)) + " |")
            lines.append("")
    return "\n".join(lines + curve)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    rows = rows_from_pytest_benchmark(data)
    if not rows:
        raise SystemExit(f"{args.json} holds no eidetic benchmark rows; run benchmarks/test_cpu_bench.py first")
    path = write_csv(rows, args.out_dir, "cpu", rows[0]["machine"], rows[0]["date"])
    summary = markdown_summary(rows)
    path.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"wrote {path} ({len(rows)} rows) and {path.with_suffix('.md').name}")
    return path


if __name__ == "__main__":
    main()
