"""Argument checks shared by the functional API. Plain ``if``/``raise``: never ``assert``."""

from __future__ import annotations

import math

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.functional._layout import check_float_array
from bnlab.functional.running import NONFINITE_POLICIES


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    if not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum, allow_none: bool = True) -> float | None:
    if momentum is None:
        if allow_none:
            return None
        raise ValueError("momentum must be a float in [0, 1], got None")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not (0.0 <= float(momentum) <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return float(momentum)


def check_training(training) -> bool:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    return bool(training)


def check_policy(on_nonfinite: str) -> str:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    return on_nonfinite


def check_vector(v, name: str, size: int, *, writable: bool = False) -> np.ndarray | None:
    """A per-channel vector: None, or a float ndarray of shape (size,)."""
    if v is None:
        return None
    check_float_array(v, name)
    if v.shape != (size,):
        raise ShapeError(
            f"{name} must have shape ({size},) to match the {size} channels of x, got {v.shape}"
        )
    if writable and not v.flags.writeable:
        raise ValueError(f"{name} must be writable: it is updated in place during training")
    return v


def check_counter(num_batches_tracked) -> np.ndarray | None:
    """The batch counter used by momentum=None: a 0-d integer ndarray updated in place."""
    if num_batches_tracked is None:
        return None
    if not (
        isinstance(num_batches_tracked, np.ndarray)
        and num_batches_tracked.shape == ()
        and np.issubdtype(num_batches_tracked.dtype, np.integer)
    ):
        raise DTypeError(
            "num_batches_tracked must be a 0-d integer numpy array (e.g. np.array(0)), "
            f"got {num_batches_tracked!r}"
        )
    return num_batches_tracked


def check_out(out, like: np.ndarray, name: str = "out") -> np.ndarray | None:
    """An optional output buffer of ``like``'s shape and dtype, writable."""
    return check_output(out, like.shape, like.dtype, name)


def check_output(out, shape, dtype, name: str = "out") -> np.ndarray | None:
    """An optional output buffer of ``shape`` and ``dtype``, writable."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ShapeError(
            f"{name} must be an ndarray of shape {tuple(shape)} and dtype {dtype}, got {got}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writable: the result is written into it")
    return out
