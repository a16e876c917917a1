"""Batch-parallel ``np.matmul`` for the engine's many small GEMMs (one per sample).

The conv layers multiply per-sample matrices, e.g. (16, 150) @ (150, 64) for LeNet's second
conv at batch 256. Each GEMM is too small for OpenBLAS to thread (and a threaded OpenBLAS
spins against the numba kernels' threads), so the engine parallelises over the batch instead,
like its numba kernels: the batch is cut into one contiguous chunk per thread and each chunk is
one ``np.matmul`` call (NumPy releases the GIL inside it) on a small thread pool.

The thread count is numba's (``bnlab.nn.threads.set_num_threads``); with one thread, or a batch
too small to split, this is exactly ``np.matmul``. Each sample's product is the same BLAS call
whatever the chunking, so results do not depend on the thread count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOL: dict[str, ThreadPoolExecutor | int | None] = {"pool": None, "workers": 0}


def engine_threads() -> int:
    """numba's current thread count (1 without numba)."""
    try:
        import numba
    except ImportError:
        return 1
    return int(numba.get_num_threads())


def _pool(workers: int) -> ThreadPoolExecutor:
    if _POOL["workers"] != workers:
        old = _POOL["pool"]
        if old is not None:
            old.shutdown(wait=True)
        _POOL["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="bnlab-matmul")
        _POOL["workers"] = workers
    return _POOL["pool"]


def batched_matmul(a: np.ndarray, b: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``np.matmul(a, b)`` for a 2-D or 3-D ``a`` and 3-D ``b`` (or 3-D ``a`` and 2-D ``b``).

    a (N, M, K) or (M, K), b (N, K, P) or (K, P), at least one 3-D: out (N, M, P), computed
    in ``threads`` contiguous batch chunks (default: :func:`engine_threads`).
    """
    n = a.shape[0] if a.ndim == 3 else b.shape[0]
    t = engine_threads() if threads is None else threads
    if t <= 1 or n < 2 * t:
        return np.matmul(a, b)
    out = np.empty((n, a.shape[-2], b.shape[-1]), np.result_type(a, b))
    bounds = [n * i // t for i in range(t + 1)]

    def chunk(i: int) -> None:
        rows = slice(bounds[i], bounds[i + 1])
        np.matmul(a[rows] if a.ndim == 3 else a, b[rows] if b.ndim == 3 else b, out=out[rows])

    futures = [_pool(t - 1).submit(chunk, i) for i in range(1, t)]
    chunk(0)
    for f in futures:
        f.result()
    return out
