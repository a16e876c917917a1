"""Group normalization (and instance norm, its ``num_groups == C`` case).

The C channels are split into G groups of C/G; statistics are per sample and group over
(C/G channels × spatial positions):

    x viewed as (N, G, C/G · S):   μ, σ² over the last axis,  x̂ = (x − μ)/sqrt(σ² + ε)
    y = γ_c · x̂ + β_c            (γ, β per channel, shape (C,))

Any layout: the channel axis is moved to position 1 for the grouped view and back afterwards.

Two backends (``backend=``, :mod:`bnlab.backend`): ``"numpy"`` is the reference below;
``"numba"`` runs ``bnlab.kernels.gn_forward/gn_backward`` on the channels-first (N, C, S) view
(NC, NCL, NCHW) and caches x, mean and rstd (:class:`NormKernelCache`). The kernels do not cover
channels-last layouts (NLC, NHWC): those take the reference on either backend. Validation happens
once, before the dispatch, so both backends raise the same errors.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional import _dispatch
from bnlab.functional import _validate as v
from bnlab.functional._layout import check_input
from bnlab.functional.layer_norm import NormKernelCache, normalize_backward
from bnlab.functional.stats import NormCache, accumulation_dtype, normalize_forward


def _group_views(shape, channel_axis, num_groups):
    """Functions mapping an input-shaped array to the (N, G, C/G·S) view and back."""
    n, c = shape[0], shape[channel_axis]
    moved = (n, c) + tuple(s for a, s in enumerate(shape) if a not in (0, channel_axis))

    def to_view(a):
        return np.moveaxis(a, channel_axis, 1).reshape(n, num_groups, -1)

    def from_view(a):
        return np.moveaxis(a.reshape(moved), 1, channel_axis)

    return to_view, from_view


def group_norm_forward(
    x,
    num_groups,
    gamma=None,
    beta=None,
    eps: float = 1e-5,
    layout="NCHW",
    *,
    backend: str | None = None,
):
    """Group norm forward; returns ``(out, cache)``. x in ``layout``; gamma, beta (C,) or None.

    ``backend``: ``"numpy"`` (the reference) or ``"numba"`` (kernels for channels-first layouts;
    channels-last ones fall back to the reference); None: the default backend (the kernels from
    a measured size on, see ``docs/kernels.md``).

    The kernels' cache keeps x by reference (the reference's keeps x̂): keep x unchanged until
    the backward, or pass a copy; a backward that finds x modified raises
    :class:`~bnlab.errors.InputModifiedError` instead of returning wrong gradients.
    """
    lay = check_input(x, layout)
    eps = v.check_eps(eps)
    choice = _dispatch.choose(backend, "group_norm", "train", x.size)
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
    if choice.backend == "numba" and not lay.channels_last:
        return _group_norm_kernel(x, int(num_groups), gamma, beta, eps, acc)
    g = None if gamma is None else lay.per_channel(gamma.astype(acc, copy=False))
    b = None if beta is None else lay.per_channel(beta.astype(acc, copy=False))
    to_view, from_view = _group_views(x.shape, lay.channel_axis, int(num_groups))
    y, cache, _, _ = normalize_forward(x, (2,), to_view, from_view, g, b, lay.reduce_axes, eps)
    return y, cache


def _group_norm_kernel(x, groups, gamma, beta, eps, acc):
    """Channels-first (NC, NCL, NCHW) input as the kernels' (N, C, S) view."""
    n, c = x.shape[0], x.shape[1]
    g = None if gamma is None else gamma.astype(acc, copy=False)
    b = None if beta is None else beta.astype(acc, copy=False)
    g64 = np.ones(c) if g is None else g.astype(np.float64)
    b64 = np.zeros(c) if b is None else b.astype(np.float64)
    run = _dispatch.gn_kernels(x.reshape(n, c, -1), groups, g64, b64, eps, None)
    cache = NormKernelCache("group_norm", run.x, run.mean, run.rstd, g, groups, (c,), x.shape,
                            x.dtype, fingerprint=run.fingerprint)  # fmt: skip
    return run.y.reshape(x.shape), cache


def group_norm_backward(dout, cache: NormCache | NormKernelCache):
    """Group norm backward: (dx, dgamma, dbeta) with dgamma/dbeta of shape (C,)."""
    return normalize_backward(dout, cache)


def instance_norm_forward(
    x, gamma=None, beta=None, eps: float = 1e-5, layout="NCHW", *, backend: str | None = None
):
    """Instance norm = group norm with one channel per group (statistics per sample and channel).
    Same backends and the same contract on x as :func:`group_norm_forward`."""
    lay = check_input(x, layout)
    return group_norm_forward(
        x, x.shape[lay.channel_axis], gamma, beta, eps, layout, backend=backend
    )


def instance_norm_backward(dout, cache: NormCache | NormKernelCache):
    return normalize_backward(dout, cache)


__all__ = [
    "NormCache",
    "NormKernelCache",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward",
]
