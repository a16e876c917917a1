"""Direct convolution on a zero-padded NHWC input, for the stem (7x7, stride 2, 3 channels).

The implicit GEMM (:func:`bnlab.inference._gemm.conv_tile_range`) gathers im2col rows; with 3
input channels that gather copies 3 floats at a time and cost as much as the GEMM itself. Here
nothing is gathered: in a padded input xp (N, Hp, Wp, C), the taps of kernel row i for output
pixel (oh, ow) are the kw·C contiguous floats starting at xp[n, s·oh + i, s·ow, 0], and the next
output pixel's start s·C floats further. So for 6 consecutive output pixels of one output row,

    C[6 pixels, 32 columns] = Σ_i  A_i @ Bp[i·kw·C : (i+1)·kw·C]           (kh micro-kernel calls)
    A_i[r, q] = xp_flat[start(n, s·oh + i, s·ow0) + r·s·C + q],   q < kw·C

is the GEMM micro-kernel with row stride lda = s·C and K = kw·C per kernel row, accumulating
over i (the weights are packed with rows (i, j, c), as for the implicit GEMM). The last block
of a row may run past the row's end: those rows read padding (xp is padded wide enough) and
go to a scratch tile that is dropped.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._gemm import MR, NR, _epilogue_rows, _microkernel


def padded_shape(n: int, h: int, w: int, c: int, kk: int, stride: int, pad: int):
    """(N, Hp, Wp, C) of the padded input: ``pad`` rows above and below; ``pad`` columns left
    and, on the right, enough that a last block of 6 output pixels stays inside the row."""
    wo = (w + 2 * pad - kk) // stride + 1
    blocks = -(-wo // MR)
    wp = max(w + 2 * pad, stride * (blocks * MR - 1) + kk)
    return n, h + 2 * pad, wp, c


@numba.njit(nogil=True, cache=True, boundscheck=False)
def pad_input(x, pad, xp):  # pragma: no cover - compiled
    """xp[n, pad + i, pad + j, :] = x[n, i, j, :]; the border of xp must already be zero (it is
    written once, when the buffer is made, and never touched again)."""
    n_img, h, w, c = x.shape
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                for q in range(c):
                    xp[n, pad + i, pad + j, q] = x[n, i, j, q]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def direct_conv_range(xp, kk, stride, ho, wo, bp, c, r0, r1, pan0, pan1, scale, shift,
                      relu):  # fmt: skip  # pragma: no cover - compiled
    """Output rows (n, oh) = divmod(r, Ho) for r0 <= r < r1, panels [pan0, pan1) of
    c = act(conv(x)·scale + shift), c (N·Ho·Wo, C_out); xp from :func:`pad_input`."""
    hp, wp, ch = xp.shape[1], xp.shape[2], xp.shape[3]
    n_out = c.shape[1]
    k = bp.shape[1]
    span = kk * ch  # K of one kernel row
    lda = stride * ch
    xf = xp.reshape(-1)
    bf = bp.reshape(-1)
    cf = c.reshape(-1)
    c_tile = np.empty((MR, n_out), np.float32)
    ct = c_tile.reshape(-1)
    empty_res = np.zeros((0, 1), np.float32)
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        for ow0 in range(0, wo, MR):
            row = (n * ho + oh) * wo + ow0
            full = ow0 + MR <= wo
            for i in range(kk):
                a_off = ((n * hp + stride * oh + i) * wp + stride * ow0) * ch
                for p in range(pan0, pan1):
                    b_off = p * k * NR + i * span * NR
                    if full:
                        _microkernel(xf, a_off, lda, bf, b_off, cf, row * n_out + p * NR, n_out,
                                     span, i)  # fmt: skip
                    else:
                        _microkernel(xf, a_off, lda, bf, b_off, ct, p * NR, n_out, span, i)
            j0, j1 = pan0 * NR, pan1 * NR
            if not full:
                c[row : row + wo - ow0, j0:j1] = c_tile[: wo - ow0, j0:j1]
            _epilogue_rows(c, row, row + min(MR, wo - ow0), j0, j1, scale, shift, empty_res, relu)


def work_items(rows: int, n_threads: int) -> list[tuple[int, int]]:
    """(r0, r1) ranges of output rows (n, oh): one per thread count x 4, or one."""
    parts = max(1, min(rows, 4 * n_threads if n_threads > 1 else 1))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
