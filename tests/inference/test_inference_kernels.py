"""The engine's numba kernels against their slow NumPy references (and PyTorch for pooling)."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.inference import _kernels as K


@pytest.mark.parametrize(
    ("n", "h", "w", "c", "k", "stride", "pad"),
    [(1, 7, 9, 3, 7, 2, 3), (2, 6, 6, 5, 3, 1, 1), (2, 7, 5, 4, 3, 2, 1), (1, 4, 4, 2, 1, 1, 0)],
)
def test_im2col_matches_reference(rng, n, h, w, c, k, stride, pad):
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    ref = K.im2col_nhwc_ref(x, k, k, stride, pad)
    col = np.full(ref.shape, np.nan, np.float32)  # NaN: every entry must be written
    rows = n * ((h + 2 * pad - k) // stride + 1)
    K.im2col_nhwc(x, k, k, stride, pad, col, 0, rows // 2)  # in two row ranges, as threads do
    K.im2col_nhwc(x, k, k, stride, pad, col, rows // 2, rows)
    np.testing.assert_array_equal(col, ref)


def test_im2col_gemm_is_torch_conv(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 6, 5, 4))
    wt = rng.standard_normal((3, 4, 3, 3))
    col = K.im2col_nhwc_ref(x, 3, 3, 2, 1)
    out = col @ wt.transpose(2, 3, 1, 0).reshape(-1, 3)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(wt), stride=2, padding=1
    ).numpy()
    np.testing.assert_allclose(out.reshape(2, 3, 3, 3), ref.transpose(0, 2, 3, 1), atol=1e-12)


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_epilogue_matches_reference(rng, with_scale, with_res, relu):
    y = rng.standard_normal((13, 6)).astype(np.float32)
    scale = rng.standard_normal(6).astype(np.float32) if with_scale else np.zeros(0, np.float32)
    shift = rng.standard_normal(6).astype(np.float32)
    res = rng.standard_normal((13, 6)).astype(np.float32) if with_res else np.zeros((0, 1), "f4")
    ref = K.epilogue_ref(y, scale, shift, res, relu)
    K.epilogue(y, scale, shift, res, relu)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    if relu:
        assert (y >= 0).all() and (ref == 0).any()


def test_maxpool_matches_reference_and_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32) - 2.0  # negative: padding must lose
    ref = K.maxpool_nhwc_ref(x, 3, 2, 1)
    out = np.empty(ref.shape, np.float32)
    K.maxpool_nhwc(x, 3, 2, 1, out)
    np.testing.assert_array_equal(out, ref)
    split = np.full(ref.shape, np.nan, np.float32)  # in two row ranges, as threads do
    K.maxpool_nhwc(x, 3, 2, 1, split, 0, 3)
    K.maxpool_nhwc(x, 3, 2, 1, split, 3, 2 * ref.shape[1])
    np.testing.assert_array_equal(split, ref)
    t = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, 2, 1)
    np.testing.assert_array_equal(out, t.numpy().transpose(0, 2, 3, 1))


def test_subsample_and_layout_copy(rng):
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    out = np.empty((2, 4, 3, 3), np.float32)
    K.subsample_nhwc(x, 2, out)
    np.testing.assert_array_equal(out, x[:, ::2, ::2, :])
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    back = np.empty_like(x)
    K.nchw_to_nhwc(nchw, back)
    np.testing.assert_array_equal(back, x)
