"""Group norm on a channels-first (N, C, S) view; instance norm is the case G = C.

A group of sample n is one contiguous block of M = (C/G)·S values (channels c ∈ g, each a row
of S). One path (``gn-blocks``): a task per (sample, group) reduces its block and writes it while
it is in cache:

    forward   μ, σ² of the block (shifted lane sums);  rstd = 1/√(σ² + ε)
              y[c] = (x[c] − μ)·(rstd·γ_c) + β_c                 per channel row of the block
    backward  per channel row: Σdy, Σdy·(x − μ) → p_dy[n, c], p_dyxmu[n, c]   (float64)
              a = Σ_c γ_c·Σdy,  b = Σ_c γ_c·rstd·Σdy·(x − μ)                 (per group)
              dx[c] = A_c·dy + B·(x − μ) + D,  A_c = rstd·γ_c,  B = −rstd²·b/M,  D = −rstd·a/M

then dγ = Σ_n rstd·Σdy·(x − μ) and dβ = Σ_n Σdy, summed over n in order. The elementwise parts
are batch norm's two expressions (:mod:`._elementwise`). Channels-last group norm is not
covered (a group is not contiguous there): the functional API runs the reference for it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnlab.errors import ShapeError

from . import _checks
from ._compile import kernel
from ._elementwise import affine_row, dx_row
from ._stream import store_fence
from ._sums import lane_grad_sums, lane_sums, lanes_total, summary, variance
from .paths import LANES, Plan


@njit(cache=True, inline="always")
def _forward_block(x, i, grp, groups, g, b, eps, stream, mean, rstd, out):
    """Statistics of the (sample i, group grp) block, then its output while it is in cache."""
    _, c, s = x.shape
    per = c // groups
    block = x[i].reshape(c * s)[grp * per * s : (grp + 1) * per * s]
    k = np.float64(block[0])
    acc1 = np.zeros(LANES)
    acc2 = np.zeros(LANES)
    lane_sums(block, k, acc1, acc2, LANES)
    m, mu, m2 = summary(np.float64(per * s), k, acc1, acc2)
    r = 1.0 / np.sqrt(variance(m, m2) + eps)
    mean[i, grp] = mu
    rstd[i, grp] = r
    t = x.dtype.type
    mc = t(mu)
    for ch in range(grp * per, (grp + 1) * per):
        affine_row(x[i, ch], mc, t(r * g[ch]), t(b[ch]), out[i, ch], stream)
    if stream:
        store_fence()


@kernel
def gn_forward_blocks(x, groups, g, b, eps, stream, mean, rstd, out):
    """Fills mean, rstd (N, G) float64 and out; g, b (C,) float64."""
    for task in prange(x.shape[0] * groups):
        i, grp = task // groups, task % groups
        _forward_block(x, i, grp, groups, g, b, eps, stream, mean, rstd, out)


@njit(cache=True, inline="always")
def _backward_block(dy, x, i, grp, groups, mean, rstd, g, stream, p_dy, p_dyxmu, dx):
    """Per-channel sums of the (i, grp) block, then its dx while it is in cache."""
    _, c, s = x.shape
    per = c // groups
    m = np.float64(per * s)
    t = x.dtype.type
    mu = mean[i, grp]
    r = rstd[i, grp]
    acc1 = np.empty(LANES)
    acc2 = np.empty(LANES)
    a = 0.0
    bsum = 0.0
    for ch in range(grp * per, (grp + 1) * per):
        acc1[:] = 0.0
        acc2[:] = 0.0
        lane_grad_sums(dy[i, ch], x[i, ch], mu, acc1, acc2, LANES)
        s1 = lanes_total(acc1)
        s2 = lanes_total(acc2)
        p_dy[i, ch] = s1
        p_dyxmu[i, ch] = s2
        a += g[ch] * s1
        bsum += g[ch] * r * s2
    cb, cd, mc = t(-r * r * bsum / m), t(-r * a / m), t(mu)
    for ch in range(grp * per, (grp + 1) * per):
        dx_row(dy[i, ch], x[i, ch], mc, t(r * g[ch]), cb, cd, dx[i, ch], stream)
    if stream:
        store_fence()


@kernel
def gn_backward_blocks(dy, x, groups, mean, rstd, g, stream, p_dy, p_dyxmu, dx):
    """Fills dx and the (N, C) partials Σdy, Σdy·(x − μ) (float64)."""
    for task in prange(x.shape[0] * groups):
        i, grp = task // groups, task % groups
        _backward_block(dy, x, i, grp, groups, mean, rstd, g, stream, p_dy, p_dyxmu, dx)


# --------------------------------------------------------------------------- runners


def run_forward(x3, groups: int, g, b, eps: float, p: Plan, stream: bool, out3):
    """Forward into out3; returns (mean, rstd) float64 (N, G)."""
    n = x3.shape[0]
    mean, rstd = np.empty((n, groups)), np.empty((n, groups))
    gn_forward_blocks(p.parallel, x3, groups, g, b, eps, stream, mean, rstd, out3)
    return mean, rstd


def run_backward(dy3, x3, groups: int, mean, rstd, g, p: Plan, stream: bool, dx3):
    """Backward into dx3; returns (dγ, dβ) float64 (C,)."""
    n, c, _ = x3.shape
    p_dy, p_dyxmu = np.empty((n, c)), np.empty((n, c))
    gn_backward_blocks(p.parallel, dy3, x3, groups, mean, rstd, g, stream, p_dy, p_dyxmu, dx3)
    dgamma = (np.repeat(rstd, c // groups, axis=1) * p_dyxmu).sum(axis=0)
    return dgamma, p_dy.sum(axis=0)


# --------------------------------------------------------------------------- public, checked

_CF = "(N, C, S)"


def check_groups(num_groups, c: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of C={c}, got {num_groups}")
    return int(num_groups)


def gn_forward(x3, num_groups, weight, bias, eps, out=None):
    """Group-norm forward on (N, C, S): returns (y3, mean (N, G), rstd (N, G)), the statistics
    in the accumulation dtype; weight/bias (C,) or None."""
    from bnlab.functional import _dispatch

    x = _checks.array(x3, "x3", 3, _CF)
    _checks.nonempty(x, "x3")
    c = x.shape[1]
    groups = check_groups(num_groups, c)
    g = _checks.optional_vector(weight, "weight", c, 1.0)
    b = _checks.optional_vector(bias, "bias", c, 0.0)
    eps = _checks.eps(eps)
    _checks.out(out, x, "out")
    run = _dispatch.gn_kernels(x, groups, g, b, eps, out)
    return run.y, run.mean, run.rstd


def gn_backward(dy3, x3, mean, rstd, weight, num_groups, dx=None):
    """Group-norm backward on (N, C, S): returns (dx3, dweight (C,), dbias (C,)); mean/rstd are
    the (N, G) statistics of :func:`gn_forward`; weight None means γ = 1."""
    from bnlab.functional import _dispatch

    x = _checks.array(x3, "x3", 3, _CF)
    dy = _checks.array(dy3, "dy3", 3, _CF)
    if dy.shape != x.shape:
        raise ShapeError(f"dy3 must have the shape of x3 {x.shape}, got {dy.shape}")
    _checks.nonempty(x, "x3")
    n, c, _ = x.shape
    groups = check_groups(num_groups, c)
    mu = _checks.vector(np.asarray(mean).reshape(-1), "mean", n * groups).reshape(n, groups)
    rs = _checks.vector(np.asarray(rstd).reshape(-1), "rstd", n * groups).reshape(n, groups)
    g = _checks.optional_vector(weight, "weight", c, 1.0)
    _checks.out(dx, x, "dx")
    return _dispatch.gn_backward_kernels(dy, x, groups, mu, rs, g, dx)
