"""Shared data of the tests/functional suite: backends, shapes per layout, random problems.

Tolerances are not here: they are stated once in :mod:`bnlab.check` (``TOLERANCES``,
``DTYPE_TOLERANCES``, ``dtype_tolerance``) and imported by every test.
"""

from __future__ import annotations

import numpy as np

from bnlab.backend import numba_available
from bnlab.functional._layout import LAYOUTS, get_layout

#: Every backend batch norm can run on here; numba joins when the kernels are installed.
BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])

LAYOUT_NAMES = list(LAYOUTS)

#: Per layout: C=1, N=2 and odd sizes (small: numeric gradients cost 2 forwards per element).
GRAD_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "NC": [(2, 1), (2, 3), (5, 4)],
    "NCL": [(2, 1, 3), (3, 4, 5)],
    "NLC": [(2, 3, 1), (3, 5, 4)],
    "NCHW": [(2, 1, 3, 3), (3, 4, 3, 1), (2, 3, 1, 5)],
    "NHWC": [(2, 3, 3, 1), (3, 1, 3, 4), (2, 5, 1, 3)],
}

LAYOUT_SHAPES = [(lay, shape) for lay, shapes in GRAD_SHAPES.items() for shape in shapes]


def channels(shape, layout) -> int:
    return shape[get_layout(layout).channel_axis]


def to_channels_first(a: np.ndarray, layout: str) -> np.ndarray:
    """Move the channel axis to 1 (what torch and the textbook formulas expect)."""
    return np.moveaxis(a, get_layout(layout).channel_axis, 1)


def random_affine(rng, c, dtype=np.float64):
    """γ around 1 and β around 0, never exactly 1 and 0 (so a dropped γ or β is visible)."""
    return (rng.standard_normal(c) * 0.5 + 1.0).astype(dtype), rng.standard_normal(c).astype(dtype)


def random_buffers(rng, c, dtype=np.float64):
    """running_mean, running_var: non-trivial starting values (var > 0)."""
    return (rng.standard_normal(c) * 0.5).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype)
