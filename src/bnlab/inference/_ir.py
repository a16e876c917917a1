"""LLVM-IR building blocks of the engine's register-blocked kernels (numba ``@intrinsic``).

The GEMM micro-kernel (:mod:`._microkernel`) and the strip kernels of depthwise and grouped
convolutions (:mod:`._depthwise`, :mod:`._grouped`) are written in LLVM IR so that their
accumulators provably stay in vector registers. This module holds what they share: vector
types and intrinsics (:class:`IR`), lane masks, and the strip kernel's skeleton
(:func:`strip_codegen`): a loop over the kernel taps that updates ``pix`` accumulators through
a per-operator body, then scale, shift, clip and one masked store per pixel.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

VW = 16  # floats per vector (one zmm register)


def splat(builder, value, n: int = VW):
    """<n x T> with every lane = value."""
    vec_t = ir.VectorType(value.type, n)
    one = builder.insert_element(ir.Constant(vec_t, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))  # fmt: skip
    return builder.shuffle_vector(
        one,
        ir.Constant(vec_t, ir.Undefined),
        ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n),
    )


def lane_masks(builder, width, halves: int = 2):
    """<16 x i1> masks of the first ``halves`` 16-lane vectors for ``width`` valid lanes."""
    i64 = ir.IntType(64)
    w = splat(builder, width)
    return [builder.icmp_signed("<", ir.Constant(ir.VectorType(i64, VW), [VW * h + q for q in
                                range(VW)]), w) for h in range(halves)]  # fmt: skip


class IR:
    """The types and LLVM intrinsics of one kernel body."""

    def __init__(self, builder):
        self.f32, self.i32, self.i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        self.v16 = ir.VectorType(self.f32, VW)
        self.v16p = self.v16.as_pointer()
        mask_t = ir.VectorType(ir.IntType(1), VW)
        mod, v16, v16p, i32 = builder.module, self.v16, self.v16p, self.i32
        fn = cgutils.get_or_insert_function
        self.fma = fn(mod, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32")
        self.mload = fn(mod, ir.FunctionType(v16, [v16p, i32, mask_t, v16]),
                        "llvm.masked.load.v16f32.p0")  # fmt: skip
        self.mstore = fn(mod, ir.FunctionType(ir.VoidType(), [v16, v16p, i32, mask_t]),
                         "llvm.masked.store.v16f32.p0")  # fmt: skip
        self.minnum = fn(mod, ir.FunctionType(v16, [v16] * 2), "llvm.minnum.v16f32")
        self.maxnum = fn(mod, ir.FunctionType(v16, [v16] * 2), "llvm.maxnum.v16f32")

    def const(self, v: int):
        return ir.Constant(self.i64, v)

    def vec_ptr(self, builder, base, offset):
        return builder.bitcast(builder.gep(base, [offset]), self.v16p)

    def load(self, builder, ptr, mask=None):
        """A vector load; masked (lanes outside the mask read nothing, give 0) if a mask."""
        if mask is None:
            return builder.load(ptr, align=4)
        zero = ir.Constant(self.v16, None)
        return builder.call(self.mload, [ptr, ir.Constant(self.i32, 4), mask, zero])

    def store(self, builder, value, ptr, mask) -> None:
        builder.call(self.mstore, [value, ptr, ir.Constant(self.i32, 4), mask])

    def clip(self, builder, v, lo_v, hi_v):
        return builder.call(self.minnum, [builder.call(self.maxnum, [v, lo_v]), hi_v])


def data(context, builder, ty, arr):
    """(data pointer, number of items) of a NumPy array argument."""
    a = context.make_array(ty)(context, builder, arr)
    return a.data, a.nitems


def strip_intrinsic(name: str, codegen, doc: str):
    """A numba intrinsic ``name(geo, npix, lanes, epi) -> None`` with this codegen (explicit
    parameters: numba folds a ``*args`` typer's arguments into one tuple when lowering)."""

    def typer(typingctx, geo, npix, lanes, epi):
        return types.void(geo, npix, lanes, epi), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


# --------------------------------------------------------------------------- strip kernels

STRIP_GEO = "x x_off pix_step tap_step row_step w w_off w_tap w_row rows_k kw out out_off out_step"
STRIP_EPI = "shift scale col act pa pb"


def _strip_args(builder, signature, args):
    """name -> (LLVM value, numba type) of a strip kernel's arguments, its tuples unpacked."""
    geo_t, _, _, epi_t = signature.args
    out = {}
    for names, tup, ty in ((STRIP_GEO, args[0], geo_t), (STRIP_EPI, args[3], epi_t)):
        for i, name in enumerate(names.split()):
            out[name] = (builder.extract_value(tup, i), ty.types[i])
    out["npix"], out["lanes"] = (args[1], signature.args[1]), (args[2], signature.args[2])
    return out


def strip_codegen(pix: int, body):
    """Codegen of a strip kernel ``(geo, npix, lanes, epi)`` (tuples: :data:`STRIP_GEO`,
    :data:`STRIP_EPI`): for pixels p < npix <= pix and the channel vector at ``col`` (``lanes``
    <= 16 valid),

        acc[p] = Σ_{i < rows_k, j < kw} body(x at x_off + i·row_step + j·tap_step + p·pix_step,
                                             w at w_off + i·w_row + j·w_tap)
        out[out_off + p·out_step] = act(acc[p]·scale[col] + shift[col])   (act, pa, pb)

    (scale skipped when empty). ``body(ctx, x_at, w_at, acc) -> acc`` emits the multiply-adds of
    one tap; ``x_at(p)`` and ``w_at(extra)`` are the element offsets of pixel p's input and of
    the tap's weights (+ extra). Pixels past npix repeat the last one and are not stored.
    """

    def codegen(context, builder, signature, args):
        both = _strip_args(builder, signature, args)
        a = {k: v for k, (v, _) in both.items()}
        t = {k: ty for k, (_, ty) in both.items()}
        x = IR(builder)
        c = x.const
        ctx = _StripContext(context, builder, x, a, t)
        last = builder.sub(a["npix"], c(1))
        pix_off = []
        for p in range(pix):
            pp = builder.select(builder.icmp_signed("<", c(p), a["npix"]), c(p), last)
            pix_off.append(builder.mul(pp, a["pix_step"]))
        zero = ir.Constant(x.v16, None)
        entry = builder.block
        loop_i, loop_j = builder.append_basic_block("rows"), builder.append_basic_block("cols")
        next_i, done = builder.append_basic_block("next_row"), builder.append_basic_block("done")
        some = builder.and_(builder.icmp_signed(">", a["rows_k"], c(0)),
                            builder.icmp_signed(">", a["kw"], c(0)))  # fmt: skip
        builder.cbranch(some, loop_i, done)  # (the loops below test at their end)

        builder.position_at_end(loop_i)  # for i in range(rows_k)
        ii = builder.phi(x.i64)
        acc_i = [builder.phi(x.v16) for _ in range(pix)]
        builder.branch(loop_j)

        builder.position_at_end(loop_j)  # for j in range(kw)
        jj = builder.phi(x.i64)
        acc_j = [builder.phi(x.v16) for _ in range(pix)]
        base = builder.add(builder.add(a["x_off"], builder.mul(ii, a["row_step"])),
                           builder.mul(jj, a["tap_step"]))  # fmt: skip
        w_t = builder.add(a["w_off"], builder.add(builder.mul(ii, a["w_row"]),
                                                  builder.mul(jj, a["w_tap"])))  # fmt: skip
        new = body(
            ctx,
            lambda p: builder.add(base, pix_off[p]),
            lambda extra=None: w_t if extra is None else builder.add(w_t, extra),
            acc_j,
        )
        j_next = builder.add(jj, c(1))
        builder.cbranch(builder.icmp_signed("<", j_next, a["kw"]), loop_j, next_i)
        jj.add_incoming(c(0), loop_i)
        jj.add_incoming(j_next, builder.block)
        for a_j, a_i, v in zip(acc_j, acc_i, new, strict=True):
            a_j.add_incoming(a_i, loop_i)
            a_j.add_incoming(v, builder.block)
        tail_j = builder.block

        builder.position_at_end(next_i)
        i_next = builder.add(ii, c(1))
        builder.cbranch(builder.icmp_signed("<", i_next, a["rows_k"]), loop_i, done)
        ii.add_incoming(c(0), entry)
        ii.add_incoming(i_next, next_i)
        for a_i, v in zip(acc_i, new, strict=True):
            a_i.add_incoming(zero, entry)
            a_i.add_incoming(v, next_i)
        if tail_j is not loop_j:  # the phis above assume the body adds no blocks
            raise NotImplementedError("a strip body must not add basic blocks")

        builder.position_at_end(done)
        res = [builder.phi(x.v16) for _ in range(pix)]
        for r, v in zip(res, new, strict=True):
            r.add_incoming(zero, entry)
            r.add_incoming(v, next_i)
        _strip_store(ctx, res, pix)
        return context.get_dummy_value()

    return codegen


class _StripContext:
    """What a strip body needs: the builder, the IR helpers, the arrays' data pointers, the
    lane mask."""

    def __init__(self, context, builder, x, a, t):
        self.builder, self.x, self.a = builder, x, a
        self.x_data = data(context, builder, t["x"], a["x"])[0]
        self.w_data = data(context, builder, t["w"], a["w"])[0]
        self.o_data = data(context, builder, t["out"], a["out"])[0]
        self.sh_data = data(context, builder, t["shift"], a["shift"])[0]
        self.sc_data, self.sc_n = data(context, builder, t["scale"], a["scale"])
        self.mask = lane_masks(builder, a["lanes"], 1)[0]

    def load_x(self, offset, masked=True):
        return self.x.load(self.builder, self.x.vec_ptr(self.builder, self.x_data, offset),
                           self.mask if masked else None)  # fmt: skip

    def load_w(self, offset, masked=True):
        return self.x.load(self.builder, self.x.vec_ptr(self.builder, self.w_data, offset),
                           self.mask if masked else None)  # fmt: skip


def _strip_store(ctx: _StripContext, res, pix: int) -> None:
    builder, x, a = ctx.builder, ctx.x, ctx.a
    c = x.const
    sh = x.load(builder, x.vec_ptr(builder, ctx.sh_data, a["col"]), ctx.mask)
    has_sc = splat(builder, builder.icmp_signed(">", ctx.sc_n, c(0)))
    sc = x.load(builder, x.vec_ptr(builder, ctx.sc_data, a["col"]),
                builder.and_(ctx.mask, has_sc))  # fmt: skip
    sc = builder.select(has_sc, sc, ir.Constant(x.v16, [1.0] * VW))
    ys = activate(builder, x, [builder.call(x.fma, [r, sc, sh]) for r in res], a["act"], a["pa"],
                  a["pb"])  # fmt: skip
    for p in range(pix):
        valid = splat(builder, builder.icmp_signed("<", c(p), a["npix"]))
        ptr = x.vec_ptr(
            builder, ctx.o_data, builder.add(a["out_off"], builder.mul(c(p), a["out_step"]))
        )
        x.store(builder, ys[p], ptr, builder.and_(ctx.mask, valid))


# --------------------------------------------------------------------------- activations


def _vexp(builder, x, v):
    """e^v for a <16 x float>, the algorithm of :func:`bnlab.inference._act.exp32`: 2^n · p(r),
    n = round(v·log2 e), r = v − n·ln 2 (two parts), p the degree-7 Taylor polynomial."""
    from bnlab.inference import _act as A  # noqa: PLC0415

    def k(c):
        return ir.Constant(x.v16, [float(c)] * VW)

    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(x.v16, [x.v16]),
                                           "llvm.floor.v16f32")  # fmt: skip
    v = x.clip(builder, v, k(A._LO), k(A._HI))
    n = builder.call(floor, [builder.call(x.fma, [v, k(A._LOG2E), k(0.5)])])
    r = builder.call(x.fma, [n, k(-A._LN2_HI), v])
    r = builder.call(x.fma, [n, k(-A._LN2_LO), r])
    p = k(A._C[7])
    for c in A._C[6::-1]:
        p = builder.call(x.fma, [p, r, k(c)])
    vi32 = ir.VectorType(x.i32, VW)
    bits = builder.shl(builder.add(builder.fptosi(n, vi32), ir.Constant(vi32, [127] * VW)),
                       ir.Constant(vi32, [23] * VW))  # fmt: skip
    return builder.fmul(p, builder.bitcast(bits, x.v16))


def activate(builder, x, vals, act, pa, pb):
    """The activation (code ``act``, parameters pa, pb: :mod:`bnlab.inference._act`) of each
    <16 x float> in vals. A clip (ReLU, ReLU6; ±inf bounds for the others) is applied in line;
    the exp-based and hard activations behind one run-time branch for all the vectors, so a
    ReLU epilogue pays nothing for them."""
    from bnlab.inference import _act as A  # noqa: PLC0415

    one, zero = ir.Constant(x.v16, [1.0] * VW), ir.Constant(x.v16, None)
    inf = ir.Constant(x.f32, float("inf"))
    is_clip = builder.icmp_signed("==", act, ir.Constant(act.type, A.CLIP))
    lo = splat(builder, builder.select(is_clip, pa, builder.fsub(ir.Constant(x.f32, 0.0), inf)))
    hi = splat(builder, builder.select(is_clip, pb, inf))
    vals = [x.clip(builder, v, lo, hi) for v in vals]
    a, b = splat(builder, pa), splat(builder, pb)

    def hsig(v):
        return x.clip(builder, builder.call(x.fma, [a, v, b]), zero, one)

    def sigmoid(v):
        return builder.fdiv(one, builder.fadd(one, _vexp(builder, x, builder.fsub(zero, v))))

    cases = {
        A.SIGMOID: sigmoid,
        A.SILU: lambda v: builder.fmul(v, sigmoid(v)),
        A.HARDSIGMOID: hsig,
        A.HARDSWISH: lambda v: builder.fmul(v, hsig(v)),
    }
    merge = builder.append_basic_block("act_done")
    start = builder.block
    switch = builder.switch(act, merge)  # NONE and CLIP: straight to merge
    ends = [(start, vals)]
    for code, fn in cases.items():
        blk = builder.append_basic_block(f"act{code}")
        switch.add_case(ir.Constant(act.type, code), blk)
        builder.position_at_end(blk)
        out = [fn(v) for v in vals]
        ends.append((builder.block, out))
        builder.branch(merge)
    builder.position_at_end(merge)
    result = []
    for i in range(len(vals)):
        phi = builder.phi(x.v16)
        for blk, out in ends:
            phi.add_incoming(out[i], blk)
        result.append(phi)
    return result
