"""Record the machine and the versions in pytest-benchmark's JSON, so the report needs no guessing."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


_LOAD_AT_START = {"value": "?"}


def pytest_sessionstart(session):
    _LOAD_AT_START["value"] = load_average()
    # EIDETIC_BENCH_THREADS=1 when other work shares the cores: with 2 threads on 2 busy cores, torch's
    # thread pool waits for a descheduled thread and even a tiny matmul takes milliseconds.
    threads = os.environ.get("EIDETIC_BENCH_THREADS", "").strip()
    if threads:
        torch.set_num_threads(int(threads))


def pytest_benchmark_update_machine_info(config, machine_info):
    from eidetic_kernels import backends

    machine_info["eidetic"] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average at the start and the end of the run: other work on the machine shows here
        "load_1min": f"{_LOAD_AT_START['value']} -> {load_average()}",
        "backends": {op: backends.select(op, torch.device("cpu")) for op in backends.OPS},
    }
