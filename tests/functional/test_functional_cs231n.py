"""The cs231n adapters against a transcription of the assignment's own formulas, and their
``bn_param`` semantics (defaults, write-back, mode)."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.check import numeric_gradient, rel_error
from bnlab.errors import ShapeError
from bnlab.functional import cs231n

# --------------------------------------------------------------------------- the textbook


def textbook_batchnorm_forward(x, gamma, beta, bn_param):
    """cs231n's batchnorm_forward, as the assignment specifies it (x is (N, D))."""
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    N, D = x.shape
    running_mean = bn_param.get("running_mean", np.zeros(D, dtype=x.dtype))
    running_var = bn_param.get("running_var", np.zeros(D, dtype=x.dtype))
    if mode == "train":
        sample_mean = x.mean(axis=0)
        sample_var = x.var(axis=0)
        x_hat = (x - sample_mean) / np.sqrt(sample_var + eps)
        out = gamma * x_hat + beta
        running_mean = momentum * running_mean + (1 - momentum) * sample_mean
        running_var = momentum * running_var + (1 - momentum) * sample_var
    else:
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out


def textbook_groupnorm(x, gamma, beta, G, eps=1e-5):
    N, C, H, W = x.shape
    xg = x.reshape(N, G, C // G, H, W)
    mean = xg.mean(axis=(2, 3, 4), keepdims=True)
    var = xg.var(axis=(2, 3, 4), keepdims=True)
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(N, C, H, W)
    return gamma.reshape(1, C, 1, 1) * xhat + beta.reshape(1, C, 1, 1)


def to_rows(x):
    """(N, C, H, W) -> (N·H·W, C): spatial batch norm is vanilla batch norm on these rows."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


# --------------------------------------------------------------------------- tests


def test_batchnorm_train_then_test_matches_textbook(rng):
    gamma, beta = rng.standard_normal(5) + 1, rng.standard_normal(5)
    ours, theirs = {"mode": "train", "momentum": 0.8}, {"mode": "train", "momentum": 0.8}
    for t in range(6):
        x = rng.standard_normal((7, 5)) * (t + 1) + t
        out, _ = cs231n.batchnorm_forward(x, gamma, beta, ours)
        np.testing.assert_allclose(out, textbook_batchnorm_forward(x, gamma, beta, theirs),
                                   atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(ours["running_mean"], theirs["running_mean"], atol=1e-12)
        np.testing.assert_allclose(ours["running_var"], theirs["running_var"], atol=1e-12)
    ours["mode"] = theirs["mode"] = "test"
    x = rng.standard_normal((3, 5))
    out, _ = cs231n.batchnorm_forward(x, gamma, beta, ours)
    np.testing.assert_allclose(out, textbook_batchnorm_forward(x, gamma, beta, theirs), atol=1e-12)


def test_bn_param_defaults_and_write_back(rng):
    """Defaults: eps 1e-5, momentum 0.9, running stats start at zeros (cs231n's choice);
    updated stats are stored back as new arrays, the arrays passed in stay untouched."""
    x = rng.standard_normal((6, 3), dtype=np.float32)
    bn_param = {"mode": "train"}
    cs231n.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn_param["running_var"], 0.1 * x.var(0), rtol=1e-5)
    assert bn_param["running_mean"].dtype == np.float32
    given = bn_param["running_mean"]
    kept = given.copy()
    cs231n.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bn_param)
    np.testing.assert_array_equal(given, kept)
    assert bn_param["running_mean"] is not given


@pytest.mark.parametrize("mode", ["eval", None, "TRAIN"])
def test_invalid_mode_leaves_bn_param(rng, mode):
    bn_param = {"mode": mode, "running_mean": np.zeros(2), "running_var": np.ones(2)}
    with pytest.raises(ValueError, match="Invalid forward batchnorm mode"):
        cs231n.batchnorm_forward(rng.standard_normal((4, 2)), np.ones(2), np.zeros(2), bn_param)
    assert set(bn_param) == {"mode", "running_mean", "running_var"}
    np.testing.assert_array_equal(bn_param["running_var"], 1)


def test_bad_input_leaves_bn_param(rng):
    bn_param = {"mode": "train", "running_mean": np.zeros(2), "running_var": np.ones(2)}
    with pytest.raises(ShapeError, match=r"gamma must have shape \(2,\)"):
        cs231n.batchnorm_forward(rng.standard_normal((4, 2)), np.ones(3), np.zeros(2), bn_param)
    np.testing.assert_array_equal(bn_param["running_mean"], 0)


@pytest.mark.parametrize("backward", [cs231n.batchnorm_backward, cs231n.batchnorm_backward_alt])
def test_batchnorm_backward_numeric(rng, backward):
    x = rng.standard_normal((5, 4)) + 2
    gamma, beta = rng.standard_normal(4) + 1, rng.standard_normal(4)
    dout = rng.standard_normal((5, 4))

    def f():
        return cs231n.batchnorm_forward(x, gamma, beta, {"mode": "train"})[0]

    _, cache = cs231n.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    for grad, p in zip(backward(dout, cache), (x, gamma, beta), strict=True):
        assert rel_error(grad, numeric_gradient(f, p, dout)) < 1e-6


def test_spatial_batchnorm_is_vanilla_on_rows(rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
    gamma, beta = rng.standard_normal(3) + 1, rng.standard_normal(3)
    dout = rng.standard_normal(x.shape)
    p_sp, p_row = {"mode": "train"}, {"mode": "train"}
    out, cache = cs231n.spatial_batchnorm_forward(x, gamma, beta, p_sp)
    out_rows, cache_rows = cs231n.batchnorm_forward(to_rows(x), gamma, beta, p_row)
    np.testing.assert_allclose(to_rows(out), out_rows, atol=1e-12)
    np.testing.assert_allclose(p_sp["running_var"], p_row["running_var"], atol=1e-12)
    dx, dg, db = cs231n.spatial_batchnorm_backward(dout, cache)
    dxr, dgr, dbr = cs231n.batchnorm_backward_alt(to_rows(dout), cache_rows)
    np.testing.assert_allclose(to_rows(dx), dxr, atol=1e-12)
    np.testing.assert_allclose(dg, dgr, atol=1e-12)
    np.testing.assert_allclose(db, dbr, atol=1e-12)


def test_layernorm_matches_textbook_and_gradients(rng):
    x = rng.standard_normal((4, 7)) * 3 - 1
    gamma, beta = rng.standard_normal(7) + 1, rng.standard_normal(7)
    dout = rng.standard_normal(x.shape)
    out, cache = cs231n.layernorm_forward(x, gamma, beta, {"eps": 1e-4})
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    np.testing.assert_allclose(out, gamma * (x - mu) / np.sqrt(var + 1e-4) + beta, atol=1e-12)

    def f():
        return cs231n.layernorm_forward(x, gamma, beta, {"eps": 1e-4})[0]

    for grad, p in zip(cs231n.layernorm_backward(dout, cache), (x, gamma, beta), strict=True):
        assert rel_error(grad, numeric_gradient(f, p, dout)) < 1e-6


@pytest.mark.parametrize("param_shape", ["(1,C,1,1)", "(C,)"])
def test_spatial_groupnorm_matches_textbook_and_gradients(rng, param_shape):
    N, C, H, W, G = 2, 6, 3, 2, 3
    shape = (1, C, 1, 1) if param_shape == "(1,C,1,1)" else (C,)
    x = rng.standard_normal((N, C, H, W)) + 0.5
    gamma, beta = rng.standard_normal(shape) + 1, rng.standard_normal(shape)
    dout = rng.standard_normal(x.shape)
    out, cache = cs231n.spatial_groupnorm_forward(x, gamma, beta, G, {})
    np.testing.assert_allclose(out, textbook_groupnorm(x, gamma, beta, G), atol=1e-12)

    def f():
        return cs231n.spatial_groupnorm_forward(x, gamma, beta, G, {})[0]

    grads = cs231n.spatial_groupnorm_backward(dout, cache)
    for grad, p in zip(grads, (x, gamma, beta), strict=True):
        assert grad.shape == p.shape
        assert rel_error(grad, numeric_gradient(f, p, dout)) < 1e-6


def test_spatial_groupnorm_bad_gamma(rng):
    with pytest.raises(ShapeError, match=r"gamma must have shape \(1, 4, 1, 1\) or \(4,\)"):
        cs231n.spatial_groupnorm_forward(rng.standard_normal((2, 4, 2, 2)), np.ones((4, 1)),
                                         np.zeros(4), 2, {})  # fmt: skip
