"""The engine's fast paths against their slow, obvious references (float32 and float64)."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab import nn
from bnlab.nn import activation, conv, pooling

numba = pytest.importorskip("numba")
from bnlab.nn import _kernels  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "k", "stride", "dil"),
    [((3, 2, 9, 8), (3, 3), (1, 1), (1, 1)), ((2, 3, 10, 9), (2, 3), (2, 1), (2, 1))],
)
def test_col2im_kernel_equals_reference(dtype, shape, k, stride, dil):
    rng = np.random.default_rng(0)
    n, c, hp, wp = shape
    oh = (hp - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (wp - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    dcols = rng.standard_normal((n, c * k[0] * k[1], oh * ow)).astype(dtype)
    ref = conv.col2im_reference(dcols, shape, k, stride, dil, (oh, ow))
    out = _kernels.col2im_add(dcols, *k, *stride, *dil, oh, ow, np.full(shape, np.nan, dtype))
    np.testing.assert_allclose(out, ref, rtol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [(2, 2), (3, 2)])
def test_avgpool_tile_kernels_equal_reference(dtype, k):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 6, 8)).astype(dtype)
    out = np.empty((3, 4, 6 // k[0], 8 // k[1]), dtype)
    np.testing.assert_allclose(
        _kernels.avgpool_tile_forward(x, *k, out),
        pooling.avgpool_tile_reference(x, *k),
        rtol=1e-6,
        atol=1e-6,  # summation order differs: cancellation on values of order 1
    )
    d = rng.standard_normal(out.shape).astype(dtype)
    np.testing.assert_allclose(
        _kernels.avgpool_tile_backward(d, *k, np.empty_like(x)),
        pooling.avgpool_tile_backward_reference(d, *k),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 5},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (2, 3), "dilation": (1, 2), "padding": (1, 2)},
        {"kernel_size": 3, "groups": 2},
    ],
)
def test_conv_im2col_equals_direct_loops(kw):
    rng = np.random.default_rng(2)
    layer = nn.Conv2d(4, 6, **kw, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 4, 9, 10))
    ref = conv.conv2d_reference(
        x,
        layer.weight.data,
        layer.bias.data,
        kw.get("stride", 1),
        kw.get("padding", 0),
        kw.get("dilation", 1),
        kw.get("groups", 1),
    )
    np.testing.assert_allclose(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_kernels_bit_identical_across_thread_counts():
    """Resume exactness relies on results not depending on the number of threads."""
    rng = np.random.default_rng(3)
    dcols = rng.standard_normal((8, 6 * 9, 36)).astype(np.float32)
    before = numba.get_num_threads()
    outs = []
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            outs.append(
                _kernels.col2im_add(
                    dcols, 3, 3, 1, 1, 1, 1, 6, 6, np.empty((8, 6, 8, 8), np.float32)
                )
            )
    finally:
        numba.set_num_threads(before)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_unit_step_im2col_and_col2im_kernels_equal_references(shape, k, dtype, seed):
    """Stride-1 kernels vs the NumPy references: pure copies and adds, so equal bit for bit
    (col2im adds the taps in the reference's order)."""
    rng = np.random.default_rng(seed)
    n, c, hp, wp = shape[0], shape[1], shape[2] + k[0] - 1, shape[3] + k[1] - 1
    oh, ow = shape[2], shape[3]
    xp = rng.standard_normal((n, c, hp, wp)).astype(dtype)
    cols = _kernels.im2col_unit(
        xp, *k, oh, ow, np.full((n, c * k[0] * k[1], oh * ow), np.nan, dtype)
    )
    np.testing.assert_array_equal(cols, conv.im2col_reference(xp, k, (1, 1), (1, 1), (oh, ow)))
    dcols = rng.standard_normal(cols.shape).astype(dtype)
    dxp = _kernels.col2im_add_unit(dcols, *k, oh, ow, np.full(xp.shape, np.nan, dtype))
    ref = conv.col2im_reference(dcols, xp.shape, k, (1, 1), (1, 1), (oh, ow))
    np.testing.assert_array_equal(dxp, ref)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_avgpool2x2_kernels_equal_references(shape, dtype, seed):
    """Forward: other summation order than the reshape reference (float32 atol 1e-6 on values of
    order 1, float64 1e-14); backward: the same products, equal bit for bit."""
    rng = np.random.default_rng(seed)
    n, c, oh, ow = shape
    x = rng.standard_normal((n, c, 2 * oh, 2 * ow)).astype(dtype)
    y = _kernels.avgpool2x2_forward(x, np.full(shape, np.nan, dtype))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(y, pooling.avgpool_tile_reference(x, 2, 2), rtol=0, atol=tol)
    d = rng.standard_normal(shape).astype(dtype)
    dx = _kernels.avgpool2x2_backward(d, np.full(x.shape, np.nan, dtype))
    np.testing.assert_array_equal(dx, pooling.avgpool_tile_backward_reference(d, 2, 2))


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_sigmoid_backward_kernel_equals_reference(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    y = activation.sigmoid(rng.standard_normal(shape).astype(dtype) * 4)
    dout = rng.standard_normal(shape).astype(dtype)
    got = np.empty_like(y)
    _kernels.sigmoid_backward(y.reshape(-1), dout.reshape(-1), got.reshape(-1))
    np.testing.assert_array_equal(got, activation.sigmoid_backward_reference(y, dout))
    # the layer's dispatch (numba backend is the default): non-contiguous upstream gradient
    strided = np.repeat(dout[..., None], 2, axis=-1)[..., 0]
    np.testing.assert_array_equal(activation.sigmoid_backward(y, strided), got)
