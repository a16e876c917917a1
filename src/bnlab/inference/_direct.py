"""Direct convolution on a zero-padded NHWC input, for convs with few input channels (the stems:
7x7/2 or 3x3 on 3 channels).

The implicit GEMM (:func:`bnlab.inference._gemm.conv_tile_range`) gathers im2col rows; with 3
input channels that gather copies 3 floats at a time and cost as much as the GEMM itself. Here
nothing is gathered: in a padded input xp (N, Hp, Wp, C), the taps of kernel row i for output
pixel (oh, ow) are the kw·C contiguous floats starting at xp[n, sh·oh + i, sw·ow, 0], and the
next output pixel's start sw·C floats further. So for 6 consecutive output pixels of one row,

    C[6 pixels, 32 columns] = Σ_i  A_i @ Bp[i·kw·C : (i+1)·kw·C]           (kh micro-kernel calls)
    A_i[r, q] = xp_flat[start(n, sh·oh + i, sw·ow0) + r·sw·C + q],   q < kw·C

is the GEMM micro-kernel with row stride lda = sw·C, run once over K = kh·kw·C in kh segments
of kw·C floats one padded input row apart (:func:`._microkernel.microkernel_seg`; the weights
are packed with rows (i, j, c), as for the implicit GEMM). The last block of
a row has fewer than 6 pixels: the micro-kernel's row count handles it. Dilation 1 only.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._microkernel import MR, NR, microkernel_seg
from bnlab.inference._pool import MIN_ITEM_FLOPS, n_items


def padded_shape(n: int, h: int, w: int, c: int, pads) -> tuple[int, int, int, int]:
    """(N, H + top + bottom, W + left + right, C) for pads (top, left, bottom, right)."""
    pt, pl, pb, pr = pads
    return n, h + pt + pb, w + pl + pr, c


@numba.njit(nogil=True, cache=True, boundscheck=False)
def pad_input(x, pt, pl, xp):  # pragma: no cover - compiled
    """xp[n, pt + i, pl + j, :] = x[n, i, j, :]; the border of xp must already be zero (it is
    written once, when the buffer is made, and never touched again)."""
    n_img, h, w, c = x.shape
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                for q in range(c):
                    xp[n, pt + i, pl + j, q] = x[n, i, j, q]


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def direct_conv_range(
    xp, kh, kw, sh, sw, ho, wo, bp, c, r0, r1, pan0, pan1, scale, shift, act, pa, pb
):  # pragma: no cover - compiled
    """Output rows (n, oh) = divmod(r, Ho) for r0 <= r < r1, panels [pan0, pan1) of
    c = act(conv(x)·scale + shift), c (N·Ho·Wo, C_out); xp from :func:`pad_input`."""
    hp, wp, ch = xp.shape[1], xp.shape[2], xp.shape[3]
    n_out = c.shape[1]
    k = bp.shape[1]
    span = kw * ch  # K of one kernel row
    lda = sw * ch
    xf, bf, cf = xp.reshape(-1), bp.reshape(-1), c.reshape(-1)
    none = np.zeros(0, np.float32)
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        for ow0 in range(0, wo, MR):
            row = (n * ho + oh) * wo + ow0
            rows = min(MR, wo - ow0)
            a_off = ((n * hp + sh * oh) * wp + sw * ow0) * ch
            for p in range(pan0, pan1):  # K = kh·kw·C in kh segments, one input row apart
                microkernel_seg(xf, a_off, lda, bf, p * k * NR, cf, row * n_out + p * NR, n_out,
                                kh * span, 0, rows, min(NR, n_out - p * NR), span, wp * ch, 1,
                                p * NR, shift, scale, none, 0, 1, act, pa, pb)  # fmt: skip


def work_items(rows: int, n_threads: int, flops: float) -> list[tuple[int, int]]:
    """(r0, r1) ranges of output rows (n, oh): 4 per thread, none under MIN_ITEM_FLOPS."""
    parts = min(rows, n_items(flops, MIN_ITEM_FLOPS, n_threads))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def reference(x: np.ndarray, w: np.ndarray, stride, pads) -> np.ndarray:
    """The slow obvious conv in float64: x (N, H, W, C), w (C_out, C, kh, kw), no bias, dilation
    1 -> (N·Ho·Wo, C_out)."""
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[2:]
    ho = (xp.shape[1] - kh) // stride[0] + 1
    wo = (xp.shape[2] - kw) // stride[1] + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[0]))
    for i in range(kh):
        for j in range(kw):
            tap = xp[
                :,
                i : i + stride[0] * (ho - 1) + 1 : stride[0],
                j : j + stride[1] * (wo - 1) + 1 : stride[1],
            ]
            y += tap @ w[:, :, i, j].T.astype(np.float64)
    return y.reshape(-1, w.shape[0])
