"""Depthwise convolution (groups = channels), NHWC, with the fused epilogue.

    y[n, oh, ow, c] = act(Σ_{i,j} x[n, oh·sh − pt + i·dh, ow·sw − pl + j·dw, c] · w[i, j, c]
                          · scale[c] + shift[c] + residual)

Each output value reads kh·kw inputs of its own channel only, so there is nothing to share
between channels and nothing for a GEMM to do: the work is a stream of multiply-adds over
channel vectors. Loops run over channels innermost (contiguous in NHWC; LLVM vectorizes them);
each output row of channels is accumulated in place over the taps while it is in L1, then the
epilogue runs on the finished output rows of one (n, oh).
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._gemm import epilogue_rows


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> (kh·kw, C) float32: row t = i·kw + j holds tap (i, j) of every channel."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c, kh * kw).T, dtype=np.float32)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def depthwise_rows(
    x, wt, geom, out, r0, r1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Output rows r = n·Ho + oh in [r0, r1) of the depthwise conv of x (N, H, W, C) with
    packed weights wt (kh·kw, C); out (N·Ho·Wo, C). geom = (kh, kw, sh, sw, pt, pl, dh, dw,
    Ho, Wo)."""
    kh, kw, sh, sw, pt, pl, dh, dw, ho, wo = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        row0 = r * wo
        for ow in range(wo):
            o = out[row0 + ow]
            for q in range(c):
                o[q] = 0.0
            for i in range(kh):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow * sw - pl + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    xr = x[n, ih, iw]
                    wr = wt[i * kw + j]
                    for q in range(c):
                        o[q] += xr[q] * wr[q]
        epilogue_rows(out, row0, row0 + wo, 0, c, scale, shift, residual, act, pa, pb)


def work_items(rows: int, n_threads: int) -> list[tuple[int, int]]:
    """(r0, r1) ranges of output rows (n, oh): 4 per thread, or one."""
    parts = max(1, min(rows, 4 * n_threads if n_threads > 1 else 1))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
