"""The row driver of the strip kernels: depthwise convs (cg = 1) and grouped convs (cg = 2-16).

For each output row (n, oh) and each vector of 16 channels, the row's pixels go through the
strip kernels: 8 at a time (then 4, then 1) where the whole window lies inside the row, one at
a time with its valid kernel columns at the left and right border; kernel rows outside the image
(top and bottom border) are skipped by starting at the first valid one. The strips apply scale,
shift and the activation before their store; a residual (and then the activation) is added to
the finished row while it is in cache.

Speed: the depthwise 3x3 and 5x5 windows with stride 1 or 2 and all 16 lanes valid call the
kernel with the tap counts, steps and lane count as literal constants (``kind`` 1-4). LLVM then
unrolls the tap loops and, since the input of pixel p at tap j + sw is the input of pixel
p + 1 at tap j, loads it once; measured 2-4x faster than with run-time values.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference import _depthwise as D
from bnlab.inference import _grouped as G
from bnlab.inference._gemm import epilogue_rows

VW = 16
_JIT = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}


@numba.njit(inline="always", nogil=True, cache=True)
def _depthwise(npix, a, lanes, e):  # pragma: no cover - compiled
    if npix == 8:
        D.STRIP8(a, 8, lanes, e)
    elif npix == 4:
        D.STRIP4(a, 4, lanes, e)
    else:
        D.STRIP1(a, 1, lanes, e)


@numba.njit(inline="always", nogil=True, cache=True)
def _grouped(cg, npix, a, e):  # pragma: no cover - compiled
    if cg == 4:
        if npix == 8:
            G.G8_4(a, 8, 16, e)
        elif npix == 4:
            G.G4_4(a, 4, 16, e)
        else:
            G.G1_4(a, 1, 16, e)
    elif cg == 8:
        if npix == 8:
            G.G8_8(a, 8, 16, e)
        elif npix == 4:
            G.G4_8(a, 4, 16, e)
        else:
            G.G1_8(a, 1, 16, e)
    elif cg == 16:
        if npix == 8:
            G.G8_16(a, 8, 16, e)
        elif npix == 4:
            G.G4_16(a, 4, 16, e)
        else:
            G.G1_16(a, 1, 16, e)
    elif npix == 8:
        G.G8_2(a, 8, 16, e)
    elif npix == 4:
        G.G4_2(a, 4, 16, e)
    else:
        G.G1_2(a, 1, 16, e)


@numba.njit(inline="always", nogil=True, cache=True)
def _strip(
    kind,
    cg,
    npix,
    xf,
    x_off,
    sw,
    dw,
    rs,
    wf,
    w_off,
    c,
    wt_c,
    rk,
    kw,
    kw_full,
    of,
    out_off,
    lanes,
    e,
):  # pragma: no cover - compiled
    """One strip: the depthwise kernel with constants for ``kind`` 1-4 (3x3 or 5x5, stride 1
    or 2), with run-time values for 0, or the grouped kernel (cg > 1); wt_c = floats per tap
    (C, or cg·C)."""
    if cg > 1:
        _grouped(cg, npix, (xf, x_off, sw * c, dw * c, rs, wf, w_off, wt_c, kw_full * wt_c, rk,
                            kw, of, out_off, c), e)  # fmt: skip
    elif kind == 1:
        _depthwise(npix, (xf, x_off, c, c, rs, wf, w_off, c, 3 * c, 3, 3, of, out_off, c), 16, e)
    elif kind == 2:
        _depthwise(npix, (xf, x_off, 2 * c, c, rs, wf, w_off, c, 3 * c, 3, 3, of, out_off, c), 16,
                   e)  # fmt: skip
    elif kind == 3:
        _depthwise(npix, (xf, x_off, c, c, rs, wf, w_off, c, 5 * c, 5, 5, of, out_off, c), 16, e)
    elif kind == 4:
        _depthwise(npix, (xf, x_off, 2 * c, c, rs, wf, w_off, c, 5 * c, 5, 5, of, out_off, c), 16,
                   e)  # fmt: skip
    else:
        _depthwise(npix, (xf, x_off, sw * c, dw * c, rs, wf, w_off, c, kw_full * c, rk, kw, of,
                          out_off, c), lanes, e)  # fmt: skip


@numba.njit(**_JIT)
def strip_rows(
    x, wt, geom, out, r0, r1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Output rows r = n·Ho + oh in [r0, r1) of the depthwise (wt (kh·kw, C)) or grouped
    (wt (kh·kw, cg, C)) conv of x (N, H, W, C) into out (N·Ho·Wo, C).
    geom = (kh, kw, sh, sw, pt, pl, dh, dw, Ho, Wo)."""
    kh, kw, sh, sw, pt, pl, dh, dw, ho, wo = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    cg = wt.shape[1] if wt.ndim == 3 else 1
    xf, wf, of = x.reshape(-1), wt.reshape(-1), out.reshape(-1)
    fused = residual.shape[0] == 0  # the strips' epilogue is the whole epilogue
    zero = np.float32(0.0)
    # output columns whose window lies inside the row: ow·sw − pl >= 0 and the last tap < W
    ow_lo = min(wo, -(-pl // sw))
    ow_hi = max(ow_lo, min(wo, (w - 1 + pl - (kw - 1) * dw) // sw + 1))
    kind = 0
    if cg == 1 and dw == 1 and kh == kw and (kh == 3 or kh == 5) and (sw == 1 or sw == 2):
        kind = (1 if kh == 3 else 3) + (sw - 1)
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        row0 = r * wo
        i0 = max(0, -(-(pt - oh * sh) // dh))  # the valid kernel rows i0 <= i < i1
        i1 = min(kh, (h - 1 + pt - oh * sh) // dh + 1)
        ih0 = oh * sh - pt + i0 * dh
        for c0 in range(0, c, VW):
            lanes = min(VW, c - c0)
            full = kind if i1 - i0 == kh and lanes == VW else 0
            e = (shift, scale, c0, act, pa, pb) if fused else (shift, scale, c0, 0, zero, zero)
            ow = 0
            while ow < wo:
                if ow_lo <= ow < ow_hi:  # inside: strips of 8, 4 or 1 pixels
                    rest = ow_hi - ow
                    npix, j0, j1, k = (8 if rest >= 8 else (4 if rest >= 4 else 1)), 0, kw, full
                else:  # at the border: one pixel, the valid kernel columns j0 <= j < j1
                    npix, k = 1, 0
                    j0 = max(0, -(-(pl - ow * sw) // dw))
                    j1 = min(kw, (w - 1 + pl - ow * sw) // dw + 1)
                x_off = ((n * h + ih0) * w + ow * sw - pl + j0 * dw) * c + c0
                _strip(k, cg, npix, xf, x_off, sw, dw, dh * w * c, wf,
                       (i0 * kw + j0) * cg * c + c0, c, cg * c, i1 - i0, j1 - j0, kw, of,
                       (row0 + ow) * c + c0, lanes, e)  # fmt: skip
                ow += npix
        if not fused:  # a residual: added (with the activation) after scale + shift
            epilogue_rows(out, row0, row0 + wo, 0, c, np.zeros(0, np.float32),
                          np.zeros(c, np.float32), residual, act, pa, pb)  # fmt: skip
