"""python_layers: Eidetic Learning on top of eidetic_kernels.

EideticNetwork trains tasks one after another without forgetting: the layer graph of its body is
traced (graph.py), each task is pruned and frozen (trainer.py, pruning.py), and a router picks the
task when none is given (routing.py).
"""
from .graph import GraphError, LayerGraph, NeuronGroup, Segment, declare_graph, trace_body
from .network import (BodyChangedWarning, CapacityError, CapacityWarning, EideticNetwork, HookedTrainingWarning,
                      LossyCastWarning)

__all__ = ["EideticNetwork", "BodyChangedWarning", "CapacityError", "CapacityWarning", "HookedTrainingWarning", "LossyCastWarning", "LayerGraph", "NeuronGroup", "Segment", "GraphError", "trace_body",
           "declare_graph"]
