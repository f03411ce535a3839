"""Functions that torch.compile must not compile, with torch._dynamo imported only when one runs.

The CPU engine's backward passes run eagerly under torch.compile: autograd calls an autograd Function's backward
(and a tensor hook) after a compiled step broke at ``loss.backward()``, while torch.compile still compiles every
Python frame that runs then. It would try to compile these frames, warn about the C++ extension inside (the batch
norm's), and break the graph around them, for nothing: the CPU engine plans its work on the host and runs eagerly
anyway (``layers._run_eagerly``).

``torch.compiler.disable`` imports torch._dynamo, which takes longer than importing torch itself; applied when
a module is imported, it would make every ``import eidetic_kernels`` pay for it. ``compile_disabled`` uses
torch's own lazy form of it (``torch._disable_dynamo``, which torch applies to its own functions for the same
reason): torch._dynamo is imported on the first call. Its wrapper lives in torch's files, which torch.compile
never compiles, so the wrapper's frame costs no compilation either.
"""
from __future__ import annotations

import torch

_lazy_disable = getattr(torch, "_disable_dynamo", None)


def compile_disabled(fn=None, *, reason: str | None = None):
    """``fn`` with torch.compile's frame compilation off (``torch.compiler.disable``), torch._dynamo imported on
    the first call. ``reason``: what torch shows when ``fullgraph=True`` stops there. Usable as
    ``@compile_disabled`` or ``@compile_disabled(reason=...)``."""
    if fn is None:
        return lambda f: compile_disabled(f, reason=reason)
    if _lazy_disable is None:  # a torch without the lazy form: the import is paid now
        return torch.compiler.disable(fn)
    wrapped = _lazy_disable(fn)
    # what torch.compiler.disable marks: torch.compile skips the wrapper where it meets it, naming ``reason``
    # under fullgraph=True
    wrapped._torchdynamo_disable = True
    wrapped._torchdynamo_disable_msg = reason
    return wrapped


def eager_backward(fn):
    """``fn`` (a backward or a gradient hook of the CPU engine) with torch.compile's frame compilation off."""
    return compile_disabled(fn)
