"""Group-norm kernels for channels-first input (N, C, S), written entirely with the batch-norm core
on views, plus (C,)-sized bookkeeping:

    statistics   core.channel_moments on (1, N·G, C/G·S): one "channel" per (sample, group)
    forward      core.affine on (1, N·C, S) with per-(sample, channel) coefficients
                 μ_{n,g(c)},  a = rstd_{n,g}·γ_c,  b = β_c:   y = (x − μ)·a + b
    backward     core.channel_grad_sums on (1, N·C, S): Σdy, Σdy·(x − μ) per (n, c); then
                 dβ_c = Σ_n Σdy,   dγ_c = Σ_n rstd·Σdy·(x − μ)
                 a_{n,g} = Σ_{c∈g} γ_c·Σdy,   b_{n,g} = Σ_{c∈g} γ_c·rstd·Σdy·(x − μ)
                 dx = A·dy + B·(x − μ) + D  with A = rstd·γ_c, B = −rstd²·b/M, D = −rstd·a/M
                 (M = C/G·S values per group): core.backward_elementwise on (1, N·C, S)

Instance norm is the case G = C. Channels-last input is not handled here (the per-group reduction
would mix samples in the channels-last core); use the NumPy reference or a channels-first copy.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError

from . import core
from .batch_norm import (
    _check_array,
    _check_eps,
    _check_nonempty,
    _check_out,
    _check_vec,
    _compute_dtype,
    _result,
    _work_out,
    acc_dtype,
)

_CF = "(N, C, S)"


def _groups(num_groups, c: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of C={c}, got {num_groups}")
    return int(num_groups)


def _param(v, name: str, c: int, fill: float) -> np.ndarray:
    return np.full(c, fill) if v is None else _check_vec(v, name, c)


def _rows(a: np.ndarray) -> np.ndarray:
    """(N, C, S) -> (1, N·C, S): every (sample, channel) row becomes a kernel "channel"."""
    n, c, s = a.shape
    return a.reshape(1, n * c, s)


def gn_forward(x3, num_groups, weight, bias, eps, out=None):
    """Group-norm forward on (N, C, S): returns (y3, mean (N, G), rstd (N, G)), the statistics in
    the accumulation dtype; weight/bias (C,) or None."""
    x = _check_array(x3, "x3", 3, _CF)
    _check_nonempty(x)
    n, c, s = x.shape
    groups = _groups(num_groups, c)
    g, b = _param(weight, "weight", c, 1.0), _param(bias, "bias", c, 0.0)
    eps = _check_eps(eps)
    xw = _compute_dtype(x)
    buf = _check_out(_work_out(x, xw, out), xw)
    mean, var = core.channel_moments(xw.reshape(1, n * groups, -1), False)
    rstd = 1.0 / np.sqrt(var + eps)
    per_row = c // groups
    a = np.repeat(rstd, per_row) * np.tile(g, n)
    core.affine(_rows(xw), np.repeat(mean, per_row), a, np.tile(b, n), False, _rows(buf))
    acc = acc_dtype(x.dtype)
    stats = (mean.reshape(n, groups).astype(acc), rstd.reshape(n, groups).astype(acc))
    return _result(buf, out, x.dtype), *stats


def gn_backward(dy3, x3, mean, rstd, weight, num_groups, dx=None):
    """Group-norm backward on (N, C, S): returns (dx3, dweight (C,), dbias (C,)); mean/rstd are
    the (N, G) statistics of :func:`gn_forward`; weight None means γ = 1."""
    x = _check_array(x3, "x3", 3, _CF)
    dy = _check_array(dy3, "dy3", 3, _CF)
    if dy.shape != x.shape:
        raise ShapeError(f"dy3 must have the shape of x3 {x.shape}, got {dy.shape}")
    _check_nonempty(x)
    n, c, s = x.shape
    groups = _groups(num_groups, c)
    mu = _check_vec(np.asarray(mean).reshape(-1), "mean", n * groups)
    rs = _check_vec(np.asarray(rstd).reshape(-1), "rstd", n * groups)
    g = _param(weight, "weight", c, 1.0)
    xw = _compute_dtype(x)
    dyw = dy if dy.dtype == xw.dtype else dy.astype(xw.dtype)
    buf = _check_out(_work_out(x, xw, dx, "dx"), xw, "dx")
    per_row = c // groups
    mu_nc, rstd_nc, g_nc = np.repeat(mu, per_row), np.repeat(rs, per_row), np.tile(g, n)
    sum_dy, sum_dyxmu = core.channel_grad_sums(_rows(dyw), _rows(xw), mu_nc, False)
    dyxhat = rstd_nc * sum_dyxmu  # Σ dy·x̂ per (n, c)
    a = (g_nc * sum_dy).reshape(n * groups, per_row).sum(axis=1)
    bsum = (g_nc * dyxhat).reshape(n * groups, per_row).sum(axis=1)
    m = per_row * s
    coef_a = rstd_nc * g_nc
    coef_b = -rstd_nc * rstd_nc * np.repeat(bsum, per_row) / m
    coef_d = -rstd_nc * np.repeat(a, per_row) / m
    core.backward_elementwise(
        _rows(dyw), _rows(xw), mu_nc, coef_a, coef_b, coef_d, False, _rows(buf)
    )
    acc = acc_dtype(x.dtype)
    dgamma = dyxhat.reshape(n, c).sum(axis=0).astype(acc)
    dbeta = sum_dy.reshape(n, c).sum(axis=0).astype(acc)
    return _result(buf, dx, x.dtype), dgamma, dbeta
