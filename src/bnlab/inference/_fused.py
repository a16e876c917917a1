"""A bottleneck's expanding 1x1 conv and its downsample branch as one GEMM with two K segments.

A bottleneck with a downsample branch ends in

    Y = relu(T2 @ W3 + b3 + Xs @ Wd + bd)          T2 (M, w), Xs (M, C_in), Y (M, 4w)

(Xs = X, or X subsampled by the stride). The engine used to compute the branch into its own
buffer (M x 4w floats written and read back as the residual); here both products accumulate in
the same registers: the micro-kernel runs over T2's K segment, then over Xs's with its
accumulate flag set, and the epilogue adds b3 + bd and applies ReLU once. Only for folded BN
(both convs then have plain biases; with BN kept as scale + shift the two branches would need
different scales).

Each segment is K-blocked by ``KC`` like the big-K path of :func:`bnlab.inference._gemm.
gemm_tile_range`: one 64 KB piece of a weight panel serves a whole L2-sized chunk of rows.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._gemm import (
    A_CHUNK_FLOATS,
    KC,
    MR,
    NR,
    _epilogue_rows,
    _microkernel_pf,
    _next_piece,
    _prefetch_target,
)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _accumulate(af, k, bf, cf, n, blk0, blk1, pan0, pan1, first):  # pragma: no cover - compiled
    """C[rows of blocks blk0..blk1, panels pan0..pan1] (+)= A @ B for one K segment: A flat
    (rows, k), B panels flat (N/32, k, 32), C flat (rows, n); ``first`` overwrites C."""
    for kb in range(0, k, KC):
        kc = min(KC, k - kb)
        acc = 0 if first and kb == 0 else 1
        for p in range(pan0, pan1):
            b_off = p * k * NR + kb * NR
            nxt = _next_piece(p, pan0, pan1, kb, k)
            for blk in range(blk0, blk1):
                i = blk * MR
                pf, st = _prefetch_target(b_off, nxt, blk - blk0, blk1 - blk0, kc)
                _microkernel_pf(af, i * k + kb, k, bf, b_off, cf, i * n + p * NR, n, kc, acc, pf,
                                st)  # fmt: skip


@numba.njit(nogil=True, cache=True, boundscheck=False)
def gemm2_tile_range(a, bp, a2, bp2, c, blk0, blk1, pan0, pan1, shift,
                     relu):  # fmt: skip  # pragma: no cover - compiled
    """Rows [6·blk0, 6·blk1) ∩ [0, M) and panels [pan0, pan1) of
    c = act(a @ B + a2 @ B2 + shift).

    a (M, K1), a2 (M, K2) float32 C-contiguous; bp (N/32, K1, 32), bp2 (N/32, K2, 32) packed;
    c (M, N) C-contiguous; shift (N,).
    """
    m, k1 = a.shape
    k2 = a2.shape[1]
    n = c.shape[1]
    af, a2f, bf, b2f, cf = (
        a.reshape(-1),
        a2.reshape(-1),
        bp.reshape(-1),
        bp2.reshape(-1),
        c.reshape(-1),
    )
    no_scale = np.zeros(0, np.float32)
    no_res = np.zeros((0, 1), np.float32)
    full = m // MR
    hi = min(blk1, full)
    chunk = max(1, A_CHUNK_FLOATS // (MR * min(max(k1, k2), KC)))
    for c0 in range(blk0, hi, chunk):
        c1 = min(c0 + chunk, hi)
        _accumulate(af, k1, bf, cf, n, c0, c1, pan0, pan1, True)
        _accumulate(a2f, k2, b2f, cf, n, c0, c1, pan0, pan1, False)
        _epilogue_rows(c, c0 * MR, c1 * MR, pan0 * NR, pan1 * NR, no_scale, shift, no_res, relu)
    if blk1 > full and m % MR:  # the last, partial block: through zero-padded scratch rows
        i = full * MR
        rows = m - i
        a_tile = np.zeros((MR, k1), np.float32)
        a2_tile = np.zeros((MR, k2), np.float32)
        a_tile[:rows] = a[i:]
        a2_tile[:rows] = a2[i:]
        c_tile = np.empty((MR, n), np.float32)
        ct = c_tile.reshape(-1)
        _accumulate(a_tile.reshape(-1), k1, bf, ct, n, 0, 1, pan0, pan1, True)
        _accumulate(a2_tile.reshape(-1), k2, b2f, ct, n, 0, 1, pan0, pan1, False)
        c[i:, pan0 * NR : pan1 * NR] = c_tile[:rows, pan0 * NR : pan1 * NR]
        _epilogue_rows(c, i, m, pan0 * NR, pan1 * NR, no_scale, shift, no_res, relu)


def gemm2_reference(a, w, a2, w2, shift, relu):
    """The slow obvious version in float64: act(a @ w + a2 @ w2 + shift)."""
    y = a.astype(np.float64) @ w.astype(np.float64) + a2.astype(np.float64) @ w2.astype(np.float64)
    y = y + shift
    return np.maximum(y, 0) if relu else y
