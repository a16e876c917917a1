"""Non-temporal (streaming) stores, for outputs too big to stay in cache.

An ordinary store first reads the line it writes ("read for ownership"), so writing a 51 MB
output moves 102 MB, and the output evicts the inputs the next pass reads. A non-temporal store
writes whole 64-byte lines straight to memory. It pays for outputs much larger than the
last-level cache (``machine.stream_bytes``), which the next layer reads from memory anyway.

:func:`line_writer` turns an elementwise expression (a scalar ``@njit`` function of
:mod:`._elementwise`) into the code for one line: the expression's Python source is run on
vector values whose operators emit LLVM vector instructions, so the arithmetic is written once
and both ways give the same bits. Vector loads of the inputs are
unaligned, so inputs that start at another offset within a line than the output would split
every load: :func:`streams` asks for the same offset for every array.

Non-temporal stores are weakly ordered: a task ends with :func:`store_fence` (an LLVM seq_cst
fence) before another thread may read what it wrote.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .machine import LINE


def streams(out: np.ndarray, *inputs: np.ndarray) -> bool:
    """Whether a kernel writing ``out`` from ``inputs`` may use non-temporal stores: a
    float32/float64 output whose elements can reach a line boundary, every array at the same
    address modulo :data:`LINE`. (The plan decides whether the output is big enough.)"""
    if out.dtype.type not in (np.float32, np.float64):
        return False
    offset = out.ctypes.data % LINE
    if offset % out.itemsize:  # elements straddle their natural alignment
        return False
    return all(a.ctypes.data % LINE == offset for a in inputs)


class _Traced:
    """An LLVM vector value whose ``-``, ``*``, ``+`` emit vector instructions: running an
    expression's Python source on these writes its vector form, operation for operation in the
    order Python evaluates it (which is numba's order: the same bits, lane by lane)."""

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def __sub__(self, other):
        return _Traced(self.builder, self.builder.fsub(self.value, other.value))

    def __add__(self, other):
        return _Traced(self.builder, self.builder.fadd(self.value, other.value))

    def __mul__(self, other):
        return _Traced(self.builder, self.builder.fmul(self.value, other.value))


def _operand(context, builder, ty, val, index, vecty):
    """A vector of one line: loaded from array ``val`` at ``index`` (unaligned), the scalar
    ``val`` broadcast, or the product of a pair's (``_elementwise.at``'s s·g[j])."""
    if isinstance(ty, types.BaseTuple):
        parts = [
            _operand(context, builder, t, builder.extract_value(val, k), index, vecty)
            for k, t in enumerate(ty)
        ]
        return builder.fmul(parts[0], parts[1])
    if isinstance(ty, types.Array):
        ptr = _element_ptr(context, builder, ty, val, index)
        return builder.load(builder.bitcast(ptr, vecty.as_pointer()), align=1)
    undef = ir.Constant(vecty, ir.Undefined)
    first = builder.insert_element(undef, val, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vecty.count), [0] * vecty.count)
    return builder.shuffle_vector(first, undef, mask)


def _element_ptr(context, builder, arrty, arr, index):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(
        context, builder, arrty, ary, [index], wraparound=False, boundscheck=False
    )


def line_writer(expression):
    """An intrinsic ``write(out, i, *operands)``: out[i : i + L] = expression(*operands) over one
    64-byte line (L values), with a non-temporal store; each operand an array read at i or a
    scalar of out's dtype. ``expression`` is an ``@njit`` function of scalars (its Python source
    is traced, see :class:`_Traced`)."""
    source = expression.py_func

    def codegen(context, builder, sig, args):
        out_ty, _, *operand_tys = sig.args
        vecty = ir.VectorType(
            context.get_value_type(out_ty.dtype), LINE // out_ty.dtype.bitwidth * 8
        )
        operands = [
            _Traced(builder, _operand(context, builder, ty, val, args[1], vecty))
            for ty, val in zip(operand_tys, args[2:], strict=True)
        ]
        value = source(*operands).value
        ptr = _element_ptr(context, builder, out_ty, args[0], args[1])
        store = builder.store(value, builder.bitcast(ptr, vecty.as_pointer()), align=LINE)
        store.set_metadata(
            "nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        )
        return context.get_dummy_value()

    return codegen


@intrinsic
def store_fence(typingctx):
    """Order this thread's non-temporal stores before anything it does next."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, inline="always")
def head(y) -> int:
    """Values of the 1-D y before its first line boundary (all of them if it has none)."""
    return min(y.shape[0], (LINE - y.ctypes.data % LINE) % LINE // y.itemsize)
