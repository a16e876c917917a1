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
non-temporal lines (:mod:`._stream`) at any common offset of the arrays: the registers hold the
coefficient rows starting at the lane of that boundary. The kernels take the (C,) vectors and
build the lane rows themselves (tiling and rotating them with NumPy cost ~0.1 ms per call right
after a 51 MB pass has evicted NumPy's own working set from the caches).

Measured (NHWC (64,56,56,64) float32, 2 threads, paired rounds in one process, against the
kernels before: 1024-lane widened rows, heap state): statistics 1.20 -> 0.95 ms (PyTorch's plain
``torch.sum`` of the same x: 0.87 ms), gradient sums 2.15 -> 1.92 ms, affine 2.04 -> 1.73 ms,
backward elementwise 2.94 -> 2.51 ms; forward+backward 8.94 -> 8.05 ms, and 0.65-0.97x the time
at every other channels-last shape tried (C = 3, 32, 64, 128, 192, 256; float64). At C = 256 two
float64 accumulators of 256 lanes spill part of the register file and were still faster than
the heap version; column tiles of 64 lanes of longer rows, each task striding through memory,
were slower, so wider channel counts keep :mod:`._reduce`'s kernels.

Everything runs in a fixed order (blocks by shape, lanes in order): deterministic and
independent of the thread count; the elementwise passes compute the expressions of
:mod:`._elementwise`, in the same order, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload
from numba.np.numpy_support import carray

from ._reduce import fold_lane_moments, fold_lane_sums
from ._stack import stack as _stack
from ._stream import LINE, _nt_affine, _nt_backward, store_fence

REGISTER_WIDTHS = (64, 128, 192, 256)  # lanes per row: multiples of a 64-byte float32 line


def register_width(c: int) -> int:
    """The narrowest of :data:`REGISTER_WIDTHS` that whole rows of c channels fill exactly, or 0
    when there is none (c > 256, or c divides none of them: the heap-accumulator kernels)."""
    return next((w for w in REGISTER_WIDTHS if w % c == 0), 0) if c > 0 else 0


# The helpers take the width as an argument, passed from the kernels below as a compile-time
# constant (each width compiles its own helper: ``stack`` needs the literal). The kernels are
# closures over the width only — a closure over another jitted function would pickle into a
# different cache key in every process, so numba's disk cache would never hit.


@njit(cache=True)
def _shifted_sums(x, r0, r1, shift, acc1, acc2, width):
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
def _grad_sums(dy, x, r0, r1, mean, acc1, acc2, width):
    """acc1, acc2 (W,) ← Σ dy, Σ dy·(x − μ) per lane over rows [r0, r1); lane j's μ is
    mean[j mod C] (mean (C,))."""
    mu = carray(_stack(width, np.float64), (width,))
    a1 = carray(_stack(width, np.float64), (width,))
    a2 = carray(_stack(width, np.float64), (width,))
    c = mean.shape[0]
    for j in range(width):
        mu[j] = mean[j % c]
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


@njit(cache=True)
def _block_range(blk, blocks, n, width):
    """Flat [lo, hi) of block blk of n values: whole rows of ``width`` values, the last block to
    the end."""
    rows = n // width
    lo = blk * rows // blocks * width
    hi = n if blk == blocks - 1 else (blk + 1) * rows // blocks * width
    return lo, hi


def _kernels(width: int):
    """The (moments, grad_sums) parallel kernels for rows of exactly ``width`` lanes."""

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
            _shifted_sums(x, r0, r1, shift, acc1, acc2, width)
            fold_lane_moments(shift, acc1, acc2, np.float64(r1 - r0), k, b, p_cnt, p_mean, p_m2)

    @njit(parallel=True, cache=True)
    def grad_sums(dy, x, mean, k, blocks, p_dy, p_dyxmu):
        """Partial Σ dy and Σ dy·(x − μ) per (row block, channel) of dy, x (R', W); ``mean``
        (C,)."""
        rows = x.shape[0]
        for b in prange(blocks):
            acc1 = np.empty(width)
            acc2 = np.empty(width)
            r0 = b * rows // blocks
            r1 = (b + 1) * rows // blocks
            _grad_sums(dy, x, r0, r1, mean, acc1, acc2, width)
            fold_lane_sums(acc1, acc2, k, b, p_dy, p_dyxmu)

    return moments, grad_sums


def _values_per_line(a):
    """Values of a's dtype per cache line, as a compile-time constant (``LINE // a.itemsize``
    reads the item size at run time: the line loop would not unroll and the coefficient arrays
    would stay in memory)."""
    return LINE // a.itemsize


@overload(_values_per_line)
def _values_per_line_constant(a):
    n = LINE // (a.dtype.bitwidth // 8)
    return lambda a: n


@njit(cache=True)
def _affine_span(x, m, a, b, lo, count, phase, out):
    """out[lo + j] = (x[lo + j] − m)·a + b for j < count, coefficients of channel (phase + j) mod
    C (``phase``: the lane of x[lo] within its row of C channels)."""
    c = m.shape[0]
    for j in range(count):
        ch = (phase + j) % c
        out[lo + j] = (x[lo + j] - m[ch]) * a[ch] + b[ch]


@njit(cache=True)
def _affine_rows(x, m, a, b, start, rows, phase, stream, out, width):
    """The same over ``rows`` line-aligned stretches of ``width`` values from flat ``start``
    (lane ``phase``), the coefficients held in registers; whole-line non-temporal stores if
    ``stream``."""
    mr = carray(_stack(width, x.dtype), (width,))
    ar = carray(_stack(width, x.dtype), (width,))
    br = carray(_stack(width, x.dtype), (width,))
    c = m.shape[0]
    for j in range(width):
        ch = (phase + j) % c
        mr[j] = m[ch]
        ar[j] = a[ch]
        br[j] = b[ch]
    if stream:
        for r in range(rows):
            s = start + r * width
            xs = x[s : s + width]
            ys = out[s : s + width]
            for t in range(0, width, _values_per_line(out)):
                _nt_affine(ys, xs, mr, ar, br, t)
        store_fence()
    else:
        for r in range(rows):
            s = start + r * width
            xs = x[s : s + width]
            ys = out[s : s + width]
            for j in range(width):
                ys[j] = (xs[j] - mr[j]) * ar[j] + br[j]


@njit(cache=True)
def _backward_span(dy, x, mu, a, b, d, lo, count, phase, dx):
    """dx[lo + j] = (A·dy + B·(x − μ)) + D for j < count, coefficients of channel
    (phase + j) mod C."""
    c = mu.shape[0]
    for j in range(count):
        ch = (phase + j) % c
        dx[lo + j] = a[ch] * dy[lo + j] + b[ch] * (x[lo + j] - mu[ch]) + d[ch]


@njit(cache=True)
def _backward_rows(dy, x, mu, a, b, d, start, rows, phase, stream, dx, width):
    """The same over ``rows`` line-aligned stretches of ``width`` values (lane ``phase``), the
    coefficients in registers; whole-line non-temporal stores if ``stream``."""
    mur = carray(_stack(width, x.dtype), (width,))
    ar = carray(_stack(width, x.dtype), (width,))
    br = carray(_stack(width, x.dtype), (width,))
    dr = carray(_stack(width, x.dtype), (width,))
    c = mu.shape[0]
    for j in range(width):
        ch = (phase + j) % c
        mur[j] = mu[ch]
        ar[j] = a[ch]
        br[j] = b[ch]
        dr[j] = d[ch]
    if stream:
        for r in range(rows):
            s = start + r * width
            dys = dy[s : s + width]
            xs = x[s : s + width]
            dxs = dx[s : s + width]
            for t in range(0, width, _values_per_line(dx)):
                _nt_backward(dxs, dys, xs, mur, ar, br, dr, t)
        store_fence()
    else:
        for r in range(rows):
            s = start + r * width
            dys = dy[s : s + width]
            xs = x[s : s + width]
            dxs = dx[s : s + width]
            for j in range(width):
                dxs[j] = ar[j] * dys[j] + br[j] * (xs[j] - mur[j]) + dr[j]


def _elementwise_kernels(width: int):
    """The (affine, backward) parallel elementwise kernels for flat channels-last arrays of C
    channels, C dividing ``width`` (laid out by :func:`.core._lane_layout`). Per block (whole rows
    of W values): the ``head`` values before the first line boundary, whole line-aligned
    stretches of W values with the coefficients in registers (lane ``head`` first), the tail."""

    @njit(parallel=True, cache=True)
    def affine(x, m, a, b, head, blocks, stream, out):
        """out = (x − m)·a + b over flat (R·C,) arrays; m, a, b (C,)."""
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = _block_range(blk, blocks, n, width)
            h = min(head, hi - lo)
            _affine_span(x, m, a, b, lo, h, 0, out)
            rows = (hi - lo - h) // width
            _affine_rows(x, m, a, b, lo + h, rows, h, stream, out, width)
            s = lo + h + rows * width
            _affine_span(x, m, a, b, s, hi - s, h, out)

    @njit(parallel=True, cache=True)
    def backward(dy, x, mu, a, b, d, head, blocks, stream, dx):
        """dx = (A·dy + B·(x − μ)) + D over flat (R·C,) arrays; μ, A, B, D (C,)."""
        n = x.shape[0]
        for blk in prange(blocks):
            lo, hi = _block_range(blk, blocks, n, width)
            h = min(head, hi - lo)
            _backward_span(dy, x, mu, a, b, d, lo, h, 0, dx)
            rows = (hi - lo - h) // width
            _backward_rows(dy, x, mu, a, b, d, lo + h, rows, h, stream, dx, width)
            s = lo + h + rows * width
            _backward_span(dy, x, mu, a, b, d, s, hi - s, h, dx)

    return affine, backward


_KERNELS = {w: _kernels(w) for w in REGISTER_WIDTHS}
_ELEMENTWISE = {w: _elementwise_kernels(w) for w in REGISTER_WIDTHS}


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
