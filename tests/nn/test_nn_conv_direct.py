"""The direct (im2col-free) conv kernels against the direct-loop reference and the im2col path.

Tolerances: float64 1e-12 (same sums, other order); float32 rtol 1e-5 relative to the largest
output, which covers reassociated float32 sums of up to ~10^3 terms of order 1.
Each kernel width compiles its own forward kernel, so the widths drawn are few (2, 5).
"""

from __future__ import annotations

import numpy as np
import pytest
from nn_helpers import set_engine_kernels

from bnlab import nn
from bnlab.nn import conv

numba = pytest.importorskip("numba")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bnlab.nn import _conv_direct  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _close(got, want, dtype):
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


def _weight_grad_reference(xp, dout, kernel):
    """dW[o, c, p, q] = Σ_{n,i,j} dy[n,o,i,j] · xp[n, c, i+p, j+q] (float64 im2col GEMM)."""
    n, o, oh, ow = dout.shape
    cols = conv.im2col(xp.astype(np.float64), kernel, (1, 1), (1, 1), (oh, ow))
    dw = np.einsum("nom,nkm->ok", dout.reshape(n, o, -1).astype(np.float64), cols)
    return dw.reshape(o, xp.shape[1], *kernel)


geometry = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "c": st.integers(1, 3),
        "o": st.integers(1, 4),
        "kh": st.integers(1, 4),
        # (kernel width, dtype): each pair is one compiled forward kernel, so only three
        "kw_dtype": st.sampled_from([(2, np.float64), (5, np.float32), (5, np.float64)]),
        "h": st.integers(0, 5),
        "w": st.integers(0, 6),
        "ph": st.integers(0, 2),
        "pw": st.integers(0, 2),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=40, deadline=None)
@given(g=geometry)
def test_direct_kernels_equal_references_on_random_shapes(g):
    (kw, dtype), rng = g["kw_dtype"], np.random.default_rng(g["seed"])
    # input at least as large as the kernel after padding
    h, w = g["kh"] + g["h"], kw + g["w"]
    x = rng.standard_normal((g["n"], g["c"], h, w)).astype(dtype)
    weight = rng.standard_normal((g["o"], g["c"], g["kh"], kw)).astype(dtype)
    bias = rng.standard_normal(g["o"]).astype(dtype)
    pad = (g["ph"], g["pw"])
    xp = conv.pad_input(x, pad)

    y, xf = _conv_direct.conv_forward(x, weight, bias, pad)
    ref = conv.conv2d_reference(x.astype(np.float64), weight, bias, padding=pad)
    assert y.dtype == dtype and y.shape == ref.shape
    _close(y, ref, dtype)

    dout = rng.standard_normal(y.shape).astype(dtype)
    dw, db = _conv_direct.conv_weight_grad(xf, dout, x.shape[2:], pad, (g["kh"], kw))
    assert dw.dtype == dtype and db.dtype == dtype
    _close(dw, _weight_grad_reference(xp, dout, (g["kh"], kw)), dtype)
    _close(db, dout.astype(np.float64).sum(axis=(0, 2, 3)), dtype)


def test_direct_forward_without_bias_and_non_contiguous_input():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1, 9, 16))[:, :, :, ::2]  # strided view, 9x8
    weight = rng.standard_normal((3, 1, 3, 5))
    y, _ = _conv_direct.conv_forward(x, weight, None, (0, 1))
    _close(y, conv.conv2d_reference(x, weight, padding=(0, 1)), np.float64)


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 5},
        {"kernel_size": (3, 2), "padding": (1, 2)},
        {"kernel_size": 2, "bias": False},
    ],
)
def test_conv2d_direct_path_equals_im2col_path(kw, monkeypatch):
    """Same float64 layer, kernels on (direct forward and dW, col2im dx) and off (im2col)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 1, 8, 7))
    runs = {}
    for kernels in (True, False):
        set_engine_kernels(monkeypatch, kernels)
        layer = nn.Conv2d(1, 4, **kw, dtype=np.float64, rng=np.random.default_rng(5))
        assert layer.uses_direct_kernel() is kernels
        y = layer(x)
        dout = np.random.default_rng(8).standard_normal(y.shape)  # random, same in both runs
        dx = layer.backward(dout)
        runs[kernels] = (y, dx, {k: p.grad.copy() for k, p in layer.named_parameters()})
    (y1, dx1, g1), (y0, dx0, g0) = runs[True], runs[False]
    _close(y1, y0, np.float64)
    _close(dx1, dx0, np.float64)
    assert g1.keys() == g0.keys()
    for name in g0:
        _close(g1[name], g0[name], np.float64)


@pytest.mark.parametrize(
    "kw",
    [{"stride": 2}, {"dilation": 2}, {"stride": (1, 2)}],
)
def test_direct_kernels_only_for_stride_one_undilated(kw, monkeypatch):
    set_engine_kernels(monkeypatch, True)
    assert not nn.Conv2d(1, 2, 3, **kw).uses_direct_kernel()
    assert not nn.Conv2d(6, 16, 5).uses_direct_kernel()  # many channels: im2col GEMM
    assert nn.Conv2d(1, 6, 5).uses_direct_kernel()


def test_direct_kernels_bit_identical_across_thread_counts():
    """Resume exactness relies on results not depending on the number of threads."""
    rng = np.random.default_rng(7)
    xp = rng.standard_normal((8, 1, 12, 12)).astype(np.float32)
    weight = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
    dout = rng.standard_normal((8, 6, 8, 8)).astype(np.float32)
    before = numba.get_num_threads()
    outs = []
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            y, xf = _conv_direct.conv_forward(xp, weight, None, (0, 0))
            dw, db = _conv_direct.conv_weight_grad(xf, dout, (12, 12), (0, 0), (5, 5))
            outs.append((y, dw, db))
    finally:
        numba.set_num_threads(before)
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            np.testing.assert_array_equal(a, b)
