"""Loader for the optional C++ CPU backend (csrc/). Absent or failed build -> reference path."""
from __future__ import annotations


def unavailable_reason(op: str) -> str | None:
    return "the C++ backend is not built in this version"
