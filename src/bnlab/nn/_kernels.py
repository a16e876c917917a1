"""Numba kernels for the engine's memory-bound steps, each the twin of a NumPy reference.

    col2im_add   adjoint of im2col (scatter-add of the column gradient), ref: conv.col2im_reference
    col2im_add_unit, im2col_unit   the same for stride 1 and no dilation, written as contiguous
                 row slices so that LLVM vectorises them (3x faster than the general kernel
                 and than NumPy's strided copy for LeNet's second conv); ref: the general ones
    avgpool_tile_forward / _backward   non-overlapping k×k average pooling,
                 ref: pooling.avgpool_tile_reference / avgpool_tile_backward_reference

Parallel over the batch only: each sample's output is written by one thread with a fixed loop
order, so results are bit-identical whatever the thread count (resume stays exact).
Imported lazily (only when the backend is "numba"), so ``import bnlab.nn`` does not load numba.
"""

from __future__ import annotations

from numba import njit, prange


@njit(parallel=True, cache=True)
def col2im_add(dcols, kh, kw, sh, sw, dh, dw, oh, ow, dxp):
    """dxp[n, c, a·sh + p·dh, b·sw + q·dw] += dcols[n, (c·kh + p)·kw + q, a·ow + b]; dxp zeroed.

    dcols (N, C·kh·kw, OH·OW), dxp (N, C, Hp, Wp) — both C-contiguous.
    """
    n, c = dxp.shape[0], dxp.shape[1]
    for i in prange(n):
        dxp[i] = 0
        for ch in range(c):
            for p in range(kh):
                for q in range(kw):
                    k = (ch * kh + p) * kw + q
                    for a in range(oh):
                        row = a * sh + p * dh
                        base = a * ow
                        for b in range(ow):
                            dxp[i, ch, row, b * sw + q * dw] += dcols[i, k, base + b]
    return dxp


@njit(parallel=True, cache=True)
def col2im_add_unit(dcols, kh, kw, oh, ow, dxp):
    """col2im_add at stride 1, dilation 1: dxp[n, c, a + p, b + q] += dcols[n, k, a·ow + b].

    dcols (N, C·kh·kw, OH·OW), dxp (N, C, OH + kh − 1, OW + kw − 1), k = (c·kh + p)·kw + q.
    """
    n, c = dxp.shape[0], dxp.shape[1]
    for i in prange(n):
        dxp[i] = 0
        for ch in range(c):
            for p in range(kh):
                for q in range(kw):
                    k = (ch * kh + p) * kw + q
                    for a in range(oh):
                        src = dcols[i, k, a * ow : (a + 1) * ow]
                        dst = dxp[i, ch, a + p, q : q + ow]
                        for b in range(ow):
                            dst[b] += src[b]
    return dxp


@njit(parallel=True, cache=True)
def im2col_unit(xp, kh, kw, oh, ow, cols):
    """cols[n, (c·kh + p)·kw + q, a·ow + b] = xp[n, c, a + p, b + q] (stride 1, dilation 1).

    xp (N, C, Hp, Wp), cols (N, C·kh·kw, OH·OW) C-contiguous.
    """
    n, c = xp.shape[0], xp.shape[1]
    for i in prange(n):
        for ch in range(c):
            for p in range(kh):
                for q in range(kw):
                    k = (ch * kh + p) * kw + q
                    for a in range(oh):
                        src = xp[i, ch, a + p, q : q + ow]
                        dst = cols[i, k, a * ow : (a + 1) * ow]
                        for b in range(ow):
                            dst[b] = src[b]
    return cols


@njit(parallel=True, cache=True)
def avgpool_tile_forward(x, kh, kw, out):
    """out[n, c, i, j] = mean of x[n, c, i·kh:(i+1)·kh, j·kw:(j+1)·kw]; x (N, C, H, W)."""
    n, c, oh, ow = out.shape
    scale = 1.0 / (kh * kw)
    for i in prange(n):
        for ch in range(c):
            for a in range(oh):
                for b in range(ow):
                    s = x[i, ch, a * kh, b * kw] * 0
                    for p in range(kh):
                        for q in range(kw):
                            s += x[i, ch, a * kh + p, b * kw + q]
                    out[i, ch, a, b] = s * scale
    return out


@njit(parallel=True, cache=True)
def avgpool_tile_backward(dout, kh, kw, dx):
    """dx[n, c, a·kh + p, b·kw + q] = dout[n, c, a, b] / (kh·kw)."""
    n, c, oh, ow = dout.shape
    scale = 1.0 / (kh * kw)
    for i in prange(n):
        for ch in range(c):
            for a in range(oh):
                for p in range(kh):
                    for b in range(ow):
                        g = dout[i, ch, a, b] * scale
                        for q in range(kw):
                            dx[i, ch, a * kh + p, b * kw + q] = g
    return dx
