"""Depthwise convolution (groups = channels), NHWC, with the fused epilogue.

    y[n, oh, ow, c] = act(Σ_{i,j} x[n, oh·sh − pt + i·dh, ow·sw − pl + j·dw, c] · w[i, j, c]
                          · scale[c] + shift[c] + residual)

Each output reads kh·kw inputs of its own channel only: nothing to share between channels and
nothing for a GEMM to do, a stream of multiply-adds over channel vectors. The inner kernel
(:func:`_dw_strip`, LLVM IR like the GEMM's micro-kernel) keeps 8 output pixels x 16 channels in
8 vector registers over all the taps: per tap one weight vector and 8 input vectors are loaded
and 8 FMAs issued, then the epilogue (scale, shift, clip) is applied in registers and the 8
vectors stored once. A strip covers output pixels whose window lies inside the row; the few
pixels at the left and right border (where the window reaches into the padding) go through a
plain NumPy-style loop (:func:`_border_pixel`). Kernel rows outside the image (top and bottom
border) are skipped by starting the strip at the first valid kernel row.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bnlab.inference._act import CLIP, NONE, activate_rows
from bnlab.inference._gemm import clip_bounds, epilogue_rows
from bnlab.inference._microkernel import _IR, _data, _lane_masks, _splat

VW = 16  # channels per strip (one zmm register)


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> (kh·kw, C) float32: row t = i·kw + j holds tap (i, j) of every channel."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c, kh * kw).T, dtype=np.float32)


def _strip_codegen(pix: int):
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
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        ) = args
        t = signature.args
        x = _IR(builder)
        i64, v16 = x.i64, x.v16
        x_data, _ = _data(context, builder, t[0], x_arr)
        w_data, _ = _data(context, builder, t[5], w_arr)
        o_data, _ = _data(context, builder, t[11], out_arr)
        mask = _lane_masks(builder, lanes)[0]
        last = builder.sub(npix, ir.Constant(i64, 1))
        pix_off = []  # offsets of the strip's pixels (past npix: the last one again)
        for p in range(pix):
            pp = builder.select(
                builder.icmp_signed("<", ir.Constant(i64, p), npix), ir.Constant(i64, p), last
            )
            pix_off.append(builder.mul(pp, pix_step))
        zero = ir.Constant(v16, None)
        entry = builder.block
        loop_i = builder.append_basic_block("rows")
        loop_j = builder.append_basic_block("cols")
        next_i = builder.append_basic_block("next_row")
        done = builder.append_basic_block("done")
        some = builder.and_(
            builder.icmp_signed(">", rows_k, ir.Constant(i64, 0)),
            builder.icmp_signed(">", kw, ir.Constant(i64, 0)),
        )
        builder.cbranch(some, loop_i, done)  # (the loops below test at their end)

        builder.position_at_end(loop_i)  # for i in range(rows_k)
        ii = builder.phi(i64)
        acc_i = [builder.phi(v16) for _ in range(pix)]
        builder.branch(loop_j)

        builder.position_at_end(loop_j)  # for j in range(kw)
        jj = builder.phi(i64)
        acc_j = [builder.phi(v16) for _ in range(pix)]
        base = builder.add(builder.add(x_off, builder.mul(ii, row_step)), builder.mul(jj, tap_step))
        tap = builder.add(builder.mul(ii, w_row), builder.mul(jj, w_tap))
        wv = x.load(builder, x.vec_ptr(builder, w_data, builder.add(w_off, tap)), mask)
        new = []
        for p in range(pix):
            xv = x.load(builder, x.vec_ptr(builder, x_data, builder.add(base, pix_off[p])), mask)
            new.append(builder.call(x.fma, [xv, wv, acc_j[p]]))
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
        sh_data, _ = _data(context, builder, t[16], shift)
        sc_data, sc_n = _data(context, builder, t[17], scale)
        sh = x.load(builder, x.vec_ptr(builder, sh_data, col), mask)
        has_sc = builder.icmp_signed(">", sc_n, ir.Constant(i64, 0))
        sc = x.load(
            builder,
            x.vec_ptr(builder, sc_data, col),
            builder.and_(mask, _splat(builder, has_sc, 16)),
        )
        sc = builder.select(_splat(builder, has_sc, 16), sc, ir.Constant(v16, [1.0] * 16))
        lo_v, hi_v = _splat(builder, lo, 16), _splat(builder, hi, 16)
        for p in range(pix):
            v = builder.call(x.fma, [res[p], sc, sh])
            v = builder.call(x.minnum, [builder.call(x.maxnum, [v, lo_v]), hi_v])
            valid = _splat(builder, builder.icmp_signed("<", ir.Constant(i64, p), npix), 16)
            ptr = x.vec_ptr(
                builder, o_data, builder.add(out_off, builder.mul(ir.Constant(i64, p), out_step))
            )
            builder.call(x.mstore, [v, ptr, ir.Constant(x.i32, 4), builder.and_(mask, valid)])
        return context.get_dummy_value()

    return codegen


def _make_strip(pix: int):
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
        lanes,
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
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        )
        return sig, _strip_codegen(pix)

    strip.__doc__ = f"""out[out_off + p·out_step + q] = clip(Σ_{{i<rows_k, j<kw}} x[x_off +
    i·row_step + j·tap_step + p·pix_step + q] · w[w_off + i·w_row + j·w_tap + q] · scale[col + q]
    + shift[col + q], lo, hi) for pixels p < npix <= {pix} and channels q < lanes <= 16 (scale
    skipped when empty): {pix} pixels x 16 channels in {pix} vector registers."""
    return strip


_dw_strip8, _dw_strip4, _dw_strip1 = _make_strip(8), _make_strip(4), _make_strip(1)


@numba.njit(inline="always", nogil=True, cache=True)
def _strip_n(
    npix,
    xf,
    x_off,
    pix_step,
    tap_step,
    row_step,
    wf,
    w_off,
    w_tap,
    w_row,
    rows_k,
    kw,
    of,
    out_off,
    out_step,
    lanes,
    shift,
    scale,
    col,
    lo,
    hi,
):  # pragma: no cover
    """The strip kernel for npix = 8, 4 or 1 pixels."""
    if npix == 8:
        _dw_strip8(
            xf,
            x_off,
            pix_step,
            tap_step,
            row_step,
            wf,
            w_off,
            w_tap,
            w_row,
            rows_k,
            kw,
            of,
            out_off,
            out_step,
            8,
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    elif npix == 4:
        _dw_strip4(
            xf,
            x_off,
            pix_step,
            tap_step,
            row_step,
            wf,
            w_off,
            w_tap,
            w_row,
            rows_k,
            kw,
            of,
            out_off,
            out_step,
            4,
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    else:
        _dw_strip1(
            xf,
            x_off,
            pix_step,
            tap_step,
            row_step,
            wf,
            w_off,
            w_tap,
            w_row,
            rows_k,
            kw,
            of,
            out_off,
            out_step,
            1,
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        )


@numba.njit(inline="always", nogil=True, cache=True)
def _row_fast(
    xf,
    x_off,
    sw,
    dw,
    row_step,
    wf,
    w_off,
    c,
    kh,
    kw,
    w_row,
    of,
    out_off,
    npix,
    lanes,
    shift,
    scale,
    col,
    lo,
    hi,
    fast,
):  # pragma: no cover - compiled
    """One strip through the kernel instance whose tap counts, steps and lane count are literal
    constants (``fast`` = 1..4: 3x3 or 5x5 windows, stride 1 or 2, all 16 lanes), else through
    the one taking them at run time. With constants LLVM unrolls the tap loops and, as the
    input of pixel p at tap j + sw is the input of pixel p + 1 at tap j, loads it once:
    measured 2-4x faster."""
    if fast == 1:
        _strip_n(
            npix,
            xf,
            x_off,
            c,
            c,
            row_step,
            wf,
            w_off,
            c,
            3 * c,
            3,
            3,
            of,
            out_off,
            c,
            16,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    elif fast == 2:
        _strip_n(
            npix,
            xf,
            x_off,
            2 * c,
            c,
            row_step,
            wf,
            w_off,
            c,
            3 * c,
            3,
            3,
            of,
            out_off,
            c,
            16,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    elif fast == 3:
        _strip_n(
            npix,
            xf,
            x_off,
            c,
            c,
            row_step,
            wf,
            w_off,
            c,
            5 * c,
            5,
            5,
            of,
            out_off,
            c,
            16,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    elif fast == 4:
        _strip_n(
            npix,
            xf,
            x_off,
            2 * c,
            c,
            row_step,
            wf,
            w_off,
            c,
            5 * c,
            5,
            5,
            of,
            out_off,
            c,
            16,
            shift,
            scale,
            col,
            lo,
            hi,
        )
    else:
        _strip_n(
            npix,
            xf,
            x_off,
            sw * c,
            dw * c,
            row_step,
            wf,
            w_off,
            c,
            w_row,
            kh,
            kw,
            of,
            out_off,
            c,
            lanes,
            shift,
            scale,
            col,
            lo,
            hi,
        )


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def depthwise_rows(
    x, wt, geom, out, r0, r1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Output rows r = n·Ho + oh in [r0, r1) of the depthwise conv of x (N, H, W, C) with
    packed weights wt (kh·kw, C); out (N·Ho·Wo, C). geom = (kh, kw, sh, sw, pt, pl, dh, dw,
    Ho, Wo)."""
    kh, kw, sh, sw, pt, pl, dh, dw, ho, wo = geom
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    xf, wf, of = x.reshape(-1), wt.reshape(-1), out.reshape(-1)
    fused = residual.shape[0] == 0  # the strip kernel's epilogue is the whole epilogue
    lo, hi = clip_bounds(act, pa, pb) if fused else (np.float32(-np.inf), np.float32(np.inf))
    # output columns whose window lies inside the row: ow·sw − pl >= 0 and the last tap < W
    ow_lo = min(wo, -(-pl // sw))
    ow_hi = max(ow_lo, min(wo, (w - 1 + pl - (kw - 1) * dw) // sw + 1))
    kind = 0  # the window's constant-specialized kernel, if it has one
    if dw == 1 and kh == kw and (kh == 3 or kh == 5) and (sw == 1 or sw == 2):
        kind = (1 if kh == 3 else 3) + (sw - 1)
    for r in range(r0, r1):
        n, oh = r // ho, r % ho
        row0 = r * wo
        i0 = max(0, -(-(pt - oh * sh) // dh))  # the valid kernel rows i0 <= i < i1
        i1 = min(kh, (h - 1 + pt - oh * sh) // dh + 1)
        ih0 = oh * sh - pt + i0 * dh
        for c0 in range(0, c, VW):
            lanes = min(VW, c - c0)
            fast = kind if i1 - i0 == kh and lanes == VW else 0
            ow = 0
            while ow < wo:
                if ow_lo <= ow < ow_hi:  # inside: strips of 8, 4 or 1 pixels
                    rest = ow_hi - ow
                    npix, j0, j1, f = (8 if rest >= 8 else (4 if rest >= 4 else 1)), 0, kw, fast
                else:  # at the border: one pixel, the valid kernel columns j0 <= j < j1
                    npix, f = 1, 0
                    j0 = max(0, -(-(pl - ow * sw) // dw))
                    j1 = min(kw, (w - 1 + pl - ow * sw) // dw + 1)
                x_off = ((n * h + ih0) * w + ow * sw - pl + j0 * dw) * c + c0
                _row_fast(
                    xf,
                    x_off,
                    sw,
                    dw,
                    dh * w * c,
                    wf,
                    (i0 * kw + j0) * c + c0,
                    c,
                    i1 - i0,
                    j1 - j0,
                    kw * c,
                    of,
                    (row0 + ow) * c + c0,
                    npix,
                    lanes,
                    shift,
                    scale,
                    c0,
                    lo,
                    hi,
                    f,
                )
                ow += npix
        if not fused:  # a residual: added (with the activation) after the strips' scale + shift
            _add_residual(out, row0, row0 + wo, residual, act, pa, pb)
        elif act != NONE and act != CLIP:
            activate_rows(out, row0, row0 + wo, 0, c, act, pa, pb)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _add_residual(out, r0, r1, residual, act, pa, pb):  # pragma: no cover - compiled
    zero = np.zeros(out.shape[1], np.float32)
    epilogue_rows(
        out, r0, r1, 0, out.shape[1], np.zeros(0, np.float32), zero, residual, act, pa, pb
    )


def work_items(rows: int, n_threads: int) -> list[tuple[int, int]]:
    """(r0, r1) ranges of output rows (n, oh): 4 per thread, or one."""
    parts = max(1, min(rows, 4 * n_threads if n_threads > 1 else 1))
    step = -(-rows // parts)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
