"""Per-dtype tolerances of the kernel-vs-reference comparisons: the one place they are stated.

A result ``a`` matches the reference ``r`` when  max|a − r| <= RTOL[dtype] · max(max|r|, 1).
The scale is normwise (the largest reference value, at least 1) because BN outputs and gradients
mix values of very different sizes and elementwise relative error is meaningless near zero.

float64: both sides compute in float64 with a different summation order (the kernel shifts and
chunks; NumPy does pairwise sums): agreement to ~1e-15 relative, 1e-10 leaves room for cancellation
in dx.  float32: the kernel accumulates in float64, the reference in float32: ~1e-6 is typical.
float16: both stage through float32 and round to float16 at the end: one float16 ulp (~1e-3).
"""

from __future__ import annotations

import numpy as np

RTOL = {
    np.dtype(np.float16): 4e-3,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float64): 1e-10,
}


def assert_matches(actual, reference, dtype, what: str, terms=None) -> None:
    """Normwise comparison with the dtype's tolerance; the message says what differed.

    ``terms``: the size of the terms the result is a difference of, when that is larger than the
    result. dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)) of a group or row with (almost) no spread
    is a difference of values ~γ·rstd·dy (rstd up to 1/√ε ≈ 316) that cancel to ~0: rounding
    each in the dtype leaves an error relative to those terms, not to the ~0 result."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != reference {r.shape}"
    big = 0.0 if terms is None else float(np.max(np.abs(terms), initial=0.0))
    scale = max(float(np.max(np.abs(r), initial=0.0)), big, 1.0)
    err = float(np.max(np.abs(a - r), initial=0.0))
    tol = RTOL[np.dtype(dtype)] * scale
    assert err <= tol, f"{what} ({np.dtype(dtype)}): max abs error {err:.3g} > {tol:.3g}"
