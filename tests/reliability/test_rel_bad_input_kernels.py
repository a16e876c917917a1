"""Bad inputs to the numba kernels called directly (bnlab.kernels): the kernels index raw memory,
so every shape, dtype and buffer is checked before a kernel runs; inputs and ``out`` untouched."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab.backend import numba_available
from bnlab.errors import DTypeError, ShapeError

FAMILY = "bad input: kernels"
pytestmark = pytest.mark.skipif(not numba_available(), reason="numba backend not installed")


@pytest.fixture
def arrays(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)  # (N, C, S)
    return {
        "x": x,
        "g": rng.standard_normal(3).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
        "dy": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "mean": rng.standard_normal(3).astype(np.float32),
        "rstd": rng.random(3).astype(np.float32) + 0.5,
    }


def _k():
    from bnlab import kernels

    return kernels


def fwd(a, x=None, g=None, b=None, eps=1e-5, cl=False, **kw):
    x = a["x"] if x is None else x
    g = a["g"] if g is None else g
    b = a["b"] if b is None else b
    return _k().bn_train_forward(x, g, b, eps, cl, **kw)


def bwd(a, fn="bn_backward", dy=None, rstd=None):
    dy = a["dy"] if dy is None else dy
    rstd = a["rstd"] if rstd is None else rstd
    return getattr(_k(), fn)(dy, a["x"], a["mean"], rstd, a["g"], False)


NON_CONTIGUOUS = np.empty((4, 5, 3), np.float32).transpose(0, 2, 1)

CASES = [
    ("x-4d", lambda a: fwd(a, x=a["x"][..., None]), ShapeError, ["x3", "3-D"]),
    ("x-int", lambda a: fwd(a, x=a["x"].astype(np.int32)), DTypeError, ["x3", "float"]),
    ("x-list", lambda a: fwd(a, x=a["x"].tolist()), DTypeError, ["x3", "numpy.ndarray"]),
    ("gamma-size", lambda a: fwd(a, g=a["g"][:2]), ShapeError, ["(3,)"]),
    ("bias-int", lambda a: fwd(a, b=a["b"].astype(int)), DTypeError, ["(3,)"]),
    ("channels-last-mismatch", lambda a: fwd(a, cl=True), ShapeError, ["(5,)"]),
    ("eps-zero", lambda a: fwd(a, eps=0.0), ValueError, ["eps"]),
    ("empty", lambda a: fwd(a, x=a["x"][:0]), ShapeError, ["empty"]),
    ("out-wrong-dtype", lambda a: fwd(a, out=np.empty((4, 3, 5))), ShapeError, ["out", "float32"]),
    (
        "out-non-contiguous",
        lambda a: _k().bn_eval_forward(a["x"], a["g"], a["b"], False, out=NON_CONTIGUOUS),
        ShapeError,
        ["out", "C-contiguous"],
    ),
    ("dy-shape", lambda a: bwd(a, dy=a["dy"][:, :, :4]), ShapeError, ["dy3", "shape of x"]),
    ("rstd-size", lambda a: bwd(a, rstd=a["rstd"][:1]), ShapeError, ["(3,)"]),
    (
        "eval-dy-dtype",
        lambda a: bwd(a, "bn_eval_backward", dy=a["dy"].astype(np.int64)),
        DTypeError,
        ["dy3"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_bad_input(arrays, case):
    _, call, exc, needles = case
    expect_clean_error(lambda: call(arrays), exc, needles, list(arrays.values()))
