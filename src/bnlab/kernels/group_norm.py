"""Group-norm kernels for channels-first input (N, C, S): one task per (sample, group) block of
C/G·S contiguous values, one launch per pass (see :mod:`._group_blocks` for the formulas), plus
(C,)-sized bookkeeping here: checks, float16 staging, dγ = Σ_n rstd·Σdy·(x − μ), dβ = Σ_n Σdy.

Instance norm is the case G = C. Channels-last input is not handled here (a group is not
contiguous there); use the NumPy reference or a channels-first copy.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError

from . import _chunks, _group_blocks, core
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
    mean, rstd = np.empty((n, groups)), np.empty((n, groups))
    with core.threads_for(2 * x.size):
        _group_blocks.gn_forward_blocks(xw, groups, g, b, eps, _chunks.SEGMENT, mean, rstd, buf)
    acc = acc_dtype(x.dtype)
    return _result(buf, out, x.dtype), mean.astype(acc), rstd.astype(acc)


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
    mu = _check_vec(np.asarray(mean).reshape(-1), "mean", n * groups).reshape(n, groups)
    rs = _check_vec(np.asarray(rstd).reshape(-1), "rstd", n * groups).reshape(n, groups)
    g = _param(weight, "weight", c, 1.0)
    xw = _compute_dtype(x)
    dyw = dy if dy.dtype == xw.dtype else dy.astype(xw.dtype)
    buf = _check_out(_work_out(x, xw, dx, "dx"), xw, "dx")
    p_dy, p_dyxmu = np.empty((n, c)), np.empty((n, c))
    with core.threads_for(3 * x.size):
        _group_blocks.gn_backward_blocks(dyw, xw, groups, mu, rs, g, p_dy, p_dyxmu, buf)
    acc = acc_dtype(x.dtype)
    dgamma = (np.repeat(rs, c // groups, axis=1) * p_dyxmu).sum(axis=0).astype(acc)
    dbeta = p_dy.sum(axis=0).astype(acc)
    return _result(buf, dx, x.dtype), dgamma, dbeta
