"""Under ``EIDETIC_BACKEND=triton`` without a GPU every op runs in the Triton interpreter (~0.5 ms per
program). Training a conv body for three tasks then takes minutes per test, so those tests are skipped
there; the conv kernels themselves are covered by tests/kernels/test_triton_*.py, and the MLP and the
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
    skip = pytest.mark.skip(reason="trains a conv body: minutes per test under the Triton interpreter "
                                   "(run it on a GPU, or with the default backend)")
    for item in items:
        if item.get_closest_marker("trains_conv_body"):
            item.add_marker(skip)
