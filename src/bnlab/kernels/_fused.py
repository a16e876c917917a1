"""Single-launch batch-norm kernels: a task owns whole channels, reduces them and writes them.

When a channels-last (R, C) view has few rows (a (256, 4096) activation of an MLP, NHWC maps of a
small batch), one column tile of every row fits in the core's L2 cache. A task then owns a tile of
channels end to end: it reduces the tile's statistics over all R rows (one read from memory) and
immediately writes the normalized tile (the second read comes from cache). One kernel launch for
the whole training forward, one for the whole backward, no partials to merge:

    forward   per channel j of the tile, shift k_j = x[0, j]:
                  s1 = Σ_r (x − k),  s2 = Σ_r (x − k)²           (float64)
                  μ = k + s1/R,  σ² = max(s2 − s1²/R, 0)/R,  a = γ·(1/√(σ² + ε))
                  y = (x − μ)·a + β                              (in x's dtype)
    backward  Σdy, Σdy·(x − μ) over the rows (float64); dβ = Σdy, dγ = rstd·Σdy·(x − μ)
              dx = A·dy + B·(x − μ) + D, A = γ·rstd, B = −A·rstd·dγ/R, D = −A·Σdy/R

Channels-first (N, C, S) with long rows: a task owns one channel (N rows of S values, strided by
C·S); it sums the rows in order (shifted LANES-way sums of :mod:`._reduce`, merged row by row with
the parallel update), then writes the channel. A channel that fits in the last-level cache is read
from memory once per pass.

Each channel is summed by one task in a fixed order, so results do not depend on the thread count.
Shapes: x, dy, out, dx (R, C) or (N, C, S) C-contiguous; vectors (C,) float64; ``tiles`` from
:func:`bnlab.kernels._chunks.fused_tiles` (a function of the shape only).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._elementwise import scalar_affine_row, scalar_backward_row
from ._reduce import (
    LANES,
    _column_grad_sums,
    _column_shifted_sums,
    _grad_sums_in,
    _merge,
    _shifted_sums_in,
    _tile,
)
from ._stream import store_fence


@njit(parallel=True, cache=True)
def train_forward_cl(x, g, b, eps, tiles, mean, var, out):
    """Training forward of (R, C) in one launch: fills mean, var (C,) (biased) and out."""
    rows, c = x.shape
    m = np.float64(rows)
    for t in prange(tiles):
        c0, c1 = _tile(t, tiles, c)
        w = c1 - c0
        k, acc1, acc2 = _column_shifted_sums(x, 0, rows, c0, c1)
        mc = np.empty(w, x.dtype)
        ac = np.empty(w, x.dtype)
        bc = np.empty(w, x.dtype)
        for j in range(w):
            mu = k[j] + acc1[j] / m
            v = (acc2[j] - acc1[j] * acc1[j] / m) / m
            if v < 0.0:
                v = 0.0
            mean[c0 + j] = mu
            var[c0 + j] = v
            mc[j] = mu
            ac[j] = g[c0 + j] * (1.0 / np.sqrt(v + eps))
            bc[j] = b[c0 + j]
        for r in range(rows):
            xr = x[r, c0:c1]
            yr = out[r, c0:c1]
            for j in range(w):
                yr[j] = (xr[j] - mc[j]) * ac[j] + bc[j]


@njit(parallel=True, cache=True)
def backward_cl(dy, x, mean, rstd, g, tiles, dx, dgamma, dbeta):
    """Training backward of (R, C) in one launch: fills dx and dgamma, dbeta (C,) float64."""
    rows, c = x.shape
    m = np.float64(rows)
    for t in prange(tiles):
        c0, c1 = _tile(t, tiles, c)
        w = c1 - c0
        mu = mean[c0:c1]
        acc1, acc2 = _column_grad_sums(dy, x, mu, 0, rows, c0, c1)
        ca = np.empty(w, x.dtype)
        cb = np.empty(w, x.dtype)
        cd = np.empty(w, x.dtype)
        mc = np.empty(w, x.dtype)
        for j in range(w):
            r_ = rstd[c0 + j]
            dg = r_ * acc2[j]
            dgamma[c0 + j] = dg
            dbeta[c0 + j] = acc1[j]
            a = g[c0 + j] * r_
            ca[j] = a
            cb[j] = -a * r_ * dg / m
            cd[j] = -a * acc1[j] / m
            mc[j] = mu[j]
        for r in range(rows):
            dyr = dy[r, c0:c1]
            xr = x[r, c0:c1]
            dxr = dx[r, c0:c1]
            for j in range(w):
                dxr[j] = ca[j] * dyr[j] + cb[j] * (xr[j] - mc[j]) + cd[j]


@njit(parallel=True, cache=True)
def train_forward_cf(x, g, b, eps, stream, mean, var, out):
    """Training forward of (N, C, S), one task per channel: fills mean, var (C,) and out
    (non-temporal stores when ``stream``)."""
    n, c, s = x.shape
    for ch in prange(c):
        cnt, mu, m2 = 0.0, 0.0, 0.0
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for i in range(n):
            row = x[i, ch]
            k = np.float64(row[0])
            s1, s2 = _shifted_sums_in(row, k, acc1, acc2)
            m = np.float64(s)
            cnt, mu, m2 = _merge(cnt, mu, m2, m, k + s1 / m, s2 - s1 * s1 / m)
        v = m2 / cnt
        if v < 0.0:
            v = 0.0
        mean[ch] = mu
        var[ch] = v
        mc = x.dtype.type(mu)
        ac = x.dtype.type(g[ch] * (1.0 / np.sqrt(v + eps)))
        bc = x.dtype.type(b[ch])
        for i in range(n):
            scalar_affine_row(x[i, ch], mc, ac, bc, stream, out[i, ch])
        if stream:
            store_fence()


@njit(parallel=True, cache=True)
def backward_cf(dy, x, mean, rstd, g, stream, dx, dgamma, dbeta):
    """Training backward of (N, C, S), one task per channel: fills dx and dgamma, dbeta (C,)
    (dx with non-temporal stores when ``stream``)."""
    n, c, s = x.shape
    m = np.float64(n * s)
    for ch in prange(c):
        mu = mean[ch]
        sum_dy, sum_dyxmu = 0.0, 0.0
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for i in range(n):
            s1, s2 = _grad_sums_in(dy[i, ch], x[i, ch], mu, acc1, acc2)
            sum_dy += s1
            sum_dyxmu += s2
        r_ = rstd[ch]
        dg = r_ * sum_dyxmu
        dgamma[ch] = dg
        dbeta[ch] = sum_dy
        a = g[ch] * r_
        t = x.dtype.type
        ca, cb, cd, mc = t(a), t(-a * r_ * dg / m), t(-a * sum_dy / m), t(mu)
        for i in range(n):
            scalar_backward_row(dy[i, ch], x[i, ch], mc, ca, cb, cd, stream, dx[i, ch])
        if stream:
            store_fence()
