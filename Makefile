# Two commands: `make demo` and `make test`. Both create .venv and install what is needed, once.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eidetic-installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (tests run one torch thread each; CI has 2 cores)
TEST_WORKERS ?= 2

.PHONY: setup test test-triton demo bench bench-plot clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, from the pinned spec, so nothing later pulls a second (CUDA) torch.
$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q triton numpy
	$(PY) -m pip install -q -e ".[dev]"
	@echo "$(TORCH_SPEC)" > $(STAMP)

setup: $(STAMP)
	@grep -qxF "$(TORCH_SPEC)" $(STAMP) || { rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

# Both cores (pytest-xdist), longest tests first (tests/conftest.py); TEST_WORKERS=0 runs in this process.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 tests $(PYTEST_ARGS)

# The whole suite on the Triton backend. Without a GPU the kernels run in the interpreter, one per core
# (pytest-xdist, longest tests first: tests/python_layers/conftest.py); about 80 minutes on 2 cores.
test-triton: setup
	EIDETIC_BACKEND=triton $(PY) -m pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 --durations=20 tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m python_layers.demo

bench: setup
	$(PY) -m pytest -q benchmarks/test_cpu_bench.py --benchmark-only --benchmark-columns=min,median,iqr,rounds --benchmark-json=benchmarks/results/last-cpu.json
	$(PY) -m benchmarks.cpu_report benchmarks/results/last-cpu.json
	$(PY) -m benchmarks.tasks_curve
	$(PY) -m benchmarks.distributed_scaling
	$(PY) -m benchmarks.plot

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
