"""Batch-norm kernels on a channels-first (N, C, S) view: channel c is N rows of S values.

``cf-single-launch`` (one task per channel, the channel re-read from cache):

    cf_train_forward   μ, σ² of the channel (shifted lane sums, one shift per channel), then
                       y = (x − μ)·(γ·rstd) + β                           fills mean, var, y
    cf_backward        Σdy, Σdy·(x − μ), then dx = A·dy + B·(x − μ) + D    fills dγ, dβ, dx

``cf-two-pass`` (statistics, then an elementwise pass):

    cf_moments         partial (count, mean, M2) per (group of rows, channel): short rows are
                       summed column-wise (lanes = the row), long ones as rows of LANES lanes
    cf_grad_sums       partial Σdy, Σdy·(x − μ) likewise
    cf_affine          y = (x − m)·a + b per channel (also the inference forward)
    cf_dx              dx = A·dy + B·(x − m) + D per channel

with A = γ·rstd, B = −A·rstd·dγ/m, D = −A·Σdy/m, dγ = rstd·Σdy·(x − μ), dβ = Σdy (m = N·S).
Shapes: x, dy, out, dx (N, C, S) C-contiguous; per-channel vectors (C,) (float64, or x's dtype
for the elementwise coefficients); partials (groups, C) float64. The chunk counts come from the
plan (:mod:`.plan`): a function of the shape only, so the bits do not depend on the threads.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from ._compile import kernel
from ._elementwise import affine_row, dx_row
from ._stream import store_fence
from ._sums import (
    grad_add,
    lane_grad_sums,
    lane_sums,
    lanes_total,
    shifted_add,
    summary,
    variance,
)
from .paths import LANES


@njit(cache=True, inline="always")
def _channel_train_forward(x, ch, g, b, eps, stream, mean, var, out):
    """Statistics of channel ch (one shift: its first value), then its output from cache."""
    n, _, s = x.shape
    k = np.float64(x[0, ch, 0])
    acc1 = np.zeros(LANES)
    acc2 = np.zeros(LANES)
    for i in range(n):
        lane_sums(x[i, ch], k, acc1, acc2, LANES)
    m, mu, m2 = summary(np.float64(n * s), k, acc1, acc2)
    v = variance(m, m2)
    mean[ch] = mu
    var[ch] = v
    t = x.dtype.type
    mc, ac, bc = t(mu), t(g[ch] * (1.0 / np.sqrt(v + eps))), t(b[ch])
    for i in range(n):
        affine_row(x[i, ch], mc, ac, bc, out[i, ch], stream)
    if stream:
        store_fence()


@kernel
def cf_train_forward(x, g, b, eps, stream, mean, var, out):
    for ch in prange(x.shape[1]):
        _channel_train_forward(x, ch, g, b, eps, stream, mean, var, out)


@njit(cache=True, inline="always")
def _channel_backward(dy, x, ch, mean, rstd, g, stream, dx, dgamma, dbeta):
    """Gradient sums of channel ch, then its dx from cache."""
    n, _, s = x.shape
    m = np.float64(n * s)
    mu = mean[ch]
    acc1 = np.zeros(LANES)
    acc2 = np.zeros(LANES)
    for i in range(n):
        lane_grad_sums(dy[i, ch], x[i, ch], mu, acc1, acc2, LANES)
    sum_dy = lanes_total(acc1)
    r = rstd[ch]
    dg = r * lanes_total(acc2)
    dgamma[ch] = dg
    dbeta[ch] = sum_dy
    a = g[ch] * r
    t = x.dtype.type
    ca, cb, cd, mc = t(a), t(-a * r * dg / m), t(-a * sum_dy / m), t(mu)
    for i in range(n):
        dx_row(dy[i, ch], x[i, ch], mc, ca, cb, cd, dx[i, ch], stream)
    if stream:
        store_fence()


@kernel
def cf_backward(dy, x, mean, rstd, g, stream, dx, dgamma, dbeta):
    for ch in prange(x.shape[1]):
        _channel_backward(dy, x, ch, mean, rstd, g, stream, dx, dgamma, dbeta)


@njit(cache=True, inline="always")
def _piece(a, i, ch, p, pieces):
    """Piece p of the (i, ch) row of a (the whole row when it is not cut: no slicing)."""
    if pieces == 1:
        return a[i, ch]
    s = a.shape[2]
    return a[i, ch, p * s // pieces : (p + 1) * s // pieces]


@njit(cache=True, inline="always")
def _task_moments(x, grp, groups, cb, cblocks, pieces, w, p_cnt, p_mean, p_m2, fixed):
    """Partial summaries of the channels of block cb over the units (row, piece) of group grp,
    one shift per channel (its first value there). Short rows (fixed = 0, one piece): the
    group's rows of a channel summed column-wise in one call (w = S lanes); long rows: each
    piece as rows of LANES lanes."""
    n, c, s = x.shape
    units = n * pieces
    u0 = grp * units // groups
    u1 = (grp + 1) * units // groups
    acc1 = np.empty(w)
    acc2 = np.empty(w)
    i0, p0 = u0 // pieces, u0 % pieces  # the group's first unit (divisions: once per task)
    for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
        i, p = i0, p0
        k = np.float64(_piece(x, i, ch, p, pieces)[0])
        acc1[:] = 0.0
        acc2[:] = 0.0
        if fixed == 0:  # the channel's rows, column-wise: lane j is column j
            for i in range(u0, u1):
                row = x[i, ch]
                for j in range(s):
                    shifted_add(acc1, acc2, j, row[j], k)
            count = (u1 - u0) * s
        else:
            count = 0
            for _ in range(u1 - u0):  # (i, p) walks the units without a division per row
                seg = _piece(x, i, ch, p, pieces)
                lane_sums(seg, k, acc1, acc2, LANES)
                count += seg.shape[0]
                p += 1
                if p == pieces:
                    i, p = i + 1, 0
        cnt, mu, m2 = summary(np.float64(count), k, acc1, acc2)
        p_cnt[grp, ch] = cnt
        p_mean[grp, ch] = mu
        p_m2[grp, ch] = m2


@njit(cache=True, inline="always")
def _task_grad_sums(dy, x, mean, grp, groups, cb, cblocks, pieces, w, p_dy, p_dyxmu, fixed):
    """Partial Σdy, Σdy·(x − μ) of the channels of block cb over the units of group grp (short
    and long rows as in :func:`_task_moments`)."""
    n, c, s = x.shape
    units = n * pieces
    u0 = grp * units // groups
    u1 = (grp + 1) * units // groups
    acc1 = np.empty(w)
    acc2 = np.empty(w)
    i0, p0 = u0 // pieces, u0 % pieces
    for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
        mu = mean[ch]
        acc1[:] = 0.0
        acc2[:] = 0.0
        if fixed == 0:
            for i in range(u0, u1):
                dyr, xr = dy[i, ch], x[i, ch]
                for j in range(s):
                    grad_add(acc1, acc2, j, dyr[j], xr[j], mu)
        else:
            i, p = i0, p0
            for _ in range(u1 - u0):
                dyr, xr = _piece(dy, i, ch, p, pieces), _piece(x, i, ch, p, pieces)
                lane_grad_sums(dyr, xr, mu, acc1, acc2, LANES)
                p += 1
                if p == pieces:
                    i, p = i + 1, 0
        p_dy[grp, ch] = lanes_total(acc1)
        p_dyxmu[grp, ch] = lanes_total(acc2)


@functools.cache
def reductions(fixed: int):
    """(cf_moments, cf_grad_sums) summing long rows (fixed = LANES) as rows of LANES lanes, or
    short ones (fixed = 0) column-wise, the lanes being the S columns."""

    @kernel
    def cf_moments(x, w, groups, cblocks, pieces, p_cnt, p_mean, p_m2):
        for t in prange(groups * cblocks):
            grp, cb = t // cblocks, t % cblocks
            _task_moments(x, grp, groups, cb, cblocks, pieces, w, p_cnt, p_mean, p_m2, fixed)

    @kernel
    def cf_grad_sums(dy, x, mean, w, groups, cblocks, pieces, p_dy, p_dyxmu):
        for t in prange(groups * cblocks):
            grp, cb = t // cblocks, t % cblocks
            _task_grad_sums(dy, x, mean, grp, groups, cb, cblocks, pieces, w, p_dy, p_dyxmu, fixed)

    return cf_moments, cf_grad_sums


@kernel
def cf_affine(x, m, a, b, cblocks, pieces, stream, out):
    """One task per (sample, block of channels, piece of the rows). (The task bodies are
    written in the prange loops: as inlined helpers they ran 15 % slower on 7x7 maps.)"""
    n, c, s = x.shape
    for t in prange(n * cblocks * pieces):
        i = t // (cblocks * pieces)
        rest = t % (cblocks * pieces)
        cb = rest // pieces
        p = rest % pieces
        for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
            xr = _piece(x, i, ch, p, pieces)
            affine_row(xr, m[ch], a[ch], b[ch], _piece(out, i, ch, p, pieces), stream)
        if stream:
            store_fence()


@kernel
def cf_dx(dy, x, m, a, b, d, cblocks, pieces, stream, dx):
    n, c, s = x.shape
    for t in prange(n * cblocks * pieces):
        i = t // (cblocks * pieces)
        rest = t % (cblocks * pieces)
        cb = rest // pieces
        p = rest % pieces
        for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
            dyr, xr = _piece(dy, i, ch, p, pieces), _piece(x, i, ch, p, pieces)
            dx_row(dyr, xr, m[ch], a[ch], b[ch], d[ch], _piece(dx, i, ch, p, pieces), stream)
        if stream:
            store_fence()
