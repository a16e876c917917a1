"""Streaming (non-temporal) stores for outputs too big to stay in cache.

An ordinary store first reads the line it writes into the cache ("read for ownership"), so
writing a 51 MB output moves 102 MB. A non-temporal store writes whole 64-byte lines straight to
memory: the read disappears, and the output does not push the inputs (read again by the next
pass) out of the cache. It pays only for outputs much larger than the last-level cache, which the
next layer will read from memory anyway; below :data:`STREAM_MIN_BYTES` the kernels store
normally.

The row helpers below compute exactly the expressions of the ordinary loops, in the same order,
without fused multiply-adds, so both paths give the same bits:

    affine      y  = (x − m)·a + b
    backward    dx = (A·dy + B·(x − μ)) + D
    layer norm  y  = ((x − m)·s)·γ + β,   dx = s·((dy·γ − ca) − ((x − m)·s)·cb)

Coefficients are per-element (C,)-like rows (channels-last) or scalars (channels-first). A row
is written with ordinary stores up to the first 64-byte boundary of the output, then one line
(16 float32 / 8 float64) per non-temporal vector store, then an ordinary tail. Vector loads of the
inputs are unaligned loads, so inputs that are not aligned like the output would split every load
across two lines: :func:`streams` asks for the same address modulo 64 of every array.

Non-temporal stores are weakly ordered: a task ends with :func:`store_fence` (an LLVM seq_cst
fence: on x86 a locked instruction or ``mfence``, either of which orders them; ``dmb`` on ARM)
before another thread may read what it wrote.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes per cache line = per non-temporal vector store
STREAM_MIN_BYTES = 16 << 20  # outputs at least this big stream (the L3 here is 32 MiB)


def streams(out: np.ndarray, *inputs: np.ndarray) -> bool:
    """Whether a kernel writing ``out`` from ``inputs`` should use non-temporal stores: a big
    float32/float64 output at an address that is a multiple of its item size, and every array
    at the same address modulo :data:`LINE`."""
    if out.nbytes < STREAM_MIN_BYTES or out.dtype.type not in (np.float32, np.float64):
        return False
    offset = out.ctypes.data % LINE
    if offset % out.itemsize:  # elements straddle their natural alignment: no line boundary
        return False  # is ever reached by whole elements
    return all(a.ctypes.data % LINE == offset for a in inputs)


def streams_rows(out: np.ndarray, *inputs: np.ndarray) -> bool:
    """:func:`streams` for (R, W) arrays whose rows are combined with (W,) coefficient rows:
    also whole lines per row, so every row starts at the same offset within a line and one
    coefficient row (:func:`aligned_like`) is aligned like all of them."""
    return out.shape[-1] * out.itemsize % LINE == 0 and streams(out, *inputs)


def aligned_like(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A copy of the 1-D ``v`` that starts at ``like``'s address modulo :data:`LINE`: loading
    a coefficient row next to a data row then never splits a load across two lines (a split
    load per coefficient cost the channels-last backward all of the streaming gain)."""
    raw = np.empty(v.nbytes + LINE, np.uint8)
    start = (like.ctypes.data - raw.ctypes.data) % LINE
    out = raw[start : start + v.nbytes].view(v.dtype)
    out[:] = v
    return out


# --------------------------------------------------------------------------- LLVM intrinsics


def _lanes(dtype) -> int:
    return LINE // (dtype.bitwidth // 8)


def _element_ptr(context, builder, arrty, arr, index):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(
        context, builder, arrty, ary, [index], wraparound=False, boundscheck=False
    )


def _operand(context, builder, ty, val, index, vecty):
    """A vector of ``vecty``'s lanes: loaded from array ``val`` at ``index`` (unaligned), or the
    scalar ``val`` broadcast (cast to the element type first)."""
    if isinstance(ty, types.Array):
        ptr = _element_ptr(context, builder, ty, val, index)
        return builder.load(builder.bitcast(ptr, vecty.as_pointer()), align=1)
    scalar = context.cast(builder, val, ty, _elem_numba_type(vecty))
    undef = ir.Constant(vecty, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vecty.count), [0] * vecty.count)
    return builder.shuffle_vector(first, undef, mask)


def _elem_numba_type(vecty):
    return types.float32 if isinstance(vecty.element, ir.FloatType) else types.float64


def _store_line(context, builder, arrty, arr, index, value):
    """One 64-byte non-temporal store of ``value`` at arr[index] (a line boundary)."""
    ptr = _element_ptr(context, builder, arrty, arr, index)
    store = builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=LINE)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _vector_type(context, arrty):
    return ir.VectorType(context.get_value_type(arrty.dtype), _lanes(arrty.dtype))


@intrinsic
def _nt_affine(typingctx, y, x, m, a, b, i):
    """y[i:i+L] = (x[i:i+L] − m)·a + b, one non-temporal line (L lanes; m, a, b arrays read at i,
    or scalars)."""

    def codegen(context, builder, sig, args):
        tys = sig.args
        vecty = _vector_type(context, tys[0])
        xv, mv, av, bv = (
            _operand(context, builder, tys[k], args[k], args[5], vecty) for k in (1, 2, 3, 4)
        )
        value = builder.fadd(builder.fmul(builder.fsub(xv, mv), av), bv)
        _store_line(context, builder, tys[0], args[0], args[5], value)
        return context.get_dummy_value()

    return types.void(y, x, m, a, b, i), codegen


@intrinsic
def _nt_backward(typingctx, dx, dy, x, mu, ca, cb, cd, i):
    """dx[i:i+L] = (A·dy + B·(x − μ)) + D, one non-temporal line (coefficients arrays read at i,
    or scalars)."""

    def codegen(context, builder, sig, args):
        tys = sig.args
        vecty = _vector_type(context, tys[0])
        dyv, xv, muv, av, bv, dv = (
            _operand(context, builder, tys[k], args[k], args[7], vecty) for k in range(1, 7)
        )
        value = builder.fadd(
            builder.fadd(builder.fmul(av, dyv), builder.fmul(bv, builder.fsub(xv, muv))), dv
        )
        _store_line(context, builder, tys[0], args[0], args[7], value)
        return context.get_dummy_value()

    return types.void(dx, dy, x, mu, ca, cb, cd, i), codegen


@intrinsic
def _nt_ln_affine(typingctx, y, x, m, s, g, b, i):
    """Layer norm's forward, y[i:i+L] = ((x − m)·s)·g + b, one non-temporal line (m, s scalars
    of the row; g, b read at i)."""

    def codegen(context, builder, sig, args):
        tys = sig.args
        vecty = _vector_type(context, tys[0])
        xv, mv, sv, gv, bv = (
            _operand(context, builder, tys[k], args[k], args[6], vecty) for k in range(1, 6)
        )
        value = builder.fadd(builder.fmul(builder.fmul(builder.fsub(xv, mv), sv), gv), bv)
        _store_line(context, builder, tys[0], args[0], args[6], value)
        return context.get_dummy_value()

    return types.void(y, x, m, s, g, b, i), codegen


@intrinsic
def _nt_ln_dx(typingctx, dx, dy, x, m, s, g, ca, cb, i):
    """Layer norm's dx[i:i+L] = s·((dy·g − ca) − ((x − m)·s)·cb), one non-temporal line."""

    def codegen(context, builder, sig, args):
        tys = sig.args
        vecty = _vector_type(context, tys[0])
        dyv, xv, mv, sv, gv, av, bv = (
            _operand(context, builder, tys[k], args[k], args[8], vecty) for k in range(1, 8)
        )
        xhat_b = builder.fmul(builder.fmul(builder.fsub(xv, mv), sv), bv)
        value = builder.fmul(sv, builder.fsub(builder.fsub(builder.fmul(dyv, gv), av), xhat_b))
        _store_line(context, builder, tys[0], args[0], args[8], value)
        return context.get_dummy_value()

    return types.void(dx, dy, x, m, s, g, ca, cb, i), codegen


@intrinsic
def store_fence(typingctx):
    """Order this thread's non-temporal stores before anything it does next."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


# --------------------------------------------------------------------------- row helpers


@njit(cache=True)
def _head(y) -> int:
    """Elements of the 1-D row y before its first line boundary (all of them if none)."""
    size = y.itemsize
    return min(y.shape[0], (LINE - y.ctypes.data % LINE) % LINE // size)


@njit(cache=True)
def _body_end(y, start) -> int:
    lanes = LINE // y.itemsize
    return start + (y.shape[0] - start) // lanes * lanes


@njit(cache=True)
def affine_row(x, m, a, b, y):
    """y = (x − m)·a + b over 1-D rows; m, a, b (n,) rows (channels-last)."""
    h = _head(y)
    e = _body_end(y, h)
    for j in range(h):
        y[j] = (x[j] - m[j]) * a[j] + b[j]
    for j in range(h, e, LINE // y.itemsize):
        _nt_affine(y, x, m, a, b, j)
    for j in range(e, y.shape[0]):
        y[j] = (x[j] - m[j]) * a[j] + b[j]


@njit(cache=True)
def affine_row_scalar(x, mc, ac, bc, y):
    """y = (x − mc)·ac + bc over 1-D rows; mc, ac, bc scalars of y's dtype (channels-first)."""
    h = _head(y)
    e = _body_end(y, h)
    for j in range(h):
        y[j] = (x[j] - mc) * ac + bc
    for j in range(h, e, LINE // y.itemsize):
        _nt_affine(y, x, mc, ac, bc, j)
    for j in range(e, y.shape[0]):
        y[j] = (x[j] - mc) * ac + bc


@njit(cache=True)
def backward_row(dy, x, mu, ca, cb, cd, dx):
    """dx = A·dy + B·(x − μ) + D over 1-D rows; coefficients (n,) rows (channels-last)."""
    h = _head(dx)
    e = _body_end(dx, h)
    for j in range(h):
        dx[j] = ca[j] * dy[j] + cb[j] * (x[j] - mu[j]) + cd[j]
    for j in range(h, e, LINE // dx.itemsize):
        _nt_backward(dx, dy, x, mu, ca, cb, cd, j)
    for j in range(e, dx.shape[0]):
        dx[j] = ca[j] * dy[j] + cb[j] * (x[j] - mu[j]) + cd[j]


@njit(cache=True)
def backward_row_scalar(dy, x, mu, ca, cb, cd, dx):
    """dx = A·dy + B·(x − μ) + D over 1-D rows; coefficients scalars of dx's dtype."""
    h = _head(dx)
    e = _body_end(dx, h)
    for j in range(h):
        dx[j] = ca * dy[j] + cb * (x[j] - mu) + cd
    for j in range(h, e, LINE // dx.itemsize):
        _nt_backward(dx, dy, x, mu, ca, cb, cd, j)
    for j in range(e, dx.shape[0]):
        dx[j] = ca * dy[j] + cb * (x[j] - mu) + cd


@njit(cache=True)
def ln_affine_row(x, m, s, g, b, y):
    """Layer norm's y = (x − m)·s·γ + β over one row (m, s scalars; g, b (n,) rows)."""
    h = _head(y)
    e = _body_end(y, h)
    for j in range(h):
        y[j] = (x[j] - m) * s * g[j] + b[j]
    for j in range(h, e, LINE // y.itemsize):
        _nt_ln_affine(y, x, m, s, g, b, j)
    for j in range(e, y.shape[0]):
        y[j] = (x[j] - m) * s * g[j] + b[j]


@njit(cache=True)
def ln_dx_row(dy, x, m, s, g, ca, cb, dx):
    """Layer norm's dx = s·(dy·γ − ca − (x − m)·s·cb) over one row (m, s, ca, cb scalars)."""
    h = _head(dx)
    e = _body_end(dx, h)
    for j in range(h):
        dx[j] = s * (dy[j] * g[j] - ca - (x[j] - m) * s * cb)
    for j in range(h, e, LINE // dx.itemsize):
        _nt_ln_dx(dx, dy, x, m, s, g, ca, cb, j)
    for j in range(e, dx.shape[0]):
        dx[j] = s * (dy[j] * g[j] - ca - (x[j] - m) * s * cb)
