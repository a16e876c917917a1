"""Grouped convolution with few channels per group (ResNeXt: 4-16), NHWC, fused epilogue.

With g groups of cg input and cg output channels (cg = 2, 4, 8 or 16),

    y[p, o] = Σ_{taps t} Σ_{c < cg} w[t, c, o] · x[p + t, group(o)·cg + c]

A vector of 16 output channels o0..o0+15 covers 16/cg whole groups, whose input channels are
exactly x[., o0 : o0 + 16]: one vector load per pixel and tap. For each c the lanes then need
x[., group(o)·cg + c], the c-th input of their own group: a constant shuffle of that vector
(within 128-bit lanes for cg <= 4, so a cheap in-lane permute), times the weight vector
w[t, c, o0 : o0 + 16]. So the work is the convolution's own multiply-adds, none wasted; the
dense formulation with block-diagonal weights (what :mod:`._packing` builds for other group
sizes) does 32/cg times as many. For cg = 16 the shuffle is a broadcast of one element.

The inner kernel (:func:`_make_strip`, LLVM IR) keeps 8 (or 4, or 1) output pixels x 16
channels in registers over all taps and applies scale, shift and a clip before its one store;
borders are handled as in :mod:`._depthwise` (first valid kernel row, and per-pixel valid
kernel columns at the left and right edges).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bnlab.inference._act import CLIP, NONE, activate_rows
from bnlab.inference._gemm import clip_bounds, epilogue_rows
from bnlab.inference._microkernel import _IR, _data, _splat

VW = 16
GROUP_SIZES = (2, 4, 8, 16)


def supported(c_in: int, c_out: int, groups: int) -> bool:
    """Whether a conv runs here: groups of equal in and out width 2-16, 16 | channels."""
    cg = c_in // groups
    return groups > 1 and c_in == c_out and cg in GROUP_SIZES and c_out % VW == 0


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C_out, cg, kh, kw) -> (kh·kw, cg, C_out) float32: row (t, c) holds w[o, c, t] for all o."""
    c_out, cg, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c_out, cg, kh * kw).transpose(2, 1, 0), np.float32)


def _strip_codegen(pix: int, cg: int):
    def codegen(context, builder, signature, args):
        (
            x_arr,
            x_off,
            pix_step,
            tap_step,
            row_step,
            w_arr,
            w_off,
            w_tap,
            w_row,
            rows_k,
            kw,
            out_arr,
            out_off,
            out_step,
            npix,
            shift,
            scale,
            col,
            lo,
            hi,
        ) = args
        t = signature.args
        x = _IR(builder)
        i32, i64, v16 = x.i32, x.i64, x.v16
        x_data, _ = _data(context, builder, t[0], x_arr)
        w_data, _ = _data(context, builder, t[5], w_arr)
        o_data, _ = _data(context, builder, t[11], out_arr)
        last = builder.sub(npix, ir.Constant(i64, 1))
        pix_off = []
        for p in range(pix):
            pp = builder.select(
                builder.icmp_signed("<", ir.Constant(i64, p), npix), ir.Constant(i64, p), last
            )
            pix_off.append(builder.mul(pp, pix_step))
        masks = [
            ir.Constant(ir.VectorType(i32, VW), [(o // cg) * cg + c for o in range(VW)])
            for c in range(cg)
        ]
        zero = ir.Constant(v16, None)
        undef = ir.Constant(v16, ir.Undefined)
        entry = builder.block
        loop_i = builder.append_basic_block("rows")
        loop_j = builder.append_basic_block("cols")
        next_i = builder.append_basic_block("next_row")
        done = builder.append_basic_block("done")
        some = builder.and_(
            builder.icmp_signed(">", rows_k, ir.Constant(i64, 0)),
            builder.icmp_signed(">", kw, ir.Constant(i64, 0)),
        )
        builder.cbranch(some, loop_i, done)

        builder.position_at_end(loop_i)
        ii = builder.phi(i64)
        acc_i = [builder.phi(v16) for _ in range(pix)]
        builder.branch(loop_j)

        builder.position_at_end(loop_j)
        jj = builder.phi(i64)
        acc_j = [builder.phi(v16) for _ in range(pix)]
        base = builder.add(builder.add(x_off, builder.mul(ii, row_step)), builder.mul(jj, tap_step))
        w_t = builder.add(w_off, builder.add(builder.mul(ii, w_row), builder.mul(jj, w_tap)))
        xv = [
            builder.load(x.vec_ptr(builder, x_data, builder.add(base, pix_off[p])), align=4)
            for p in range(pix)
        ]
        new = list(acc_j)
        for c in range(cg):  # w_tap = cg·C_out, the (t, c) rows C_out apart
            w_c = builder.add(
                w_t, builder.mul(ir.Constant(i64, c), builder.sdiv(w_tap, ir.Constant(i64, cg)))
            )
            wv = builder.load(x.vec_ptr(builder, w_data, w_c), align=4)
            for p in range(pix):
                xs = builder.shuffle_vector(xv[p], undef, masks[c])
                new[p] = builder.call(x.fma, [xs, wv, new[p]])
        j_next = builder.add(jj, ir.Constant(i64, 1))
        builder.cbranch(builder.icmp_signed("<", j_next, kw), loop_j, next_i)
        jj.add_incoming(ir.Constant(i64, 0), loop_i)
        jj.add_incoming(j_next, loop_j)
        for a_j, a_i, v in zip(acc_j, acc_i, new, strict=True):
            a_j.add_incoming(a_i, loop_i)
            a_j.add_incoming(v, loop_j)

        builder.position_at_end(next_i)
        i_next = builder.add(ii, ir.Constant(i64, 1))
        builder.cbranch(builder.icmp_signed("<", i_next, rows_k), loop_i, done)
        ii.add_incoming(ir.Constant(i64, 0), entry)
        ii.add_incoming(i_next, next_i)
        for a_i, v in zip(acc_i, new, strict=True):
            a_i.add_incoming(zero, entry)
            a_i.add_incoming(v, next_i)

        builder.position_at_end(done)
        res = [builder.phi(v16) for _ in range(pix)]
        for r, v in zip(res, new, strict=True):
            r.add_incoming(zero, entry)
            r.add_incoming(v, next_i)
        sh_data, _ = _data(context, builder, t[15], shift)
        sc_data, sc_n = _data(context, builder, t[16], scale)
        sh = builder.load(x.vec_ptr(builder, sh_data, col), align=4)
        has_sc = _splat(builder, builder.icmp_signed(">", sc_n, ir.Constant(i64, 0)), VW)
        sc = x.load(builder, x.vec_ptr(builder, sc_data, col), has_sc)
        sc = builder.select(has_sc, sc, ir.Constant(v16, [1.0] * VW))
        lo_v, hi_v = _splat(builder, lo, VW), _splat(builder, hi, VW)
        for p in range(pix):
            v = builder.call(x.fma, [res[p], sc, sh])
            v = builder.call(x.minnum, [builder.call(x.maxnum, [v, lo_v]), hi_v])
            valid = _splat(builder, builder.icmp_signed("<", ir.Constant(i64, p), npix), VW)
            ptr = x.vec_ptr(
                builder, o_data, builder.add(out_off, builder.mul(ir.Constant(i64, p), out_step))
            )
            builder.call(x.mstore, [v, ptr, ir.Constant(i32, 4), valid])
        return context.get_dummy_value()

    return codegen


def _make_strip(pix: int, cg: int):
    @intrinsic
    def strip(
        typingctx,
        x,
        x_off,
        pix_step,
        tap_step,
        row_step,
        w,
        w_off,
        w_tap,
        w_row,
        rows_k,
        kw,
        out,
        out_off,
        out_step,
        npix,
        shift,
        scale,
        col,
        lo,
        hi,
    ):
        sig = types.void(
            x,
            x_off,
            pix_step,
            tap_step,
            row_step,
            w,
            w_off,
            w_tap,
            w_row,
            rows_k,
            kw,
            out,
            out_off,
            out_step,
            npix,
            shift,
            scale,
            col,
            lo,
            hi,
        )
        return sig, _strip_codegen(pix, cg)

    return strip


_S = {(p, g): _make_strip(p, g) for p in (8, 4, 1) for g in GROUP_SIZES}
_S8_2, _S4_2, _S1_2 = _S[8, 2], _S[4, 2], _S[1, 2]
_S8_4, _S4_4, _S1_4 = _S[8, 4], _S[4, 4], _S[1, 4]
_S8_8, _S4_8, _S1_8 = _S[8, 8], _S[4, 8], _S[1, 8]
_S8_16, _S4_16, _S1_16 = _S[8, 16], _S[4, 16], _S[1, 16]


@numba.njit(inline="always", nogil=True, cache=True)
def _strip(
    cg,
    npix,
    xf,
    x_off,
    ps,
    ts,
    rs,
    wf,
    w_off,
    w_tap,
    w_row,
    rk,
    kw,
    of,
    out_off,
    os_,
    shift,
    scale,
    col,
    lo,
    hi,
):  # pragma: no cover - compiled
    """The kernel instance for cg channels per group and npix = 8, 4 or 1 pixels."""
    a = (xf, x_off, ps, ts, rs, wf, w_off, w_tap, w_row, rk, kw, of, out_off, os_)
    if cg == 4:
        if npix == 8:
            _S8_4(*a, 8, shift, scale, col, lo, hi)
        elif npix == 4:
            _S4_4(*a, 4, shift, scale, col, lo, hi)
        else:
            _S1_4(*a, 1, shift, scale, col, lo, hi)
    elif cg == 8:
        if npix == 8:
            _S8_8(*a, 8, shift, scale, col, lo, hi)
        elif npix == 4:
            _S4_8(*a, 4, shift, scale, col, lo, hi)
        else:
            _S1_8(*a, 1, shift, scale, col, lo, hi)
    elif cg == 16:
        if npix == 8:
            _S8_16(*a, 8, shift, scale, col, lo, hi)
        elif npix == 4:
            _S4_16(*a, 4, shift, scale, col, lo, hi)
        else:
            _S1_16(*a, 1, shift, scale, col, lo, hi)
    elif npix == 8:
        _S8_2(*a, 8, shift, scale, col, lo, hi)
    elif npix == 4:
        _S4_2(*a, 4, shift, scale, col, lo, hi)
    else:
        _S1_2(*a, 1, shift, scale, col, lo, hi)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def grouped_rows(
    x, wt, geom, out, r0, r1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Output rows r = n·Ho + oh in [r0, r1) of the grouped conv of x (N, H, W, C) with packed
    weights wt (kh·kw, cg, C); out (N·Ho·Wo, C). geom = (kh, kw, sh, sw, pt, pl, dh, dw,
    Ho, Wo)."""
    kh, kw, sh, sw, pt, pl, dh, dw, ho, wo = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    cg = wt.shape[1]
    xf, wf, of = x.reshape(-1), wt.reshape(-1), out.reshape(-1)
    fused = residual.shape[0] == 0
    lo, hi = clip_bounds(act, pa, pb) if fused else (np.float32(-np.inf), np.float32(np.inf))
    ow_lo = min(wo, -(-pl // sw))
    ow_hi = max(ow_lo, min(wo, (w - 1 + pl - (kw - 1) * dw) // sw + 1))
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        row0 = r * wo
        i0 = max(0, -(-(pt - oh * sh) // dh))
        i1 = min(kh, (h - 1 + pt - oh * sh) // dh + 1)
        ih0 = oh * sh - pt + i0 * dh
        ow = 0
        while ow < wo:
            if ow_lo <= ow < ow_hi:
                rest = ow_hi - ow
                npix, j0, j1 = (8 if rest >= 8 else (4 if rest >= 4 else 1)), 0, kw
            else:
                npix = 1
                j0 = max(0, -(-(pl - ow * sw) // dw))
                j1 = min(kw, (w - 1 + pl - ow * sw) // dw + 1)
            x_off = ((n * h + ih0) * w + ow * sw - pl + j0 * dw) * c
            for c0 in range(0, c, VW):
                _strip(
                    cg,
                    npix,
                    xf,
                    x_off + c0,
                    sw * c,
                    dw * c,
                    dh * w * c,
                    wf,
                    (i0 * kw + j0) * cg * c + c0,
                    cg * c,
                    kw * cg * c,
                    i1 - i0,
                    j1 - j0,
                    of,
                    (row0 + ow) * c + c0,
                    c,
                    shift,
                    scale,
                    c0,
                    lo,
                    hi,
                )
            ow += npix
        if not fused:
            epilogue_rows(
                out,
                row0,
                row0 + wo,
                0,
                c,
                np.zeros(0, np.float32),
                np.zeros(c, np.float32),
                residual,
                act,
                pa,
                pb,
            )
        elif act != NONE and act != CLIP:
            activate_rows(out, row0, row0 + wo, 0, c, act, pa, pb)
