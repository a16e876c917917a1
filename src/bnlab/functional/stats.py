"""The statistics and normalize helpers the whole normalization family shares.

``accumulation_dtype``  the dtype statistics are accumulated in (functional and kernels alike);
``moments``             mean and (biased) variance over some axes, numerically stable;
``normalize``           x̂ = (x − μ) · rstd with rstd = 1 / sqrt(σ² + ε)  (eps *inside* the sqrt);
``normalize_backward``  the input gradient of x̂ given the gradient of x̂;
``normalize_forward`` / ``normalize_grads``  the per-sample norms (layer, group, instance) on a
                        view of x, with their elementwise affine and :class:`NormCache`.

Batch norm reduces over every axis but the channel, layer norm over the trailing axes, group norm
over (channels of a group × spatial) of one sample: each member only picks the axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def accumulation_dtype(dtype) -> np.dtype:
    """Statistics are accumulated in float64 for float64 input, float32 otherwise (float16 too).
    Either byte order: ``np.dtype(">f8") == np.float64`` is False, its ``.type`` is np.float64."""
    return np.dtype(np.float64) if np.dtype(dtype).type is np.float64 else np.dtype(np.float32)


def moments(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x`` over ``axes`` (kept as size-1 dims).

    Two passes with a compensation term, in the accumulation dtype (float32 for float16/32):

        μ  = mean(x)
        d  = x − μ
        σ² = mean(d²) − mean(d)²     (the second term cancels the rounding error of μ)

    Unlike E[x²] − E[x]², this does not lose every digit when |mean| ≫ std.
    """
    acc = accumulation_dtype(x.dtype)
    xa = x.astype(acc, copy=False)
    m = acc.type(reduction_size(x.shape, axes))
    # Inf − Inf = NaN is the expected outcome for a non-finite batch; callers check the
    # statistics with np.isfinite, so numpy's "invalid value" warning would only be noise.
    with np.errstate(invalid="ignore"):
        mean = _sum(xa, axes) / m
        d = xa - mean
        correction = _sum(d, axes) / m
        var = _sum(d * d, axes) / m - correction * correction
        np.maximum(var, 0, out=var)
    return mean + correction, var


def _sum(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Σ a over ``axes``, kept as size-1 dims (``np.add.reduce``: ``a.mean`` costs ~6 µs of
    Python per call, more than the arithmetic of a cs231n-sized batch)."""
    return np.add.reduce(a, axis=axes, keepdims=True)


def inverse_std(var: np.ndarray, eps: float) -> np.ndarray:
    """rstd = 1 / sqrt(var + eps)."""
    return 1.0 / np.sqrt(var + var.dtype.type(eps))


def standardize(x: np.ndarray, mean: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """x̂ = (x − μ) · rstd, computed in the statistics' dtype."""
    return (x.astype(mean.dtype, copy=False) - mean) * rstd


def normalize(x: np.ndarray, axes: tuple[int, ...], eps: float):
    """(x̂, μ, σ², rstd) over ``axes`` (statistics keepdims, in the accumulation dtype)."""
    mean, var = moments(x, axes)
    rstd = inverse_std(var, eps)
    return standardize(x, mean, rstd), mean, var, rstd


def normalize_backward(
    dxhat: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, axes: tuple[int, ...]
) -> np.ndarray:
    """Gradient through x̂ = (x − μ)·rstd where μ, σ² are statistics over ``axes`` (M values).

        dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))

    The two means are over ``axes``; this is cs231n's closed form divided through by M.
    """
    m = dxhat.dtype.type(reduction_size(dxhat.shape, axes))
    mean_dxhat = _sum(dxhat, axes) / m
    mean_dxhat_xhat = _sum(dxhat * xhat, axes) / m
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


standardize_backward = normalize_backward  # the name bnlab.functional has always exported


def reduction_size(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """How many values each statistic is computed from (a Python int: never overflows)."""
    n = 1
    for a in axes:
        n *= int(shape[a])
    return n


def pool_moments(
    means: np.ndarray, variances: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and biased variance of the union of G groups from their moments (Chan et al.):

        M = Σ_g m_g      μ = Σ_g m_g·μ_g / M      σ² = Σ_g m_g·(σ²_g + (μ_g − μ)²) / M

    ``means``, ``variances``: (G, C) per-group mean and biased variance; ``counts``: (G,) values
    per channel in each group. Returns (μ (C,), σ² (C,), M), float64. Equal to the moments of the
    concatenated groups up to rounding (used by diagnosis, recalibration and SyncBN).
    """
    m = np.asarray(counts, np.float64).reshape(-1, 1)
    mu_g = np.asarray(means, np.float64)
    var_g = np.asarray(variances, np.float64)
    total = float(m.sum())
    mean = (m * mu_g).sum(axis=0) / total
    var = (m * (var_g + (mu_g - mean) ** 2)).sum(axis=0) / total
    return mean, var, total


# --------------------------------------------------------------------------- per-sample norms


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
    """The per-sample norms' forward: normalize in a view, the affine outside it.
    Returns (y, NormCache, mean, var)."""
    xhat, mean, var, rstd = normalize(to_view(x), stat_axes, eps)
    y = from_view(xhat)
    if gamma_b is not None:
        y = y * gamma_b
    if beta_b is not None:
        y = y + beta_b
    cache = NormCache(
        xhat, rstd, gamma_b, stat_axes, param_axes, x.shape, x.dtype, to_view, from_view
    )
    return y.astype(x.dtype, copy=False), cache, mean, var


def normalize_grads(dout, cache: NormCache):
    """The per-sample norms' backward: (dx, dgamma, dbeta), dgamma/dbeta None without affine."""
    d = dout.astype(cache.xhat.dtype, copy=False)
    xhat = cache.from_view(cache.xhat)
    dgamma = dbeta = None
    if cache.gamma is not None:
        dgamma = (d * xhat).sum(axis=cache.param_axes)
        dbeta = d.sum(axis=cache.param_axes)
        d = d * cache.gamma
    dx = normalize_backward(cache.to_view(d), cache.xhat, cache.rstd, cache.stat_axes)
    return cache.from_view(dx).astype(cache.dtype, copy=False), dgamma, dbeta
