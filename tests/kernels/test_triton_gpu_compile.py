"""Every Triton kernel compiles for real GPUs (sm_90, sm_80) with the signatures and constexprs its host
functions launch with (fp32, fp16, bf16; every tile configuration), on this machine, without a GPU: the
checks only the real compiler makes. Registers, shared memory and spills are reported (printed with -s or
in the failure message); spills are not asserted (the linear and conv kernels at their GPU tiles read rows at
per-row storage offsets, which costs registers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_linear_fwd_kernel", "_linear_dx_kernel", "_linear_dw_kernel", "_conv_fwd_kernel", "_conv_dx_kernel",
           "_conv_dw_kernel", "_bn_stats_kernel", "_bn_norm_kernel", "_bn_bwd_reduce_kernel",
           "_bn_bwd_finalize_kernel", "_bn_dx_kernel", "_bn_finalize_kernel", "_bn_update_running_kernel",
           "taylor_kernel"}


@pytest.mark.slow  # minutes: ptxas on every kernel variant for two targets
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton build cannot compile for NVIDIA GPUs ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile", "--targets", "90,80", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {e["kernel"] for e in report} == KERNELS
    assert all(e["ok"] for e in report)
    for kernel in ("_linear_fwd_kernel", "_conv_fwd_kernel"):  # each dtype compiled for each target
        for target in ("sm_90", "sm_80"):
            dtypes = {d for e in report if e["kernel"] == kernel and e["target"] == target for d in e["dtypes"]}
            assert {"*fp32", "*fp16", "*bf16"} <= dtypes, (kernel, target, dtypes)
    for kernel in ("_linear_fwd_kernel", "_linear_dx_kernel", "_linear_dw_kernel", "_conv_fwd_kernel",
                   "_conv_dx_kernel", "_conv_dw_kernel"):
        # a network's task-major tables compile without the gather/map paths, scattered ones with them
        variants = {e["constexprs"].get("SCATTERED") for e in report if e["kernel"] == kernel}
        assert {"True", "False"} <= variants, (kernel, variants)
    for kernel in ("_linear_dx_kernel", "_conv_dx_kernel"):
        # 16-bit runs on a float32 table (autocast) launch with float32's COLS, beside their own
        for target in ("sm_90", "sm_80"):
            cols = {e["constexprs"]["BLOCK_K"] for e in report
                    if e["kernel"] == kernel and e["target"] == target and "*bf16" in e["dtypes"]}
            assert len(cols) == 2, (kernel, target, cols)
    worst = sorted(report, key=lambda e: -e["spill_bytes"])[:5]
    print("most spilling:", [(e["kernel"], e["target"], e["dtypes"][0], e["spill_bytes"]) for e in worst])
    print("most shared memory:", max((e["shared_bytes"], e["kernel"], e["target"]) for e in report))
    # how the GEMM kernels read their operands at the GPU tiles (scalar loads: far below tensor-core rate)
    for e in report:
        if e["target"] == "sm_90" and e["kernel"].endswith(("fwd_kernel", "dx_kernel", "dw_kernel")):
            assert e["loads_scalar"] + e["loads_vector"] + e["cp_async"] > 0, e
    print("global loads (sm_90, scalar/vector/cp.async):",
          sorted({(e["kernel"], e["loads_scalar"], e["loads_vector"], e["cp_async"]) for e in report
                  if e["target"] == "sm_90"}))
