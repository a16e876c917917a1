"""Thread counts of the engine's two pools: numba (kernels) and the BLAS behind ``np.matmul``.

``set_num_threads(n)`` sets both, like ``torch.set_num_threads`` does for PyTorch, so a benchmark
can give both engines the same number of threads. The BLAS count is changed through OpenBLAS's
``*_set_num_threads`` entry point of the library NumPy loaded (found next to NumPy, as
threadpoolctl does); when it cannot be found the BLAS keeps its own setting and the function
says so by returning False. On a machine shared with other jobs, 1 thread is often the fastest.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def _openblas_setter():
    return _openblas_function(_SETTERS)


def _openblas_function(names):
    import numpy

    libdir = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(libdir.glob("lib*openblas*.so*")):
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for name in names:
            fn = getattr(dll, name, None)
            if fn is not None:
                return fn
    return None


def get_blas_threads() -> int | None:
    """OpenBLAS's current thread count, or None when NumPy's OpenBLAS could not be located."""
    fn = _openblas_function(_GETTERS)
    return None if fn is None else int(fn())


def get_num_threads() -> tuple[int | None, int | None]:
    """(numba threads, BLAS threads); None for a pool that is not available."""
    try:
        import numba
    except ImportError:
        nb = None
    else:
        nb = numba.get_num_threads()
    return nb, get_blas_threads()


def set_blas_threads(n: int) -> bool:
    """Set OpenBLAS's thread count; False when NumPy's OpenBLAS could not be located."""
    fn = _openblas_setter()
    if fn is None:
        return False
    fn(int(n))
    return True


def set_num_threads(n: int) -> bool:
    """Use ``n`` threads in numba kernels and in the BLAS; returns whether the BLAS was set."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    try:
        import numba
    except ImportError:
        pass
    else:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return set_blas_threads(n)
