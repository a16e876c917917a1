"""Small argument helpers shared by the layer files (plain if/raise, never assert)."""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError, ShapeError


def pair(value, name: str, minimum: int = 0) -> tuple[int, int]:
    """An int or a pair of ints -> (int, int), each >= minimum."""
    vals = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(vals) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in vals):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(vals[0]), int(vals[1])


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise DTypeError(f"dtype must be a floating dtype (float32 or float64), got {dt}")
    return dt


def check_x(x, ndim: int | tuple[int, ...], name: str, what: str) -> np.ndarray:
    """x must be a float ndarray with ``ndim`` dims (``what`` describes the expected shape)."""
    if not isinstance(x, np.ndarray):
        raise DTypeError(f"{name}: input must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise DTypeError(f"{name}: input must have a floating dtype, got {x.dtype}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in ndims:
        raise ShapeError(f"{name}: input must be {what}, got shape {x.shape}")
    return x


def check_dout(dout, shape: tuple[int, ...], name: str) -> np.ndarray:
    if not isinstance(dout, np.ndarray) or dout.shape != tuple(shape):
        got = getattr(dout, "shape", type(dout).__name__)
        raise ShapeError(f"{name}.backward: dout must have the output shape {shape}, got {got}")
    return dout


def use_numba() -> bool:
    """The engine's own kernels follow bnlab's backend switch (``bnlab.set_backend``)."""
    from bnlab.backend import get_backend

    return get_backend() == "numba"
