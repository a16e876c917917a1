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


def _microkernel_codegen(prefetch: bool):
    def codegen(context, builder, signature, args):
        a_arr, a_off_v, lda_v, b_arr, b_off_v, c_arr, c_off_v, ldc_v, k_v, acc_v = args[:10]
        rows_v, width_v = args[-2:]
        aty, bty, cty = signature.args[0], signature.args[3], signature.args[5]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v16 = ir.VectorType(f32, 16)
        v16p = v16.as_pointer()
        mask_t = ir.VectorType(ir.IntType(1), 16)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
        )
        mload = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(v16, [v16p, i32, mask_t, v16]),
            "llvm.masked.load.v16f32.p0",
        )
        mstore = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [v16, v16p, i32, mask_t]),
            "llvm.masked.store.v16f32.p0",
        )
        a_base = builder.gep(context.make_array(aty)(context, builder, a_arr).data, [a_off_v])
        b_base = builder.gep(context.make_array(bty)(context, builder, b_arr).data, [b_off_v])
        c_base = builder.gep(context.make_array(cty)(context, builder, c_arr).data, [c_off_v])
        last = builder.sub(rows_v, ir.Constant(i64, 1))
        col_masks = _lane_masks(builder, width_v)
        rows, c_ptrs, masks = [], [], []
        for r in range(MR):
            valid = builder.icmp_signed("<", ir.Constant(i64, r), rows_v)
            rr = builder.select(valid, ir.Constant(i64, r), last)  # past the end: the last row
            rows.append(builder.gep(a_base, [builder.mul(lda_v, rr)]))
            crow = builder.gep(c_base, [builder.mul(ldc_v, ir.Constant(i64, r))])
            row_mask = _splat(builder, valid, 16)
            for h in range(2):
                c_ptrs.append(builder.bitcast(builder.gep(crow, [ir.Constant(i64, 16 * h)]), v16p))
                masks.append(builder.and_(col_masks[h], row_mask))
        zero = ir.Constant(v16, None)
        accumulate = builder.icmp_signed("!=", acc_v, ir.Constant(acc_v.type, 0))
        # the initial accumulators: what c holds, or zero (masked: nothing outside C is read)
        init = []
        for p, m in zip(c_ptrs, masks, strict=True):
            load_mask = builder.and_(m, _splat(builder, accumulate, 16))
            init.append(builder.call(mload, [p, ir.Constant(i32, 4), load_mask, zero]))
        undef = ir.Constant(v16, ir.Undefined)
        splat0 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

        entry = builder.block
        loop = builder.append_basic_block("k_loop")
        done = builder.append_basic_block("k_done")
        builder.cbranch(builder.icmp_signed(">", k_v, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        kk = builder.phi(i64)
        acc = [builder.phi(v16) for _ in range(2 * MR)]
        if prefetch:
            pf_off_v, pf_step_v = args[10:12]
            b_data = context.make_array(bty)(context, builder, b_arr).data
            pf = builder.gep(b_data, [builder.add(pf_off_v, builder.mul(kk, pf_step_v))])
            i8p = ir.IntType(8).as_pointer()
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0",
            )  # (address, read, locality 3 = keep in L1, data cache)
            builder.call(
                fn,
                [
                    builder.bitcast(pf, i8p),
                    ir.Constant(i32, 0),
                    ir.Constant(i32, 3),
                    ir.Constant(i32, 1),
                ],
            )
        off = builder.mul(kk, ir.Constant(i64, NR))
        b0 = builder.load(builder.bitcast(builder.gep(b_base, [off]), v16p), align=4)
        off16 = builder.add(off, ir.Constant(i64, 16))
        b1 = builder.load(builder.bitcast(builder.gep(b_base, [off16]), v16p), align=4)
        new = []
        for r in range(MR):
            s = builder.load(builder.gep(rows[r], [kk]), align=4)
            av = builder.shuffle_vector(
                builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, splat0
            )
            new += [
                builder.call(fma, [av, b0, acc[2 * r]]),
                builder.call(fma, [av, b1, acc[2 * r + 1]]),
            ]
        k_next = builder.add(kk, ir.Constant(i64, 1))
        tail = builder.block
        kk.add_incoming(ir.Constant(i64, 0), entry)
        kk.add_incoming(k_next, tail)
        for p, v, v0 in zip(acc, new, init, strict=True):
            p.add_incoming(v0, entry)
            p.add_incoming(v, tail)
        builder.cbranch(builder.icmp_signed("<", k_next, k_v), loop, done)

        builder.position_at_end(done)
        results = [builder.phi(v16) for _ in range(2 * MR)]  # phis first: LLVM requires it
        for res, v, v0 in zip(results, new, init, strict=True):
            res.add_incoming(v0, entry)
            res.add_incoming(v, tail)
        for res, p, m in zip(results, c_ptrs, masks, strict=True):
            builder.call(mstore, [res, p, ir.Constant(i32, 4), m])
        return context.get_dummy_value()

    return codegen


@intrinsic
def microkernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width):
    """c[r·ldc + j] (+)= Σ_k a[r·lda + k] · b[k·32 + j] for r < rows <= 6, j < width <= 32
    (offsets in elements, all int64); ``acc`` nonzero adds to what c holds (the K blocks after
    the first), zero overwrites."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width)
    return sig, _microkernel_codegen(False)


@intrinsic
def microkernel_pf(
    typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, pf_off, pf_step, rows, width
):
    """:func:`microkernel`, also prefetching b[pf_off + k·pf_step] at every k step."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, pf_off, pf_step, rows, width)
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
