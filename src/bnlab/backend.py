"""The backend switch: which implementation computes the normalization family.

``"numba"``  multi-core kernels in :mod:`bnlab.kernels` (the default when numba imports);
``"numpy"``  the readable reference in :mod:`bnlab.functional` (always available).

The switch is explicit state, set by :func:`set_backend` or overridden per call with ``backend=``.
It never changes *what* is computed (same conventions, same validation, same errors), only how.
A backend named either way is used for every call; the default (never set) runs the kernels only
from a measured input size on, the reference below it (``bnlab.functional._dispatch.choose``;
``bnlab.kernels.explain`` says which runs and why).
"""

from __future__ import annotations

import functools
import importlib.util
import os

BACKENDS = ("numpy", "numba")

_state = {"backend": None, "explicit": False}


@functools.cache
def numba_available() -> bool:
    """True when numba is installed and bnlab's kernels package is present (looked up once:
    installing a package does not change a running process)."""
    return (
        importlib.util.find_spec("numba") is not None
        and importlib.util.find_spec("bnlab.kernels") is not None
    )


def _default_backend() -> str:
    return "numba" if numba_available() else "numpy"


def get_backend() -> str:
    """The backend used when a call passes ``backend=None``."""
    if _state["backend"] is None:
        _state["backend"] = _default_backend()
    return _state["backend"]


def set_backend(name: str) -> None:
    """Select the default backend: ``"numba"`` or ``"numpy"``. A backend chosen here is used
    for every call, whatever its size (see :func:`requested_backend`)."""
    _state["backend"] = resolve_backend(name)
    _state["explicit"] = True


def resolve_backend(name: str | None) -> str:
    """Validate a ``backend=`` argument; ``None`` means the current default."""
    if name is None:
        return get_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "numba" and not numba_available():
        raise ValueError("backend='numba' was requested but numba is not installed")
    return name


def requested_backend(name: str | None) -> tuple[str, bool]:
    """(backend, explicit) for a ``backend=`` argument: explicit when the call names a backend
    or :func:`set_backend` chose one. The default (numba when it imports, never set) is not
    explicit: ``bnlab.functional`` then runs the NumPy reference for inputs below the measured
    break-even size, where the kernels' fixed costs exceed the work (see
    ``bnlab.functional._dispatch``)."""
    if name is None:
        return get_backend(), bool(_state["explicit"])
    return resolve_backend(name), True


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
