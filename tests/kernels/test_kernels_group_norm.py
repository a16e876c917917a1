"""Group-norm kernels (one task per (sample, group) block) against the NumPy reference, PyTorch
autograd (float64, random upstream gradient), central differences, across thread counts, and bad
input."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_tolerances import assert_matches

from bnlab.check import numeric_gradient
from bnlab.errors import ShapeError
from bnlab.functional import group_norm_backward, group_norm_forward
from bnlab.kernels import gn_backward, gn_forward, paths

EXAMPLES = 1000 if os.environ.get("CI") == "true" else 150


@st.composite
def gn_cases(draw):
    groups = draw(st.integers(1, 4))
    n, per_group, s = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 30))
    return {
        "shape": (n, groups * per_group, s),
        "groups": groups,
        "dtype": draw(st.sampled_from([np.float16, np.float32, np.float64])),
        "eps": draw(st.sampled_from([1e-5, 1e-2, 0.5])),
        "affine": draw(st.booleans()),
        "offset": draw(st.floats(-20.0, 20.0)),
        "scale": draw(st.floats(0.1, 10.0)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }  # fmt: skip


@settings(max_examples=EXAMPLES)
@given(case=gn_cases())
def test_kernels_group_norm_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    dtype, shape, groups = case["dtype"], case["shape"], case["groups"]
    acc = np.float64 if dtype == np.float64 else np.float32
    x = (case["offset"] + case["scale"] * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    g = rng.standard_normal(c).astype(acc) if case["affine"] else None
    b = rng.standard_normal(c).astype(acc) if case["affine"] else None
    y_ref, cache = group_norm_forward(x, groups, g, b, case["eps"], layout="NCL", backend="numpy")
    dx_ref, dg_ref, db_ref = group_norm_backward(dy, cache)
    y, mean, rstd = gn_forward(x, groups, g, b, case["eps"])
    dx, dg, db = gn_backward(dy, x, mean, rstd, g, groups)
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    assert_matches(y, y_ref, dtype, "y")
    scale = np.ones(c) if g is None else np.abs(g)
    terms = dy.astype(np.float64) * scale[:, None] * np.repeat(rstd, c // groups, axis=1)[..., None]
    assert_matches(dx, dx_ref, dtype, "dx", terms=terms)
    assert_matches(rstd, cache.rstd.reshape(rstd.shape), dtype, "rstd")
    if case["affine"]:
        assert_matches(dg, dg_ref, dtype, "dgamma")
        assert_matches(db, db_ref, dtype, "dbeta")


def test_kernels_group_norm_gradients_match_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    x = 1.0 + 2.0 * rng.standard_normal((3, 6, 4, 5))
    dy = rng.standard_normal(x.shape)  # random upstream gradient
    g, b = rng.standard_normal(6), rng.standard_normal(6)
    x3, dy3 = x.reshape(3, 6, 20), dy.reshape(3, 6, 20)
    y, mean, rstd = gn_forward(x3, 3, g, b, 1e-5)
    dx, dg, db = gn_backward(dy3, x3, mean, rstd, g, 3)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    ty = torch.nn.functional.group_norm(tx, 3, tg, tb, eps=1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y.reshape(x.shape), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx.reshape(x.shape), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_kernels_group_norm_gradients_match_central_differences():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 4, 3))
    dy = rng.standard_normal(x.shape)
    g, b = rng.standard_normal(4), rng.standard_normal(4)
    _, mean, rstd = gn_forward(x, 2, g, b, 1e-5)
    dx, dg, db = gn_backward(dy, x, mean, rstd, g, 2)

    def y():
        return gn_forward(x, 2, g, b, 1e-5)[0]

    for arr, grad in ((x, dx), (g, dg), (b, db)):
        np.testing.assert_allclose(grad, numeric_gradient(y, arr, dy), rtol=1e-6, atol=1e-7)


def test_kernels_group_norm_bit_identical_across_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    rng = np.random.default_rng(15)
    x = (5 + rng.standard_normal((3, 8, 33))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = rng.standard_normal(8).astype(np.float32)

    def run(threads):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            with paths.limits(parallel_min_values=0):
                y, mean, rstd = gn_forward(x, 4, g, None, 1e-5)
                return (y, mean, rstd, *gn_backward(dy, x, mean, rstd, g, 4))
        finally:
            numba.set_num_threads(previous)

    for a, b in zip(run(1), run(2), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("s", [5, 50, 20_000])
def test_kernels_group_norm_statistics_match_float64(s):
    """Large-mean groups of short and long blocks: the float64 statistics, and gradient sums
    that match float64 NumPy."""
    rng = np.random.default_rng(16)
    x = 1e3 + rng.standard_normal((2, 6, s))
    dy = rng.standard_normal(x.shape)
    g = rng.standard_normal(6)
    y, mean, rstd = gn_forward(x, 3, g, None, 1e-5)
    blocks = x.reshape(2, 3, -1)
    np.testing.assert_allclose(mean, blocks.mean(axis=2), rtol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(blocks.var(axis=2) + 1e-5), rtol=1e-10)
    _, dg, db = gn_backward(dy, x, mean, rstd, g, 3)
    xhat = ((blocks - blocks.mean(axis=2, keepdims=True)) * rstd[..., None]).reshape(x.shape)
    np.testing.assert_allclose(dg, (dy * xhat).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "err", "word"),
    [
        (lambda x: gn_forward(x, 3, None, None, 1e-5), ValueError, "num_groups"),
        (lambda x: gn_forward(x, 2.0, None, None, 1e-5), TypeError, "num_groups"),
        (lambda x: gn_forward(x[0], 2, None, None, 1e-5), ShapeError, "x3"),
        (lambda x: gn_forward(x, 2, np.ones(3), None, 1e-5), ShapeError, "weight"),
        (lambda x: gn_backward(x, x, np.zeros((2, 3)), np.ones((2, 2)), None, 2), ShapeError,
         "mean"),
        (lambda x: gn_backward(x[:1], x, np.zeros(4), np.ones(4), None, 2), ShapeError, "dy3"),
    ],
)  # fmt: skip
def test_kernels_group_norm_rejects_bad_input(call, err, word):
    with pytest.raises(err, match=word):
        call(np.ones((2, 4, 5), np.float32))
