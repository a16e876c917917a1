"""Channels-last kernels that keep their per-lane state in vector registers.

A channels-last (R, C) tensor with few channels is walked in rows of W = k·C lanes (k
consecutive rows of C channels are the same memory as one row of W values; lane l·C + ch is
channel ch), W one of :data:`REGISTER_WIDTHS`, the narrowest that C divides. The per-lane state
of a task lives in *stack* arrays of a compile-time size (:func:`._stack.stack`): LLVM unrolls
the lane loop, can see that nothing else reaches those arrays, and keeps them in vector registers
for the whole row loop. The same loops over heap arrays (``np.zeros``, or the (W,) coefficient
rows of :mod:`._elementwise`) load every lane's state from memory for every row (and, for
accumulators, store it back), since LLVM cannot rule out that they alias the data.

Reductions (training statistics, gradient sums): one task per block of rows, one row per update,
the W-lane float64 accumulators in registers; the shifted sums and merges of :mod:`._reduce`
(shift = the block's first row, lanes folded per channel in lane order). Elementwise passes
(affine, backward): the coefficients in registers; the arrays are walked flat, from the first
cache-line boundary of the output in stretches of W values, so the stores can be whole
non-temporal lines (:mod:`._stream`) at any common offset of the arrays: the coefficient rows
are rotated by the number of values before that boundary (:func:`lane_rows`).

Measured (NHWC (64,56,56,64) float32, 2 threads, paired rounds in one process, against the
previous kernels: 1024-lane widened rows, heap state): statistics 1.30 -> 0.89 ms (PyTorch's
plain ``torch.sum`` of the same x: 0.85 ms), gradient sums 2.34 -> 2.00 ms, backward elementwise
3.31 -> 2.72 ms (the channels-first pass on the same data: 3.06 ms). At C = 256 (two float64
accumulators of 256 lanes spill part of the register file) the statistics were still faster than
the heap version (1.34 -> 1.10 ms); column tiles of 64 lanes of longer rows, each task striding
through memory, were slower, so wider channel counts keep :mod:`._reduce`'s kernels.

Everything runs in a fixed order (blocks by shape, lanes in order): deterministic and
independent of the thread count; the elementwise passes compute the expressions of
:mod:`._elementwise`, in the same order, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.np.numpy_support import carray

from ._reduce import fold_lane_moments, fold_lane_sums
from ._stack import stack as _stack
from ._stream import LINE, _nt_affine, _nt_backward, store_fence

REGISTER_WIDTHS = (64, 128, 192, 256)  # lanes per row: multiples of a 64-byte float32 line


def register_width(c: int) -> int:
    """The narrowest of :data:`REGISTER_WIDTHS` that whole rows of c channels fill exactly, or 0
    when there is none (c > 256, or c divides none of them: the heap-accumulator kernels)."""
    return next((w for w in REGISTER_WIDTHS if w % c == 0), 0) if c > 0 else 0


def _kernels(width: int):
    """The (moments, grad_sums) parallel kernels for rows of exactly ``width`` lanes."""

    @njit(cache=True)
    def shifted_sums(x, r0, r1, shift, acc1, acc2):
        """acc1, acc2 (W,) ← Σ (x − k), Σ (x − k)² per lane over rows [r0, r1), k = shift (W,)."""
        k = carray(_stack(width, np.float64), (width,))
        a1 = carray(_stack(width, np.float64), (width,))
        a2 = carray(_stack(width, np.float64), (width,))
        for j in range(width):
            k[j] = shift[j]
            a1[j] = 0.0
            a2[j] = 0.0
        for r in range(r0, r1):
            xr = x[r]
            for j in range(width):
                d = np.float64(xr[j]) - k[j]
                a1[j] += d
                a2[j] += d * d
        for j in range(width):
            acc1[j] = a1[j]
            acc2[j] = a2[j]

    @njit(cache=True)
    def grad_sums(dy, x, r0, r1, mean, acc1, acc2):
        """acc1, acc2 (W,) ← Σ dy, Σ dy·(x − μ) per lane over rows [r0, r1), μ = mean (W,)."""
        mu = carray(_stack(width, np.float64), (width,))
        a1 = carray(_stack(width, np.float64), (width,))
        a2 = carray(_stack(width, np.float64), (width,))
        for j in range(width):
            mu[j] = mean[j]
            a1[j] = 0.0
            a2[j] = 0.0
        for r in range(r0, r1):
            dyr = dy[r]
            xr = x[r]
            for j in range(width):
                g = np.float64(dyr[j])
                a1[j] += g
                a2[j] += g * (np.float64(xr[j]) - mu[j])
        for j in range(width):
            acc1[j] = a1[j]
            acc2[j] = a2[j]

    @njit(parallel=True, cache=True)
    def moments(x, k, blocks, p_cnt, p_mean, p_m2):
        """Partial (count, mean, M2) per (row block, channel) of x (R', W), W = k·C: one task per
        block, shifted by the block's first row, its k lanes per channel folded into (blocks, C)."""
        rows = x.shape[0]
        for b in prange(blocks):
            r0 = b * rows // blocks
            r1 = (b + 1) * rows // blocks
            shift = np.empty(width)
            for j in range(width):
                shift[j] = np.float64(x[r0, j])
            acc1 = np.empty(width)
            acc2 = np.empty(width)
            shifted_sums(x, r0, r1, shift, acc1, acc2)
            fold_lane_moments(shift, acc1, acc2, np.float64(r1 - r0), k, b, p_cnt, p_mean, p_m2)

    @njit(parallel=True, cache=True)
    def grad_sums_kernel(dy, x, mean, k, blocks, p_dy, p_dyxmu):
        """Partial Σ dy and Σ dy·(x − μ) per (row block, channel) of dy, x (R', W); ``mean`` is
        the (C,) means tiled k times."""
        rows = x.shape[0]
        for b in prange(blocks):
            acc1 = np.empty(width)
            acc2 = np.empty(width)
            grad_sums(dy, x, b * rows // blocks, (b + 1) * rows // blocks, mean, acc1, acc2)
            fold_lane_sums(acc1, acc2, k, b, p_dy, p_dyxmu)

    return moments, grad_sums_kernel


def _elementwise_kernels(width: int):
    """The (affine, backward) parallel elementwise kernels for channels-last arrays whose
    channels repeat every ``width`` values (laid out by :func:`.core._lane_layout`)."""

    @njit(cache=True)
    def block_range(blk, blocks, n):
        """Flat [lo, hi) of block blk: whole rows of ``width`` values, the last block to the end."""
        rows = n // width
        lo = blk * rows // blocks * width
        hi = n if blk == blocks - 1 else (blk + 1) * rows // blocks * width
        return lo, hi

    @njit(parallel=True, cache=True)
    def affine(x, rot, head, blocks, stream, out):
        """out = (x − m)·a + b over flat (R·C,) arrays; rot (3, W) = the m, a, b lane rows
        rotated by ``head``."""
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = block_range(blk, blocks, n)
            m = carray(_stack(width, x.dtype), (width,))
            a = carray(_stack(width, x.dtype), (width,))
            b = carray(_stack(width, x.dtype), (width,))
            for j in range(width):
                m[j] = rot[0, j]
                a[j] = rot[1, j]
                b[j] = rot[2, j]
            h = min(head, hi - lo)
            for j in range(h):  # lane j = rotated index j − head + W
                i = j - head + width
                out[lo + j] = (x[lo + j] - m[i]) * a[i] + b[i]
            rows = (hi - lo - h) // width
            for r in range(rows):
                s = lo + h + r * width
                xs = x[s : s + width]
                ys = out[s : s + width]
                if stream:
                    for t in range(0, width, LINE // out.itemsize):
                        _nt_affine(ys, xs, m, a, b, t)
                else:
                    for j in range(width):
                        ys[j] = (xs[j] - m[j]) * a[j] + b[j]
            s = lo + h + rows * width
            for j in range(hi - s):
                out[s + j] = (x[s + j] - m[j]) * a[j] + b[j]
            if stream:
                store_fence()

    @njit(parallel=True, cache=True)
    def backward(dy, x, rot, head, blocks, stream, dx):
        """dx = (A·dy + B·(x − μ)) + D over flat (R·C,) arrays; rot (4, W) = the μ, A, B, D lane
        rows rotated by ``head``."""
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = block_range(blk, blocks, n)
            mu = carray(_stack(width, x.dtype), (width,))
            a = carray(_stack(width, x.dtype), (width,))
            b = carray(_stack(width, x.dtype), (width,))
            d = carray(_stack(width, x.dtype), (width,))
            for j in range(width):
                mu[j] = rot[0, j]
                a[j] = rot[1, j]
                b[j] = rot[2, j]
                d[j] = rot[3, j]
            h = min(head, hi - lo)
            for j in range(h):
                i = j - head + width
                dx[lo + j] = a[i] * dy[lo + j] + b[i] * (x[lo + j] - mu[i]) + d[i]
            rows = (hi - lo - h) // width
            for r in range(rows):
                s = lo + h + r * width
                dys = dy[s : s + width]
                xs = x[s : s + width]
                dxs = dx[s : s + width]
                if stream:
                    for t in range(0, width, LINE // dx.itemsize):
                        _nt_backward(dxs, dys, xs, mu, a, b, d, t)
                else:
                    for j in range(width):
                        dxs[j] = a[j] * dys[j] + b[j] * (xs[j] - mu[j]) + d[j]
            s = lo + h + rows * width
            for j in range(hi - s):
                dx[s + j] = a[j] * dy[s + j] + b[j] * (x[s + j] - mu[j]) + d[j]
            if stream:
                store_fence()

    return affine, backward


_KERNELS = {w: _kernels(w) for w in REGISTER_WIDTHS}
_ELEMENTWISE = {w: _elementwise_kernels(w) for w in REGISTER_WIDTHS}


def lane_rows(coefs, k: int, head: int) -> np.ndarray:
    """The elementwise kernels' coefficients: (len(coefs), W) rows, each (C,) coefficient tiled k
    times (lane l·C + ch is channel ch) and rotated left by ``head`` (entry j is lane
    (j + head) mod W), so that within a line-aligned stretch of W values entry j goes with value
    j."""
    return np.roll(np.tile(np.stack(coefs), (1, k)), -head, axis=1)


def head(out: np.ndarray) -> int:
    """Values of the flat ``out`` before its first line boundary (< 64 bytes of them)."""
    return (-out.ctypes.data % LINE) // out.itemsize


def moments(width: int):
    """The register-accumulator moments kernel for rows of ``width`` lanes."""
    return _KERNELS[width][0]


def grad_sums(width: int):
    """The register-accumulator gradient-sums kernel for rows of ``width`` lanes."""
    return _KERNELS[width][1]


def affine(width: int):
    """The register-coefficient affine kernel for channels repeating every ``width`` values."""
    return _ELEMENTWISE[width][0]


def backward(width: int):
    """The register-coefficient backward elementwise kernel, likewise."""
    return _ELEMENTWISE[width][1]
