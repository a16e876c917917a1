"""Checks of the values ``Module.load_state_dict`` receives, and its ``IncompatibleKeys`` result."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bnlab.errors import DTypeError


def state_problem(value: np.ndarray, slot: np.ndarray, finite: bool = True) -> str | None:
    """Shape, kind and (``finite``) finiteness of a loaded value against the slot it goes into:
    float slots take floats only (integers would be cast silently), integer slots integers."""
    if value.shape != slot.shape:
        return f"expected shape {slot.shape}, got {value.shape}"
    if slot.dtype.kind == "f":
        if value.dtype.kind != "f":
            return f"expected a floating-point array, got dtype {value.dtype}"
        if finite and not np.isfinite(value).all():
            return "contains NaN or Inf"
    elif value.dtype.kind not in "iu":
        return f"expected an integer array, got dtype {value.dtype}"
    return None


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def as_numpy(value, key: str) -> np.ndarray:
    """Accept ndarrays and anything with ``.detach().cpu().numpy()`` (a torch tensor)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    if isinstance(value, (int, float, np.number)):
        return np.asarray(value)
    raise DTypeError(f"state_dict[{key!r}] must be a numpy array, got {type(value).__name__}")
