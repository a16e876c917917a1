"""The host-side check of PyTorch's in-place running-statistics update (see
:mod:`bnlab.torch._pytorch_op`): keep the new values if every one is finite, else put the old ones
back. One compiled call (0.3 µs here, against 2.4 µs for two NumPy ``isfinite`` reductions): the
check runs on every training call of a small layer, where PyTorch's op itself takes ~8 µs.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; the NumPy check still works
    njit = None


def _keep_or_restore_numpy(mean, var, old_mean, old_var) -> bool:
    """All of ``mean`` and ``var`` finite: True; else they get ``old_*`` back and False. A
    float64 sum is NaN or ±Inf exactly when an element is (finite float16/32 values cannot
    overflow it)."""
    total = np.add.reduce(mean, dtype=np.float64) + np.add.reduce(var, dtype=np.float64)
    if math.isfinite(total):
        return True
    mean[...] = old_mean
    var[...] = old_var
    return False


if njit is not None:

    @njit(cache=True)
    def _keep_or_restore_compiled(mean, var, old_mean, old_var):  # pragma: no cover - compiled
        bad = 0.0  # v − v is 0 for finite v, NaN for NaN and ±Inf: one branch-free sum
        for i in range(mean.shape[0]):
            bad += (mean[i] - mean[i]) + (var[i] - var[i])
        if bad == 0.0:
            return True
        mean[:] = old_mean
        var[:] = old_var
        return False


_COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


def keep_or_restore(mean: np.ndarray, var: np.ndarray, old_mean: np.ndarray,
                    old_var: np.ndarray) -> bool:  # fmt: skip
    """Keep the updated running statistics (views of the buffers) if all finite, else restore
    the old values in place. Returns whether the update was kept."""
    if njit is not None and mean.dtype in _COMPILED and var.dtype in _COMPILED:
        return _keep_or_restore_compiled(mean, var, old_mean, old_var)
    return _keep_or_restore_numpy(mean, var, old_mean, old_var)
