"""Kernel and layer tests build neuron states directly, FREE inputs of frozen neurons included (to check that
frozen neurons never read them): the warning a user gets for that at ``freeze_free_neurons`` is expected here
(ignored, unless a test's own filterwarnings mark says otherwise: this one is applied first)."""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernels/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::eidetic_kernels.FreeInputsWarning"), append=False)
