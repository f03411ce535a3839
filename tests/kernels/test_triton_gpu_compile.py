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
import torch

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
    # every launch states its fused multiply-adds (a finished task's bits must not follow Triton's default)
    assert all(e["options"].get("enable_fp_fusion") is True for e in report)
    gemm = {"_linear_fwd_kernel", "_linear_dx_kernel", "_linear_dw_kernel", "_conv_fwd_kernel", "_conv_dx_kernel",
            "_conv_dw_kernel"}
    assert {e["kernel"] for e in report if e["variant"] == "tf32" and e["target"] == "sm_90"} == gemm
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
    # batch norm's statistics and normalisation divide and take square roots correctly rounded, as torch does
    normalising = {"_bn_stats_kernel", "_bn_finalize_kernel", "_bn_norm_kernel", "_bn_update_running_kernel"}
    assert not [(e["kernel"], e["target"], e["approx_math"]) for e in report
                if e["kernel"] in normalising and e["approx_math"]]
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


def test_products_over_frozen_synapses_run_exact_fp32_whatever_the_tf32_flags_say(monkeypatch):
    """On a GPU, fp32 products follow torch's TF32 flags as the twins do, but a forward launch that reads stored
    frozen synapses runs exact: the flags are global and any later code may flip them, which would change a finished
    task's outputs. Every launch of the host functions is recorded (no kernel runs), with the precision they would
    ask for on a GPU where TF32 is allowed."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from eidetic_kernels.ops import triton_common
    from eidetic_kernels.ops.batch_norm import triton as bn
    from eidetic_kernels.ops.conv2d import triton as conv
    from eidetic_kernels.ops.linear import triton as lin
    from tests.kernels.launches import exercise

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((getattr(self, "__name__", None) or self.fn.__name__, args, kwargs))

    def on_a_gpu_with_tf32(dtype, device, conv=False, frozen=False):
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
                return triton_common.dot_precision(dtype, torch.device("cuda"), conv=conv, frozen=frozen)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    for module in (lin, conv, bn):
        monkeypatch.setattr(module, "DENSE_SHORTCUT", module.DENSE_SHORTCUT)  # restored after exercise's change
    monkeypatch.setattr(lin, "dot_precision", on_a_gpu_with_tf32)
    monkeypatch.setattr(conv, "dot_precision", on_a_gpu_with_tf32)
    monkeypatch.setattr(JITFunction, "run", record)
    monkeypatch.setattr(InterpretedFunction, "run", record)
    exercise(torch.float32)
    forwards = [(name, args, kw) for name, args, kw in launches if name in ("_linear_fwd_kernel", "_conv_fwd_kernel")]
    frozen = [args[2] is not args[1] for _, args, _ in forwards]  # the frozen storage, or the trainable as a dummy
    assert forwards and all(frozen)  # the recorded cases all hold a finished task
    for (name, args, kw), reads_frozen in zip(forwards, frozen):
        assert kw["PREC"] == ("ieee" if reads_frozen else "tf32"), (name, kw["PREC"])
    gradients = [kw["PREC"] for name, _, kw in launches if name.endswith(("dx_kernel", "dw_kernel"))
                 and name.startswith(("_linear", "_conv"))]
    assert gradients and set(gradients) == {"tf32"}  # gradients reach no finished output: they follow the flags
    assert {kw.get("enable_fp_fusion") for _, _, kw in launches} == {True}
    # a product over trainable rows alone follows the flags, as the twin's does
    for is_conv in (False, True):
        assert on_a_gpu_with_tf32(torch.float32, None, conv=is_conv) == "tf32"
        assert on_a_gpu_with_tf32(torch.float32, None, conv=is_conv, frozen=True) == "ieee"


def test_kernels_launch_on_their_tensors_device_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device; torch's ops follow their tensors. A layer on cuda:1 while cuda:0
    is current must launch on cuda:1: every host function that launches makes its first tensor's device current
    (fake CUDA tensors stand for the GPU here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eidetic_kernels.ops import triton_common
    from eidetic_kernels.ops.batch_norm import triton as bn
    from eidetic_kernels.ops.conv2d import triton as conv
    from eidetic_kernels.ops.linear import triton as lin

    entered = []

    class Device:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    seen = []

    @triton_common.on_tensor_device
    def host(x, n):
        seen.append(list(entered))
        return n

    with FakeTensorMode():
        on_1, on_0, none = torch.empty(3, device="cuda:1"), torch.empty(3, device="cuda:0"), torch.empty(3)
    assert host(on_1, 7) == 7 and seen[-1] == [torch.device("cuda:1")] and entered[-1] is None
    entered.clear()
    host(on_0, 1), host(none, 1), host(None, 1)
    assert entered == [] and seen[-3:] == [[], [], []]
    for fn in (lin.linear_forward, lin.linear_input_grad, lin.linear_weight_grad, conv.conv_forward,
               conv.conv_input_grad, conv.conv_weight_grad, bn.bn_forward, bn.bn_backward, triton_common.add_taylor):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__  # each launcher runs on its tensors' device
