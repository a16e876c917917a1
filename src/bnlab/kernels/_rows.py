"""Row-wise kernels for layer norm on a (M, D) view: statistics per row (from the shared reduction
core), affine per column.

    forward:   y = (x − μ_r)·rstd_r·γ_j + β_j
    backward:  with ĝ = dy·γ:  a_r = Σ_j ĝ,  b_r = Σ_j ĝ·x̂          (per row)
               dγ_j = Σ_r dy·x̂,  dβ_j = Σ_r dy                      (per column, row blocks)
               dx = rstd_r·(ĝ − a_r/D − x̂·b_r/D)

Row blocks follow the fixed chunking of :mod:`._chunks` (``row_blocks``); the per-block column
partials are summed in block order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def ln_affine(x, mean, rstd, g, b, blocks, out):
    """out = (x − μ_r)·rstd_r·γ_j + β_j, in x's dtype (coefficients passed in that dtype)."""
    rows, d = x.shape
    for blk in prange(blocks):
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            m, s = mean[r], rstd[r]
            xr = x[r]
            yr = out[r]
            for j in range(d):
                yr[j] = (xr[j] - m) * s * g[j] + b[j]


@njit(parallel=True, cache=True)
def ln_grad_sums(dy, x, mean, rstd, g, blocks, row_a, row_b, p_dg, p_db):
    """Per-row a_r, b_r (float64) and per-(block, column) partials of dγ, dβ in one read."""
    rows, d = x.shape
    for blk in prange(blocks):
        dg = np.zeros(d)
        db = np.zeros(d)
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            m, s = mean[r], rstd[r]
            dyr = dy[r]
            xr = x[r]
            a = 0.0
            bsum = 0.0
            for j in range(d):
                gy = np.float64(dyr[j])
                xh = (np.float64(xr[j]) - m) * s
                dg[j] += gy * xh
                db[j] += gy
                gh = gy * g[j]
                a += gh
                bsum += gh * xh
            row_a[r] = a
            row_b[r] = bsum
        for j in range(d):
            p_dg[blk, j] = dg[j]
            p_db[blk, j] = db[j]


@njit(parallel=True, cache=True)
def ln_dx(dy, x, mean, rstd, g, ca, cb, blocks, dx):
    """dx = rstd_r·(dy·γ − a_r/D − x̂·b_r/D), with ca = a/D, cb = b/D per row; x's dtype."""
    rows, d = x.shape
    for blk in prange(blocks):
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            m, s, a, bb = mean[r], rstd[r], ca[r], cb[r]
            dyr = dy[r]
            xr = x[r]
            dxr = dx[r]
            for j in range(d):
                dxr[j] = s * (dyr[j] * g[j] - a - (xr[j] - m) * s * bb)
