"""Grouped convolution with few channels per group (ResNeXt: 4-16), NHWC: packing and body.

With g groups of cg input and cg output channels (cg = 2, 4, 8 or 16),

    y[p, o] = Σ_{taps t} Σ_{c < cg} w[t, c, o] · x[p + t, group(o)·cg + c]

A vector of 16 output channels o0..o0+15 covers 16/cg whole groups, whose input channels are
exactly x[., o0 : o0 + 16]: one vector load per pixel and tap. For each c the lanes then need
x[., group(o)·cg + c], the c-th input of their own group: a constant shuffle of that vector
(within 128-bit lanes for cg <= 4, so a cheap in-lane permute), times the weight vector
w[t, c, o0 : o0 + 16]. So the work is the convolution's own multiply-adds, none wasted; the
dense formulation with block-diagonal weights (what :mod:`._packing` builds for other group
sizes) does 32/cg times as many. For cg = 16 the shuffle is a broadcast of one element.
The strip skeleton (pixels in registers, epilogue, store) is :func:`._ir.strip_codegen`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from bnlab.inference._ir import VW, strip_codegen, strip_intrinsic

GROUP_SIZES = (2, 4, 8, 16)


def supported(c_in: int, c_out: int, groups: int) -> bool:
    """Whether a conv runs here: groups of equal in and out width 2-16, 16 | channels."""
    cg = c_in // groups
    return groups > 1 and c_in == c_out and cg in GROUP_SIZES and c_out % VW == 0


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C_out, cg, kh, kw) -> (kh·kw, cg, C_out) float32: row (t, c) holds w[o, c, t] for all o."""
    c_out, cg, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c_out, cg, kh * kw).transpose(2, 1, 0), np.float32)


def _body_for(cg: int):
    def body(ctx, x_at, w_at, acc):
        """acc[p] += shuffle_c(x[pixel p]) · w[tap, c] for c < cg (w_tap = cg·C_out)."""
        b, x = ctx.builder, ctx.x
        undef = ir.Constant(x.v16, ir.Undefined)
        xv = [ctx.load_x(x_at(p), masked=False) for p in range(len(acc))]
        c_out = b.sdiv(ctx.a["w_tap"], x.const(cg))
        new = list(acc)
        for c in range(cg):
            idx = ir.Constant(ir.VectorType(x.i32, VW), [(o // cg) * cg + c for o in range(VW)])
            wv = ctx.load_w(w_at(b.mul(x.const(c), c_out)), masked=False)
            for p in range(len(acc)):
                new[p] = b.call(x.fma, [b.shuffle_vector(xv[p], undef, idx), wv, new[p]])
        return new

    return body


def _kernel(pix: int, cg: int):
    return strip_intrinsic(
        f"grouped_strip{pix}_{cg}",
        strip_codegen(pix, _body_for(cg)),
        f"The grouped strip kernel, {pix} pixels, {cg} channels per group.",
    )


KERNELS = {(pix, cg): _kernel(pix, cg) for pix in (8, 4, 1) for cg in GROUP_SIZES}
G8_2, G4_2, G1_2 = KERNELS[8, 2], KERNELS[4, 2], KERNELS[1, 2]
G8_4, G4_4, G1_4 = KERNELS[8, 4], KERNELS[4, 4], KERNELS[1, 4]
G8_8, G4_8, G1_8 = KERNELS[8, 8], KERNELS[4, 8], KERNELS[1, 8]
G8_16, G4_16, G1_16 = KERNELS[8, 16], KERNELS[4, 16], KERNELS[1, 16]
