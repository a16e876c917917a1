"""Layer normalization: statistics per sample over the trailing ``normalized_shape`` axes.

For x of shape (*, *normalized_shape), k = len(normalized_shape), M = prod(normalized_shape):

    μ, σ² over the last k axes (biased),  x̂ = (x − μ)/sqrt(σ² + ε),  y = γ ⊙ x̂ + β

γ, β have shape ``normalized_shape`` (elementwise affine, as in ``torch.nn.LayerNorm``).
No running statistics: training and inference compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import accumulation_dtype, check_float_array
from bnlab.functional.stats import inverse_std, moments, standardize, standardize_backward


@dataclass
class NormCache:
    """Cache of layer/group norm: x̂ and rstd in the grouped view, plus how to undo the view."""

    xhat: np.ndarray  # standardized input, in the *normalization view* (see to_view)
    rstd: np.ndarray  # 1/sqrt(σ² + ε), keepdims in the normalization view
    gamma: np.ndarray | None  # affine weight, broadcastable against the input
    stat_axes: tuple[int, ...]  # axes of the view reduced for the statistics
    param_axes: tuple[int, ...]  # axes of the input summed for dgamma/dbeta
    input_shape: tuple[int, ...]
    dtype: np.dtype
    to_view: object  # input-shaped array -> normalization view
    from_view: object  # normalization view -> input-shaped array


def normalize_forward(x, stat_axes, to_view, from_view, gamma_b, beta_b, param_axes, eps):
    """Shared forward of the per-sample norms: standardize in a view, apply the affine outside."""
    xv = to_view(x)
    mean, var = moments(xv, stat_axes)
    rstd = inverse_std(var, eps)
    xhat = standardize(xv, mean, rstd)
    y = from_view(xhat)
    if gamma_b is not None:
        y = y * gamma_b
    if beta_b is not None:
        y = y + beta_b
    cache = NormCache(
        xhat, rstd, gamma_b, stat_axes, param_axes, x.shape, x.dtype, to_view, from_view
    )
    return y.astype(x.dtype, copy=False), cache, mean, var


def normalize_backward(dout, cache: NormCache):
    """Shared backward: (dx, dgamma, dbeta); dgamma/dbeta are None without affine parameters."""
    check_float_array(dout, "dout")
    if dout.shape != cache.input_shape:
        raise ShapeError(f"dout must have the shape of x {cache.input_shape}, got {dout.shape}")
    d = dout.astype(cache.xhat.dtype, copy=False)
    xhat = cache.from_view(cache.xhat)
    dgamma = dbeta = None
    if cache.gamma is not None:
        dgamma = (d * xhat).sum(axis=cache.param_axes)
        dbeta = d.sum(axis=cache.param_axes)
        d = d * cache.gamma
    dx = standardize_backward(cache.to_view(d), cache.xhat, cache.rstd, cache.stat_axes)
    return cache.from_view(dx).astype(cache.dtype, copy=False), dgamma, dbeta


def _identity(a):
    return a


def _as_shape(normalized_shape) -> tuple[int, ...]:
    """An int or a sequence of ints (NumPy integers too), as a tuple of Python ints."""
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        shape = None
    if not shape or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape
    ):
        raise ShapeError(
            f"normalized_shape must be an int or a non-empty sequence of ints, "
            f"got {normalized_shape!r}"
        )
    return tuple(int(s) for s in shape)


def layer_norm_forward(x, normalized_shape, gamma=None, beta=None, eps: float = 1e-5):
    """Layer norm forward; returns ``(out, cache)``.

    Args:
        x: (*, *normalized_shape) float array.
        normalized_shape: int or tuple, the trailing shape to normalize over.
        gamma, beta: arrays of shape ``normalized_shape`` or None.
    """
    check_float_array(x, "x")
    eps = v.check_eps(eps)
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k :]) != shape:
        raise ShapeError(
            f"normalized_shape {shape} must equal the trailing dims of x, got x shape {x.shape}"
        )
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None:
            check_float_array(p, name)
            if p.shape != shape:
                raise ShapeError(f"{name} must have shape {shape}, got {p.shape}")
    acc = accumulation_dtype(x.dtype)
    axes = tuple(range(x.ndim - k, x.ndim))
    param_axes = tuple(range(x.ndim - k))
    g = None if gamma is None else gamma.astype(acc, copy=False)
    b = None if beta is None else beta.astype(acc, copy=False)
    y, cache, _, _ = normalize_forward(x, axes, _identity, _identity, g, b, param_axes, eps)
    return y, cache


def layer_norm_backward(dout, cache: NormCache):
    """Layer norm backward: (dx, dgamma, dbeta); see :func:`standardize_backward`."""
    return normalize_backward(dout, cache)
