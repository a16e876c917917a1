"""Layer norm on a (M, D) view: M rows (samples), D = prod(normalized_shape) values each.

    forward   μ_r, σ²_r of row r (shifted lane sums);  rstd_r = 1/√(σ²_r + ε)
              y = (x − μ_r)·(rstd_r·γ_j) + β_j
    backward  with ĝ = dy·γ:  a_r = Σ_j ĝ,  b_r = Σ_j ĝ·x̂             (per row)
              dγ_j = Σ_r dy·x̂,  dβ_j = Σ_r dy                       (per column, row blocks)
              dx = rstd_r·(ĝ − a_r/D − x̂·b_r/D) = A_j·dy + B_r·(x − μ_r) + D_r
                   with A_j = rstd_r·γ_j, B_r = −rstd_r²·b_r/D, D_r = −rstd_r·a_r/D

One path (``ln-rows``): a task owns a block of rows and, for each row, sums it and then writes
its output while the row is still in cache (one read of memory per direction). The elementwise
parts are batch norm's two expressions (:mod:`._elementwise`). The per-block column partials of
dγ, dβ are summed in block order: the bits do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _checks
from ._compile import kernel
from ._elementwise import affine_row, dx_row
from ._stream import store_fence
from ._sums import lane_sums, lanes_total, summary, variance
from .paths import LANES, Plan


@njit(cache=True, inline="always")
def _forward_rows(x, r0, r1, eps, g, b, stream, mean, rstd, out):
    """Rows [r0, r1): each row's statistics, then its output while it is in cache."""
    d = x.shape[1]
    t = x.dtype.type
    acc1 = np.empty(LANES)
    acc2 = np.empty(LANES)
    for r in range(r0, r1):
        xr = x[r]
        k = np.float64(xr[0])
        acc1[:] = 0.0
        acc2[:] = 0.0
        lane_sums(xr, k, acc1, acc2, LANES)
        m, mu, m2 = summary(np.float64(d), k, acc1, acc2)
        rs = 1.0 / np.sqrt(variance(m, m2) + eps)
        mean[r] = mu
        rstd[r] = rs
        affine_row(xr, t(mu), (t(rs), g), b, out[r], stream)  # (x − μ)·(rstd·γ_j) + β_j
    if stream:
        store_fence()


@kernel
def ln_forward_rows(x, eps, g, b, blocks, stream, mean, rstd, out):
    """Fills mean, rstd (M,) float64 and out; g, b (D,) in x's dtype."""
    rows = x.shape[0]
    for blk in prange(blocks):
        r0, r1 = blk * rows // blocks, (blk + 1) * rows // blocks
        _forward_rows(x, r0, r1, eps, g, b, stream, mean, rstd, out)


@njit(cache=True)
def _row_grad_sums(dyr, xr, m, s, g64, dg, db, acc_a, acc_b):
    """One row's a = Σ_j dy·γ and b = Σ_j dy·γ·x̂ (float64, LANES-way interleaved: a single
    serial sum is a latency-bound chain, slower than the memory), and dγ_j += dy·x̂,
    dβ_j += dy into the task's columns."""
    d = xr.shape[0]
    acc_a[:] = 0.0
    acc_b[:] = 0.0
    full = d // LANES * LANES
    for base in range(0, full, LANES):
        for lane in range(LANES):
            j = base + lane
            gy = np.float64(dyr[j])
            xh = (np.float64(xr[j]) - m) * s
            dg[j] += gy * xh
            db[j] += gy
            gh = gy * g64[j]
            acc_a[lane] += gh
            acc_b[lane] += gh * xh
    a = lanes_total(acc_a)
    b = lanes_total(acc_b)
    for j in range(full, d):
        gy = np.float64(dyr[j])
        xh = (np.float64(xr[j]) - m) * s
        dg[j] += gy * xh
        db[j] += gy
        gh = gy * g64[j]
        a += gh
        b += gh * xh
    return a, b


@njit(cache=True, inline="always")
def _backward_rows(dy, x, r0, r1, blk, mean, rstd, g64, g, stream, dx, p_dg, p_db):
    """Rows [r0, r1): each row's sums (and the block's dγ, dβ columns), then its dx."""
    d = x.shape[1]
    t = x.dtype.type
    dg = np.zeros(d)
    db = np.zeros(d)
    acc_a = np.empty(LANES)
    acc_b = np.empty(LANES)
    for r in range(r0, r1):
        m, s = mean[r], rstd[r]
        a, bsum = _row_grad_sums(dy[r], x[r], m, s, g64, dg, db, acc_a, acc_b)
        cb, cd = t(-s * s * bsum / d), t(-s * a / d)
        dx_row(dy[r], x[r], t(m), (t(s), g), cb, cd, dx[r], stream)
    if stream:
        store_fence()
    for j in range(d):
        p_dg[blk, j] = dg[j]
        p_db[blk, j] = db[j]


@kernel
def ln_backward_rows(dy, x, mean, rstd, g64, g, blocks, stream, dx, p_dg, p_db):
    """Fills dx and the (blocks, D) partials of dγ, dβ; γ as float64 ``g64`` and in x's dtype
    ``g``."""
    rows = x.shape[0]
    for blk in prange(blocks):
        r0, r1 = blk * rows // blocks, (blk + 1) * rows // blocks
        _backward_rows(dy, x, r0, r1, blk, mean, rstd, g64, g, stream, dx, p_dg, p_db)


# --------------------------------------------------------------------------- runners


def run_forward(x2, g, b, eps: float, p: Plan, stream: bool, out2):
    """Forward into out2; returns (mean, rstd) float64 (M,). g, b (D,) float64."""
    rows, d = x2.shape
    mean, rstd = np.empty(rows), np.empty(rows)
    gw, bw = g.astype(x2.dtype), b.astype(x2.dtype)
    blocks = p.chunks["blocks"]
    ln_forward_rows(p.parallel, x2, eps, gw, bw, blocks, stream, mean, rstd, out2)
    return mean, rstd


def run_backward(dy2, x2, mean, rstd, g, p: Plan, stream: bool, dx2):
    """Backward into dx2; returns (dγ, dβ) float64 (D,). mean, rstd (M,), g (D,) float64."""
    from ._sums import sum_partials

    d = x2.shape[1]
    blocks = p.chunks["blocks"]
    p_dg, p_db = np.empty((blocks, d)), np.empty((blocks, d))
    gw = g.astype(x2.dtype)
    ln_backward_rows(p.parallel, dy2, x2, mean, rstd, g, gw, blocks, stream, dx2, p_dg, p_db)
    dgamma, dbeta = np.empty(d), np.empty(d)
    sum_partials(p_dg, dgamma)
    sum_partials(p_db, dbeta)
    return dgamma, dbeta


# --------------------------------------------------------------------------- public, checked

_ROWS = "(M, D)"


def ln_forward(x2, weight, bias, eps, out=None):
    """Layer-norm forward on (M, D): returns (y2, mean (M,), rstd (M,)), mean/rstd in the
    accumulation dtype. weight/bias (D,) or None (γ = 1, β = 0)."""
    from bnlab.functional import _dispatch

    x = _checks.array(x2, "x2", 2, _ROWS)
    _checks.nonempty(x, "x2")
    d = x.shape[1]
    g = _checks.optional_vector(weight, "weight", d, 1.0)
    b = _checks.optional_vector(bias, "bias", d, 0.0)
    eps = _checks.eps(eps)
    _checks.out(out, x, "out")
    run = _dispatch.ln_kernels(x, g, b, eps, out)
    return run.y, run.mean, run.rstd


def ln_backward(dy2, x2, mean, rstd, weight, dx=None):
    """Layer-norm backward on (M, D): returns (dx2, dweight (D,), dbias (D,)) in the
    accumulation dtype; weight None means γ = 1."""
    from bnlab.functional import _dispatch

    x = _checks.array(x2, "x2", 2, _ROWS)
    dy = _checks.like(dy2, "dy2", x)
    _checks.nonempty(x, "x2")
    rows, d = x.shape
    mu, rs = _checks.vector(mean, "mean", rows), _checks.vector(rstd, "rstd", rows)
    g = _checks.optional_vector(weight, "weight", d, 1.0)
    _checks.out(dx, x, "dx")
    return _dispatch.ln_backward_kernels(dy, x, mu, rs, g, dx)
