"""Batch-norm kernels on a channels-last (R, C) view: R = N·S rows of C channels.

``cl-single-launch`` (few rows: a column tile of every row fits L2; one launch per direction):

    cl_train_forward   a task owns a tile of channels: μ, σ² over all R rows, then writes
                       y = (x − μ)·(γ·rstd) + β from cache                fills mean, var, y
    cl_backward        Σdy, Σdy·(x − μ) of its tile, then dx from cache    fills dγ, dβ, dx

``cl-two-pass`` (k consecutive rows of C values seen as one lane row of W = k·C lanes, lane l
being channel l mod C; the reductions take the (R·C // W, W) lane rows and the leftover values
as a (1, t) partial row, the elementwise passes the arrays flat):

    cl_moments         per block of lane rows, shifted lane sums folded into partial (count,
                       mean, M2) per (block, channel)
    cl_grad_sums       partial Σdy, Σdy·(x − μ) per (block, channel)
    cl_affine          y = (x − m)·a + b, the coefficients as lane rows
    cl_dx              dx = A·dy + B·(x − m) + D, likewise

When C divides a register width (64, 128, 192, 256 lanes) W is that width, a compile-time
constant, and each task keeps its lane accumulators and coefficient rows in vector registers
(:mod:`._sums`); otherwise W = k·C >= 1024 and they live in memory. The elementwise passes walk
each block from the output's first line boundary, so streaming stores write whole lines at any
common offset of the arrays. Shapes: x, dy, out, dx (R, C) for the single launch, flat (R·C,)
for the two passes; vectors (C,); partials (blocks, C) float64.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import literally, njit, prange, types
from numba.extending import overload
from numba.np.numpy_support import carray

from ._compile import kernel, stack
from ._elementwise import affine, affine_row, bn_dx, dx_row
from ._stream import head, store_fence
from ._sums import (
    column_grad_sums,
    column_grad_sums4,
    column_sums,
    column_sums4,
    fold_lane_moments,
    fold_lane_sums,
    variance,
)


@njit(cache=True, inline="always")
def _tile(t, tiles, c):
    """Channels [c0, c1) of tile t (tiles of equal width, the last one shorter)."""
    width = (c + tiles - 1) // tiles
    c0 = (t % tiles) * width
    return c0, min(c, c0 + width)


@njit(cache=True)
def _tile_train_forward(x, g, b, eps, c0, c1, mean, var, out):
    """Statistics of channels [c0, c1) over all rows, then their output from cache."""
    rows = x.shape[0]
    m = np.float64(rows)
    w = c1 - c0
    shift = np.empty(w)
    for j in range(w):
        shift[j] = np.float64(x[0, c0 + j])
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    column_sums4(x, 0, rows, c0, shift, acc1, acc2)
    mc = np.empty(w, x.dtype)
    ac = np.empty(w, x.dtype)
    bc = np.empty(w, x.dtype)
    for j in range(w):
        mu = shift[j] + acc1[j] / m
        v = variance(m, acc2[j] - acc1[j] * acc1[j] / m)
        mean[c0 + j] = mu
        var[c0 + j] = v
        mc[j] = mu
        ac[j] = g[c0 + j] * (1.0 / np.sqrt(v + eps))
        bc[j] = b[c0 + j]
    for r in range(rows):
        affine_row(x[r, c0:c1], mc, ac, bc, out[r, c0:c1], False)


@kernel
def cl_train_forward(x, g, b, eps, tiles, mean, var, out):
    c = x.shape[1]
    for t in prange(tiles):
        c0, c1 = _tile(t, tiles, c)
        _tile_train_forward(x, g, b, eps, c0, c1, mean, var, out)


@njit(cache=True)
def _tile_backward(dy, x, mean, rstd, g, c0, c1, dx, dgamma, dbeta):
    """Gradient sums of channels [c0, c1) over all rows, then their dx from cache."""
    rows = x.shape[0]
    m = np.float64(rows)
    w = c1 - c0
    mu = mean[c0:c1].copy()
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    column_grad_sums4(dy, x, 0, rows, c0, mu, acc1, acc2)
    mc = np.empty(w, x.dtype)
    ca = np.empty(w, x.dtype)
    cb = np.empty(w, x.dtype)
    cd = np.empty(w, x.dtype)
    for j in range(w):
        r_ = rstd[c0 + j]
        dg = r_ * acc2[j]
        dgamma[c0 + j] = dg
        dbeta[c0 + j] = acc1[j]
        a = g[c0 + j] * r_
        mc[j] = mu[j]
        ca[j] = a
        cb[j] = -a * r_ * dg / m
        cd[j] = -a * acc1[j] / m
    for r in range(rows):
        dx_row(dy[r, c0:c1], x[r, c0:c1], mc, ca, cb, cd, dx[r, c0:c1], False)


@kernel
def cl_backward(dy, x, mean, rstd, g, tiles, dx, dgamma, dbeta):
    c = x.shape[1]
    for t in prange(tiles):
        c0, c1 = _tile(t, tiles, c)
        _tile_backward(dy, x, mean, rstd, g, c0, c1, dx, dgamma, dbeta)


# --------------------------------------------------------------------------- two passes


def lane_row(v, phase, w, fixed, like):
    """A row of ``w`` lanes, lane j = v[(phase + j) mod C]: on the stack when ``fixed`` (= w) is
    a compile-time constant, else on the heap, starting at ``like``'s offset within a cache line
    (a coefficient load split across two lines at every vector cost the streaming passes all
    their gain) (compiled code only)."""
    raise NotImplementedError("lane_row runs inside compiled kernels only")


@njit(cache=True, inline="always")
def _rotated(row, v, phase):
    """row[j] = v[(phase + j) mod C] (a register row: a few hundred lanes)."""
    c = v.shape[0]
    for j in range(row.shape[0]):
        row[j] = v[(phase + j) % c]
    return row


@njit(cache=True)
def _tiled(v, phase, w, like):
    """The same row in memory, filled without a division per lane (w may be thousands)."""
    c = v.shape[0]
    raw = np.empty(w + 64 // v.itemsize, v.dtype)
    start = (like.ctypes.data - raw.ctypes.data) % 64 // v.itemsize
    row = raw[start : start + w]
    for j in range(min(w, c - phase % c)):
        row[j] = v[phase % c + j]
    for j in range(c - phase % c, w):
        row[j] = row[j - c]
    return row


@overload(lane_row, prefer_literal=True, inline="always")
def _lane_row(v, phase, w, fixed, like):
    n = fixed.literal_value if isinstance(fixed, types.IntegerLiteral) else 0
    if n:
        return lambda v, phase, w, fixed, like: _rotated(carray(stack(n, v.dtype), (n,)), v, phase)
    return lambda v, phase, w, fixed, like: _tiled(v, phase, w, like)


@njit(cache=True, inline="always")
def _block(blk, blocks, n, w):
    """Flat [lo, hi) of block blk: whole lane rows of w values, the last block to the end."""
    rows = n // w
    lo = blk * rows // blocks * w
    hi = n if blk == blocks - 1 else (blk + 1) * rows // blocks * w
    return lo, hi


@njit(cache=True)
def _block_moments(bulk, tail, r0, r1, last, c, b, p_cnt, p_mean, p_m2, fixed):
    """Row b of the moment partials: lane rows [r0, r1) of ``bulk`` (R', W) (and the partial
    lane row ``tail`` (1, t) when ``last``), each lane shifted by the block's first lane row,
    folded per channel (``fixed`` = W: lanes in registers; 0: in memory)."""
    literally(fixed)
    w = bulk.shape[1]
    t = tail.shape[1] if last else 0
    shift = np.zeros(w)
    for j in range(w if r1 > r0 else t):
        shift[j] = np.float64(bulk[r0, j] if r1 > r0 else tail[0, j])
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    if fixed:  # a lane row of a register width, in registers
        column_sums(bulk, r0, r1, 1, 0, shift, acc1, acc2, w, fixed)
    else:  # a wider one, in memory, four rows per update
        column_sums4(bulk, r0, r1, 0, shift, acc1, acc2)
    column_sums(tail, 0, 1 if last else 0, 1, 0, shift, acc1, acc2, t, 0)
    fold_lane_moments(shift, acc1, acc2, r1 - r0, t, c, b, p_cnt, p_mean, p_m2)


@njit(cache=True)
def _block_grad_sums(dy, x, dy_tail, x_tail, mean, r0, r1, last, b, p_dy, p_dyxmu, fixed):
    """Row b of the gradient-sum partials (lane j's mean is mean[j mod C])."""
    literally(fixed)
    c = mean.shape[0]
    w = x.shape[1]
    mus = np.empty(w)
    for j in range(w):
        mus[j] = mean[j % c]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    if fixed:
        column_grad_sums(dy, x, r0, r1, 1, 0, mus, acc1, acc2, w, fixed)
    else:
        column_grad_sums4(dy, x, r0, r1, 0, mus, acc1, acc2)
    t = x_tail.shape[1] if last else 0
    column_grad_sums(dy_tail, x_tail, 0, 1 if last else 0, 1, 0, mus, acc1, acc2, t, 0)
    fold_lane_sums(acc1, acc2, c, b, p_dy, p_dyxmu)


@njit(cache=True, inline="always")
def _start(out, lo, hi, fixed):
    """Where a block's stretches of lanes start: at out's first line boundary for register lanes
    (whole lines per stretch, so every store streams), at the block's start (lane 0) otherwise
    (each stretch then finds its own line boundary)."""
    return lo + min(head(out[lo:hi]), hi - lo) if fixed else lo


@njit(cache=True)
def _affine_block(x, m, a, b, lo, hi, w, stream, out, fixed):
    """out[lo:hi] = (x − m)·a + b, flat, in stretches of w lanes whose coefficient rows are
    built once (``fixed`` lanes in registers when it is not 0)."""
    literally(fixed)
    c = m.shape[0]
    ww = fixed if fixed else w
    s = _start(out, lo, hi, fixed)
    for j in range(lo, s):
        out[j] = affine(x[j], m[j % c], a[j % c], b[j % c])
    phase = s % c
    mr = lane_row(m, phase, ww, fixed, out[s:])
    ar = lane_row(a, phase, ww, fixed, out[s:])
    br = lane_row(b, phase, ww, fixed, out[s:])
    for _ in range((hi - s) // ww):
        affine_row(x[s : s + ww], mr, ar, br, out[s : s + ww], stream, fixed)
        s += ww
    for j in range(s, hi):
        out[j] = affine(x[j], m[j % c], a[j % c], b[j % c])
    if stream:
        store_fence()


@njit(cache=True)
def _dx_block(dy, x, m, a, b, d, lo, hi, w, stream, dx, fixed):
    """dx[lo:hi] = A·dy + B·(x − m) + D, flat, like :func:`_affine_block`."""
    literally(fixed)
    c = m.shape[0]
    ww = fixed if fixed else w
    s = _start(dx, lo, hi, fixed)
    for j in range(lo, s):
        dx[j] = bn_dx(dy[j], x[j], m[j % c], a[j % c], b[j % c], d[j % c])
    phase = s % c
    mr = lane_row(m, phase, ww, fixed, dx[s:])
    ar = lane_row(a, phase, ww, fixed, dx[s:])
    br = lane_row(b, phase, ww, fixed, dx[s:])
    dr = lane_row(d, phase, ww, fixed, dx[s:])
    for _ in range((hi - s) // ww):
        dx_row(dy[s : s + ww], x[s : s + ww], mr, ar, br, dr, dx[s : s + ww], stream, fixed)
        s += ww
    for j in range(s, hi):
        dx[j] = bn_dx(dy[j], x[j], m[j % c], a[j % c], b[j % c], d[j % c])
    if stream:
        store_fence()


@functools.cache
def two_pass(fixed: int):
    """(cl_moments, cl_grad_sums, cl_affine, cl_dx) for lane rows of ``fixed`` lanes in
    registers, or (fixed = 0) of the ``w`` given at run time, in memory."""

    @kernel
    def cl_moments(bulk, tail, c, blocks, p_cnt, p_mean, p_m2):
        rows = bulk.shape[0]
        for b in prange(blocks):
            r0, r1 = b * rows // blocks, (b + 1) * rows // blocks
            _block_moments(bulk, tail, r0, r1, b == blocks - 1, c, b, p_cnt, p_mean, p_m2, fixed)

    @kernel
    def cl_grad_sums(dy, x, dy_tail, x_tail, mean, blocks, p_dy, p_dyxmu):
        rows = x.shape[0]
        for b in prange(blocks):
            r0, r1 = b * rows // blocks, (b + 1) * rows // blocks
            last = b == blocks - 1
            _block_grad_sums(dy, x, dy_tail, x_tail, mean, r0, r1, last, b, p_dy, p_dyxmu, fixed)

    @kernel
    def cl_affine(x, m, a, b, w, blocks, stream, out):
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = _block(blk, blocks, n, w)
            _affine_block(x, m, a, b, lo, hi, w, stream, out, fixed)

    @kernel
    def cl_dx(dy, x, m, a, b, d, w, blocks, stream, dx):
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = _block(blk, blocks, n, w)
            _dx_block(dy, x, m, a, b, d, lo, hi, w, stream, dx, fixed)

    return cl_moments, cl_grad_sums, cl_affine, cl_dx
