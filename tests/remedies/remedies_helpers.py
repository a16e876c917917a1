"""Helpers shared by the remedies tests (imported by module name; pytest puts this folder on
sys.path because the test folders have no ``__init__.py``)."""

from __future__ import annotations

import numpy as np

from bnlab.check import numeric_gradient


def numeric_grad(loss, arr: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``loss()`` with respect to every entry of ``arr``
    (modified in place and restored)."""
    return numeric_gradient(loss, arr, 1.0, h)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max(|a|, |b|, 1e-8), cs231n-style but over the whole array."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-8))
