"""Test-wide set-up.

``make test`` runs on two workers (pytest-xdist, ``-n 2 --maxschedchunk 1``); the longest tests are scheduled
first so that the workers finish together instead of one of them running a long test alone at the end.

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


def _interpreted_triton() -> bool:
    return os.environ.get("EIDETIC_BACKEND", "").strip().lower() == "triton" and not torch.cuda.is_available()


def _schedule_rank(item) -> int:
    """Lower runs first: the conv trainings under the Triton interpreter (5-15 minutes each there, ResNet's the
    longest), then the tests marked ``slow`` (minutes on the default backend: the GPU compile check, the
    Split MNIST router trainings), then the rest in pytest's order."""
    if _interpreted_triton() and item.get_closest_marker("trains_conv_body"):
        return 0 if "resnet" in item.nodeid else 1
    return 2 if item.get_closest_marker("slow") else 3


def pytest_collection_modifyitems(config, items):
    items.sort(key=_schedule_rank)  # stable: pytest's order within each rank
