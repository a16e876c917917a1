"""Numba kernels for the engine's memory-bound steps, each the twin of a NumPy reference.

    col2im_add   adjoint of im2col (scatter-add of the column gradient), ref: conv.col2im_reference
    col2im_add_unit, im2col_unit   the same for stride 1 and no dilation, written as contiguous
                 row slices so that LLVM vectorises them (3x faster than the general kernel
                 and than NumPy's strided copy for LeNet's second conv); ref: the general ones
    avgpool_tile_forward / _backward   non-overlapping k×k average pooling,
                 ref: pooling.avgpool_tile_reference / avgpool_tile_backward_reference
    avgpool2x2_forward / _backward   the same for 2×2 tiles with the tap loops written out
                 (LLVM then vectorises the stride-2 accesses: 3x faster on LeNet's pools)
    sigmoid_backward   dx = dy·y·(1 − y) in one pass, ref: activation.sigmoid_backward_reference

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


@njit(parallel=True, cache=True)
def avgpool2x2_forward(x, out):
    """out[n, c, a, b] = ((x[2a, 2b] + x[2a, 2b+1]) + (x[2a+1, 2b] + x[2a+1, 2b+1])) / 4.

    x (N, C, 2·OH, 2·OW), out (N, C, OH, OW).
    """
    n, c, oh, ow = out.shape
    for i in prange(n):
        for ch in range(c):
            for a in range(oh):
                r0, r1, o = x[i, ch, 2 * a], x[i, ch, 2 * a + 1], out[i, ch, a]
                for b in range(ow):
                    o[b] = ((r0[2 * b] + r0[2 * b + 1]) + (r1[2 * b] + r1[2 * b + 1])) * 0.25
    return out


@njit(parallel=True, cache=True)
def avgpool2x2_backward(dout, dx):
    """dx[n, c, 2a + p, 2b + q] = dout[n, c, a, b] / 4 for p, q ∈ {0, 1}."""
    n, c, oh, ow = dout.shape
    for i in prange(n):
        for ch in range(c):
            for a in range(oh):
                g, r0, r1 = dout[i, ch, a], dx[i, ch, 2 * a], dx[i, ch, 2 * a + 1]
                for b in range(ow):
                    v = g[b] * 0.25
                    r0[2 * b] = v
                    r0[2 * b + 1] = v
                    r1[2 * b] = v
                    r1[2 * b + 1] = v
    return dx


@njit(parallel=True, cache=True)
def sigmoid_backward(y, dout, dx):
    """dx = ((1 − y)·y)·dout elementwise, in y's dtype and NumPy's order (equal bit for bit).

    y, dout, dx: 1-D, same length.
    """
    one = y.dtype.type(1)
    for i in prange(y.size):
        v = y[i]
        dx[i] = ((one - v) * v) * dout[i]
    return dx
