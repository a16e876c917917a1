"""bnlab: batch normalization and its family, correct, explained, fast and checkable.

``import bnlab`` needs only NumPy; torch, matplotlib and numba are imported where used.
"""

import os as _os

# numba's parallel kernels and OpenBLAS/torch share the OpenMP runtime. With its default (active)
# wait policy an idle worker spins for a while after each parallel region and steals the core from
# the next region of the other library: measured on 2 cores, LeNet-BN training with 2 threads ran
# at 6.5k examples/s instead of 16k. It only takes effect if set before the runtime starts, so it
# is set (unless the user chose a policy) when bnlab is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bnlab.backend import get_backend, set_backend  # noqa: E402
from bnlab.conventions import (  # noqa: E402
    PRESETS,
    convert_momentum,
    convert_running_stats,
    get_convention,
)

# Functions named like their modules: bind after the submodule import so `bnlab.diagnose(...)` and
# `bnlab.recalibrate(...)` are the functions (both modules import only NumPy).
from bnlab.diagnose import diagnose  # noqa: E402
from bnlab.recalibrate import recalibrate  # noqa: E402

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
