"""A network's bytes (parameters + buffers) against its torch.nn twin: within 2% while nothing is frozen,
below the twin's once tasks finish (frozen rows keep only their live synapses)."""
import torch

from tests.flops import make_finished_mlp


def _bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def test_network_bytes_within_two_percent_of_twin_then_below_it():
    sizes = {}
    for tasks in (0, 1, 4):
        model, twin = make_finished_mlp(width=256, tasks=tasks, share=0.1, seed=tasks)
        sizes[tasks] = _bytes(model) / _bytes(twin)
    assert sizes[0] <= 1.02, sizes
    assert sizes[1] < 1.0 and sizes[4] < sizes[1], sizes
