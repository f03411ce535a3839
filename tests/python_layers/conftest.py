"""Under ``EIDETIC_BACKEND=triton`` without a GPU every op runs in the Triton interpreter (a fraction of a
millisecond per operation of each program), and the whole suite runs there: ``make test-triton`` (both cores,
about an hour on 2 cores). Two things differ from a run on a GPU or on the default CPU backends:

* The tests that train on thousands of MNIST images (marker ``trains_on_mnist``) measure the task router's
  accuracy, which does not depend on the backend. Under the interpreter their body trains on the default CPU
  backend (``EIDETIC_BACKEND`` is unset for them): on the interpreted kernels they took 62 of the suite's 147
  worker-minutes. The kernels' training is covered by every other training test, the conv bodies included.
* The tests that run ``train_task`` on a conv body for several tasks with pruning (``trains_conv_body``, 5-15
  minutes each there) are scheduled first, ResNet first (``tests/conftest.py``).

``-m "not trains_conv_body"`` leaves the conv trainings out for a quicker interpreted run.
"""
import os

import pytest
import torch

INTERPRETED_TRITON = os.environ.get("EIDETIC_BACKEND", "").strip().lower() == "triton" and not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:  # pytest passes every collected item here, not only this folder's
        if "tests/python_layers/" in item.nodeid.replace("\\", "/"):
            # the network wires every consumer before it freezes: a frozen neuron cut from a FREE input is a bug
            # (first, so that a test building such states by hand can ignore it with its own mark)
            item.add_marker(pytest.mark.filterwarnings("error::eidetic_kernels.FreeInputsWarning"), append=False)


@pytest.fixture(autouse=True)
def _router_accuracy_on_the_default_backend(request, monkeypatch):
    if INTERPRETED_TRITON and request.node.get_closest_marker("trains_on_mnist"):
        monkeypatch.delenv("EIDETIC_BACKEND")
