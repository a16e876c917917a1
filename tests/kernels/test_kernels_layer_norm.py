"""Layer-norm kernels (the same reduction core on a (M, D) view) against the NumPy reference,
PyTorch autograd (float64, random upstream gradient), across thread counts, and on bad input."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_tolerances import assert_matches

from bnlab.check import numeric_gradient
from bnlab.errors import DTypeError, ShapeError
from bnlab.functional import layer_norm_backward, layer_norm_forward
from bnlab.kernels import ln_backward, ln_forward, paths

EXAMPLES = 1000 if os.environ.get("CI") == "true" else 150


@settings(max_examples=EXAMPLES)
@given(
    m=st.integers(1, 9),
    d=st.integers(1, 40),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    eps=st.sampled_from([1e-5, 1e-2, 0.5]),
    affine=st.booleans(),
    offset=st.floats(-20.0, 20.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernels_layer_norm_matches_reference(m, d, dtype, eps, affine, offset, scale, seed):
    rng = np.random.default_rng(seed)
    acc = np.float64 if dtype == np.float64 else np.float32
    x = (offset + scale * rng.standard_normal((m, d))).astype(dtype)
    dy = rng.standard_normal((m, d)).astype(dtype)
    g = rng.standard_normal(d).astype(acc) if affine else None
    b = rng.standard_normal(d).astype(acc) if affine else None
    y_ref, cache = layer_norm_forward(x, d, g, b, eps, backend="numpy")
    dx_ref, dg_ref, db_ref = layer_norm_backward(dy, cache)
    y, mean, rstd = ln_forward(x, g, b, eps)
    dx, dg, db = ln_backward(dy, x, mean, rstd, g)
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    assert_matches(y, y_ref, dtype, "y")
    scale = 1.0 if g is None else np.abs(g)
    assert_matches(dx, dx_ref, dtype, "dx", terms=dy.astype(np.float64) * scale * rstd[:, None])
    assert_matches(rstd, cache.rstd.ravel(), dtype, "rstd")
    if affine:
        assert dg.dtype == dg_ref.dtype
        assert_matches(dg, dg_ref, dtype, "dgamma")
        assert_matches(db, db_ref, dtype, "dbeta")


def test_kernels_layer_norm_gradients_match_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x = 3.0 + 2.0 * rng.standard_normal((6, 11))
    dy = rng.standard_normal(x.shape)  # random upstream gradient
    g, b = rng.standard_normal(11), rng.standard_normal(11)
    y, mean, rstd = ln_forward(x, g, b, 1e-5)
    dx, dg, db = ln_backward(dy, x, mean, rstd, g)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    ty = torch.nn.functional.layer_norm(tx, (11,), tg, tb, eps=1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_kernels_layer_norm_gradients_match_central_differences():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 5))
    dy = rng.standard_normal(x.shape)
    g, b = rng.standard_normal(5), rng.standard_normal(5)
    _, mean, rstd = ln_forward(x, g, b, 1e-5)
    dx, dg, db = ln_backward(dy, x, mean, rstd, g)

    def y():
        return ln_forward(x, g, b, 1e-5)[0]

    for arr, grad in ((x, dx), (g, dg), (b, db)):
        np.testing.assert_allclose(grad, numeric_gradient(y, arr, dy), rtol=1e-6, atol=1e-7)


def test_kernels_layer_norm_large_mean():
    x = (np.random.default_rng(11).standard_normal((16, 4096)) + 1e4).astype(np.float32)
    _, mean, rstd = ln_forward(x, None, None, 1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x64.var(axis=1) + 1e-5), rtol=1e-3)


def test_kernels_layer_norm_bit_identical_across_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((37, 71)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = rng.standard_normal(71).astype(np.float32)

    def run(threads):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            with paths.limits(min_block_rows=2, min_block_values=16, parallel_min_values=0):
                assert (
                    paths.plan(x.shape, "NC", x.dtype, threads, "layer_norm").chunks["blocks"] > 4
                )
                y, mean, rstd = ln_forward(x, g, None, 1e-5)
                return (y, mean, rstd, *ln_backward(dy, x, mean, rstd, g))
        finally:
            numba.set_num_threads(previous)

    for a, b in zip(run(1), run(2), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("call", "err", "word"),
    [
        (lambda x: ln_forward(x[None], None, None, 1e-5), ShapeError, "x2"),
        (lambda x: ln_forward(x.astype(np.int64), None, None, 1e-5), DTypeError, "x2"),
        (lambda x: ln_forward(x, np.ones(3), None, 1e-5), ShapeError, "weight"),
        (lambda x: ln_forward(x[:0], None, None, 1e-5), ShapeError, "empty"),
        (lambda x: ln_backward(x[:1], x, np.zeros(2), np.ones(2), None), ShapeError, "dy2"),
        (lambda x: ln_backward(x, x, np.zeros(3), np.ones(2), None), ShapeError, "mean"),
    ],
)
def test_kernels_layer_norm_rejects_bad_input(call, err, word):
    with pytest.raises(err, match=word):
        call(np.ones((2, 4), np.float32))


@pytest.mark.parametrize("d", [1, 31, 32, 33, 70_001])
def test_kernels_layer_norm_rows_of_any_length_match_float64(d):
    """Rows shorter than, equal to and much longer than the 32 lanes (a row of 70,001 values
    does not stay in cache: it is read twice, same kernel)."""
    rng = np.random.default_rng(d)
    x = 1e3 + rng.standard_normal((3, d))
    dy = rng.standard_normal(x.shape)
    g = rng.standard_normal(d)
    y, mean, rstd = ln_forward(x, g, None, 1e-5)
    dx, dg, db = ln_backward(dy, x, mean, rstd, g)
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(axis=1) + 1e-5), rtol=1e-9)
    xhat = (x - x.mean(axis=1, keepdims=True)) * rstd[:, None]
    np.testing.assert_allclose(y, xhat * g, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dg, (dy * xhat).sum(axis=0), rtol=1e-9, atol=1e-9)
    gh = dy * g
    ref_dx = rstd[:, None] * (gh - gh.mean(axis=1, keepdims=True)
                              - xhat * (gh * xhat).mean(axis=1, keepdims=True))  # fmt: skip
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-8, atol=1e-8)
