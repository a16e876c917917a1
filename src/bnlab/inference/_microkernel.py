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

from bnlab.inference._ir import IR, activate, data, lane_masks, splat

MR, NR = 6, 32  # micro-tile: 6 rows x 32 columns (two 16-float vectors)
A_CHUNK_FLOATS = 64 * 1024  # rows of A swept per B panel: 256 KB, a quarter of a 1 MB L2
KC = 512  # K block: a (KC x 32) piece of a B panel is 64 KB


_ARGS = "a a_off lda b b_off c c_off ldc k acc rows width"
_EPI = "epi col shift scale res res_off ldr act pa pb"


def _microkernel_codegen(prefetch: bool, segmented: bool = False):
    extra = "pf_off pf_step" if prefetch else ("span seg_a" if segmented else "")
    names = f"{_ARGS} {extra} {_EPI}".split()

    def codegen(context, builder, signature, args):
        v = dict(zip(names, args, strict=True))
        t = dict(zip(names, signature.args, strict=True))
        x = IR(builder)
        c = x.const
        a_data, b_data, c_data = (data(context, builder, t[n], v[n])[0] for n in "abc")
        a_base, b_base = builder.gep(a_data, [v["a_off"]]), builder.gep(b_data, [v["b_off"]])
        c_base = builder.gep(c_data, [v["c_off"]])
        rows_v, k_v = v["rows"], v["k"]
        last = builder.sub(rows_v, c(1))
        col_masks = lane_masks(builder, v["width"])
        acc_mask = splat(builder, builder.icmp_signed("!=", v["acc"], c(0)))
        rows, c_ptrs, masks, init = [], [], [], []
        for r in range(MR):
            valid = builder.icmp_signed("<", c(r), rows_v)
            rr = builder.select(valid, c(r), last)  # past the end: the last row again
            rows.append(builder.gep(a_base, [builder.mul(v["lda"], rr)]))
            crow = builder.gep(c_base, [builder.mul(v["ldc"], c(r))])
            for h in range(2):
                c_ptrs.append(x.vec_ptr(builder, crow, c(16 * h)))
                masks.append(builder.and_(col_masks[h], splat(builder, valid)))
                # the initial accumulators: what c holds, or zero (nothing outside C is read)
                init.append(x.load(builder, c_ptrs[-1], builder.and_(masks[-1], acc_mask)))
        entry = builder.block
        done, pick = builder.append_basic_block("k_done"), builder.append_basic_block("k_pick")
        loops = [(h, builder.append_basic_block(f"k_loop{h}")) for h in (2, 1)]
        builder.cbranch(builder.icmp_signed(">", k_v, c(0)), pick, done)
        builder.position_at_end(pick)  # all 32 columns, or only the first 16 (width <= 16)
        builder.cbranch(builder.icmp_signed("<=", v["width"], c(16)), loops[1][1], loops[0][1])
        tails = []
        for halves, blk in loops:
            builder.position_at_end(blk)
            kk = builder.phi(x.i64)
            if segmented:  # k within its segment, and the segment's offset in A
                kin, soff = builder.phi(x.i64), builder.phi(x.i64)
            acc = [builder.phi(x.v16) for _ in range(2 * MR)]  # (phis first: LLVM requires it)
            a_k = builder.add(soff, kin) if segmented else kk
            if prefetch:
                _prefetch(builder, builder.gep(b_data, [builder.add(
                    v["pf_off"], builder.mul(kk, v["pf_step"]))]), x)  # fmt: skip
            off = builder.mul(kk, c(NR))
            bv = [x.load(builder, x.vec_ptr(builder, b_base, builder.add(off, c(16 * h))))
                  for h in range(halves)]  # fmt: skip
            new = list(acc)
            for r in range(MR):
                av = splat(builder, builder.load(builder.gep(rows[r], [a_k]), align=4))
                for h in range(halves):
                    new[2 * r + h] = builder.call(x.fma, [av, bv[h], acc[2 * r + h]])
            k_next = builder.add(kk, c(1))
            kk.add_incoming(c(0), pick)
            kk.add_incoming(k_next, builder.block)
            if segmented:  # the next segment after span steps
                kin1 = builder.add(kin, c(1))
                wrap = builder.icmp_signed("==", kin1, v["span"])
                kin.add_incoming(c(0), pick)
                kin.add_incoming(builder.select(wrap, c(0), kin1), builder.block)
                soff.add_incoming(c(0), pick)
                soff.add_incoming(builder.select(wrap, builder.add(soff, v["seg_a"]), soff),
                                  builder.block)  # fmt: skip
            for p, nv, v0 in zip(acc, new, init, strict=True):
                p.add_incoming(v0, pick)
                p.add_incoming(nv, builder.block)
            tails.append((builder.block, new))
            builder.cbranch(builder.icmp_signed("<", k_next, k_v), blk, done)

        builder.position_at_end(done)
        results = [builder.phi(x.v16) for _ in range(2 * MR)]
        for i, res in enumerate(results):
            res.add_incoming(init[i], entry)
            for blk, new in tails:
                res.add_incoming(new[i], blk)
        _epilogue_and_store(context, builder, x, v, t, results, c_ptrs, masks, col_masks)
        return context.get_dummy_value()

    return codegen


def _prefetch(builder, ptr, x) -> None:
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.VoidType(), [i8p, x.i32, x.i32, x.i32]), "llvm.prefetch.p0")  # fmt: skip
    # (address, read, locality 3 = keep in L1, data cache)
    builder.call(fn, [builder.bitcast(ptr, i8p)] + [ir.Constant(x.i32, n) for n in (0, 3, 1)])


def _epilogue_and_store(context, builder, x, v, t, results, c_ptrs, masks, col_masks):
    """Store the accumulators; with ``epi`` nonzero first y = act(y·scale + shift + residual)
    per column (scale and residual only when their arrays are not empty; the activation one
    run-time branch for the whole tile: :func:`bnlab.inference._ir.activate`)."""
    c = x.const
    sh_data, _ = data(context, builder, t["shift"], v["shift"])
    sc_data, sc_n = data(context, builder, t["scale"], v["scale"])
    res_data, res_n = data(context, builder, t["res"], v["res"])
    apply = builder.icmp_signed("!=", v["epi"], ir.Constant(v["epi"].type, 0))
    has_sc = splat(builder, builder.and_(apply, builder.icmp_signed(">", sc_n, c(0))))
    has_res = builder.and_(apply, builder.icmp_signed(">", res_n, c(0)))
    on = splat(builder, apply)
    shift, scale = [], []
    for h in range(2):
        j = builder.add(v["col"], c(16 * h))
        shift.append(x.load(builder, x.vec_ptr(builder, sh_data, j), builder.and_(col_masks[h],
                                                                                  on)))  # fmt: skip
        sc = x.load(builder, x.vec_ptr(builder, sc_data, j), builder.and_(col_masks[h], has_sc))
        scale.append(builder.select(has_sc, sc, ir.Constant(x.v16, [1.0] * 16)))
    res_base = builder.gep(res_data, [v["res_off"]])
    ys = []
    for r in range(MR):
        rrow = builder.gep(res_base, [builder.mul(v["ldr"], c(r))])
        valid = builder.icmp_signed("<", c(r), v["rows"])
        for h in range(2):
            i = 2 * r + h
            y = builder.call(x.fma, [results[i], scale[h], shift[h]])  # = results when off
            rm = builder.and_(masks[i], splat(builder, builder.and_(has_res, valid)))
            ys.append(builder.fadd(y, x.load(builder, x.vec_ptr(builder, rrow, c(16 * h)), rm)))
    act = builder.select(apply, v["act"], ir.Constant(v["act"].type, 0))
    for y, ptr, m in zip(activate(builder, x, ys, act, v["pa"], v["pb"]), c_ptrs, masks,
                         strict=True):  # fmt: skip
        x.store(builder, y, ptr, m)


# fmt: off
@intrinsic
def microkernel(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width, epi, col,
                shift, scale, res, res_off, ldr, act, pa, pb):
    """c[r·ldc + j] (+)= Σ_k a[r·lda + k] · b[k·32 + j] for r < rows <= 6, j < width <= 32
    (offsets in elements, all int64); ``acc`` nonzero adds to what c holds (the K blocks after
    the first), zero overwrites. With ``epi`` nonzero (the last K block) the stored value is
    act(v·scale[col + j] + shift[col + j] + res[res_off + r·ldr + j]) (activation code act,
    parameters pa, pb), scale and res skipped when empty: the epilogue of
    :func:`bnlab.inference._gemm.epilogue_rows` while the accumulators are in registers."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width, epi, col,
                     shift, scale, res, res_off, ldr, act, pa, pb)
    return sig, _microkernel_codegen(False)


@intrinsic
def microkernel_seg(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width, span,
                    seg_a, epi, col, shift, scale, res, res_off, ldr, act, pa, pb):
    """:func:`microkernel` whose A rows are segments: step k reads a[r·lda + (k // span)·seg_a
    + k mod span] (B stays contiguous). A direct conv takes its kh kernel rows of one output
    tile in one call this way (K = kh·kw·C) instead of kh calls of K = kw·C."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width, span, seg_a,
                     epi, col, shift, scale, res, res_off, ldr, act, pa, pb)
    return sig, _microkernel_codegen(False, segmented=True)


@intrinsic
def microkernel_pf(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width,
                   pf_off, pf_step, epi, col, shift, scale, res, res_off, ldr, act, pa, pb):
    """:func:`microkernel`, also prefetching b[pf_off + k·pf_step] at every k step."""
    sig = types.void(a, a_off, lda, b, b_off, c, c_off, ldc, k, acc, rows, width, pf_off,
                     pf_step, epi, col, shift, scale, res, res_off, ldr, act, pa, pb)
    return sig, _microkernel_codegen(True)
# fmt: on


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
