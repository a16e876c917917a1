"""Argument checks of the kernels' own API (``bn_*``, ``ln_*``, ``gn_*``).

The kernels index raw memory and numba does not bounds-check, so every array that reaches them
is checked first: its type, dtype, number of dimensions, the length of each per-channel vector,
and a caller's output buffer (shape, dtype, C-contiguous, writable: it is written, never
replaced). Errors name the argument and say what was expected. (``bnlab.functional`` validates
its own arguments and calls the kernels through the seam, not through these.)
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.functional._validate import check_eps

FLOATS = (np.float16, np.float32, np.float64)


def array(a, name: str, ndim: int, what: str) -> np.ndarray:
    """A float16/32/64 ndarray of ``ndim`` dimensions (any strides, any byte order)."""
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.type not in FLOATS:
        raise DTypeError(f"{name} must be float16, float32 or float64, got {a.dtype}")
    if a.ndim != ndim:
        raise ShapeError(f"{name} must be a {ndim}-D {what} view, got shape {a.shape}")
    return a


def nonempty(a: np.ndarray, name: str) -> None:
    if a.size == 0:
        raise ShapeError(f"{name} must not be empty, got shape {a.shape}")


def view3(x3, name: str, channels_last: bool, empty_ok: bool = False) -> tuple[np.ndarray, int]:
    """A 3-D (N, C, S) or (N, S, C) view and its channel count."""
    x = array(x3, name, 3, "(N, C, S) or (N, S, C)")
    if not empty_ok:
        nonempty(x, name)
    return x, x.shape[2] if channels_last else x.shape[1]


def like(a, name: str, x: np.ndarray) -> np.ndarray:
    """A second input of x's shape (dy)."""
    a = array(a, name, x.ndim, "array")
    if a.shape != x.shape:
        raise ShapeError(f"{name} must have the shape of x {x.shape}, got {a.shape}")
    return a


def vector(v, name: str, n: int) -> np.ndarray:
    """A (n,) per-channel (or per-row) float vector, returned as float64."""
    if not isinstance(v, np.ndarray) or v.dtype.type not in FLOATS:
        raise DTypeError(f"{name} must be a float numpy.ndarray of shape ({n},), got {v!r}")
    if v.shape != (n,):
        raise ShapeError(f"{name} must have shape ({n},), got {v.shape}")
    return v.astype(np.float64)


def optional_vector(v, name: str, n: int, fill: float) -> np.ndarray:
    """:func:`vector`, or ``fill`` repeated when v is None (no affine parameter)."""
    return np.full(n, fill) if v is None else vector(v, name, n)


def eps(value) -> float:
    return check_eps(value)


def out(buffer, x: np.ndarray, name: str) -> None:
    """A caller's output buffer: x's shape and dtype, C-contiguous, writable (or None)."""
    if buffer is None:
        return
    ok = (
        isinstance(buffer, np.ndarray)
        and buffer.shape == x.shape
        and buffer.dtype == x.dtype
        and buffer.flags.c_contiguous
        and buffer.flags.writeable
    )
    if not ok:
        got = (getattr(buffer, "shape", None), getattr(buffer, "dtype", type(buffer).__name__))
        raise ShapeError(
            f"{name} must be a writable C-contiguous ndarray of shape {x.shape} and dtype "
            f"{x.dtype}, got {got}"
        )
