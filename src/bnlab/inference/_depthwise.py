"""Depthwise convolution (groups = channels), NHWC: packing and the strip kernel's body.

    y[n, oh, ow, c] = act(Σ_{i,j} x[n, oh·sh − pt + i·dh, ow·sw − pl + j·dw, c] · w[i, j, c]
                          · scale[c] + shift[c] + residual)

Each output reads kh·kw inputs of its own channel only: nothing to share between channels and
nothing for a GEMM to do, a stream of multiply-adds over channel vectors. The strip kernel
(:func:`bnlab.inference._ir.strip_codegen`) keeps 8 (or 4, or 1) output pixels x 16 channels
in registers over all taps: per tap one weight vector and one input vector per pixel are
loaded and one FMA per pixel issued. The row driver is :func:`bnlab.inference._strips.
strip_rows`.
"""

from __future__ import annotations

import numpy as np

from bnlab.inference._ir import strip_codegen, strip_intrinsic
from bnlab.inference._pool import MIN_ITEM_FLOPS, n_items


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> (kh·kw, C) float32: row t = i·kw + j holds tap (i, j) of every channel."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c, kh * kw).T, dtype=np.float32)


def _body(ctx, x_at, w_at, acc):
    """acc[p] += x[pixel p at this tap] · w[tap], 16 channels."""
    b, x = ctx.builder, ctx.x
    wv = ctx.load_w(w_at())
    return [b.call(x.fma, [ctx.load_x(x_at(p)), wv, acc[p]]) for p in range(len(acc))]


def _kernel(pix: int):
    return strip_intrinsic(
        f"depthwise_strip{pix}",
        strip_codegen(pix, _body),
        f"The depthwise strip kernel, {pix} pixels (see _ir.strip_codegen).",
    )


STRIP8, STRIP4, STRIP1 = _kernel(8), _kernel(4), _kernel(1)


def work_items(rows: int, n_threads: int, flops: float) -> list[tuple[int, int]]:
    """(r0, r1) ranges of output rows (n, oh): 4 per thread, none under MIN_ITEM_FLOPS / 2 (the
    strip kernels run at about half the GEMM's rate)."""
    parts = min(rows, n_items(flops, MIN_ITEM_FLOPS / 2, n_threads))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
