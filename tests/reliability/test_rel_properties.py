"""Property tests (hypothesis): every fast kernel equals its reference, and folding equals the
unfolded computation, within stated bounds, over randomly drawn shapes, layouts, dtypes and data.

Example counts (per run, fixed so the suite time is predictable; failures print a reproducer):
    EXAMPLES["bn_forward"]   numba BN training forward vs NumPy reference
    EXAMPLES["bn_backward"]  numba BN backward (training and eval) vs NumPy reference
    EXAMPLES["engine"]       numba col2im / average-pool kernels vs NumPy references
    EXAMPLES["torch_paths"]  bnlab.torch fast path vs its torch-ops reference path
    EXAMPLES["fold"]         fold_conv_bn / fold_bn_conv / fold_bn_linear vs unfolded layers
    EXAMPLES["fold_model"]   fold(LeNet-BN) vs the unfolded model, random BN statistics
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab.backend import numba_available
from bnlab.fold import fold_bn_conv, fold_bn_linear, fold_conv_bn
from bnlab.nn.conv import conv2d_reference

FAMILY = "property tests (hypothesis)"
EXAMPLES = {
    "bn_forward": 40,
    "bn_backward": 40,
    "engine": 25,
    "torch_paths": 25,
    "fold": 30,
    "fold_model": 8,
}
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba backend not installed")

LAYOUT_NDIM = {"NC": 2, "NCL": 3, "NLC": 3, "NCHW": 4, "NHWC": 4}
CHANNEL_AXIS = {"NC": 1, "NCL": 1, "NLC": 2, "NCHW": 1, "NHWC": 3}


@st.composite
def bn_inputs(draw):
    layout = draw(st.sampled_from(sorted(LAYOUT_NDIM)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n, c = draw(st.integers(2, 6)), draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 4)) for _ in range(LAYOUT_NDIM[layout] - 2)]
    shape = [n, *spatial]
    shape.insert(CHANNEL_AXIS[layout], c)
    offset = draw(st.floats(-100, 100))
    scale = draw(st.floats(1e-2, 1e2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    g = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return layout, x, g, b, rng, abs(offset) / scale


def _tol(dtype, cond):
    """float64: 1e-9; float32: grows with the centering condition number |mean|/std."""
    return 1e-9 if dtype == np.float64 else 2e-5 * (1 + cond)


@needs_numba
@settings(max_examples=EXAMPLES["bn_forward"])
@given(bn_inputs())
def test_numba_forward_equals_reference(case):
    layout, x, g, b, _, cond = case
    ys = {}
    for backend in ("numpy", "numba"):
        rm, rv = np.zeros(len(g), x.dtype), np.ones(len(g), x.dtype)
        y, cache = F.batch_norm_forward(x, g, b, training=True, running_mean=rm, running_var=rv,
                                        layout=layout, backend=backend)  # fmt: skip
        ys[backend] = (y, cache.mean, cache.var, rm, rv)
    tol = _tol(x.dtype, cond)
    for ref, fast in zip(ys["numpy"], ys["numba"], strict=True):
        np.testing.assert_allclose(fast, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


@needs_numba
@settings(max_examples=EXAMPLES["bn_backward"])
@given(bn_inputs(), st.booleans())
def test_numba_backward_equals_reference(case, training):
    layout, x, g, b, rng, cond = case
    dout = rng.standard_normal(x.shape).astype(x.dtype)  # random upstream gradient, never ones
    rm = rng.standard_normal(len(g)).astype(x.dtype)
    rv = (rng.random(len(g)) + 0.5).astype(x.dtype)
    grads = {}
    for backend in ("numpy", "numba"):
        stats = {"running_mean": rm.copy(), "running_var": rv.copy()}
        _, cache = F.batch_norm_forward(
            x, g, b, training=training, layout=layout, backend=backend, **stats
        )
        grads[backend] = F.batch_norm_backward(dout, cache)
    tol = _tol(x.dtype, cond) * 10
    for ref, fast in zip(grads["numpy"], grads["numba"], strict=True):
        np.testing.assert_allclose(fast, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


@needs_numba
@settings(max_examples=EXAMPLES["engine"])
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(3, 8), st.integers(1, 3), st.integers(1, 2),
    st.integers(1, 2), st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_engine_col2im_kernel_equals_reference(n, c, size, k, stride, dilation, seed):
    from bnlab.nn import _kernels
    from bnlab.nn.conv import col2im_reference, conv_output_size

    oh = conv_output_size(size, k, stride, 0, dilation)
    if oh <= 0:
        return
    rng = np.random.default_rng(seed)
    dcols = rng.standard_normal((n, c * k * k, oh * oh))
    shape = (n, c, size, size)
    ref = col2im_reference(dcols, shape, (k, k), (stride, stride), (dilation, dilation), (oh, oh))
    fast = _kernels.col2im_add(dcols, k, k, stride, stride, dilation, dilation, oh, oh,
                               np.empty(shape))  # fmt: skip
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)


@needs_numba
@settings(max_examples=EXAMPLES["engine"])
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))  # fmt: skip
def test_engine_avgpool_kernels_equal_reference(n, c, tiles, k, dtype, seed):
    from bnlab.nn import _kernels
    from bnlab.nn.pooling import avgpool_tile_backward_reference, avgpool_tile_reference

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, tiles * k, tiles * k)).astype(dtype)
    out = _kernels.avgpool_tile_forward(x, k, k, np.empty((n, c, tiles, tiles), dtype))
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, avgpool_tile_reference(x, k, k), rtol=tol, atol=tol)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = _kernels.avgpool_tile_backward(dout, k, k, np.empty_like(x))
    np.testing.assert_allclose(dx, avgpool_tile_backward_reference(dout, k, k), rtol=tol, atol=tol)


@settings(max_examples=EXAMPLES["torch_paths"])
@given(bn_inputs(), st.booleans())
def test_torch_fast_path_equals_reference_path(case, training):
    torch = pytest.importorskip("torch")
    from bnlab.torch import functional as BF

    layout, x, g, b, rng, cond = case
    if layout in ("NLC", "NHWC"):
        return  # torch tensors are channel-second; channels_last is a memory format, covered below
    t = torch.from_numpy(x)
    w, bias = torch.from_numpy(g), torch.from_numpy(b)
    outs = []
    for fn in (BF.batch_norm, BF.batch_norm_reference):
        rm, rv = torch.zeros(len(g), dtype=t.dtype), torch.ones(len(g), dtype=t.dtype)
        y = fn(t, rm, rv, w, bias, training, 0.1, 1e-5)
        outs.append((y, rm, rv))
    tol = _tol(x.dtype, cond)
    for fast, ref in zip(*outs, strict=True):
        np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=tol,
                                   atol=tol * max(1.0, float(ref.abs().max())))  # fmt: skip


# ------------------------------------------------------------------ folding


@st.composite
def conv_bn(draw, bn_first=False):
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = 0 if bn_first else draw(st.integers(0, 2))
    size = draw(st.integers(k, k + 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c_bn = c_in if bn_first else c_out
    bn = {
        "mean": rng.standard_normal(c_bn) * 3,
        "var": rng.random(c_bn) * 4 + draw(st.sampled_from([0.0, 1e-3])),
        "gamma": rng.standard_normal(c_bn),
        "beta": rng.standard_normal(c_bn),
    }
    w = rng.standard_normal((c_out, c_in // groups, k, k))
    bias = rng.standard_normal(c_out) if draw(st.booleans()) else None
    x = rng.standard_normal((2, c_in, size, size)) * 2 + 1
    return x, w, bias, bn, {"stride": stride, "padding": padding, "groups": groups}


def _bn_eval(z, bn, eps=1e-5):
    s = bn["gamma"] / np.sqrt(bn["var"] + eps)
    return (z - bn["mean"][None, :, None, None]) * s[None, :, None, None] + bn["beta"][
        None, :, None, None
    ]


FOLD_BOUND = 1e-9  # float64 everywhere: folded and unfolded differ only by rounding


@settings(max_examples=EXAMPLES["fold"])
@given(conv_bn())
def test_fold_conv_bn_equals_conv_then_bn(case):
    x, w, bias, bn, conv = case
    unfolded = _bn_eval(conv2d_reference(x, w, bias, **conv), bn)
    w2, b2 = fold_conv_bn(w, bias, bn["mean"], bn["var"], 1e-5, bn["gamma"], bn["beta"])
    folded = conv2d_reference(x, w2, b2, **conv)
    np.testing.assert_allclose(
        folded, unfolded, rtol=FOLD_BOUND, atol=FOLD_BOUND * np.abs(unfolded).max()
    )


@settings(max_examples=EXAMPLES["fold"])
@given(conv_bn(bn_first=True))
def test_fold_bn_conv_equals_bn_then_conv(case):
    x, w, bias, bn, conv = case
    unfolded = conv2d_reference(_bn_eval(x, bn), w, bias, **conv)
    w2, b2 = fold_bn_conv(bn["mean"], bn["var"], 1e-5, bn["gamma"], bn["beta"], w, bias,
                          groups=conv["groups"])  # fmt: skip
    folded = conv2d_reference(x, w2, b2, **conv)
    np.testing.assert_allclose(
        folded, unfolded, rtol=FOLD_BOUND, atol=FOLD_BOUND * np.abs(unfolded).max()
    )


@settings(max_examples=EXAMPLES["fold"])
@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.integers(0, 2**32 - 1))
def test_fold_bn_linear_equals_bn_then_linear(c_in, c_out, with_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, c_in)) * 3 - 1
    mean, var = rng.standard_normal(c_in), rng.random(c_in) + 0.1
    gamma, beta = rng.standard_normal(c_in), rng.standard_normal(c_in)
    w = rng.standard_normal((c_out, c_in))
    bias = rng.standard_normal(c_out) if with_bias else None
    bn = (x - mean) * gamma / np.sqrt(var + 1e-5) + beta
    unfolded = bn @ w.T + (0 if bias is None else bias)
    w2, b2 = fold_bn_linear(mean, var, 1e-5, gamma, beta, w, bias)
    folded = x @ w2.T + b2
    np.testing.assert_allclose(
        folded, unfolded, rtol=FOLD_BOUND, atol=FOLD_BOUND * np.abs(unfolded).max()
    )


@settings(max_examples=EXAMPLES["fold_model"])
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 3.0), st.floats(1e-3, 10.0))
def test_fold_model_pass_equals_unfolded_model(seed, mean_scale, var_scale):
    """fold(LeNet-BN) in float64 equals the unfolded float64 model; the input is not modified."""
    from reliability_helpers import snapshot

    from bnlab.fold import fold
    from bnlab.models import lenet_bn

    rng = np.random.default_rng(seed)
    model = lenet_bn(seed=seed % 1000, dtype=np.float64)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf[...] = rng.standard_normal(buf.shape) * mean_scale
        elif name.endswith("running_var"):
            buf[...] = rng.random(buf.shape) * var_scale + 1e-3
    for p in model.parameters():
        p.data[...] += rng.standard_normal(p.data.shape) * 0.1
    model.eval()
    before = snapshot(model)
    x = rng.random((3, 1, 28, 28))
    folded, _ = fold(model)
    ref, out = model(x), folded(x)
    np.testing.assert_allclose(out, ref, rtol=FOLD_BOUND, atol=FOLD_BOUND * np.abs(ref).max())
    assert snapshot(model) == before
