"""bnlab: batch normalization and its family, correct, explained, fast and checkable.

``import bnlab`` needs only NumPy; torch, matplotlib and numba are imported where used.
"""

from bnlab.backend import get_backend, set_backend
from bnlab.conventions import PRESETS, convert_momentum, convert_running_stats, get_convention

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "__version__",
    "convert_momentum",
    "convert_running_stats",
    "get_backend",
    "get_convention",
    "set_backend",
]
