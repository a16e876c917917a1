"""The engine's GEMM micro-kernel, written in LLVM IR (numba ``@intrinsic``), and its prefetch plan.

    C[i:i+rows, j:j+width] (+)= A[i:i+rows, :] @ Bp[j/32]          rows <= 6, width <= 32

* B (the weights, (K, N)) is packed once into panels Bp (ceil(N/32), K, 32), zero-padded on the
  right: each k step loads two 16-float vectors of one panel;
* A (activations, row-major) is read in place: 6 row streams, one broadcast per row and k;
* 12 ``<16 x float>`` accumulators stay in registers: per k, 2 loads + 6 broadcasts + 12 FMAs;
* a partial block (``rows`` < 6: the last rows of a matrix) re-reads its last valid row and does
  not store the rows past it; a partial panel (``width`` < 32: the last panel when N is not a
  multiple of 32) loads and stores C through lane masks. So no caller needs a padded scratch
  copy, and nothing outside C's valid rows and columns is read or written.

The prefetching variant also prefetches (into L1) one address per k step, b[pf_off + k·pf_step]:
callers point it at the next weight-panel piece, so that DRAM streams while this piece is
reused from cache (measured 5-20 % on the big-K GEMMs). :func:`prefetch_target` and
:func:`next_piece` compute those addresses for the K-blocked loops.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MR, NR = 6, 32  # micro-tile: 6 rows x 32 columns (two 16-float vectors)
A_CHUNK_FLOATS = 64 * 1024  # rows of A swept per B panel: 256 KB, a quarter of a 1 MB L2
KC = 512  # K block: a (KC x 32) piece of a B panel is 64 KB


def _splat(builder, value, n: int):
    """<n x T> with every lane = value."""
    vec_t = ir.VectorType(value.type, n)
    one = builder.insert_element(
        ir.Constant(vec_t, ir.Undefined), value, ir.Constant(ir.IntType(32), 0)
    )
    return builder.shuffle_vector(
        one,
        ir.Constant(vec_t, ir.Undefined),
        ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n),
    )


def _lane_masks(builder, width):
    """The <16 x i1> masks of the two column halves for ``width`` valid columns (i64)."""
    i64 = ir.IntType(64)
    lanes = [ir.Constant(ir.VectorType(i64, 16), [16 * h + q for q in range(16)]) for h in (0, 1)]
    w = _splat(builder, width, 16)
    return [builder.icmp_signed("<", lane, w) for lane in lanes]


class _IR:
    """The types and LLVM intrinsics one micro-kernel body needs."""

    def __init__(self, builder):
        self.f32, self.i32, self.i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        self.v16 = ir.VectorType(self.f32, 16)
        self.v16p = self.v16.as_pointer()
        mask_t = ir.VectorType(ir.IntType(1), 16)
        mod = builder.module
        self.fma = cgutils.get_or_insert_function(
            mod, ir.FunctionType(self.v16, [self.v16] * 3), "llvm.fma.v16f32"
        )
        self.mload = cgutils.get_or_insert_function(
            mod,
            ir.FunctionType(self.v16, [self.v16p, self.i32, mask_t, self.v16]),
            "llvm.masked.load.v16f32.p0",
        )
        self.mstore = cgutils.get_or_insert_function(
            mod,
            ir.FunctionType(ir.VoidType(), [self.v16, self.v16p, self.i32, mask_t]),
            "llvm.masked.store.v16f32.p0",
        )
        for name in ("minnum", "maxnum"):
            setattr(
                self,
                name,
                cgutils.get_or_insert_function(
                    mod, ir.FunctionType(self.v16, [self.v16] * 2), f"llvm.{name}.v16f32"
                ),
            )

    def vec_ptr(self, builder, base, offset):
        return builder.bitcast(builder.gep(base, [offset]), self.v16p)

    def load(self, builder, ptr, mask):
        zero = ir.Constant(self.v16, None)
        return builder.call(self.mload, [ptr, ir.Constant(self.i32, 4), mask, zero])


def _data(context, builder, ty, arr):
    a = context.make_array(ty)(context, builder, arr)
    return a.data, a.nitems


def _microkernel_codegen(prefetch: bool, segmented: bool = False):
    def codegen(context, builder, signature, args):
        (a_arr, a_off, lda, b_arr, b_off, c_arr, c_off, ldc, k_v, acc_v, rows_v, width_v) = args[
            :12
        ]
        pf_off, pf_step = args[12:14] if prefetch else (None, None)
        span, seg_a = args[12:14] if segmented else (None, None)
        epi, col, sh_arr, sc_arr, res_arr, res_off, ldr, lo, hi = args[-9:]
        t = signature.args
        x = _IR(builder)
        i64, v16 = x.i64, x.v16
        a_data, _ = _data(context, builder, t[0], a_arr)
        b_data, _ = _data(context, builder, t[3], b_arr)
        c_data, _ = _data(context, builder, t[5], c_arr)
        a_base, b_base = builder.gep(a_data, [a_off]), builder.gep(b_data, [b_off])
        c_base = builder.gep(c_data, [c_off])
        last = builder.sub(rows_v, ir.Constant(i64, 1))
        col_masks = _lane_masks(builder, width_v)
        acc_mask = _splat(builder, builder.icmp_signed("!=", acc_v, ir.Constant(i64, 0)), 16)
        rows, c_ptrs, masks, init = [], [], [], []
        for r in range(MR):
            valid = builder.icmp_signed("<", ir.Constant(i64, r), rows_v)
            rr = builder.select(valid, ir.Constant(i64, r), last)  # past the end: the last row
            rows.append(builder.gep(a_base, [builder.mul(lda, rr)]))
            crow = builder.gep(c_base, [builder.mul(ldc, ir.Constant(i64, r))])
            row_mask = _splat(builder, valid, 16)
            for h in range(2):
                c_ptrs.append(x.vec_ptr(builder, crow, ir.Constant(i64, 16 * h)))
                masks.append(builder.and_(col_masks[h], row_mask))
                # the initial accumulators: what c holds, or zero (nothing outside C is read)
                init.append(x.load(builder, c_ptrs[-1], builder.and_(masks[-1], acc_mask)))
        narrow = builder.icmp_signed("<=", width_v, ir.Constant(i64, 16))
        entry = builder.block
        done = builder.append_basic_block("k_done")
        loops = []
        for halves in (2, 1):  # all 32 columns, or only the first 16 (width <= 16)
            blk = builder.append_basic_block(f"k_loop{halves}")
            loops.append((halves, blk))
        has_k = builder.icmp_signed(">", k_v, ir.Constant(i64, 0))
        pick = builder.append_basic_block("k_pick")
        builder.cbranch(has_k, pick, done)
        builder.position_at_end(pick)
        builder.cbranch(narrow, loops[1][1], loops[0][1])
        tails = []
        for halves, blk in loops:
            builder.position_at_end(blk)
            kk = builder.phi(i64)
            if segmented:  # k within its segment, and the segment's offset in A
                kin, soff = builder.phi(i64), builder.phi(i64)
            acc = [builder.phi(v16) for _ in range(2 * MR)]  # (phis first: LLVM requires it)
            a_k = builder.add(soff, kin) if segmented else kk
            if prefetch:
                pf = builder.gep(b_data, [builder.add(pf_off, builder.mul(kk, pf_step))])
                _prefetch(builder, pf, x)
            off = builder.mul(kk, ir.Constant(i64, NR))
            bv = []
            for h in range(halves):
                ptr = x.vec_ptr(builder, b_base, builder.add(off, ir.Constant(i64, 16 * h)))
                bv.append(builder.load(ptr, align=4))
            new = list(acc)
            for r in range(MR):
                av = _splat(builder, builder.load(builder.gep(rows[r], [a_k]), align=4), 16)
                for h in range(halves):
                    new[2 * r + h] = builder.call(x.fma, [av, bv[h], acc[2 * r + h]])
            k_next = builder.add(kk, ir.Constant(i64, 1))
            kk.add_incoming(ir.Constant(i64, 0), pick)
            kk.add_incoming(k_next, builder.block)
            if segmented:  # the next segment after span steps
                kin1 = builder.add(kin, ir.Constant(i64, 1))
                wrap = builder.icmp_signed("==", kin1, span)
                kin.add_incoming(ir.Constant(i64, 0), pick)
                kin.add_incoming(builder.select(wrap, ir.Constant(i64, 0), kin1), builder.block)
                soff.add_incoming(ir.Constant(i64, 0), pick)
                soff.add_incoming(
                    builder.select(wrap, builder.add(soff, seg_a), soff), builder.block
                )
            for p, v, v0 in zip(acc, new, init, strict=True):
                p.add_incoming(v0, pick)
                p.add_incoming(v, builder.block)
            tails.append((builder.block, new))
            builder.cbranch(builder.icmp_signed("<", k_next, k_v), blk, done)

        builder.position_at_end(done)
        results = [builder.phi(v16) for _ in range(2 * MR)]  # phis first: LLVM requires it
        for i, res in enumerate(results):
            res.add_incoming(init[i], entry)
            for blk, new in tails:
                res.add_incoming(new[i], blk)
        _epilogue_and_store(
            context,
            builder,
            x,
            t,
            results,
            c_ptrs,
            masks,
            col_masks,
            rows_v,
            epi,
            col,
            sh_arr,
            sc_arr,
            res_arr,
            res_off,
            ldr,
            lo,
            hi,
        )
        return context.get_dummy_value()

    return codegen


def _prefetch(builder, ptr, x) -> None:
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [i8p, x.i32, x.i32, x.i32]),
        "llvm.prefetch.p0",
    )  # (address, read, locality 3 = keep in L1, data cache)
    i32 = x.i32
    builder.call(
        fn,
        [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)],
    )


def _epilogue_and_store(
    context,
    builder,
    x,
    t,
    results,
    c_ptrs,
    masks,
    col_masks,
    rows_v,
    epi,
    col,
    sh_arr,
    sc_arr,
    res_arr,
    res_off,
    ldr,
    lo,
    hi,
):
    """Store the accumulators; with ``epi`` nonzero first v = min(max(v·scale + shift +
    residual, lo), hi) per column (scale and residual only when their arrays are not empty)."""
    i64 = x.i64
    sh_data, _ = _data(context, builder, t[-7], sh_arr)
    sc_data, sc_n = _data(context, builder, t[-6], sc_arr)
    res_data, res_n = _data(context, builder, t[-5], res_arr)
    apply = builder.icmp_signed("!=", epi, ir.Constant(epi.type, 0))
    has_sc = _splat(
        builder, builder.and_(apply, builder.icmp_signed(">", sc_n, ir.Constant(i64, 0))), 16
    )
    has_res = builder.and_(apply, builder.icmp_signed(">", res_n, ir.Constant(i64, 0)))
    on = _splat(builder, apply, 16)
    one = ir.Constant(x.v16, [1.0] * 16)
    lo_v, hi_v = _splat(builder, lo, 16), _splat(builder, hi, 16)
    shift, scale = [], []
    for h in range(2):
        j = builder.add(col, ir.Constant(i64, 16 * h))
        m = builder.and_(col_masks[h], on)
        shift.append(x.load(builder, x.vec_ptr(builder, sh_data, j), m))
        sc = x.load(builder, x.vec_ptr(builder, sc_data, j), builder.and_(col_masks[h], has_sc))
        scale.append(builder.select(has_sc, sc, one))
    res_base = builder.gep(res_data, [res_off])
    for r in range(MR):
        rrow = builder.gep(res_base, [builder.mul(ldr, ir.Constant(i64, r))])
        valid = builder.icmp_signed("<", ir.Constant(i64, r), rows_v)
        for h in range(2):
            i = 2 * r + h
            v = builder.call(x.fma, [results[i], scale[h], shift[h]])  # zero shift when off
            rm = builder.and_(masks[i], _splat(builder, builder.and_(has_res, valid), 16))
            v = builder.fadd(
                v, x.load(builder, x.vec_ptr(builder, rrow, ir.Constant(i64, 16 * h)), rm)
            )
            clipped = builder.call(x.minnum, [builder.call(x.maxnum, [v, lo_v]), hi_v])
            v = builder.select(on, clipped, results[i])
            builder.call(x.mstore, [v, c_ptrs[i], ir.Constant(x.i32, 4), masks[i]])


_EPI = "epi, col, shift, scale, res, res_off, ldr, lo, hi"


@intrinsic
def microkernel(
    typingctx,
    a,
    a_off,
    lda,
    b,
    b_off,
    c,
    c_off,
    ldc,
    k,
    acc,
    rows,
    width,
    epi,
    col,
    shift,
    scale,
    res,
    res_off,
    ldr,
    lo,
    hi,
):
    """c[r·ldc + j] (+)= Σ_k a[r·lda + k] · b[k·32 + j] for r < rows <= 6, j < width <= 32
    (offsets in elements, all int64); ``acc`` nonzero adds to what c holds (the K blocks after
    the first), zero overwrites. With ``epi`` nonzero (the last K block) the stored value is
    min(max(v·scale[col + j] + shift[col + j] + res[res_off + r·ldr + j], lo), hi), scale and
    res skipped when empty: the epilogue of :func:`bnlab.inference._gemm.epilogue_rows` while
    the accumulators are still in registers."""
    sig = types.void(
        a,
        a_off,
        lda,
        b,
        b_off,
        c,
        c_off,
        ldc,
        k,
        acc,
        rows,
        width,
        epi,
        col,
        shift,
        scale,
        res,
        res_off,
        ldr,
        lo,
        hi,
    )
    return sig, _microkernel_codegen(False)


@intrinsic
def microkernel_seg(
    typingctx,
    a,
    a_off,
    lda,
    b,
    b_off,
    c,
    c_off,
    ldc,
    k,
    acc,
    rows,
    width,
    span,
    seg_a,
    epi,
    col,
    shift,
    scale,
    res,
    res_off,
    ldr,
    lo,
    hi,
):
    """:func:`microkernel` whose A rows are segments: step k reads a[r·lda + (k // span)·seg_a
    + k mod span] (B stays contiguous). A direct conv takes its kh kernel rows of one output
    tile in one call this way (K = kh·kw·C) instead of kh calls of K = kw·C."""
    sig = types.void(
        a,
        a_off,
        lda,
        b,
        b_off,
        c,
        c_off,
        ldc,
        k,
        acc,
        rows,
        width,
        span,
        seg_a,
        epi,
        col,
        shift,
        scale,
        res,
        res_off,
        ldr,
        lo,
        hi,
    )
    return sig, _microkernel_codegen(False, segmented=True)


@intrinsic
def microkernel_pf(
    typingctx,
    a,
    a_off,
    lda,
    b,
    b_off,
    c,
    c_off,
    ldc,
    k,
    acc,
    rows,
    width,
    pf_off,
    pf_step,
    epi,
    col,
    shift,
    scale,
    res,
    res_off,
    ldr,
    lo,
    hi,
):
    """:func:`microkernel`, also prefetching b[pf_off + k·pf_step] at every k step."""
    sig = types.void(
        a,
        a_off,
        lda,
        b,
        b_off,
        c,
        c_off,
        ldc,
        k,
        acc,
        rows,
        width,
        pf_off,
        pf_step,
        epi,
        col,
        shift,
        scale,
        res,
        res_off,
        ldr,
        lo,
        hi,
    )
    return sig, _microkernel_codegen(True)


@numba.njit(nogil=True, cache=True)
def prefetch_target(b_off, nxt, j, n_blocks, kc):  # pragma: no cover - compiled
    """(pf_off, pf_step) for the j-th row block of a weight piece (kc x 32 floats at b_off)
    whose successor starts at nxt (nxt < 0: none): blocks 1..n−1 each prefetch a 1/(n−1) share
    of the next piece, spread over their kc steps (one address per step, at most 16 floats =
    one 64-byte line apart, so with 3 or more blocks every line is covered); block 0 (and the
    last piece) prefetch their own piece, which is already in cache."""
    if nxt < 0 or j == 0 or n_blocks < 2:
        return b_off, 0
    share = -(-(kc * NR) // (n_blocks - 1))
    return nxt + (j - 1) * share, min(16, -(-share // kc))


@numba.njit(nogil=True, cache=True)
def next_piece(p, pan0, pan1, kb, k):  # pragma: no cover - compiled
    """Offset in the packed B (panels, K, 32) of the piece after (panel p, K block kb), in the
    order the K-blocked loops take them (kb outer, p inner); −1 after the last."""
    if p + 1 < pan1:
        return (p + 1) * k * NR + kb * NR
    if kb + KC < k:
        return pan0 * k * NR + (kb + KC) * NR
    return -1
