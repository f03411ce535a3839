"""Kept for tools that still call setup.py; the configuration lives in pyproject.toml.

The C++ backend (csrc/) is built on first use with torch.utils.cpp_extension (ninja), not here,
so installing never needs a compiler.
"""
from setuptools import setup

setup()
