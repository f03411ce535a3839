"""Test-wide set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here (a user's explicit setting wins).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 results are compared with tight tolerances: no TF32 in the references (cuDNN allows it by
    # default) nor in the kernels (they follow the same flags, as the torch.nn twins do)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.interpreter import speed_up_interpreter

    speed_up_interpreter()

# Tiny shapes: one thread is faster than two fighting over two cores, and timings stay steady in CI.
torch.set_num_threads(1)
