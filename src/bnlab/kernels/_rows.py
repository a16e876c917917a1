"""Row-wise kernels for layer norm on a (M, D) view: statistics per row (from the shared reduction
core), affine per column.

    forward:   y = (x − μ_r)·rstd_r·γ_j + β_j
    backward:  with ĝ = dy·γ:  a_r = Σ_j ĝ,  b_r = Σ_j ĝ·x̂          (per row)
               dγ_j = Σ_r dy·x̂,  dβ_j = Σ_r dy                      (per column, row blocks)
               dx = rstd_r·(ĝ − a_r/D − x̂·b_r/D)

Row blocks follow the fixed chunking of :mod:`._chunks` (``row_blocks``); the per-block column
partials are summed in block order, so results do not depend on the thread count.

Rows of ``SHORT_ROW`` to ``SEGMENT`` values (a row fits in L1/L2) run single-pass kernels
(``ln_forward_rows``; ``ln_grad_sums`` with ``write_dx``): each task reads a row from memory
once for its sums and again from cache for its output — x once instead of twice in the
forward, dy and x once instead of twice in the backward (5 passes over memory for
forward+backward instead of 8). They compute the same expressions as the two-pass path (the row
moments exactly as ``core.channel_moments`` computes a one-segment channel): the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._reduce import LANES, _shifted_sums_in
from ._stream import ln_affine_row, ln_dx_row, store_fence


@njit(parallel=True, cache=True)
def ln_forward_rows(x, eps, g, b, blocks, stream, mean, rstd, out):
    """Single-pass forward: per row r, μ_r and rstd_r (float64, into ``mean``/``rstd``) from the
    shifted sums of the row (shift = its first value), then out = (x − μ_r)·rstd_r·γ_j + β_j in
    x's dtype (μ_r, rstd_r rounded to it; g, b already in it); non-temporal stores when
    ``stream`` (:mod:`._stream`, same bits)."""
    rows, d = x.shape
    m = np.float64(d)
    for blk in prange(blocks):
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            xr = x[r]
            k = np.float64(xr[0])
            s1, s2 = _shifted_sums_in(xr, k, acc1, acc2)
            mu = k + s1 / m
            v = (s2 - s1 * s1 / m) / m
            if v < 0.0:
                v = 0.0
            rs = 1.0 / np.sqrt(v + eps)
            mean[r] = mu
            rstd[r] = rs
            mc = x.dtype.type(mu)
            sc = x.dtype.type(rs)
            yr = out[r]
            if stream:
                ln_affine_row(xr, mc, sc, g, b, yr)
            else:
                for j in range(d):
                    yr[j] = (xr[j] - mc) * sc * g[j] + b[j]
        if stream:
            store_fence()


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


@njit(cache=True)
def _row_grad_sums(dyr, xr, m, s, g64, dg, db, acc_a, acc_b):
    """One row's a = Σ_j dy·γ and b = Σ_j dy·γ·x̂ (float64; LANES-way interleaved in the
    caller's (LANES,) scratch, combined in lane order: a plain serial sum was a latency-bound
    chain, slower than the memory), and dγ_j += dy·x̂, dβ_j += dy into the task's columns."""
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
    a = 0.0
    b = 0.0
    for lane in range(LANES):
        a += acc_a[lane]
        b += acc_b[lane]
    for j in range(full, d):
        gy = np.float64(dyr[j])
        xh = (np.float64(xr[j]) - m) * s
        dg[j] += gy * xh
        db[j] += gy
        gh = gy * g64[j]
        a += gh
        b += gh * xh
    return a, b


@njit(parallel=True, cache=True)
def ln_grad_sums(dy, x, mean, rstd, g64, g, blocks, row_a, row_b, p_dg, p_db, dx, write_dx, stream):
    """Per-row a_r, b_r (float64) and per-(block, column) partials of dγ, dβ in one read of dy
    and x (γ as float64 ``g64``). With ``write_dx`` (the single-pass backward) each row's dx
    follows from the cached row as in :func:`ln_dx` (γ in x's dtype ``g``; non-temporal stores
    when ``stream``); otherwise :func:`ln_dx` makes a second pass."""
    rows, d = x.shape
    for blk in prange(blocks):
        dg = np.zeros(d)
        db = np.zeros(d)
        acc_a = np.empty(LANES)
        acc_b = np.empty(LANES)
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            m, s = mean[r], rstd[r]
            a, bsum = _row_grad_sums(dy[r], x[r], m, s, g64, dg, db, acc_a, acc_b)
            row_a[r] = a
            row_b[r] = bsum
            if write_dx:
                t = x.dtype.type
                args = (dy[r], x[r], t(m), t(s), g, t(a / d), t(bsum / d), dx[r])
                if stream:
                    ln_dx_row(*args)
                else:
                    _row_dx(*args)
        if stream:
            store_fence()
        for j in range(d):
            p_dg[blk, j] = dg[j]
            p_db[blk, j] = db[j]


@njit(cache=True)
def _row_dx(dyr, xr, m, s, g, ca, cb, dxr):
    """dx = rstd·(dy·γ − a/D − x̂·b/D) over one row, in x's dtype (all arguments in it)."""
    for j in range(xr.shape[0]):
        dxr[j] = s * (dyr[j] * g[j] - ca - (xr[j] - m) * s * cb)


@njit(parallel=True, cache=True)
def ln_dx(dy, x, mean, rstd, g, ca, cb, blocks, dx):
    """dx = rstd_r·(dy·γ − a_r/D − x̂·b_r/D), with ca = a/D, cb = b/D per row; x's dtype."""
    rows = x.shape[0]
    for blk in prange(blocks):
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            _row_dx(dy[r], x[r], mean[r], rstd[r], g, ca[r], cb[r], dx[r])
