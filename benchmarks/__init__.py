"""Benchmarks: eidetic layers against plain torch.nn and torch.nn.utils.prune-style masking.

providers.py   the three providers (nn, torch-prune, eidetic) and the benchmark models
test_cpu_bench.py  the CPU suite (pytest-benchmark), run by ``make bench``
cpu_report.py  pytest-benchmark JSON -> one CSV per run in results/
gpu.py         the GPU suite (triton.testing.do_bench), same CSV format
plot.py        ratios to ``nn`` -> PNG
"""
