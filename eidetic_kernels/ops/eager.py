"""The CPU engine's backward passes run eagerly under torch.compile.

Autograd calls an autograd Function's backward (and a tensor hook) after a compiled step broke at
``loss.backward()``, while torch.compile still compiles every Python frame that runs then: it would try to compile
these frames, warn about the C++ extension inside (the batch norm's), and break the graph around them, for
nothing: the CPU engine plans its work on the host and runs eagerly anyway (``layers._run_eagerly``).
"""
from __future__ import annotations

import torch


def eager_backward(fn):
    """``fn`` (a backward or a gradient hook of the CPU engine) with torch.compile's frame compilation off."""
    return torch.compiler.disable(fn)
