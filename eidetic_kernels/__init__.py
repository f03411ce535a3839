"""eidetic_kernels: masked ops and drop-in layers with per-neuron task state.

Public names: the layers, FREE, PRUNED, convert, functional, rebind_optimizer, the errors and warnings layers raise.
"""
from . import functional
from .functional import InputError, InputTypeError
from .layers import (EideticBatchNorm1d, EideticBatchNorm2d, EideticConv2d, EideticLayer, EideticLinear,
                     FreeInputsWarning, convert)
from .replaced import StaleOptimizerError, rebind_optimizer
from .state import FREE, MAX_TASK, PRUNED

__all__ = ["EideticLinear", "EideticConv2d", "EideticBatchNorm1d", "EideticBatchNorm2d", "EideticLayer",
           "convert", "functional", "FREE", "PRUNED", "MAX_TASK", "rebind_optimizer", "StaleOptimizerError",
           "InputError", "InputTypeError", "FreeInputsWarning"]
__version__ = "0.1.0"
