#!/usr/bin/env bash
# The whole GPU check in one script: the test suite on the Triton backend, then the GPU benchmark
# (benchmarks/gpu.py), whose CSV and summary go to benchmarks/results/ named with the GPU and the date, then the
# kernel profile (benchmarks/gpu_profile.py, a text file beside them).
#
#   benchmarks/gpu_check.sh            # on a CUDA machine; commit the CSV/.md it writes
#   benchmarks/gpu_check.sh --quick    # anywhere: the Triton kernel tests under the interpreter on CPU
#                                      # tensors, then the benchmark's tiny layer shapes (a smoke run, no
#                                      # numbers; about 4 minutes on 2 idle CPU cores)
#   benchmarks/gpu_check.sh [--quick] -- --eidetic-backends triton   # arguments after -- go to the benchmark
#
# EIDETIC_BACKEND=triton applies to the test steps only. The benchmark chooses its backends itself: it times the
# eidetic layers on Triton and on the reference backend in the same run (providers eidetic and eidetic-reference,
# see benchmarks/README.md), forcing each row's backend; --eidetic-backends after -- limits them.
#
# PY (default: .venv/bin/python when it exists, else python) picks the interpreter. A failing step does not stop
# the later ones (a GPU is lent rarely: the benchmark still runs after a failed test); the exit status is the
# first failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
usage="usage: benchmarks/gpu_check.sh [--quick] [-- BENCHMARK_ARGS...]"
quick=0
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
started=$(date +%s)
status=0
step() {  # run one step; remember the first failure and go on
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check: step failed (exit $rc): $*" >&2
    if [ "$status" -eq 0 ]; then status=$rc; fi
  fi
}
if [ "$quick" = 1 ]; then
  export TRITON_INTERPRET=1
  echo "== kernel tests, Triton interpreter (CPU), EIDETIC_BACKEND=triton =="
  step env EIDETIC_BACKEND=triton "$PY" -m pytest -q -x tests/kernels -m "triton and not slow" -p no:cacheprovider
  echo "== benchmark smoke run (tiny layer shapes, Triton interpreter + reference backend; the end-to-end models"
  echo "   take too long in the interpreter) =="
  step env -u EIDETIC_BACKEND "$PY" -m benchmarks.gpu --quick --only linear,conv2d,batchnorm2d ${bench_args[@]+"${bench_args[@]}"}
  echo "== kernel profile smoke run (tiny shapes, reference backend) =="
  step env -u EIDETIC_BACKEND "$PY" -m benchmarks.gpu_profile --quick --backends reference > /dev/null
else
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; use --quick for the interpreter smoke run" >&2
    exit 2
  fi
  "$PY" -c "import torch, triton; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)"
  echo "== test suite, EIDETIC_BACKEND=triton =="
  # up to 10 failures, not 1: a GPU is lent rarely, and each failure found there is news; the slowest tests are
  # listed, for the next run's time budget
  step env EIDETIC_BACKEND=triton "$PY" -m pytest -q --maxfail=10 --durations=15 tests -p no:cacheprovider
  echo "== benchmark (eidetic on Triton and on the reference backend) =="
  step env -u EIDETIC_BACKEND "$PY" -m benchmarks.gpu --out-dir benchmarks/results ${bench_args[@]+"${bench_args[@]}"}
  echo "== kernel profile (benchmarks/gpu_profile.py: which kernels take the time, half of each layer frozen) =="
  step env -u EIDETIC_BACKEND "$PY" -m benchmarks.gpu_profile > /dev/null
fi
echo "gpu_check: done in $(( $(date +%s) - started )) s (exit $status)"
exit "$status"
