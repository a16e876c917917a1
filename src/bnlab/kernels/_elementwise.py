"""The elementwise passes: one read of the input(s), one write of the output, per channel
coefficients broadcast along the channel axis. Arithmetic is in the input's dtype (the
coefficients are passed in that dtype), like the NumPy reference.

    affine:    out = (x − m)·a + b                    (normalize; m = 0 gives x·a + b)
    backward:  dx  = A·dy + B·(x − μ) + D             (the closed-form BN input gradient)

Shapes: channels-first (N, C, S) with ``pieces`` segments per row; channels-last (R, C) cut into
``blocks`` row ranges. Coefficients (C,). ``stream``: write with non-temporal stores
(:mod:`._stream`, same bits; for outputs much larger than the cache).
"""

from __future__ import annotations

from numba import njit, prange

from ._stream import (
    affine_row,
    affine_row_scalar,
    backward_row,
    backward_row_scalar,
    store_fence,
)


@njit(parallel=True, cache=True)
def affine_cf(x, m, a, b, pieces, stream, out):
    n, c, s = x.shape
    for t in prange(n * c * pieces):
        row = t // pieces
        p = t % pieces
        i = row // c
        ch = row % c
        mc, ac, bc = m[ch], a[ch], b[ch]
        lo, hi = p * s // pieces, (p + 1) * s // pieces
        xr = x[i, ch, lo:hi]
        yr = out[i, ch, lo:hi]
        if stream:
            affine_row_scalar(xr, mc, ac, bc, yr)
            store_fence()
        else:
            for k in range(hi - lo):
                yr[k] = (xr[k] - mc) * ac + bc


@njit(parallel=True, cache=True)
def affine_cl(x, m, a, b, blocks, stream, out):
    rows, c = x.shape
    for blk in prange(blocks):
        if stream:
            for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
                affine_row(x[r], m, a, b, out[r])
            store_fence()
        else:
            for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
                for j in range(c):
                    out[r, j] = (x[r, j] - m[j]) * a[j] + b[j]


@njit(parallel=True, cache=True)
def backward_cf(dy, x, mu, ca, cb, cd, pieces, stream, dx):
    n, c, s = x.shape
    for t in prange(n * c * pieces):
        row = t // pieces
        p = t % pieces
        i = row // c
        ch = row % c
        m, a, b, d = mu[ch], ca[ch], cb[ch], cd[ch]
        lo, hi = p * s // pieces, (p + 1) * s // pieces
        dyr = dy[i, ch, lo:hi]
        xr = x[i, ch, lo:hi]
        dxr = dx[i, ch, lo:hi]
        if stream:
            backward_row_scalar(dyr, xr, m, a, b, d, dxr)
            store_fence()
        else:
            for k in range(hi - lo):
                dxr[k] = a * dyr[k] + b * (xr[k] - m) + d


@njit(parallel=True, cache=True)
def backward_cl(dy, x, mu, ca, cb, cd, blocks, stream, dx):
    rows, c = x.shape
    for blk in prange(blocks):
        if stream:
            for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
                backward_row(dy[r], x[r], mu, ca, cb, cd, dx[r])
            store_fence()
        else:
            for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
                for j in range(c):
                    dx[r, j] = ca[j] * dy[r, j] + cb[j] * (x[r, j] - mu[j]) + cd[j]
