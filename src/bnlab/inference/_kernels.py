"""Numba kernels of the NHWC inference engine, each with a plain NumPy reference next to it.

Activations are NHWC and stored as 2-D row-major matrices (N·H·W, C), so a 1x1 convolution is one
GEMM ``(N·H·W, C_in) @ (C_in, C_out)`` and a k x k convolution is an im2col followed by one GEMM
``(N·Ho·Wo, kh·kw·C_in) @ (kh·kw·C_in, C_out)``. The kernels here are the memory-bound glue around
those GEMMs: im2col, the fused epilogue (bias, optional scale, residual add, ReLU in one pass),
max pooling, strided subsampling. ``cache=True`` compiles once per machine.

The kernels are deliberately single-threaded: the GEMMs use every core through OpenBLAS, whose
worker threads keep spinning between calls, and a second thread pool (numba's OpenMP/workqueue)
fighting them for the same cores made whole-network latency 10x worse on a 2-core machine.
The glue is ~10% of the time; the GEMMs are the rest.

Each ``*_ref`` function is the slow obvious version the tests compare the kernel to.
"""

from __future__ import annotations

import numba
import numpy as np

# --------------------------------------------------------------------------- im2col


@numba.njit(nogil=True, cache=True, boundscheck=False)
def im2col_nhwc(x, kh, kw, stride, pad, col, r0, r1):  # pragma: no cover - compiled
    """col[(n, oh, ow), (i, j, c)] = x[n, oh·s − p + i, ow·s − p + j, c]  (0 outside the image),
    for the output rows r = n·Ho + oh in [r0, r1) (so threads can share the work).

    x (N, H, W, C) contiguous; col (N·Ho·Wo, kh·kw·C) preallocated.
    """
    n_img, h, w, c = x.shape
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    for r in range(r0, min(r1, n_img * ho)):
        n = r // ho
        oh = r % ho
        for ow in range(wo):
            row = (n * ho + oh) * wo + ow
            for i in range(kh):
                ih = oh * stride - pad + i
                for j in range(kw):
                    iw = ow * stride - pad + j
                    base = (i * kw + j) * c
                    if 0 <= ih < h and 0 <= iw < w:
                        for ch in range(c):
                            col[row, base + ch] = x[n, ih, iw, ch]
                    else:
                        for ch in range(c):
                            col[row, base + ch] = 0.0


def im2col_nhwc_ref(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """Reference im2col: pad, then gather each (i, j) tap with a strided slice."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    taps = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.concatenate(taps, axis=3).reshape(n * ho * wo, kh * kw * c)


# --------------------------------------------------------------------------- epilogue


@numba.njit(nogil=True, cache=True, boundscheck=False)
def epilogue(y, scale, shift, residual, relu):  # pragma: no cover - compiled
    """In place: y = act(y · scale + shift + residual), one pass over y (M, C).

    ``scale`` (C,) or empty (= 1, the folded case); ``shift`` (C,); ``residual`` (M, C) or
    empty (0, C) for none; ``relu`` a bool.
    """
    m, c = y.shape
    has_scale = scale.shape[0] > 0
    has_res = residual.shape[0] > 0
    for r in range(m):
        for ch in range(c):
            v = y[r, ch]
            if has_scale:
                v = v * scale[ch]
            v = v + shift[ch]
            if has_res:
                v = v + residual[r, ch]
            if relu and v < 0.0:
                v = 0.0
            y[r, ch] = v


def epilogue_ref(y, scale, shift, residual, relu):
    """Reference epilogue, returning a new array."""
    out = y * scale if scale.shape[0] else y.copy()
    out = out + shift
    if residual.shape[0]:
        out = out + residual
    return np.maximum(out, 0) if relu else out


# --------------------------------------------------------------------------- pooling, striding


@numba.njit(nogil=True, cache=True, boundscheck=False)
def maxpool_nhwc(x, k, stride, pad, out, r0=0, r1=-1):  # pragma: no cover - compiled
    """out[n, oh, ow, c] = max over the k x k window (padding never wins: it is −inf), for the
    output rows r = n·Ho + oh in [r0, r1) (r1 = −1: all), so threads can share the work.

    x (N, H, W, C); out (N, Ho, Wo, C) preallocated.
    """
    n_img, h, w, c = x.shape
    ho = out.shape[1]
    wo = out.shape[2]
    for r in range(r0, n_img * ho if r1 < 0 else r1):
        n = r // ho
        oh = r % ho
        for ow in range(wo):
            for ch in range(c):
                out[n, oh, ow, ch] = -np.inf
            for i in range(k):
                ih = oh * stride - pad + i
                if ih < 0 or ih >= h:
                    continue
                for j in range(k):
                    iw = ow * stride - pad + j
                    if iw < 0 or iw >= w:
                        continue
                    for ch in range(c):
                        v = x[n, ih, iw, ch]
                        if v > out[n, oh, ow, ch]:
                            out[n, oh, ow, ch] = v


def maxpool_nhwc_ref(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    taps = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]
    return np.max(np.stack(taps), axis=0)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def subsample_nhwc(x, stride, out):  # pragma: no cover - compiled
    """out[n, oh, ow, :] = x[n, oh·s, ow·s, :]: the input of a strided 1x1 conv, made contiguous."""
    n_img = x.shape[0]
    ho = out.shape[1]
    wo = out.shape[2]
    c = x.shape[3]
    for r in range(n_img * ho):
        n = r // ho
        oh = r % ho
        for ow in range(wo):
            for ch in range(c):
                out[n, oh, ow, ch] = x[n, oh * stride, ow * stride, ch]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def nchw_to_nhwc(x, out):  # pragma: no cover - compiled
    """out[n, h, w, c] = x[n, c, h, w]."""
    n_img, c, h, w = x.shape
    for r in range(n_img * h):
        n = r // h
        i = r % h
        for j in range(w):
            for ch in range(c):
                out[n, i, j, ch] = x[n, ch, i, j]
