"""Fixed-size arrays on the stack of a compiled function, which LLVM can keep in registers.

Numba has no local arrays of a compile-time size on the CPU: ``np.empty``/``np.zeros`` allocate
on the heap, and LLVM cannot prove that such an array does not alias the kernel's inputs, so a
loop that updates it loads and stores every element on every iteration. An ``alloca`` of a
constant size is visibly private to the function: after the loops over it are unrolled, LLVM
promotes it to vector registers. Used for the per-lane accumulators and coefficient rows of
:mod:`._lanes`.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def stack(typingctx, n, dtype):
    """A pointer to n values of ``dtype`` (``np.float64``, or an array's ``.dtype``) on the stack
    of the calling function; n a compile-time constant. Wrap it with ``carray``. Uninitialized."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    if isinstance(dtype, types.NumberClass):
        elem = dtype.instance_type
    elif isinstance(dtype, types.DType):
        elem = dtype.dtype
    else:
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(elem), size=size)

    return types.CPointer(elem)(n, dtype), codegen
