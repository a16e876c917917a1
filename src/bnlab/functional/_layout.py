"""Layouts: where the channel axis is, and which axes a batch norm reduces over.

====== ===== ============ ===========================
layout ndim  channel axis  batch-norm reduction axes
====== ===== ============ ===========================
NC     2     1            (0,)
NCL    3     1            (0, 2)
NLC    3     2            (0, 1)
NCHW   4     1            (0, 2, 3)
NHWC   4     3            (0, 1, 2)
====== ===== ============ ===========================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from bnlab.errors import DTypeError, ShapeError


@dataclass(frozen=True)
class Layout:
    name: str
    ndim: int
    channel_axis: int

    @property
    def axes_description(self) -> str:
        """``"(N, C, H, W)"`` for NCHW: the expected shape spelled out for error messages."""
        return "(" + ", ".join(self.name) + ")"

    # Cached: these are read on every call of every norm (a layout is one of five constants).
    @cached_property
    def channels_last(self) -> bool:
        return self.channel_axis == self.ndim - 1 and self.ndim > 2

    @cached_property
    def reduce_axes(self) -> tuple[int, ...]:
        """Every axis but the channel axis: what batch norm averages over."""
        return tuple(a for a in range(self.ndim) if a != self.channel_axis)

    @cached_property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(a for a in self.reduce_axes if a != 0)

    @cached_property
    def _channel_shape(self) -> tuple[int, ...]:
        return tuple(-1 if a == self.channel_axis else 1 for a in range(self.ndim))

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector (C,) against an input of this layout."""
        return self._channel_shape

    def per_channel(self, v: np.ndarray) -> np.ndarray:
        """View a (C,) vector so that it broadcasts along this layout's channel axis."""
        return v.reshape(self._channel_shape)


LAYOUTS: dict[str, Layout] = {
    "NC": Layout("NC", 2, 1),
    "NCL": Layout("NCL", 3, 1),
    "NLC": Layout("NLC", 3, 2),
    "NCHW": Layout("NCHW", 4, 1),
    "NHWC": Layout("NHWC", 4, 3),
}

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def get_layout(layout: str) -> Layout:
    """Look up a layout by name; a clear error lists the valid names."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}") from None


def check_float_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as an ndarray of float16/32/64; anything else is a DTypeError naming it."""
    if not isinstance(x, np.ndarray):
        raise DTypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.type not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name} must have a floating dtype (float16, float32 or float64), got {x.dtype}"
        )
    return x


def check_input(x, layout: str | Layout, name: str = "x") -> Layout:
    """Validate an input tensor against a layout name and return the Layout."""
    lay = get_layout(layout)
    check_float_array(x, name)
    if x.ndim != lay.ndim:
        raise ShapeError(
            f"{name} must be {lay.ndim}-D {lay.axes_description} for layout {lay.name!r}, "
            f"got shape {x.shape} ({x.ndim}-D)"
        )
    return lay
