"""Numerical robustness: the large-mean test, float16 near its maximum, dtype of the outputs."""

from __future__ import annotations

import numpy as np
import pytest
from fn_support import LAYOUT_NAMES, channels

from bnlab import functional as F
from bnlab.check import centering_condition, dtype_tolerance, rel_error
from bnlab.errors import ShapeError
from bnlab.functional._layout import get_layout
from bnlab.functional.stats import moments

SHAPES = {
    "NC": (64, 3),
    "NCL": (8, 3, 9),
    "NLC": (8, 9, 3),
    "NCHW": (4, 3, 5, 7),
    "NHWC": (4, 5, 7, 3),
}


def _float64_stats(x, layout):
    axes = get_layout(layout).reduce_axes
    x64 = x.astype(np.float64)
    return x64.mean(axis=axes), x64.var(axis=axes)


def _naive_float32_var(x, axes):
    """E[x²] − E[x]² in float32: the formula the large-mean test exists to reject."""
    x = x.astype(np.float32)
    return (x * x).mean(axis=axes, dtype=np.float32) - x.mean(axis=axes, dtype=np.float32) ** 2


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_mean_float32_statistics(rng, layout, offset, backend):
    """x + 1e4 in float32: batch statistics within 1e-3 relative of the float64 answer."""
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    mean64, var64 = _float64_stats(x, layout)  # of the float32 values actually given
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, cache = F.batch_norm_forward(
        x, None, None, training=True, running_mean=rm, running_var=rv, momentum=1.0,
        layout=layout, backend=backend,
    )  # fmt: skip
    assert np.all(np.abs(cache.mean - mean64) <= 1e-3 * np.abs(mean64))
    assert np.all(np.abs(cache.var - var64) <= 1e-3 * var64)
    # with momentum=1 the buffers hold exactly this batch (unbiased variance, pytorch preset)
    m = x.size // c
    np.testing.assert_allclose(rm, mean64, rtol=1e-6)
    np.testing.assert_allclose(rv, var64 * m / (m - 1), rtol=1e-3)


def test_the_large_mean_test_rejects_the_naive_formula(rng):
    """The test above can fail: E[x²] − E[x]² in float32 misses by far more than 1e-3."""
    x = (rng.standard_normal((4, 3, 5, 7)) + 1e4).astype(np.float32)
    axes = (0, 2, 3)
    _, var64 = _float64_stats(x, "NCHW")
    naive = _naive_float32_var(x, axes)
    assert np.max(np.abs(naive - var64) / var64) > 1e-2
    _, ours = moments(x, axes)
    assert np.max(np.abs(ours.ravel() - var64) / var64) < 1e-3


@pytest.mark.parametrize("fn", ["layer", "group"])
def test_large_mean_per_sample_norms(rng, fn):
    """Layer and group norm share the statistics helper: same robustness (Flax adds 1e6)."""
    x64 = rng.standard_normal((4, 6, 5))
    x = (x64 + 1e4).astype(np.float32)
    xr = x.astype(np.float64)
    if fn == "layer":
        y, _ = F.layer_norm_forward(x, (6, 5))
        ref, _ = F.layer_norm_forward(xr, (6, 5))
    else:
        y, _ = F.group_norm_forward(x, 3, layout="NCL")
        ref, _ = F.group_norm_forward(xr, 3, layout="NCL")
    assert rel_error(y, ref) < 1e-3


@pytest.mark.parametrize("scale,offset", [(1e3, 6e4), (300.0, 0.0), (1.0, 3e4)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_float16_large_values_give_finite_statistics(rng, scale, offset, layout, backend):
    """float16 up to ~6.5e4: x² overflows float16 (max 65504), so squares are formed in float32."""
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = np.clip(rng.standard_normal(shape) * scale + offset, -65000, 65000).astype(np.float16)
    assert np.isfinite(x).all()
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, cache = F.batch_norm_forward(
        x, None, None, training=True, running_mean=rm, running_var=rv, layout=layout,
        backend=backend,
    )  # fmt: skip
    assert y.dtype == np.float16
    assert np.isfinite(y).all()
    assert np.isfinite(cache.mean).all() and np.isfinite(cache.var).all()
    assert np.isfinite(rm).all() and np.isfinite(rv).all()
    mean64, var64 = _float64_stats(x, layout)
    np.testing.assert_allclose(cache.var, var64, rtol=1e-3)
    # the output against float64 math on the same float16 values
    x64 = x.astype(np.float64)
    ref, ref_cache = F.batch_norm_forward(x64, None, None, training=True, layout=layout)
    assert rel_error(y, ref) < dtype_tolerance(
        np.float16, centering_condition(x64, ref_cache.rstd), gradient=False
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_dtype_is_input_dtype(rng, dtype, backend):
    x = rng.standard_normal((3, 2, 4, 4)).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    for training in (True, False):
        y, cache = F.batch_norm_forward(
            x, np.ones(2, dtype), np.zeros(2, dtype), training=training, running_mean=rm,
            running_var=rv, backend=backend,
        )  # fmt: skip
        dx, _, _ = F.batch_norm_backward(dout, cache)
        assert y.dtype == dtype and dx.dtype == dtype
    assert rm.dtype == np.float32 and rv.dtype == np.float32
    for y, _ in (F.layer_norm_forward(x, (4, 4)), F.group_norm_forward(x, 2)):
        assert y.dtype == dtype


def test_float16_statistics_accumulate_in_float32(rng):
    """Many float16 values: a float16 accumulator would round the sum; float32 keeps it."""
    x = (rng.standard_normal((4096, 2)) * 0.1 + 1.0).astype(np.float16)
    mean, var = moments(x, (0,))
    assert mean.dtype == np.float32
    mean64, var64 = _float64_stats(x, "NC")
    np.testing.assert_allclose(mean.ravel(), mean64, rtol=1e-5)
    np.testing.assert_allclose(var.ravel(), var64, rtol=1e-4)


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
def test_out_and_non_contiguous_input_give_the_same_result(rng, layout, training, backend):
    """``out=`` (contiguous or a strided view) and a non-contiguous x change nothing."""
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = rng.standard_normal(shape).astype(np.float32)
    kw = {"training": training, "layout": layout, "backend": backend}

    def bufs():
        return {"running_mean": np.zeros(c, np.float32), "running_var": np.ones(c, np.float32)}

    b0 = bufs()
    y0, _ = F.batch_norm_forward(x, None, None, **kw, **b0)
    out = np.empty_like(x)
    b1 = bufs()
    y1, _ = F.batch_norm_forward(x, None, None, out=out, **kw, **b1)
    assert y1 is out
    np.testing.assert_array_equal(out, y0)
    strided = np.empty(shape[:-1] + (2 * shape[-1],), np.float32)[..., ::2]
    F.batch_norm_forward(x, None, None, out=strided, **kw, **bufs())
    np.testing.assert_array_equal(strided, y0)
    xt = np.ascontiguousarray(np.swapaxes(x, 0, -1)).swapaxes(0, -1)  # same values, F-ish strides
    assert not xt.flags.c_contiguous
    y2, _ = F.batch_norm_forward(xt, None, None, **kw, **bufs())
    np.testing.assert_allclose(y2, y0, rtol=1e-6, atol=1e-6)
    for k in b0:
        np.testing.assert_array_equal(b1[k], b0[k])


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_out_gives_the_same_dx(rng, layout, training, dtype, backend):
    """``batch_norm_backward(..., out=)``: written in place (contiguous) or copied in (strided),
    the same dx bits either way; a wrong buffer is refused before anything is computed."""
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    stats = {"running_mean": np.zeros(c, np.float32), "running_var": np.ones(c, np.float32)}
    _, cache = F.batch_norm_forward(
        x, None, None, training=training, layout=layout, backend=backend, **stats
    )
    dx0, dg0, db0 = F.batch_norm_backward(dy, cache)
    out = np.empty_like(x)
    dx1, dg1, db1 = F.batch_norm_backward(dy, cache, out=out)
    assert dx1 is out
    np.testing.assert_array_equal(out, dx0)
    np.testing.assert_array_equal(dg1, dg0)
    np.testing.assert_array_equal(db1, db0)
    strided = np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    assert F.batch_norm_backward(dy, cache, out=strided)[0] is strided
    np.testing.assert_array_equal(strided, dx0)
    with pytest.raises(ShapeError, match="out"):
        F.batch_norm_backward(dy, cache, out=np.empty(shape, np.float64))
