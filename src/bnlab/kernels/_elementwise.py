"""The elementwise passes: one read of the input(s), one write of the output, per channel
coefficients broadcast along the channel axis. Arithmetic is in the input's dtype (the
coefficients are passed in that dtype), like the NumPy reference.

    affine:    out = (x − m)·a + b                    (normalize; m = 0 gives x·a + b)
    backward:  dx  = A·dy + B·(x − μ) + D             (the closed-form BN input gradient)

Shapes: channels-first (N, C, S) with ``pieces`` segments per row (short rows: ``cblocks`` blocks
of channels per sample); channels-last (R, C) cut into ``blocks`` row ranges. Coefficients (C,).
``stream``: write with non-temporal stores (:mod:`._stream`, same bits; for outputs much larger
than the cache).
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


# inline="always" (numba inlines the IR): as an ordinary call per row, the short-row kernels'
# rows of 49 values ran 1.6-1.9x slower ((8, 2048, 7, 7) affine 0.089 -> 0.144 ms).
@njit(cache=True, inline="always")
def scalar_affine_row(x, mc, ac, bc, stream, y):
    """y = (x − mc)·ac + bc over one 1-D row with scalar coefficients (a channels-first row),
    with streaming stores if ``stream`` (the caller fences, once per task)."""
    if stream:
        affine_row_scalar(x, mc, ac, bc, y)
    else:
        for k in range(y.shape[0]):
            y[k] = (x[k] - mc) * ac + bc


@njit(cache=True, inline="always")
def scalar_backward_row(dy, x, m, a, b, d, stream, dx):
    """dx = A·dy + B·(x − μ) + D over one 1-D row with scalar coefficients, streaming if
    ``stream`` (the caller fences)."""
    if stream:
        backward_row_scalar(dy, x, m, a, b, d, dx)
    else:
        for k in range(dx.shape[0]):
            dx[k] = a * dy[k] + b * (x[k] - m) + d


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
        scalar_affine_row(x[i, ch, lo:hi], mc, ac, bc, stream, out[i, ch, lo:hi])
        if stream:
            store_fence()


@njit(parallel=True, cache=True)
def affine_cf_short(x, m, a, b, cblocks, stream, out):
    """:func:`affine_cf` for short rows (S < ``SHORT_ROW``): one task per (sample, block of
    channels), so the divisions that find a task's row and the parallel loop's per-iteration
    cost are paid per block, not per row of a few dozen values ((8, 2048, 7, 7) eval: 0.18 ->
    0.09 ms)."""
    n, c, s = x.shape
    for t in prange(n * cblocks):
        i = t // cblocks
        cb = t % cblocks
        for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
            scalar_affine_row(x[i, ch], m[ch], a[ch], b[ch], stream, out[i, ch])
        if stream:
            store_fence()


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
        scalar_backward_row(dy[i, ch, lo:hi], x[i, ch, lo:hi], m, a, b, d, stream, dx[i, ch, lo:hi])
        if stream:
            store_fence()


@njit(parallel=True, cache=True)
def backward_cf_short(dy, x, mu, ca, cb, cd, cblocks, stream, dx):
    """:func:`backward_cf` for short rows, one task per (sample, block of channels)."""
    n, c, s = x.shape
    for t in prange(n * cblocks):
        i = t // cblocks
        blk = t % cblocks
        for ch in range(blk * c // cblocks, (blk + 1) * c // cblocks):
            m, a, b, d = mu[ch], ca[ch], cb[ch], cd[ch]
            scalar_backward_row(dy[i, ch], x[i, ch], m, a, b, d, stream, dx[i, ch])
        if stream:
            store_fence()


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
