"""Functions that torch.compile must not compile, with torch._dynamo imported only when one runs.

The CPU engine's backward passes run eagerly under torch.compile: autograd calls an autograd Function's backward
(and a tensor hook) after a compiled step broke at ``loss.backward()``, while torch.compile still compiles every
Python frame that runs then. It would try to compile these frames, warn about the C++ extension inside (the batch
norm's), and break the graph around them, for nothing: the CPU engine plans its work on the host and runs eagerly
anyway (``layers._run_eagerly``).

``torch.compiler.disable`` imports torch._dynamo, which takes longer than importing torch itself; applied when
a module is imported, it would make every ``import eidetic_kernels`` pay for it. ``compile_disabled`` defers it
to the first call after torch.compile was imported (as torch's own ``torch._disable_dynamo`` does).
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch


def compile_disabled(fn=None, *, reason: str | None = None):
    """``fn`` with torch.compile's frame compilation off (``torch.compiler.disable``), built on the first call.

    ``reason``: what torch shows when ``fullgraph=True`` stops there (torch >= 2.7; ignored before). Usable as
    ``@compile_disabled`` or ``@compile_disabled(reason=...)``."""
    if fn is None:
        return functools.partial(compile_disabled, reason=reason)
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:  # torch.compile is not in use: nothing to turn off
                return fn(*args, **kwargs)
            kwargs_disable = {}
            if reason is not None and "reason" in inspect.signature(torch.compiler.disable).parameters:
                kwargs_disable["reason"] = reason
            disabled = torch.compiler.disable(fn, **kwargs_disable)
        return disabled(*args, **kwargs)

    # what torch.compiler.disable marks: torch.compile skips ``call`` itself (with ``reason`` under fullgraph=True)
    # when it meets it before its first call
    call._torchdynamo_disable = True
    call._torchdynamo_disable_msg = reason
    return call


def eager_backward(fn):
    """``fn`` (a backward or a gradient hook of the CPU engine) with torch.compile's frame compilation off."""
    return compile_disabled(fn)
