"""Group normalization (and instance norm, its ``num_groups == C`` case).

The C channels are split into G groups of C/G; statistics are per sample and group over
(C/G channels × spatial positions):

    x viewed as (N, G, C/G · S):   μ, σ² over the last axis,  x̂ = (x − μ)/sqrt(σ² + ε)
    y = γ_c · x̂ + β_c            (γ, β per channel, shape (C,))

Any layout: the channel axis is moved to position 1 for the grouped view and back afterwards.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import accumulation_dtype, check_input
from bnlab.functional.layer_norm import NormCache, normalize_backward, normalize_forward


def _group_views(shape, channel_axis, num_groups):
    """Functions mapping an input-shaped array to the (N, G, C/G·S) view and back."""
    n, c = shape[0], shape[channel_axis]
    moved = (n, c) + tuple(s for a, s in enumerate(shape) if a not in (0, channel_axis))

    def to_view(a):
        return np.moveaxis(a, channel_axis, 1).reshape(n, num_groups, -1)

    def from_view(a):
        return np.moveaxis(a.reshape(moved), 1, channel_axis)

    return to_view, from_view


def group_norm_forward(x, num_groups, gamma=None, beta=None, eps: float = 1e-5, layout="NCHW"):
    """Group norm forward; returns ``(out, cache)``. x in ``layout``; gamma, beta (C,) or None."""
    lay = check_input(x, layout)
    eps = v.check_eps(eps)
    c = x.shape[lay.channel_axis]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of C={c}, got {num_groups}")
    if x.shape[0] == 0 or x.size == 0:
        raise ShapeError(f"x must not be empty, got shape {x.shape}")
    v.check_vector(gamma, "gamma", c)
    v.check_vector(beta, "beta", c)
    acc = accumulation_dtype(x.dtype)
    g = None if gamma is None else lay.per_channel(gamma.astype(acc, copy=False))
    b = None if beta is None else lay.per_channel(beta.astype(acc, copy=False))
    to_view, from_view = _group_views(x.shape, lay.channel_axis, int(num_groups))
    y, cache, _, _ = normalize_forward(x, (2,), to_view, from_view, g, b, lay.reduce_axes, eps)
    return y, cache


def group_norm_backward(dout, cache: NormCache):
    """Group norm backward: (dx, dgamma, dbeta) with dgamma/dbeta of shape (C,)."""
    return normalize_backward(dout, cache)


def instance_norm_forward(x, gamma=None, beta=None, eps: float = 1e-5, layout="NCHW"):
    """Instance norm = group norm with one channel per group (statistics per sample and channel)."""
    lay = check_input(x, layout)
    return group_norm_forward(x, x.shape[lay.channel_axis], gamma, beta, eps, layout)


def instance_norm_backward(dout, cache: NormCache):
    return normalize_backward(dout, cache)


__all__ = [
    "NormCache",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward",
]
