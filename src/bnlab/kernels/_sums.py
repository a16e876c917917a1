"""The one reduction primitive of every kernel, and the merges of its partial results.

A contiguous run of values is read as rows of ``w`` *lanes* (the last row may be partial: its
values go to lanes 0, 1, ...), and each lane accumulates, in float64,

    shifted sums    s1[l] += Σ (x − k[l]),   s2[l] += Σ (x − k[l])²          (lane_sums)
    gradient sums   s1[l] += Σ dy,           s2[l] += Σ dy·(x − μ[l])        (lane_grad_sums)

Everything is this primitive on a different view: a long channels-first row or a layer-norm row
as rows of 32 lanes, a short channels-first row as one row of S lanes (column sums across the
rows of a channel), a block of channels-last rows as rows of W = k·C lanes (lane l is channel
l mod C). The lanes are independent sequential sums in a fixed order: LLVM vectorizes them
without ``fastmath``, and the result does not depend on the thread count.

When ``w`` is a compile-time constant the lanes (and the shifts) are copied into fixed-size stack
arrays (:mod:`._stack`) that LLVM keeps in vector registers for the whole loop; heap arrays would
be loaded and stored for every row, since LLVM cannot prove they do not alias the data.

A run's summary (count m, mean, M2 = Σ (x − mean)²) follows from its shifted sums,
``mean = k + s1/m`` and ``M2 = s2 − s1²/m``: the shift k (a value of the data) removes the
cancellation of E[x²] − E[x]². Summaries are merged in a fixed order with the parallel update of
Chan, Golub and LeVeque:

    δ = mean_b − mean_a,  n = n_a + n_b,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload
from numba.np.numpy_support import carray

from ._compile import stack
from ._elementwise import at


@njit(cache=True, inline="always")
def shifted_add(a1, a2, j, v, k):
    """The primitive: lane j of the shifted sums takes one value v (shift k)."""
    d = np.float64(v) - k
    a1[j] += d
    a2[j] += d * d


@njit(cache=True, inline="always")
def grad_add(a1, a2, j, g, v, mu):
    """Its gradient twin: lane j of (Σ dy, Σ dy·(x − μ)) takes one pair (g = dy, v = x)."""
    g = np.float64(g)
    a1[j] += g
    a2[j] += g * (np.float64(v) - mu)


@njit(cache=True, inline="always")
def lane_sums(seg, k, acc1, acc2, w):
    """acc1, acc2 (w,) += the shifted sums of the 1-D contiguous ``seg`` read as rows of ``w``
    lanes (the last row may be partial); ``k``: (w,) per lane, or one scalar for all. (w is a
    compile-time constant in every caller: the divisions below are shifts.)"""
    full = seg.shape[0] // w * w
    for base in range(0, full, w):
        for j in range(w):
            shifted_add(acc1, acc2, j, seg[base + j], at(k, j))
    for j in range(seg.shape[0] - full):
        shifted_add(acc1, acc2, j, seg[full + j], at(k, j))


@njit(cache=True, inline="always")
def lane_grad_sums(dy, x, mu, acc1, acc2, w):
    """acc1, acc2 (w,) += Σ dy, Σ dy·(x − μ) per lane of the 1-D dy, x read as rows of ``w``
    lanes; ``mu``: (w,) per lane, or one scalar."""
    full = x.shape[0] // w * w
    for base in range(0, full, w):
        for j in range(w):
            grad_add(acc1, acc2, j, dy[base + j], x[base + j], at(mu, j))
    for j in range(x.shape[0] - full):
        grad_add(acc1, acc2, j, dy[full + j], x[full + j], at(mu, j))


@njit(cache=True, inline="always")
def _row(x, r, c0, w, whole):
    """Columns [c0, c0 + w) of row r (the whole row without slicing when ``whole``)."""
    return x[r] if whole else x[r, c0 : c0 + w]


@njit(cache=True, inline="always")
def _column_loop(x, r0, r1, step, c0, k, a1, a2, w):
    whole = c0 == 0 and w == x.shape[1]
    for r in range(r0, r1, step):
        row = _row(x, r, c0, w, whole)
        for j in range(w):
            shifted_add(a1, a2, j, row[j], at(k, j))


@njit(cache=True, inline="always")
def _column_grad_loop(dy, x, r0, r1, step, c0, mu, a1, a2, w):
    whole = c0 == 0 and w == x.shape[1]
    for r in range(r0, r1, step):
        dyr = _row(dy, r, c0, w, whole)
        xr = _row(x, r, c0, w, whole)
        for j in range(w):
            grad_add(a1, a2, j, dyr[j], xr[j], at(mu, j))


@njit(cache=True, inline="always")
def column_sums4(x, r0, r1, c0, k, acc1, acc2):
    """:func:`column_sums` of columns [c0, c0 + w) of rows [r0, r1) (w = acc1.size, lanes in
    memory, ``k`` per lane), four rows per update of the lanes, added as a balanced tree: a
    quarter of the lane loads and stores, and whole rows read in memory order (wide column
    tiles of rows that are not in cache: reading them 64 lanes at a time, in registers, left
    the hardware prefetchers behind: 30 % slower at (256, 4096) when cold)."""
    w = acc1.shape[0]
    r = r0
    while r + 4 <= r1:
        x0, x1 = x[r, c0 : c0 + w], x[r + 1, c0 : c0 + w]
        x2, x3 = x[r + 2, c0 : c0 + w], x[r + 3, c0 : c0 + w]
        for j in range(w):
            d0, d1 = np.float64(x0[j]) - k[j], np.float64(x1[j]) - k[j]
            d2, d3 = np.float64(x2[j]) - k[j], np.float64(x3[j]) - k[j]
            acc1[j] += (d0 + d1) + (d2 + d3)
            acc2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    _column_loop(x, r, r1, 1, c0, k, acc1, acc2, w)


@njit(cache=True, inline="always")
def column_grad_sums4(dy, x, r0, r1, c0, mu, acc1, acc2):
    """:func:`column_grad_sums` four rows at a time, likewise."""
    w = acc1.shape[0]
    r = r0
    while r + 4 <= r1:
        g0, g1 = dy[r, c0 : c0 + w], dy[r + 1, c0 : c0 + w]
        g2, g3 = dy[r + 2, c0 : c0 + w], dy[r + 3, c0 : c0 + w]
        x0, x1 = x[r, c0 : c0 + w], x[r + 1, c0 : c0 + w]
        x2, x3 = x[r + 2, c0 : c0 + w], x[r + 3, c0 : c0 + w]
        for j in range(w):
            a, b = np.float64(g0[j]), np.float64(g1[j])
            c, d = np.float64(g2[j]), np.float64(g3[j])
            m = mu[j]
            acc1[j] += (a + b) + (c + d)
            acc2[j] += (a * (np.float64(x0[j]) - m) + b * (np.float64(x1[j]) - m)) + (
                c * (np.float64(x2[j]) - m) + d * (np.float64(x3[j]) - m)
            )
        r += 4
    _column_grad_loop(dy, x, r, r1, 1, c0, mu, acc1, acc2, w)


def column_sums(x, r0, r1, step, c0, shift, acc1, acc2, w, fixed):
    """acc1, acc2 (w,) += the shifted sums of columns [c0, c0 + w) of rows r0, r0 + step, ...
    < r1 of the 2-D C-contiguous x: lane j is column c0 + j (a channels-last column tile or
    block of lane rows: step 1; the rows of one channel of a channels-first (N·C, S) view: step
    C). ``fixed``: w as a compile-time constant (lanes in registers for the whole loop), or 0
    (lanes in the given arrays). Compiled code only (see the overloads below)."""
    raise NotImplementedError("column_sums runs inside compiled kernels only")


def column_grad_sums(dy, x, r0, r1, step, c0, mu, acc1, acc2, w, fixed):
    """acc1, acc2 (w,) += Σ dy, Σ dy·(x − μ) over the rows and columns of :func:`column_sums`."""
    raise NotImplementedError("column_grad_sums runs inside compiled kernels only")


def lanes_of(v, n):
    """A per-lane array v copied into n stack lanes (registers); a scalar v as it is."""
    raise NotImplementedError("lanes_of runs inside compiled kernels only")


def _constant(fixed) -> int:
    return fixed.literal_value if isinstance(fixed, types.IntegerLiteral) else 0


@overload(lanes_of, prefer_literal=True, inline="always")
def _lanes_of(v, n):
    if not isinstance(v, types.Array):
        return lambda v, n: v
    size = _constant(n)

    def copy(v, n):
        lanes = carray(stack(size, np.float64), (size,))
        for j in range(size):
            lanes[j] = v[j]
        return lanes

    return copy


@njit(cache=True, inline="always")
def _store(lanes, acc):
    for j in range(lanes.shape[0]):
        acc[j] = lanes[j]


@overload(column_sums, prefer_literal=True, inline="always")
def _column_sums(x, r0, r1, step, c0, shift, acc1, acc2, w, fixed):
    n = _constant(fixed)
    if not n:

        def in_memory(x, r0, r1, step, c0, shift, acc1, acc2, w, fixed):
            _column_loop(x, r0, r1, step, c0, shift, acc1, acc2, w)

        return in_memory

    def in_registers(x, r0, r1, step, c0, shift, acc1, acc2, w, fixed):
        k, a1, a2 = lanes_of(shift, n), lanes_of(acc1, n), lanes_of(acc2, n)
        _column_loop(x, r0, r1, step, c0, k, a1, a2, n)
        _store(a1, acc1)
        _store(a2, acc2)

    return in_registers


@overload(column_grad_sums, prefer_literal=True, inline="always")
def _column_grad_sums(dy, x, r0, r1, step, c0, mu, acc1, acc2, w, fixed):
    n = _constant(fixed)
    if not n:

        def in_memory(dy, x, r0, r1, step, c0, mu, acc1, acc2, w, fixed):
            _column_grad_loop(dy, x, r0, r1, step, c0, mu, acc1, acc2, w)

        return in_memory

    def in_registers(dy, x, r0, r1, step, c0, mu, acc1, acc2, w, fixed):
        m, a1, a2 = lanes_of(mu, n), lanes_of(acc1, n), lanes_of(acc2, n)
        _column_grad_loop(dy, x, r0, r1, step, c0, m, a1, a2, n)
        _store(a1, acc1)
        _store(a2, acc2)

    return in_registers


# --------------------------------------------------------------------------- summaries


@njit(cache=True)
def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Parallel-variance merge of two (count, mean, M2) summaries. An empty side returns the
    other unchanged: merging into the empty (0, 0, 0) must not evaluate δ²·n_a, which is
    inf·0 = NaN once |mean| > ~1.3e154."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    f = n_b / n
    return n, mean_a + delta * f, m2_a + m2_b + delta * delta * n_a * f


@njit(cache=True)
def lanes_total(acc):
    """Σ acc in 8 interleaved sums combined pairwise (fixed order, 8 dependency chains)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = acc.shape[0] // 8 * 8
    for i in range(0, full, 8):
        s0 += acc[i]
        s1 += acc[i + 1]
        s2 += acc[i + 2]
        s3 += acc[i + 3]
        s4 += acc[i + 4]
        s5 += acc[i + 5]
        s6 += acc[i + 6]
        s7 += acc[i + 7]
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for i in range(full, acc.shape[0]):
        total += acc[i]
    return total


@njit(cache=True, inline="always")
def summary(m, k, acc1, acc2):
    """(m, mean, M2) of m values whose lanes share the shift k."""
    s1 = lanes_total(acc1)
    s2 = lanes_total(acc2)
    return m, k + s1 / m, s2 - s1 * s1 / m


@njit(cache=True, inline="always")
def variance(m, m2):
    """Biased variance M2/m, a rounding-negative one clamped to 0 (NaN stays NaN)."""
    v = m2 / m
    return 0.0 if v < 0.0 else v


@njit(cache=True)
def fold_lane_moments(shift, acc1, acc2, rows, tail, c, b, p_cnt, p_mean, p_m2):
    """Row b of the (blocks, C) moment partials from one block's lanes: ``rows`` whole rows of
    W = acc1.size lanes plus a partial row of ``tail`` values (lanes 0 .. tail − 1); lane l is
    channel l mod C. Each lane's summary is merged into its channel's in lane order."""
    for ch in range(c):
        cnt, mu, m2 = 0.0, 0.0, 0.0
        for lane in range(ch, acc1.shape[0], c):
            m = np.float64(rows + (1 if lane < tail else 0))
            if m > 0.0:
                s1 = acc1[lane]
                cnt, mu, m2 = merge(cnt, mu, m2, m, shift[lane] + s1 / m, acc2[lane] - s1 * s1 / m)
        p_cnt[b, ch] = cnt
        p_mean[b, ch] = mu
        p_m2[b, ch] = m2


@njit(cache=True)
def fold_lane_sums(acc1, acc2, c, b, p_1, p_2):
    """Row b of two (blocks, C) sum partials from one block's lanes (lane l is channel l mod C),
    added per channel in lane order."""
    for ch in range(c):
        s1, s2 = 0.0, 0.0
        for lane in range(ch, acc1.shape[0], c):
            s1 += acc1[lane]
            s2 += acc2[lane]
        p_1[b, ch] = s1
        p_2[b, ch] = s2


@njit(cache=True)
def merge_moments(p_cnt, p_mean, p_m2, mean, var):
    """mean (C,), biased var (C,) from (G, C) partial summaries, merged in group order."""
    groups, c = p_cnt.shape
    for ch in range(c):
        cnt, mu, m2 = p_cnt[0, ch], p_mean[0, ch], p_m2[0, ch]
        for g in range(1, groups):
            cnt, mu, m2 = merge(cnt, mu, m2, p_cnt[g, ch], p_mean[g, ch], p_m2[g, ch])
        mean[ch] = mu
        var[ch] = variance(cnt, m2)


@njit(cache=True)
def sum_partials(p, total):
    """total[c] = Σ_g p[g, c], in group order."""
    groups, c = p.shape
    for ch in range(c):
        acc = 0.0
        for g in range(groups):
            acc += p[g, ch]
        total[ch] = acc


@njit(cache=True)
def finish_statistics(mean64, var64, eps, mean, var, rstd):
    """mean, var ← the float64 statistics rounded to their dtype (the accumulation dtype); rstd ←
    1/√(var + ε) in that dtype (the arithmetic of ``functional.stats.inverse_std``). Returns
    whether every rounded mean and variance is finite. One compiled loop: as NumPy calls this
    bookkeeping took ~60 µs per call in a cold cache at C = 4096."""
    t = rstd.dtype.type
    e = t(eps)
    one = t(1.0)
    finite = True
    for i in range(mean64.shape[0]):
        m = t(mean64[i])
        v = t(var64[i])
        mean[i] = m
        var[i] = v
        rstd[i] = one / np.sqrt(v + e)
        if not (np.isfinite(m) and np.isfinite(v)):
            finite = False
    return finite
