"""Numeric robustness: hostile but finite inputs give statistics within stated bounds of float64,
and never produce Inf/NaN. The bounds are the ones written in docs/reliability.md.

Bounds (float32 input, statistics accumulated in float32, compared with float64 statistics of the
*same* float32 values, so input quantisation is not counted):
    |mean − mean64|     <= ulp(|mean64|) + 1e-6 · std64       (one rounding of the result, plus
                                                             summation error relative to spread)
    |var − var64|       <= 1e-5 · var64 + 1e-30               (two-pass + compensation)
    |x̂ − x̂64|           <= ulp(|mean64|) · rstd + 1e-4         (x̂ inherits the rounding of μ)
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from bnlab import functional as F
from bnlab.backend import numba_available

FAMILY = "numeric robustness"
BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])
AXES = {"NCHW": (0, 2, 3), "NHWC": (0, 1, 2)}
SHAPE = {"NCHW": (1, -1, 1, 1), "NHWC": (1, 1, 1, -1)}


def _data(rng, mean, std, layout, dtype=np.float32, shape=(64, 8, 6, 6)):
    x = (mean + std * rng.standard_normal(shape)).astype(dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def _reference(x, layout, eps=1e-5):
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=AXES[layout]), x64.var(axis=AXES[layout])
    xhat = (x64 - m.reshape(SHAPE[layout])) / np.sqrt(v.reshape(SHAPE[layout]) + eps)
    return m, v, xhat


def _ulp(a):
    return np.spacing(np.abs(a).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mean, std", [(1e4, 1e-2), (-3e5, 1.0), (1e4, 1.0), (0.0, 1e-3)])
def test_large_mean_small_std_float32(rng, backend, layout, mean, std):
    x = _data(rng, mean, std, layout)
    y, cache = F.batch_norm_forward(x, None, None, training=True, layout=layout, backend=backend)
    m64, v64, xhat64 = _reference(x, layout)
    assert np.isfinite(y).all()
    assert (np.abs(cache.mean - m64) <= _ulp(m64) + 1e-6 * np.sqrt(v64)).all(), cache.mean - m64
    assert (np.abs(cache.var - v64) <= 1e-5 * v64 + 1e-30).all(), (cache.var - v64) / v64
    rstd = 1 / np.sqrt(v64 + 1e-5)
    bound = _ulp(m64) * rstd + 1e-4
    err = np.abs(y - xhat64).max(axis=AXES[layout])
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_with_large_mean(rng, backend):
    x = _data(rng, 1e4, 1e-2, "NCHW")
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    F.batch_norm_forward(x, None, None, training=True, running_mean=rm, running_var=rv,
                         momentum=1.0, backend=backend)  # fmt: skip
    m64, v64, _ = _reference(x, "NCHW")
    m = x.shape[0] * x.shape[2] * x.shape[3]
    assert (np.abs(rm - m64) <= _ulp(m64) + 1e-6 * np.sqrt(v64)).all()
    np.testing.assert_allclose(rv, v64 * m / (m - 1), rtol=1e-5)


def test_layer_and_group_norm_large_mean(rng):
    x = (1e4 + 1e-2 * rng.standard_normal((4, 6, 32))).astype(np.float32)
    x64 = x.astype(np.float64)
    y, _ = F.layer_norm_forward(x, (32,))
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    assert np.abs(y - ref).max() <= _ulp(1e4) / 1e-2 + 1e-4
    y, _ = F.group_norm_forward(x, 3, layout="NCL")
    g = x64.reshape(4, 3, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(
        x.shape
    )
    assert np.abs(y - ref).max() <= _ulp(1e4) / 1e-2 + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["near-max", "both-signs-at-max"])
def test_float16_near_its_maximum(rng, backend, kind):
    if kind == "near-max":
        x = rng.uniform(60000, 65504, (32, 4, 3, 3)).astype(np.float16)
    else:
        x = np.where(rng.random((32, 4, 3, 3)) < 0.5, -65504, 65504).astype(np.float16)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning would be a failure
        y, cache = F.batch_norm_forward(
            x, None, None, training=True, running_mean=rm, running_var=rv, backend=backend
        )
    assert y.dtype == np.float16 and np.isfinite(y).all()
    assert np.isfinite(cache.mean).all() and np.isfinite(cache.var).all()
    assert np.isfinite(rm).all() and np.isfinite(rv).all()
    m64, v64, xhat64 = _reference(x, "NCHW")
    np.testing.assert_allclose(cache.mean, m64, rtol=1e-6)
    np.testing.assert_allclose(cache.var, v64, rtol=1e-4)
    assert np.abs(y.astype(np.float64) - xhat64).max() <= 2e-3 * max(1, np.abs(xhat64).max())


def test_float16_running_buffers_stay_finite():
    from bnlab import nn

    m = nn.BatchNorm2d(2, dtype=np.float16)
    x = np.concatenate(
        [np.full((4, 2, 2, 2), -300, np.float16), np.full((4, 2, 2, 2), 300, np.float16)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m(x)
    assert np.isfinite(m.running_var).all(), m.running_var


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_constant_channels(rng, backend, dtype):
    """Variance 0: x̂ = 0, y = β, finite gradients (rstd = 1/sqrt(eps))."""
    x = np.broadcast_to(rng.standard_normal((1, 3, 1, 1)) * 100, (8, 3, 4, 4)).astype(dtype)
    g, b = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    y, cache = F.batch_norm_forward(x, g, b, training=True, backend=backend)
    np.testing.assert_allclose(y, np.broadcast_to(b.reshape(1, 3, 1, 1), y.shape), atol=2e-3)
    assert (cache.var == 0).all()
    dx, dg, db = F.batch_norm_backward(rng.standard_normal(x.shape).astype(dtype), cache)
    assert np.isfinite(dx).all() and np.isfinite(dg).all() and np.isfinite(db).all()
    np.testing.assert_allclose(dg, 0, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, scale", [(np.float32, 1e-41), (np.float64, 1e-310), (np.float16, 1e-7)]
)
def test_denormal_inputs(rng, backend, dtype, scale):
    x = (rng.standard_normal((16, 3, 4, 4)) * scale).astype(dtype)
    assert (np.abs(x[x != 0]) < np.finfo(dtype).tiny).all()  # really subnormal
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, cache = F.batch_norm_forward(
        x, None, None, training=True, running_mean=rm, running_var=rv, backend=backend
    )
    for a in (y, cache.mean, cache.var, rm, rv):
        assert np.isfinite(a).all()
    m64 = x.astype(np.float64).mean(axis=(0, 2, 3))
    assert np.abs(cache.mean - m64).max() <= 2 * np.finfo(dtype).smallest_subnormal + 1e-45
    # |x - mean| <= 2 max|x| and rstd <= 1/sqrt(eps): the output stays as tiny as the input allows
    assert np.abs(y).max() <= 2 * np.abs(x.astype(np.float64)).max() / np.sqrt(1e-5) * 1.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_with_extreme_running_stats(rng, backend):
    """Inference with a tiny running_var and a huge running_mean stays finite in float32."""
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    rm = np.array([1e30, -1e30, 0.0], np.float32)
    rv = np.array([0.0, 1e-30, 3e38], np.float32)
    y, _ = F.batch_norm_forward(
        x, None, None, training=False, running_mean=rm, running_var=rv, backend=backend
    )
    assert np.isfinite(y).all()
