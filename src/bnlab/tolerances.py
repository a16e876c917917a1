"""How close is close enough: per-dtype and per-check tolerances, the relative error they bound,
and central-difference gradients. Used by :mod:`bnlab.check` and the test suite.

:data:`DTYPE_TOLERANCES` is the single place stating how close a float16/32/64 result must be to
the float64 answer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Largest accepted :func:`rel_error` per check.
TOLERANCES: dict[str, float] = {
    "graph": 1e-12,  # two exact derivations in float64: rounding only
    "numeric": 1e-6,  # central differences, h=1e-5: truncation O(h²) + rounding O(ε/h) ≈ 1e-10
    "torch": 1e-10,  # same float64 math, different summation order
    "numba": 1e-4,  # float32 kernels vs the float32 reference: different summation order
    "float32": float("nan"),  # per case: dtype_tolerance(float32, κ) (the gradient one)
    "float16": float("nan"),  # per case: dtype_tolerance(float16, κ) (the gradient one)
}

#: How close a result computed from an input of a given dtype must be to float64 math on the same
#: values, as :func:`rel_error`, for a well-conditioned input (see :func:`dtype_tolerance`).
#: float16 output is rounded to 11 significant bits (relative step 2^-11 ≈ 4.9e-4); float16 and
#: float32 statistics are accumulated in float32.
DTYPE_TOLERANCES: dict[np.dtype, float] = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float16): 1e-3,
}

#: Rounding-error amplification allowed per unit of the centering condition number, for outputs
#: and running statistics (measured worst case below 1) and for gradients (measured about 50:
#: dx subtracts two means of products of x̂ and loses more).
CONDITION_FACTOR = {"forward": 4.0, "gradient": 100.0}


def centering_condition(x: np.ndarray, rstd: np.ndarray) -> float:
    """κ = max|x| · max(rstd): how much ``x − μ`` magnifies a rounding error in x or μ.

    Normalizing subtracts the mean, so a rounding error of u·|x| becomes u·|x|·rstd in x̂:
    data with mean 1e4 and std 1 loses four digits when the statistics are accumulated in the
    input's own precision (float32), whatever the summation order.
    """
    return float(np.max(np.abs(x), initial=0.0)) * float(np.max(rstd, initial=0.0))


def dtype_tolerance(dtype, condition: float = 1.0, *, gradient: bool = True) -> float:
    """Largest accepted :func:`rel_error` of a result computed from ``dtype`` input:

        DTYPE_TOLERANCES[dtype] + CONDITION_FACTOR[kind] · u · max(1, κ)

    with u the unit roundoff of the accumulation dtype (float32 for float16/32 input), κ the
    :func:`centering_condition` of the input and kind ``"gradient"`` (dx, dγ, dβ; the default,
    the looser) or ``"forward"`` (outputs and running statistics).
    """
    dtype = np.dtype(dtype)
    u = float(np.finfo(np.float64 if dtype == np.float64 else np.float32).eps)
    factor = CONDITION_FACTOR["gradient" if gradient else "forward"]
    return DTYPE_TOLERANCES[dtype] + factor * u * max(1.0, condition)


NUMERIC_STEP = 1e-5


def rel_error(a, b) -> float:
    """max|a − b| / max(1, max|b|): the largest deviation relative to the reference's magnitude.

    The floor of 1 makes it an absolute error for tensors that are ~0 (e.g. dx of a norm over a
    single value, where only rounding noise remains); every check input is O(1)-scaled.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1.0)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def numeric_gradient(f: Callable[[], np.ndarray], p: np.ndarray, dout: np.ndarray, h=NUMERIC_STEP):
    """Central-difference gradient of L = Σ dout·f() with respect to ``p`` (perturbed in place).

        ∂L/∂p_i ≈ (L(p_i + h) − L(p_i − h)) / 2h

    ``f`` reads ``p`` when called; ``p`` is restored exactly after each probe.
    """
    grad = np.zeros_like(p, dtype=np.float64)
    it = np.nditer(p, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = p[i]
        p[i] = old + h
        plus = float(np.sum(f() * dout))
        p[i] = old - h
        minus = float(np.sum(f() * dout))
        p[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
