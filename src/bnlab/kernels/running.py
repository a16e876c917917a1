"""The running-statistics update of :func:`bnlab.functional.running.update_running_stats` in one
compiled call, for the numba backend (the NumPy version is a dozen small array operations:
15 µs at C = 4096 and 7.6 µs at C = 64, against 6.7 µs and 1.5 µs compiled).

Same formula, same rounding, same refusal: per channel, in float64,

    r_mean ← (1 − w)·r_mean + w·μ_B
    r_var  ← (1 − w)·r_var  + w·v,    v = σ²_B·f  (f = n/(n−1) in σ²_B's dtype, or v = σ²_B)

each rounded to the buffer's dtype; nothing is written unless every new value is finite there.
Buffers and statistics must be float32 or float64 in native byte order (others take the NumPy
path).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _blend_into(running_mean, running_var, mean, var, w, factor, unbiased):
    """The update above; returns whether it was written (False: a new value is not finite in
    the buffers' dtype, buffers untouched)."""
    c = running_mean.shape[0]
    new_mean = np.empty(c, running_mean.dtype)
    new_var = np.empty(c, running_var.dtype)
    keep = 1.0 - w
    for i in range(c):
        v = var[i] * factor if unbiased else var[i]
        new_mean[i] = keep * np.float64(running_mean[i]) + w * np.float64(mean[i])
        new_var[i] = keep * np.float64(running_var[i]) + w * np.float64(v)
    finite = 0.0  # x − x is 0 for finite x, NaN for NaN and ±Inf: one branch-free sum
    for i in range(c):
        finite += (new_mean[i] - new_mean[i]) + (new_var[i] - new_var[i])
    if finite != 0.0:
        return False
    running_mean[:] = new_mean
    running_var[:] = new_var
    return True


_FAST = (np.float32, np.float64)


def blend_running(running_mean, running_var, mean, var, w: float, count: int, unbiased: bool):
    """Apply the update in place; returns True (written), False (refused: not finite in the
    buffers' dtype) or None (dtypes this kernel does not take: use the NumPy version)."""
    for a in (running_mean, running_var, mean, var):
        if a.dtype.type not in _FAST or not a.dtype.isnative:
            return None  # float16 or byte-swapped arrays: numba takes neither
    factor = var.dtype.type(count / (count - 1)) if unbiased else var.dtype.type(1.0)
    return bool(_blend_into(running_mean, running_var, mean, var, float(w), factor, unbiased))
