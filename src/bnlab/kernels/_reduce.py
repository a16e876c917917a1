"""The reduction core: per-channel statistics in one read of the tensor, deterministic.

All sums are accumulated in float64 whatever the input dtype, in ``LANES`` independent
accumulators (so LLVM vectorizes the loop without ``fastmath``: each lane is a plain sequential
sum, the order is fixed by the code, never by the scheduler).

Moments (training forward). Each chunk (a row segment, or a block of rows for channels-last) is
summed *shifted* by its own first value k, which removes the cancellation of E[x²] − E[x]²:

    s1 = Σ (x − k)        s2 = Σ (x − k)²        over the m values of the chunk
    mean = k + s1/m       M2 = s2 − s1²/m        (M2 = Σ (x − mean)²)

and the chunks are merged in a fixed order with the parallel (Chan et al.) update:

    δ = mean_b − mean_a,  n = n_a + n_b,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

Gradient sums (backward): Σ dy and Σ dy·(x − μ) per channel, chunked the same way.

Shapes: channels-first x (N, C, S); channels-last x (R, C) (R = N·S rows); partials (G, C).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

LANES = 32  # independent float64 accumulators per row segment (a multiple of the SIMD width)


# --------------------------------------------------------------------------- per-chunk sums


@njit(cache=True)
def _shifted_sums_in(seg, k, acc1, acc2):
    """(Σ (x − k), Σ (x − k)²) over a 1-D segment, in float64, LANES-way interleaved in the
    caller's (LANES,) scratch accumulators (allocated once per task, not per segment).

    Indices start at 0 (non-negative by construction), so no wraparound check blocks SIMD."""
    acc1[:] = 0.0
    acc2[:] = 0.0
    full = seg.shape[0] // LANES * LANES
    for base in range(0, full, LANES):
        for j in range(LANES):
            d = np.float64(seg[base + j]) - k
            acc1[j] += d
            acc2[j] += d * d
    s1 = 0.0
    s2 = 0.0
    for j in range(LANES):
        s1 += acc1[j]
        s2 += acc2[j]
    for i in range(full, seg.shape[0]):
        d = np.float64(seg[i]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(cache=True)
def _grad_sums_in(dyseg, xseg, mu, acc1, acc2):
    """(Σ dy, Σ dy·(x − μ)) over two 1-D segments of equal length, float64, LANES-way, in the
    caller's (LANES,) scratch accumulators (a fresh allocation per short row costs more than the
    row)."""
    acc1[:] = 0.0
    acc2[:] = 0.0
    full = xseg.shape[0] // LANES * LANES
    for base in range(0, full, LANES):
        for j in range(LANES):
            g = np.float64(dyseg[base + j])
            acc1[j] += g
            acc2[j] += g * (np.float64(xseg[base + j]) - mu)
    s1 = 0.0
    s2 = 0.0
    for j in range(LANES):
        s1 += acc1[j]
        s2 += acc2[j]
    for i in range(full, xseg.shape[0]):
        g = np.float64(dyseg[i])
        s1 += g
        s2 += g * (np.float64(xseg[i]) - mu)
    return s1, s2


@njit(cache=True)
def _sum8(a):
    """Σ a in 8 interleaved accumulators combined pairwise (fixed order): 8 independent
    dependency chains instead of one, for the column sums of the short-row kernels."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = a.shape[0] // 8 * 8
    for i in range(0, full, 8):
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for i in range(full, a.shape[0]):
        total += a[i]
    return total


@njit(cache=True)
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Parallel-variance merge of two (count, mean, M2) summaries (Chan, Golub, LeVeque).

    An empty side returns the other one unchanged: merging into the empty (0, 0, 0) summary
    must not evaluate δ²·n_a, which is inf·0 = NaN once |mean| > ~1.3e154 (float64)."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    f = n_b / n
    return n, mean_a + delta * f, m2_a + m2_b + delta * delta * n_a * f


@njit(cache=True)
def _segment(u, pieces, s):
    """Row n and [lo, hi) of the u-th (n, piece) unit of a channels-first row of s values."""
    n = u // pieces
    p = u % pieces
    return n, p * s // pieces, (p + 1) * s // pieces


# --------------------------------------------------------------------------- moments


@njit(parallel=True, cache=True)
def moments_cf(x, groups, pieces, p_cnt, p_mean, p_m2):
    """Partial (count, mean, M2) per (group, channel) of x (N, C, S) into the (G, C) partials."""
    n, c, s = x.shape
    units = n * pieces
    for t in prange(groups * c):
        g = t // c
        ch = t % c
        cnt, mean, m2 = 0.0, 0.0, 0.0
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for u in range(g * units // groups, (g + 1) * units // groups):
            i, lo, hi = _segment(u, pieces, s)
            seg = x[i, ch, lo:hi]
            k = np.float64(seg[0])
            s1, s2 = _shifted_sums_in(seg, k, acc1, acc2)
            m = np.float64(hi - lo)
            cnt, mean, m2 = _merge(cnt, mean, m2, m, k + s1 / m, s2 - s1 * s1 / m)
        p_cnt[g, ch] = cnt
        p_mean[g, ch] = mean
        p_m2[g, ch] = m2


@njit(parallel=True, cache=True)
def moments_cf_short(x, groups, cblocks, p_cnt, p_mean, p_m2):
    """Like :func:`moments_cf` for short rows (S < ``SHORT_ROW``), where per-row lanes would be
    mostly remainder: the task's rows are summed column-wise (vectorized across the S positions)
    with one shift k (the first value), then the S column sums are added up. A task is a (group,
    block of channels): its column accumulators are allocated once for the block."""
    n, c, s = x.shape
    for t in prange(groups * cblocks):
        g = t // cblocks
        cb = t % cblocks
        n0 = g * n // groups
        n1 = (g + 1) * n // groups
        m = np.float64((n1 - n0) * s)
        acc1 = np.empty(s)
        acc2 = np.empty(s)
        for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
            k = np.float64(x[n0, ch, 0])
            acc1[:] = 0.0
            acc2[:] = 0.0
            for i in range(n0, n1):
                row = x[i, ch]
                for j in range(s):
                    d = np.float64(row[j]) - k
                    acc1[j] += d
                    acc2[j] += d * d
            s1 = _sum8(acc1)
            s2 = _sum8(acc2)
            p_cnt[g, ch] = m
            p_mean[g, ch] = k + s1 / m
            p_m2[g, ch] = s2 - s1 * s1 / m


@njit(cache=True)
def _tile(t, tiles, c):
    """Channel range [c0, c1) of task t's tile (tiles of equal width, the last one shorter)."""
    width = (c + tiles - 1) // tiles
    c0 = (t % tiles) * width
    return c0, min(c, c0 + width)


@njit(cache=True)
def _column_shifted_sums(x, r0, r1, c0, c1):
    """Per channel j of the tile [c0, c1) of x (R, C), over rows [r0, r1): the shift k_j = x[r0, j]
    and (Σ (x − k), Σ (x − k)²) in float64; the inner loop runs across contiguous channels.

    Eight rows are combined per update of the accumulators, as a balanced tree
    (((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))): an eighth of the accumulator loads and
    stores, which otherwise outnumber the data's 4 bytes per value (measured at NHWC
    (64,56,56,64), 2 threads: 1.45 ms with four rows, 1.1 ms with eight; a plain read of x takes
    1.07 ms)."""
    w = c1 - c0
    k = np.empty(w)
    for j in range(w):
        k[j] = np.float64(x[r0, c0 + j])
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    full = r0 + (r1 - r0) // 8 * 8
    for r in range(r0, full, 8):
        x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
        x4, x5, x6, x7 = x[r + 4, c0:c1], x[r + 5, c0:c1], x[r + 6, c0:c1], x[r + 7, c0:c1]
        for j in range(w):
            kj = k[j]
            d0 = np.float64(x0[j]) - kj
            d1 = np.float64(x1[j]) - kj
            d2 = np.float64(x2[j]) - kj
            d3 = np.float64(x3[j]) - kj
            d4 = np.float64(x4[j]) - kj
            d5 = np.float64(x5[j]) - kj
            d6 = np.float64(x6[j]) - kj
            d7 = np.float64(x7[j]) - kj
            acc1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            acc2[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
    for r in range(full, r1):
        xr = x[r, c0:c1]
        for j in range(w):
            d = np.float64(xr[j]) - k[j]
            acc1[j] += d
            acc2[j] += d * d
    return k, acc1, acc2


@njit(cache=True)
def _column_grad_sums(dy, x, mu, r0, r1, c0, c1):
    """Per channel j of the tile [c0, c1), over rows [r0, r1): (Σ dy, Σ dy·(x − μ_j)), float64;
    ``mu`` is the tile's (c1 − c0,) means. Four rows per accumulator update (eight, as in
    :func:`_column_shifted_sums`, measured no faster here: two inputs per value)."""
    w = c1 - c0
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    full = r0 + (r1 - r0) // 4 * 4
    for r in range(r0, full, 4):
        g0, g1, g2, g3 = dy[r, c0:c1], dy[r + 1, c0:c1], dy[r + 2, c0:c1], dy[r + 3, c0:c1]
        x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
        for j in range(w):
            a0, a1 = np.float64(g0[j]), np.float64(g1[j])
            a2, a3 = np.float64(g2[j]), np.float64(g3[j])
            acc1[j] += (a0 + a1) + (a2 + a3)
            acc2[j] += (a0 * (np.float64(x0[j]) - mu[j]) + a1 * (np.float64(x1[j]) - mu[j])) + (
                a2 * (np.float64(x2[j]) - mu[j]) + a3 * (np.float64(x3[j]) - mu[j])
            )
    for r in range(full, r1):
        dyr = dy[r, c0:c1]
        xr = x[r, c0:c1]
        for j in range(w):
            g = np.float64(dyr[j])
            acc1[j] += g
            acc2[j] += g * (np.float64(xr[j]) - mu[j])
    return acc1, acc2


@njit(cache=True)
def _whole_row_grad_sums(dy, x, mu, r0, r1):
    """:func:`_column_grad_sums` over whole rows [r0, r1) of (R, W) arrays, one row per
    accumulator update. On contiguous rows two input streams ran at the speed of a plain read of
    dy and x, where four rows per update (eight load streams) did not: NHWC (64,56,56,64) viewed
    as rows of 1024 lanes, 2 threads: 2.26 ms against 2.97 ms with four rows (the tile kernels
    are the other way round: on column tiles of long rows four rows per update are faster)."""
    w = x.shape[1]
    acc1 = np.zeros(w)
    acc2 = np.zeros(w)
    for r in range(r0, r1):
        dyr = dy[r]
        xr = x[r]
        for j in range(w):
            g = np.float64(dyr[j])
            acc1[j] += g
            acc2[j] += g * (np.float64(xr[j]) - mu[j])
    return acc1, acc2


@njit(cache=True)
def fold_lane_moments(shift, acc1, acc2, m, k, b, p_cnt, p_mean, p_m2):
    """Row b of the (blocks, C) moment partials from one block's (W,) lane sums of a widened view
    (W = k·C, lane l·C + ch is channel ch): each lane's (m, shift + s1/m, s2 − s1²/m) summary,
    merged per channel in lane order."""
    c = acc1.shape[0] // k
    for ch in range(c):
        cnt, mu, m2 = 0.0, 0.0, 0.0
        for lane in range(k):
            j = lane * c + ch
            s1 = acc1[j]
            cnt, mu, m2 = _merge(cnt, mu, m2, m, shift[j] + s1 / m, acc2[j] - s1 * s1 / m)
        p_cnt[b, ch] = cnt
        p_mean[b, ch] = mu
        p_m2[b, ch] = m2


@njit(cache=True)
def fold_lane_sums(acc1, acc2, k, b, p_1, p_2):
    """Row b of two (blocks, C) sum partials from one block's (W,) lane sums of a widened view,
    added per channel in lane order."""
    c = acc1.shape[0] // k
    for ch in range(c):
        s1, s2 = 0.0, 0.0
        for lane in range(k):
            s1 += acc1[lane * c + ch]
            s2 += acc2[lane * c + ch]
        p_1[b, ch] = s1
        p_2[b, ch] = s2


@njit(parallel=True, cache=True)
def moments_cl(x, blocks, tiles, p_cnt, p_mean, p_m2):
    """Partial (count, mean, M2) per (row block, channel) of x (R, C), one task per (block,
    channel tile), shifted by the block's first row; the inner loop runs across contiguous
    channels, so it vectorizes."""
    rows, c = x.shape
    for t in prange(blocks * tiles):
        b = t // tiles
        c0, c1 = _tile(t, tiles, c)
        r0 = b * rows // blocks
        r1 = (b + 1) * rows // blocks
        w = c1 - c0
        k, acc1, acc2 = _column_shifted_sums(x, r0, r1, c0, c1)
        m = np.float64(r1 - r0)
        for j in range(w):
            p_cnt[b, c0 + j] = m
            p_mean[b, c0 + j] = k[j] + acc1[j] / m
            p_m2[b, c0 + j] = acc2[j] - acc1[j] * acc1[j] / m


@njit(parallel=True, cache=True)
def moments_wide(x, k, blocks, p_cnt, p_mean, p_m2):
    """Like :func:`moments_cl` for a widened channels-last view x (R', k·C) (k rows of C channels
    seen as one row: lane l·C + ch is channel ch): one task per row block over whole rows, whose k
    lane partials of each channel are merged in lane order before they are written, so the
    partials are (blocks, C), not (blocks, k·C) — k times less merging afterwards."""
    rows, w = x.shape
    for b in prange(blocks):
        r0 = b * rows // blocks
        r1 = (b + 1) * rows // blocks
        shift, acc1, acc2 = _column_shifted_sums(x, r0, r1, 0, w)
        fold_lane_moments(shift, acc1, acc2, np.float64(r1 - r0), k, b, p_cnt, p_mean, p_m2)


@njit(cache=True)
def merge_moments(p_cnt, p_mean, p_m2, mean, var):
    """Merge the (G, C) partials in group order into mean (C,) and biased var = M2/count (C,).

    A negative variance from rounding is clamped to 0; NaN stays NaN (non-finite batches must
    be detectable from the statistics)."""
    groups, c = p_cnt.shape
    for ch in range(c):
        cnt, mu, m2 = p_cnt[0, ch], p_mean[0, ch], p_m2[0, ch]
        for g in range(1, groups):
            cnt, mu, m2 = _merge(cnt, mu, m2, p_cnt[g, ch], p_mean[g, ch], p_m2[g, ch])
        v = m2 / cnt
        if v < 0.0:
            v = 0.0
        mean[ch] = mu
        var[ch] = v


@njit(cache=True)
def finish_statistics(mean64, var64, eps, mean, var, rstd):
    """The per-channel bookkeeping after the statistics, in one compiled loop: mean, var (C,) ←
    the float64 statistics rounded to their dtype (the accumulation dtype), rstd ← 1/√(var + ε)
    computed in that dtype (the arithmetic of :func:`bnlab.functional.stats.inverse_std`).
    Returns whether every rounded mean and variance is finite. (As NumPy calls — two casts, two
    finiteness tests, three ufuncs for rstd — this took ~60 µs per call in a cold cache at
    C = 4096.)"""
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


# --------------------------------------------------------------------------- gradient sums


@njit(parallel=True, cache=True)
def grad_sums_cf(dy, x, mean, groups, pieces, p_dy, p_dyxmu):
    """Partial Σ dy and Σ dy·(x − μ) per (group, channel) of dy, x (N, C, S)."""
    n, c, s = x.shape
    units = n * pieces
    for t in prange(groups * c):
        g = t // c
        ch = t % c
        mu = mean[ch]
        a, b = 0.0, 0.0
        acc1 = np.empty(LANES)
        acc2 = np.empty(LANES)
        for u in range(g * units // groups, (g + 1) * units // groups):
            i, lo, hi = _segment(u, pieces, s)
            s1, s2 = _grad_sums_in(dy[i, ch, lo:hi], x[i, ch, lo:hi], mu, acc1, acc2)
            a += s1
            b += s2
        p_dy[g, ch] = a
        p_dyxmu[g, ch] = b


@njit(parallel=True, cache=True)
def grad_sums_cf_short(dy, x, mean, groups, cblocks, p_dy, p_dyxmu):
    """Like :func:`grad_sums_cf` for short rows: column-wise sums over the task's rows, one task
    per (group, block of channels)."""
    n, c, s = x.shape
    for t in prange(groups * cblocks):
        g = t // cblocks
        cb = t % cblocks
        acc1 = np.empty(s)
        acc2 = np.empty(s)
        for ch in range(cb * c // cblocks, (cb + 1) * c // cblocks):
            mu = mean[ch]
            acc1[:] = 0.0
            acc2[:] = 0.0
            for i in range(g * n // groups, (g + 1) * n // groups):
                dyr = dy[i, ch]
                xr = x[i, ch]
                for j in range(s):
                    gv = np.float64(dyr[j])
                    acc1[j] += gv
                    acc2[j] += gv * (np.float64(xr[j]) - mu)
            p_dy[g, ch] = _sum8(acc1)
            p_dyxmu[g, ch] = _sum8(acc2)


@njit(parallel=True, cache=True)
def grad_sums_cl(dy, x, mean, blocks, tiles, p_dy, p_dyxmu):
    """Partial Σ dy and Σ dy·(x − μ) per (row block, channel) of dy, x (R, C)."""
    rows, c = x.shape
    for t in prange(blocks * tiles):
        b = t // tiles
        c0, c1 = _tile(t, tiles, c)
        r0 = b * rows // blocks
        r1 = (b + 1) * rows // blocks
        acc1, acc2 = _column_grad_sums(dy, x, mean[c0:c1], r0, r1, c0, c1)
        for j in range(c1 - c0):
            p_dy[b, c0 + j] = acc1[j]
            p_dyxmu[b, c0 + j] = acc2[j]


@njit(parallel=True, cache=True)
def grad_sums_wide(dy, x, mean, k, blocks, p_dy, p_dyxmu):
    """Like :func:`grad_sums_cl` for widened (R', k·C) views (``mean`` tiled k times): one task
    per row block, its k lane sums of each channel added in lane order: partials (blocks, C)."""
    rows = x.shape[0]
    for b in prange(blocks):
        r0 = b * rows // blocks
        r1 = (b + 1) * rows // blocks
        acc1, acc2 = _whole_row_grad_sums(dy, x, mean, r0, r1)
        fold_lane_sums(acc1, acc2, k, b, p_dy, p_dyxmu)


@njit(cache=True)
def sum_partials(p, total):
    """total[c] = Σ_g p[g, c], in group order (fixed, so deterministic)."""
    groups, c = p.shape
    for ch in range(c):
        acc = 0.0
        for g in range(groups):
            acc += p[g, ch]
        total[ch] = acc
