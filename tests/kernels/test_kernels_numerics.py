"""Numerics of the numba backend: the large-mean test, chunk boundaries at the real chunk sizes,
gradients in float64 against central differences and PyTorch autograd (random upstream gradient),
and the out=/dx= buffers."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.check import numeric_gradient
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.kernels import bn_backward, bn_eval_forward, bn_train_forward, paths

SEGMENT = paths.LIMITS.segment
BLOCK_ROWS = paths.LIMITS.min_block_rows


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_kernels_large_mean_statistics_stay_accurate(layout):
    """float32 x = randn + 1e4: E[x²] − E[x]² would lose every digit; the kernel's statistics are
    within 1e-3 (relative) of float64 statistics of the very same float32 values."""
    rng = np.random.default_rng(2)
    shape = {"NCHW": (8, 3, 16, 16), "NHWC": (8, 16, 16, 3), "NC": (512, 3)}[layout]
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout != "NHWC" else 3))
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, _ = batch_norm_forward(
        x, None, None, training=True, running_mean=running_mean, running_var=running_var,
        momentum=1.0, layout=layout, backend="numba",
    )  # fmt: skip
    x64 = x.astype(np.float64)
    m = x64.size // 3
    np.testing.assert_allclose(running_mean, x64.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(running_var, x64.var(axis=axes) * m / (m - 1), rtol=1e-3)
    assert abs(float(y.astype(np.float64).std()) - 1.0) < 1e-2


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((1, 2, SEGMENT + 33), False),  # a row split into two pieces + lane remainder
        ((2, 1, 2 * SEGMENT - 1), False),
        ((3, 64 * BLOCK_ROWS // 3 + 1, 1027), True),  # lane rows in memory, leftover values
        ((3, 64 * BLOCK_ROWS // 3 + 1, 200), True),
    ],
)
def test_kernels_real_chunk_boundaries_match_numpy(shape, channels_last):
    rng = np.random.default_rng(3)
    x = 5.0 + rng.standard_normal(shape)
    c = shape[2] if channels_last else shape[1]
    with paths.limits(tile_bytes=0, channel_bytes=0):  # the two-pass paths, real chunk sizes
        y, mean, var = bn_train_forward(x, np.ones(c), np.zeros(c), 1e-5, channels_last)
    axes = (0, 1) if channels_last else (0, 2)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-12)
    ref = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


def _loss_grads(x, gamma, beta, dy, layout, training, running):
    y, cache = batch_norm_forward(
        x, gamma, beta, training=training, running_mean=running[0].copy(),
        running_var=running[1].copy(), layout=layout, backend="numba",
    )  # fmt: skip
    return y, batch_norm_backward(dy, cache)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_kernels_gradients_match_central_differences(layout, training):
    """float64, loss = Σ y·dy with a random dy: analytic (dx, dγ, dβ) vs central differences."""
    rng = np.random.default_rng(4)
    shape = {"NCHW": (3, 2, 2, 3), "NHWC": (3, 2, 3, 2), "NC": (5, 2)}[layout]
    x = 1.5 + rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(2), rng.standard_normal(2)
    dy = rng.standard_normal(shape)
    running = (rng.standard_normal(2), 0.5 + rng.random(2))
    _, (dx, dgamma, dbeta) = _loss_grads(x, gamma, beta, dy, layout, training, running)

    def y():
        return _loss_grads(x, gamma, beta, dy, layout, training, running)[0]

    for arr, grad, name in ((x, dx, "dx"), (gamma, dgamma, "dgamma"), (beta, dbeta, "dbeta")):
        num = numeric_gradient(y, arr, dy)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_kernels_gradients_match_torch_autograd(layout, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = 0.5 + 2.0 * rng.standard_normal((4, 3, 5, 6))  # NCHW for torch
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)  # random upstream gradient
    rm, rv = rng.standard_normal(3), 0.5 + rng.random(3)
    to_layout = (
        (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
        if layout == "NHWC"
        else (lambda a: a)
    )
    y, (dx, dgamma, dbeta) = _loss_grads(
        to_layout(x), gamma, beta, to_layout(dy), layout, training, (rm, rv)
    )
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    ty = torch.nn.functional.batch_norm(
        tx, torch.tensor(rm), torch.tensor(rv), tg, tb, training=training, eps=1e-5
    )
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, to_layout(ty.detach().numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, to_layout(tx.grad.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kernels_write_into_given_buffers(dtype):
    """out= and dx= are written in place and returned as the very same objects."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 10)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    w, b = np.full(3, 2.0, acc), np.full(3, 0.5, acc)
    out = np.full_like(x, np.nan)
    y, mean, var = bn_train_forward(x, w, b, 1e-5, False, out=out)
    assert y is out and np.isfinite(out).all()
    fresh, _, _ = bn_train_forward(x, w, b, 1e-5, False)
    np.testing.assert_array_equal(out, fresh)
    rstd = (1 / np.sqrt(var + acc(1e-5))).astype(acc)
    dx = np.full_like(x, np.nan)
    got, _, _ = bn_backward(dy, x, mean, rstd, w, False, dx=dx)
    assert got is dx and np.isfinite(dx).all()
    np.testing.assert_array_equal(dx, bn_backward(dy, x, mean, rstd, w, False)[0])
    out2 = np.full_like(x, np.nan)
    assert bn_eval_forward(x, w, b, False, out=out2) is out2
    np.testing.assert_array_equal(out2, (x.astype(acc) * 2.0 + 0.5).astype(dtype))


@pytest.mark.parametrize(
    ("shape", "channels_last"), [((256, 1, 4096), True), ((16, 8, 1000), False)]
)
def test_kernels_single_launch_and_two_pass_paths_agree(shape, channels_last):
    """A large mean, at the real tile sizes: the single-launch kernels and the two-pass ones
    give the same statistics, outputs and gradients to float64 rounding."""
    rng = np.random.default_rng(4)
    x = 1e3 + rng.standard_normal(shape)
    dy = rng.standard_normal(x.shape)
    c = shape[2] if channels_last else shape[1]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    layout = "NLC" if channels_last else "NCL"

    def run():
        y, mean, var = bn_train_forward(x, w, b, 1e-5, channels_last)
        rstd = 1.0 / np.sqrt(var + 1e-5)
        return (y, mean, var, *bn_backward(dy, x, mean, rstd, w, channels_last))

    with paths.limits(tile_bytes=512 << 10, channel_bytes=2 << 20):
        assert paths.plan(shape, layout, x.dtype).path.endswith("single-launch")
        single = run()
    with paths.limits(tile_bytes=0, channel_bytes=0):
        assert paths.plan(shape, layout, x.dtype).path.endswith("two-pass")
        two_pass = run()
    for name, a, s in zip(("y", "mean", "var", "dx", "dw", "db"), single, two_pass, strict=True):
        np.testing.assert_allclose(a, s, rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NC"])
def test_kernels_statistics_of_huge_float64_means_stay_finite(layout):
    """|mean| ~ 1e160: the partial summaries are merged into an empty one first, where δ²·n_a
    would be inf·0 = NaN (found in review: channels-last float64 returned NaN variances)."""
    rng = np.random.default_rng(9)
    shape = {"NHWC": (8, 16, 16, 64), "NCHW": (8, 64, 16, 16), "NC": (4096, 64)}[layout]
    x = 1e160 + 1e150 * rng.standard_normal(shape)
    y_ref, c_ref = batch_norm_forward(x, None, None, training=True, layout=layout, backend="numpy")
    y, c = batch_norm_forward(x, None, None, training=True, layout=layout, backend="numba")
    assert np.isfinite(c.var).all() and np.isfinite(y).all()
    # x itself holds its 1e150-sized deviations to ~1e-6 (float64 spacing at 1e160 is ~1e144),
    # so both sides can only agree to that
    np.testing.assert_allclose(c.var, c_ref.var, rtol=1e-4)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
