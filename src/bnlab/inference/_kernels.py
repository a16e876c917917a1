"""The memory-bound kernels of the NHWC engine: layout changes, pooling, elementwise steps.

Activations are NHWC and stored as row-major matrices (N·H·W, C); a vector value is (N, C).
Every kernel writes a caller-given output and takes a range of rows [r0, r1) so that the thread
pool can share the work (an output row is (n, oh) for maps). Loops run over channels innermost,
which LLVM vectorizes; ``error_model="numpy"`` keeps divisions vectorizable too. The float64
references are in :mod:`bnlab.inference.reference` (NCHW); the tests compare the two.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._act import CLIP, NONE, activate_rows

_JIT = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}


@numba.njit(**_JIT)
def nchw_to_nhwc(x, out):  # pragma: no cover - compiled
    """out[n, h, w, c] = x[n, c, h, w]."""
    n_img, c, h, w = x.shape
    for n in range(n_img):
        for ch in range(c):
            for i in range(h):
                xr = x[n, ch, i]
                o = out[n, i]
                for j in range(w):
                    o[j, ch] = xr[j]


@numba.njit(**_JIT)
def all_finite(x):  # pragma: no cover - compiled
    """Whether every value of the 1-D x is finite (v − v is NaN for NaN and ±Inf): one
    vectorized pass, no temporary array."""
    bad = np.float32(0.0)
    for i in range(x.shape[0]):
        bad += x[i] - x[i]
    return bad == 0.0


@numba.njit(**_JIT)
def nhwc_to_nchw(x, out):  # pragma: no cover - compiled
    """out[n, c, h, w] = x[n, h, w, c]."""
    n_img, h, w, c = x.shape
    for n in range(n_img):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    out[n, ch, i, j] = x[n, i, j, ch]


@numba.njit(**_JIT)
def flatten_nchw(x, out):  # pragma: no cover - compiled
    """out[n, c·HW + p] = x[n, p, c]: an NHWC map (N, HW, C) flattened in PyTorch's order."""
    n_img, hw, c = x.shape
    for n in range(n_img):
        for p in range(hw):
            for ch in range(c):
                out[n, ch * hw + p] = x[n, p, ch]


@numba.njit(**_JIT)
def subsample_nhwc(x, sh, sw, out):  # pragma: no cover - compiled
    """out[n, oh, ow, :] = x[n, oh·sh, ow·sw, :]: the input of a strided 1x1 conv."""
    n_img, ho, wo, c = out.shape
    for r in range(n_img * ho):
        n = r // ho
        oh = r % ho
        for ow in range(wo):
            for ch in range(c):
                out[n, oh, ow, ch] = x[n, oh * sh, ow * sw, ch]


@numba.njit(**_JIT)
def maxpool_nhwc(x, geom, out, r0, r1):  # pragma: no cover - compiled
    """out[n, oh, ow, c] = max over the window of x (padding never wins) for output rows
    r = n·Ho + oh in [r0, r1). geom = (kh, kw, sh, sw, pt, pl, dh, dw); out (N, Ho, Wo, C)."""
    kh, kw, sh, sw, pt, pl, dh, dw = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    ho, wo = out.shape[1], out.shape[2]
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        for ow in range(wo):
            o = out[n, oh, ow]
            for ch in range(c):
                o[ch] = -np.inf
            for i in range(kh):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow * sw - pl + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    xr = x[n, ih, iw]
                    for ch in range(c):
                        o[ch] = max(o[ch], xr[ch])


@numba.njit(**_JIT)
def avgpool_nhwc(x, geom, include_pad, out, r0, r1):  # pragma: no cover - compiled
    """out = mean over each window, PyTorch's divisor (see reference.avg_pool): the window
    clipped to the padded map when ``include_pad``, else to the map; windows of ceil mode that
    run past the padding are clipped too. geom = (kh, kw, sh, sw, pt, pl, pb, pr)."""
    kh, kw, sh, sw, pt, pl, pb, pr = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    ho, wo = out.shape[1], out.shape[2]
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        h0 = oh * sh - pt
        h1 = min(h0 + kh, h + pb)
        for ow in range(wo):
            w0 = ow * sw - pl
            w1 = min(w0 + kw, w + pr)
            if include_pad:
                count = (h1 - h0) * (w1 - w0)
            else:
                count = (min(h1, h) - max(h0, 0)) * (min(w1, w) - max(w0, 0))
            o = out[n, oh, ow]
            for ch in range(c):
                o[ch] = 0.0
            for ih in range(max(h0, 0), min(h1, h)):
                for iw in range(max(w0, 0), min(w1, w)):
                    xr = x[n, ih, iw]
                    for ch in range(c):
                        o[ch] += xr[ch]
            inv = np.float32(1.0) / np.float32(count)
            for ch in range(c):
                o[ch] *= inv


@numba.njit(**_JIT)
def adaptive_avgpool_nhwc(x, out, r0, r1):  # pragma: no cover - compiled
    """out[n, i, j] = mean of x[n, floor(i·H/oh) : ceil((i+1)·H/oh), (likewise j)], for output
    rows r = n·oh + i in [r0, r1)."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    oh, ow = out.shape[1], out.shape[2]
    for r in range(r0, r1):
        n, i = r // oh, r % oh
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            o = out[n, i, j]
            for ch in range(c):
                o[ch] = 0.0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    xr = x[n, ih, iw]
                    for ch in range(c):
                        o[ch] += xr[ch]
            inv = np.float32(1.0) / np.float32((h1 - h0) * (w1 - w0))
            for ch in range(c):
                o[ch] *= inv


@numba.njit(**_JIT)
def global_avgpool(x, out, n0, n1):  # pragma: no cover - compiled
    """out[n, c] = mean over p of x[n, p, c], x (N, HW, C), for images n0 <= n < n1
    (summed in float32 rows of C, then scaled once)."""
    hw, c = x.shape[1], x.shape[2]
    inv = np.float32(1.0) / np.float32(hw)
    for n in range(n0, n1):
        o = out[n]
        for ch in range(c):
            o[ch] = 0.0
        for p in range(hw):
            xr = x[n, p]
            for ch in range(c):
                o[ch] += xr[ch]
        for ch in range(c):
            o[ch] *= inv


@numba.njit(**_JIT)
def add_rows(a, b, out, r0, r1, act, pa, pb):  # pragma: no cover - compiled
    """out[r] = act(a[r] + b[r]) for r0 <= r < r1 (2-D, same shape)."""
    lo, hi = (pa, pb) if act == CLIP else (np.float32(-np.inf), np.float32(np.inf))
    for r in range(r0, r1):
        ar, br, o = a[r], b[r], out[r]
        for j in range(o.shape[0]):
            o[j] = min(max(ar[j] + br[j], lo), hi)
    if act != NONE and act != CLIP:
        activate_rows(out, r0, r1, 0, out.shape[1], act, pa, pb)


@numba.njit(**_JIT)
def mul_rows(a, b, out, r0, r1):  # pragma: no cover - compiled
    """out[r] = a[r] · b[r] for r0 <= r < r1 (2-D, same shape)."""
    for r in range(r0, r1):
        ar, br, o = a[r], b[r], out[r]
        for j in range(o.shape[0]):
            o[j] = ar[j] * br[j]


@numba.njit(**_JIT)
def scale_channels(x, s, out, r0, r1):  # pragma: no cover - compiled
    """out[n, p, c] = x[n, p, c] · s[n, c] (squeeze-excitation), x (N, HW, C), for the rows
    r = n·HW + p in [r0, r1)."""
    hw = x.shape[1]
    for r in range(r0, r1):
        n, p = r // hw, r % hw
        xr, sr, o = x[n, p], s[n], out[n, p]
        for ch in range(o.shape[0]):
            o[ch] = xr[ch] * sr[ch]


@numba.njit(**_JIT)
def scale_panel_rows(panels, s, out):  # pragma: no cover - compiled
    """out[p, k, :] = panels[p, k, :] · s[k]: packed GEMM weights (P, K, 32) with row k scaled
    (a squeeze-excitation gate folded into the next 1x1 conv, one image at a time)."""
    for p in range(panels.shape[0]):
        for k in range(panels.shape[1]):
            sk = s[k]
            src, dst = panels[p, k], out[p, k]
            for j in range(src.shape[0]):
                dst[j] = src[j] * sk


@numba.njit(**_JIT)
def affine_rows(x, scale, shift, out, r0, r1, act, pa, pb):  # pragma: no cover - compiled
    """out[r, c] = act(x[r, c]·scale[c] + shift[c]) for r0 <= r < r1 (a BN that is not folded)."""
    lo, hi = (pa, pb) if act == CLIP else (np.float32(-np.inf), np.float32(np.inf))
    for r in range(r0, r1):
        xr, o = x[r], out[r]
        for ch in range(o.shape[0]):
            o[ch] = min(max(xr[ch] * scale[ch] + shift[ch], lo), hi)
    if act != NONE and act != CLIP:
        activate_rows(out, r0, r1, 0, out.shape[1], act, pa, pb)


@numba.njit(**_JIT)
def act_rows(x, out, r0, r1, act, pa, pb):  # pragma: no cover - compiled
    """out[r] = act(x[r]) for r0 <= r < r1."""
    for r in range(r0, r1):
        xr, o = x[r], out[r]
        for ch in range(o.shape[0]):
            o[ch] = xr[ch]
    activate_rows(out, r0, r1, 0, out.shape[1], act, pa, pb)


@numba.njit(**_JIT)
def softmax_rows(x, out):  # pragma: no cover - compiled
    """out[n] = exp(x[n] − max x[n]) / Σ exp(x[n] − max x[n]), in float64 sums."""
    for n in range(x.shape[0]):
        m = x[n, 0]
        for j in range(x.shape[1]):
            m = max(m, x[n, j])
        total = 0.0
        for j in range(x.shape[1]):
            e = np.exp(np.float64(x[n, j] - m))
            out[n, j] = e
            total += e
        inv = 1.0 / total
        for j in range(x.shape[1]):
            out[n, j] = out[n, j] * inv


@numba.njit(**_JIT)
def copy_columns(src, dst, c0):  # pragma: no cover - compiled
    """dst[r, c0 : c0 + C_src] = src[r] (one input of a channel concat)."""
    for r in range(src.shape[0]):
        sr, d = src[r], dst[r]
        for ch in range(sr.shape[0]):
            d[c0 + ch] = sr[ch]
