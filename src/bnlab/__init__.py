"""bnlab: batch normalization and its family, correct, explained, fast and checkable.

``import bnlab`` needs only NumPy; torch, matplotlib and numba are imported where used, and it
changes no process-wide setting (environment, thread counts).
"""

from bnlab.backend import get_backend, set_backend
from bnlab.conventions import (
    PRESETS,
    convert_momentum,
    convert_running_stats,
    get_convention,
)

# Functions named like their modules: bind after the submodule import so `bnlab.diagnose(...)` and
# `bnlab.recalibrate(...)` are the functions (both modules import only NumPy).
from bnlab.diagnose import diagnose
from bnlab.recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "__version__",
    "convert_momentum",
    "convert_running_stats",
    "diagnose",
    "get_backend",
    "get_convention",
    "recalibrate",
    "set_backend",
]
