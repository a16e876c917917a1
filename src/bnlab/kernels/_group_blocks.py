"""Group-norm kernels: one task per (sample, group), one launch per pass.

In channels-first (N, C, S) memory a group of sample n is one contiguous block of M = (C/G)·S
values (channels c ∈ g, each a row of S). A task reduces its block and writes it while it is in
cache:

    forward   μ, σ² of the block: shifted LANES-way sums per segment of at most ``segment`` values,
              merged in order with the parallel update (as :mod:`._reduce`); rstd = 1/√(σ² + ε)
              y[c] = (x[c] − μ)·(rstd·γ_c) + β_c                  per channel row of the block
    backward  per channel row: Σdy, Σdy·(x − μ) (float64) → p_dy[n, c], p_dyxmu[n, c]
              a = Σ_c γ_c·Σdy,  b = Σ_c γ_c·rstd·Σdy·(x − μ)      (per group)
              dx[c] = A_c·dy + B·(x − μ) + D,  A_c = rstd·γ_c,  B = −rstd²·b/M,  D = −rstd·a/M

The caller sums the (N, C) partials over n (in order) for dγ = Σ_n rstd·Σdy·(x − μ), dβ = Σ_n Σdy.
Each block is reduced by one task in a fixed order: results do not depend on the thread count.
Shapes: x, dy, out, dx (N, C, S) C-contiguous; mean, rstd (N, G) float64; γ, β (C,) float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._reduce import LANES, _grad_sums_in, _merge, _shifted_sums_in


@njit(cache=True)
def _block_moments(block, segment, acc1, acc2):
    """(mean, biased variance) of a contiguous 1-D block, segment by segment (acc1, acc2: (LANES,)
    scratch)."""
    total = block.shape[0]
    cnt, mu, m2 = 0.0, 0.0, 0.0
    for lo in range(0, total, segment):
        seg = block[lo : min(total, lo + segment)]
        k = np.float64(seg[0])
        s1, s2 = _shifted_sums_in(seg, k, acc1, acc2)
        m = np.float64(seg.shape[0])
        cnt, mu, m2 = _merge(cnt, mu, m2, m, k + s1 / m, s2 - s1 * s1 / m)
    v = m2 / cnt
    if v < 0.0:
        v = 0.0
    return mu, v


@njit(parallel=True, cache=True)
def gn_forward_blocks(x, groups, g, b, eps, segment, mean, rstd, out):
    """Fills mean, rstd (N, G) and out."""
    n, c, s = x.shape
    per = c // groups
    flat = x.reshape(n * groups, per * s)
    for t in prange(n * groups):
        i = t // groups
        grp = t % groups
        mu, v = _block_moments(flat[t], segment, np.empty(LANES), np.empty(LANES))
        r = 1.0 / np.sqrt(v + eps)
        mean[i, grp] = mu
        rstd[i, grp] = r
        mc = x.dtype.type(mu)
        for ch in range(grp * per, (grp + 1) * per):
            ac = x.dtype.type(r * g[ch])
            bc = x.dtype.type(b[ch])
            xr = x[i, ch]
            yr = out[i, ch]
            for j in range(s):
                yr[j] = (xr[j] - mc) * ac + bc


@njit(parallel=True, cache=True)
def gn_backward_blocks(dy, x, groups, mean, rstd, g, p_dy, p_dyxmu, dx):
    """Fills dx and the per-(n, c) partials Σdy, Σdy·(x − μ) (N, C) float64."""
    n, c, s = x.shape
    per = c // groups
    m = np.float64(per * s)
    for t in prange(n * groups):
        i = t // groups
        grp = t % groups
        mu = mean[i, grp]
        r = rstd[i, grp]
        a = 0.0
        bsum = 0.0
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for ch in range(grp * per, (grp + 1) * per):
            s1, s2 = _grad_sums_in(dy[i, ch], x[i, ch], mu, acc1, acc2)
            p_dy[i, ch] = s1
            p_dyxmu[i, ch] = s2
            a += g[ch] * s1
            bsum += g[ch] * r * s2
        cb = x.dtype.type(-r * r * bsum / m)
        cd = x.dtype.type(-r * a / m)
        mc = x.dtype.type(mu)
        for ch in range(grp * per, (grp + 1) * per):
            ca = x.dtype.type(r * g[ch])
            dyr = dy[i, ch]
            xr = x[i, ch]
            dxr = dx[i, ch]
            for j in range(s):
                dxr[j] = ca * dyr[j] + cb * (xr[j] - mc) + cd
