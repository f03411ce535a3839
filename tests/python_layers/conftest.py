"""Under ``EIDETIC_BACKEND=triton`` without a GPU every op runs in the Triton interpreter (a fraction of a
millisecond per operation of each program). The tests that run ``train_task`` on a conv body for several tasks
with pruning (``trains_conv_body``: 2-10 minutes each there) and those that train on thousands of MNIST images
(``trains_on_mnist``: the router's accuracy) are skipped there; the conv kernels are covered by
tests/kernels/test_triton_*.py, and the conv bodies of test_finish_rules (every finish-task and bit rule on
CNN, ResNet, bottleneck and raw-input-BN bodies), the CLI's conv bodies and the test_network conv/ResNet
bit-stability tests run end to end on the interpreted kernels. ``EIDETIC_RUN_ALL=1`` runs the skipped ones
too. On a GPU, or with the default CPU backends, they all run.
"""
import os

import pytest
import torch

INTERPRETED_TRITON = os.environ.get("EIDETIC_BACKEND", "").strip().lower() == "triton" and not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not INTERPRETED_TRITON or os.environ.get("EIDETIC_RUN_ALL", "") not in ("", "0"):
        return
    reasons = {"trains_conv_body": "train_task on a conv body for several tasks: minutes per test under the Triton "
                                   "interpreter (run it on a GPU, with the default backend, or EIDETIC_RUN_ALL=1)",
               "trains_on_mnist": "trains on thousands of MNIST images: tens of minutes under the Triton interpreter "
                                  "(what it measures does not depend on the backend; run it on a GPU or with the "
                                  "default backend)"}
    for item in items:
        for marker, reason in reasons.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
