"""The two helpers the whole normalization family shares.

``moments``      mean and (biased) variance over some axes, numerically stable;
``standardize``  x̂ = (x − μ) · rstd with rstd = 1 / sqrt(σ² + ε)  (eps *inside* the sqrt);
``standardize_backward``  the input gradient of x̂ given the gradient of x̂.

Batch norm reduces over every axis but the channel, layer norm over the trailing axes, group norm
over (channels of a group × spatial) of one sample: each member only picks the axes.
"""

from __future__ import annotations

import numpy as np

from bnlab.functional._layout import accumulation_dtype


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
    # Inf − Inf = NaN is the expected outcome for a non-finite batch; callers check the
    # statistics with np.isfinite, so numpy's "invalid value" warning would only be noise.
    with np.errstate(invalid="ignore"):
        mean = xa.mean(axis=axes, keepdims=True, dtype=acc)
        d = xa - mean
        correction = d.mean(axis=axes, keepdims=True, dtype=acc)
        var = (d * d).mean(axis=axes, keepdims=True, dtype=acc) - correction * correction
        np.maximum(var, 0, out=var)
    return mean + correction, var


def inverse_std(var: np.ndarray, eps: float) -> np.ndarray:
    """rstd = 1 / sqrt(var + eps)."""
    return 1.0 / np.sqrt(var + var.dtype.type(eps))


def standardize(x: np.ndarray, mean: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """x̂ = (x − μ) · rstd, computed in the statistics' dtype."""
    return (x.astype(mean.dtype, copy=False) - mean) * rstd


def standardize_backward(
    dxhat: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, axes: tuple[int, ...]
) -> np.ndarray:
    """Gradient through x̂ = (x − μ)·rstd where μ, σ² are statistics over ``axes`` (M values).

        dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))

    The two means are over ``axes``; this is cs231n's closed form divided through by M.
    """
    mean_dxhat = dxhat.mean(axis=axes, keepdims=True)
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


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
