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

from bnlab.inference._gemm import sweep_k
from bnlab.inference._microkernel import A_CHUNK_FLOATS, KC, MR


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def gemm2_tile_range(
    a, bp, a2, bp2, c, blk0, blk1, pan0, pan1, shift, act, pa, pb
):  # pragma: no cover - compiled
    """Rows [6·blk0, 6·blk1) ∩ [0, M) and panels [pan0, pan1) of
    c = act(a @ B + a2 @ B2 + shift).

    a (M, K1), a2 (M, K2) float32 C-contiguous; bp (panels, K1, 32), bp2 (panels, K2, 32)
    packed; c (M, N) C-contiguous; shift (N,).
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
    none = np.zeros(0, np.float32)
    last = min(blk1, -(-m // MR))
    chunk = max(1, A_CHUNK_FLOATS // (MR * min(max(k1, k2), KC)))
    for c0 in range(blk0, last, chunk):
        c1 = min(c0 + chunk, last)
        sweep_k(af, 0, k1, bf, cf, m, n, c0, c1, pan0, pan1, True, False, shift, none, none, 1,
                act, pa, pb)  # fmt: skip
        sweep_k(a2f, 0, k2, b2f, cf, m, n, c0, c1, pan0, pan1, False, True, shift, none, none, 1,
                act, pa, pb)  # fmt: skip


def gemm2_reference(a, w, a2, w2, shift, act):
    """The slow obvious version in float64: act(a @ w + a2 @ w2 + shift)."""
    from bnlab.inference._act import reference  # noqa: PLC0415

    y = a.astype(np.float64) @ w.astype(np.float64) + a2.astype(np.float64) @ w2.astype(np.float64)
    return reference(y + shift, act)
