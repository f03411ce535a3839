"""Warnings that point at the user's line: ``warnings.warn(..., stacklevel=user_stacklevel())``.

A warning raised inside ``python_layers`` may be reached through several of its own frames (``model.train_task``
-> ``trainer.train_task`` -> ``finish_task``) and through torch's ``no_grad`` decorator; a fixed stacklevel points
at one of those for some callers. This one skips them all, and torch's ``Module.__call__`` frames.
"""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# torch's decorators, and Module.__call__ (a warning raised inside a forward points at the user's model(x))
_TORCH_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"),
                   os.path.join("torch", "nn", "modules", "module.py"))


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame, above the caller of ``warnings.warn``, outside this package and
    torch's decorator wrappers (1: the caller itself, when it is the user's code)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep)
                                 or frame.f_code.co_filename.endswith(_TORCH_WRAPPERS)):
        frame, level = frame.f_back, level + 1
    return level
