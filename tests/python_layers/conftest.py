"""Under ``EIDETIC_BACKEND=triton`` without a GPU every op runs in the Triton interpreter (~0.5 ms per
program). Training a conv body for three tasks then takes minutes per test, so those tests are skipped
there, as are the tests that train on thousands of MNIST images (``trains_on_mnist``: the router's accuracy);
the conv kernels themselves are covered by tests/kernels/test_triton_*.py, and the MLP and the
test_network conv/ResNet bit-stability tests still run end to end on the interpreted kernels. On a GPU,
or with the default CPU backends, they all run.
"""
import os

import pytest
import torch

INTERPRETED_TRITON = os.environ.get("EIDETIC_BACKEND", "").strip().lower() == "triton" and not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not INTERPRETED_TRITON:
        return
    reasons = {"trains_conv_body": "trains a conv body: minutes per test under the Triton interpreter (run it on a "
                                   "GPU, or with the default backend)",
               "trains_on_mnist": "trains on thousands of MNIST images: tens of minutes under the Triton interpreter "
                                  "(what it measures does not depend on the backend; run it on a GPU or with the "
                                  "default backend)"}
    for item in items:
        for marker, reason in reasons.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
