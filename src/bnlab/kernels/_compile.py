"""How the kernels are compiled: a parallel kernel and its one-thread twin from one source, and
fixed-size stack arrays that LLVM keeps in registers.

Every kernel is ``@njit(parallel=True, cache=True)`` (``prange`` loops over its tasks), and a
pass too small to pay for a parallel launch runs the same source compiled without ``parallel``
(``prange`` is then ``range``): the same tasks in the same order, so the same bits, without waking
the thread pool (which costs more than the pass, much more on a loaded machine) and without
touching numba's thread count.

Disk cache: numba keys its cache files by the function's qualified name and its index entries
by signature, code and closure values, not by the compile flags, so the twin is a copy of the
function under another qualified name. Closures over plain numbers (a register width) are fine:
their values are part of the key. A closure over another jitted function is not (it pickles to a
different key in every process, and the cache would never hit).
"""

from __future__ import annotations

import types

from numba import njit
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["Kernel", "kernel", "stack"]


class Kernel:
    """A compiled kernel: ``k(parallel, *args)`` runs the parallel or the one-thread version.
    Each version is compiled (or loaded from numba's disk cache) on its first call only."""

    def __init__(self, fn):
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.parallel = njit(parallel=True, cache=True)(fn)
        self.serial = njit(cache=True)(_renamed(fn, "_one_thread"))

    def __call__(self, parallel: bool, *args):
        return (self.parallel if parallel else self.serial)(*args)


def _renamed(fn, suffix: str):
    twin = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__
    )
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin


def kernel(fn) -> Kernel:
    """Decorator: ``fn`` (a function with a ``prange`` task loop) as a :class:`Kernel`."""
    return Kernel(fn)


@intrinsic
def stack(typingctx, n, dtype):
    """A pointer to n values of ``dtype`` (``np.float64``, or an array's ``.dtype``) on the stack
    of the calling function (n a compile-time constant; wrap it with ``carray``; uninitialized).
    Numba has no local arrays of a fixed size: LLVM cannot prove that a heap array (``np.empty``)
    does not alias the data, so a loop updating one loads and stores it every iteration, while a
    constant-size ``alloca`` is visibly private and, once its loops are unrolled, lives in
    vector registers (the lane accumulators and coefficient rows of the channels-last kernels)."""
    if not isinstance(n, nbtypes.IntegerLiteral):
        return None
    if isinstance(dtype, nbtypes.NumberClass):
        elem = dtype.instance_type
    elif isinstance(dtype, nbtypes.DType):
        elem = dtype.dtype
    else:
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(elem), size=size)

    return nbtypes.CPointer(elem)(n, dtype), codegen
