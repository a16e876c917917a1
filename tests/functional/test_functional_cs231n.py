"""The cs231n adapters against a transcription of the assignment's own formulas (written here from
the assignment's docstrings, with NumPy's dtype promotion and broadcasting), and their ``bn_param``
semantics (defaults, write-back, mode), on both backends.

The backward passes are checked against PyTorch autograd of the same transcription (float64,
random upstream gradient) and against central differences.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from fn_support import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab.check import numeric_gradient, rel_error
from bnlab.errors import DTypeError, NonFiniteBatchWarning, ShapeError
from bnlab.functional import cs231n

torch = pytest.importorskip("torch")

# --------------------------------------------------------------------------- the textbook


def textbook_batchnorm_forward(x, gamma, beta, bn_param, xp=np):
    """cs231n's batchnorm_forward as the assignment specifies it (x is (N, D)); ``xp``: numpy, or
    torch for autograd."""
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    N, D = x.shape
    if xp is torch:  # autograd of the training formula only
        mean, var = x.mean(0), x.var(0, correction=0)
        return gamma * (x - mean) / torch.sqrt(var + eps) + beta
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


def textbook_layernorm(x, gamma, beta, eps=1e-5, xp=np):
    if xp is np:
        mu, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    else:
        mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, correction=0)
    return gamma * (x - mu) / xp.sqrt(var + eps) + beta


def textbook_groupnorm(x, gamma, beta, G, eps=1e-5):
    N, C, H, W = x.shape
    xg = x.reshape(N, G, C // G, H, W)
    mean = xg.mean(axis=(2, 3, 4), keepdims=True)
    var = xg.var(axis=(2, 3, 4), keepdims=True)
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(N, C, H, W)
    return gamma * xhat + beta


def to_rows(x):
    """(N, C, H, W) -> (N·H·W, C): spatial batch norm is vanilla batch norm on these rows."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def flat_rows(shape):
    """The documented gradient shape: a row (1, D) or column (D, 1) comes back as (D,)."""
    return (shape[0] * shape[1],) if len(shape) == 2 and 1 in shape else shape


@contextlib.contextmanager
def backend_set(name):
    before = bnlab.get_backend()
    bnlab.set_backend(name)
    try:
        yield
    finally:
        bnlab.set_backend(before)


TOL = {np.dtype(np.float16): 5e-2, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def x_tolerance(x):
    """Tolerance relative to max(1, max|reference|), by the dtype x is normalized in."""
    return TOL.get(np.dtype(x.dtype), 1e-10)


# --------------------------------------------------------------------------- forward: promotion

GAMMA_FORMS = ["vector", "row", "column", "full", "scalar", "0d", "list"]


def make_param(form, n, d, dtype, rng, offset):
    values = rng.integers(-3, 4, size=(n, d)) if np.dtype(dtype).kind == "i" else None
    if values is None:
        values = rng.standard_normal((n, d)) * 0.5 + offset
    a = np.asarray(values, dtype=dtype)
    return {
        "vector": a[0],
        "row": a[:1],
        "column": a[:, :1],
        "full": a,
        "scalar": float(a[0, 0]),
        "0d": a[0, 0].copy(),
        "list": [int(v) for v in a[0]],
    }[form]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60)
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 5),
    x_dtype=st.sampled_from(["float64", "float32", "float16", "int64", "int32"]),
    p_dtype=st.sampled_from(["float64", "float32", "int64"]),
    g_form=st.sampled_from(GAMMA_FORMS),
    b_form=st.sampled_from(GAMMA_FORMS),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_forward_promotes_and_broadcasts_like_the_textbook(
    backend, n, d, x_dtype, p_dtype, g_form, b_form, seed
):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, d)) * 3 + 1
    x = (np.round(raw) if x_dtype.startswith("int") else raw).astype(x_dtype)
    gamma = make_param(g_form, n, d, p_dtype, rng, 1.0)
    beta = make_param(b_form, n, d, p_dtype, rng, 0.0)
    ours, theirs = {"mode": "train", "momentum": 0.7}, {"mode": "train", "momentum": 0.7}
    with backend_set(backend), np.errstate(all="ignore"):
        for mode in ("train", "train", "test"):
            ours["mode"] = theirs["mode"] = mode
            out, _ = cs231n.batchnorm_forward(x, gamma, beta, ours)
            expected = textbook_batchnorm_forward(x, gamma, beta, theirs)
            assert out.dtype == expected.dtype and out.shape == expected.shape
            tol = x_tolerance(x) * max(1.0, np.abs(expected).max())
            np.testing.assert_allclose(out, expected, atol=tol, rtol=0)
            stat_dtype = np.float64 if x.dtype.kind == "i" else x.dtype
            for key in ("running_mean", "running_var"):
                assert ours[key].dtype == np.result_type(theirs[key].dtype, stat_dtype)
                np.testing.assert_allclose(ours[key], theirs[key], atol=tol, rtol=0)


def test_notebook_cell_41_integer_gamma_beta(rng):
    """ConvolutionalNetworks.ipynb: spatial batch norm with np.asarray([3, 4, 5]) as γ."""
    x = 4 * rng.standard_normal((2, 3, 4, 5)) + 10
    gamma, beta = np.asarray([3, 4, 5]), np.asarray([6, 7, 8])
    out, _ = cs231n.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), [6, 7, 8], atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), [3, 4, 5], rtol=1e-5)
    expected = textbook_batchnorm_forward(to_rows(x), gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(to_rows(out), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(3,), (1, 3), (1, 3, 1, 1), (), (1,)])
def test_spatial_gamma_shapes_per_channel(rng, shape):
    x = rng.standard_normal((2, 3, 2, 3)) + 1
    gamma = rng.uniform(0.5, 2, shape)
    out, cache = cs231n.spatial_batchnorm_forward(x, gamma, np.zeros(3), {"mode": "train"})
    g = np.broadcast_to(gamma.reshape(-1), (3,)) if gamma.size == 1 else gamma.reshape(3)
    expected = textbook_batchnorm_forward(to_rows(x), g, np.zeros(3), {"mode": "train"})
    np.testing.assert_allclose(to_rows(out), expected, atol=1e-12)
    dgamma = cs231n.spatial_batchnorm_backward(rng.standard_normal(x.shape), cache)[1]
    assert dgamma.shape == flat_rows(shape)


def test_spatial_gamma_per_position_is_refused(rng):
    """The reference would broadcast an (N·H·W, C) γ over its internal row view: no meaning for
    a conv layer, refused with the shapes that are accepted."""
    x = rng.standard_normal((2, 3, 2, 2))
    with pytest.raises(ShapeError, match=r"gamma must hold one value per channel of x: shape"):
        cs231n.spatial_batchnorm_forward(x, np.ones((8, 3)), np.zeros(3), {"mode": "train"})


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", ["graph", "alt"])
@pytest.mark.parametrize("g_form", ["vector", "row", "column", "full", "0d"])
def test_batchnorm_backward_matches_autograd(rng, backend, backward, g_form):
    """Random dout, float64: dx, dγ, dβ against torch autograd of the textbook, in γ's shape
    (a row or column flattened, as cs231n documents dgamma (D,))."""
    n, d = 5, 4
    x = rng.standard_normal((n, d)) * 2 + 3
    gamma = np.asarray(make_param(g_form, n, d, np.float64, rng, 1.0))
    beta = np.asarray(make_param(g_form, n, d, np.float64, rng, 0.0))
    dout = rng.standard_normal((n, d))
    fn = cs231n.batchnorm_backward if backward == "graph" else cs231n.batchnorm_backward_alt
    with backend_set(backend):
        _, cache = cs231n.batchnorm_forward(x, gamma, beta, {"mode": "train"})
        grads = fn(dout, cache)
    ts = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    textbook_batchnorm_forward(*ts, {"mode": "train"}, xp=torch).backward(torch.tensor(dout))
    for ours, t in zip(grads, ts, strict=True):
        expected = t.grad.numpy().reshape(flat_rows(t.shape))
        assert ours.shape == expected.shape
        assert rel_error(ours, expected) < 1e-10


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


def test_test_mode_backward(rng):
    x, dout = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    gamma = np.array([[1.5, 0.5, 2.0]])
    bn_param = {"mode": "test", "running_mean": np.full(3, 0.3), "running_var": np.full(3, 2.0)}
    _, cache = cs231n.batchnorm_forward(x, gamma, 0.5, bn_param)
    dx, dgamma, dbeta = cs231n.batchnorm_backward(dout, cache)
    np.testing.assert_allclose(dx, dout * gamma / np.sqrt(2.0 + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(dgamma, (dout * (x - 0.3) / np.sqrt(2 + 1e-5)).sum(0), rtol=1e-12)
    assert dbeta.shape == () and np.isclose(dbeta, dout.sum())


# --------------------------------------------------------------------------- the student patterns


def student_layernorm_forward(x, gamma, beta, ln_param):
    """The common student layer norm: batch norm of the transposed input (as students write it,
    with the flag that tells their batch norm to keep no running statistics)."""
    ln_param["mode"] = "train"
    ln_param["layernorm"] = 1
    out, cache = cs231n.batchnorm_forward(x.T, gamma.reshape(-1, 1), beta.reshape(-1, 1), ln_param)
    return out.T, cache


def student_layernorm_backward(dout, cache):
    dx, dgamma, dbeta = cs231n.batchnorm_backward_alt(dout.T, cache)
    return dx.T, dgamma, dbeta


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_layernorm_on_batchnorm_of_the_transpose(rng, backend):
    x = 5 * rng.standard_normal((4, 5)) + 12
    gamma, beta, dout = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((4, 5))
    with backend_set(backend):
        ln_param = {}
        out, cache = student_layernorm_forward(x, gamma, beta, ln_param)
        np.testing.assert_allclose(out, textbook_layernorm(x, gamma, beta), atol=1e-12)
        assert "running_mean" not in ln_param  # the layernorm flag: no running statistics
        grads = student_layernorm_backward(dout, cache)
        for grad, p in zip(grads, (x, gamma, beta), strict=True):
            num = numeric_gradient(
                lambda: student_layernorm_forward(x, gamma, beta, {})[0], p, dout
            )
            assert grad.shape == p.shape
            assert rel_error(grad, num) < 1e-7
        # another batch size through the same ln_param (the Solver's check_accuracy does this)
        out, _ = student_layernorm_forward(x[:3], gamma, beta, ln_param)
        np.testing.assert_allclose(out, textbook_layernorm(x[:3], gamma, beta), atol=1e-12)


def test_without_the_flag_the_transpose_pattern_tracks_running_stats_of_the_batch_size(rng):
    """The reference keeps running statistics of shape (N,) here; a later batch of another size
    is a short ShapeError that says what happened (the reference fails to broadcast)."""
    bn_param = {"mode": "train"}
    x, gamma = rng.standard_normal((4, 5)), np.ones((5, 1))
    cs231n.batchnorm_forward(x.T, gamma, np.zeros((5, 1)), bn_param)
    assert bn_param["running_mean"].shape == (4,)
    with pytest.raises(ShapeError, match=r"bn_param\['running_mean'\] must have shape \(3,\)"):
        cs231n.batchnorm_forward(x[:3].T, gamma, np.zeros((5, 1)), bn_param)


@pytest.mark.parametrize("spatial", [False, True])
def test_training_batch_of_one_returns_beta(rng, spatial):
    """cs231n's reference: σ² = 0 so x̂ = 0 and out = β; the running averages take the sample as
    mean and 0 as variance."""
    shape = (1, 3, 1, 1) if spatial else (1, 3)
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(3) + 1, rng.standard_normal(3)
    fwd = cs231n.spatial_batchnorm_forward if spatial else cs231n.batchnorm_forward
    bwd = cs231n.spatial_batchnorm_backward if spatial else cs231n.batchnorm_backward
    ours = {"mode": "train", "running_mean": np.ones(3), "running_var": np.ones(3)}
    theirs = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in ours.items()}
    out, cache = fwd(x, gamma, beta, ours)
    np.testing.assert_array_equal(out.reshape(3), beta)
    textbook_batchnorm_forward(x.reshape(1, 3), gamma, beta, theirs)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-15)
    dout = rng.standard_normal(shape)
    dx, dgamma, dbeta = bwd(dout, cache)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_allclose(dbeta, dout.reshape(3))
    for grad, p in zip((dx, dgamma, dbeta), (x, gamma, beta), strict=True):
        num = numeric_gradient(lambda: fwd(x, gamma, beta, {"mode": "train"})[0], p, dout)
        assert rel_error(grad, num) < 1e-6


# --------------------------------------------------------------------------- bn_param semantics


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_train_then_test_matches_textbook(rng, backend):
    gamma, beta = rng.standard_normal(5) + 1, rng.standard_normal(5)
    ours, theirs = {"mode": "train", "momentum": 0.8}, {"mode": "train", "momentum": 0.8}
    with backend_set(backend):
        for t in range(6):
            x = rng.standard_normal((7, 5)) * (t + 1) + t
            out, _ = cs231n.batchnorm_forward(x, gamma, beta, ours)
            np.testing.assert_allclose(out, textbook_batchnorm_forward(x, gamma, beta, theirs),
                                       atol=1e-12)  # fmt: skip
            for key in ("running_mean", "running_var"):
                np.testing.assert_allclose(ours[key], theirs[key], atol=1e-12)
        ours["mode"] = theirs["mode"] = "test"
        x = rng.standard_normal((3, 5))
        out, _ = cs231n.batchnorm_forward(x, gamma, beta, ours)
    expected = textbook_batchnorm_forward(x, gamma, beta, theirs)
    np.testing.assert_allclose(out, expected, atol=1e-12)


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


def test_test_mode_creates_zeros_and_keeps_given_arrays(rng):
    """cs231n stores back what it used: test mode keeps the arrays given (same objects) and
    stores the zeros it created when there were none."""
    x = rng.standard_normal((4, 2))
    rm, rv = np.array([0.5, -0.5]), np.array([2.0, 3.0])
    bn_param = {"mode": "test", "running_mean": rm, "running_var": rv}
    cs231n.batchnorm_forward(x, np.ones(2), np.zeros(2), bn_param)
    assert bn_param["running_mean"] is rm and bn_param["running_var"] is rv
    fresh = {"mode": "test"}
    out, _ = cs231n.batchnorm_forward(x, np.ones(2), np.zeros(2), fresh)
    np.testing.assert_allclose(out, x / np.sqrt(1e-5))
    np.testing.assert_array_equal(fresh["running_var"], 0)


@pytest.mark.parametrize("mode", ["eval", None, "TRAIN", np.zeros(3)])
def test_invalid_mode_leaves_bn_param(rng, mode):
    bn_param = {"mode": mode, "running_mean": np.zeros(2), "running_var": np.ones(2)}
    with pytest.raises(ValueError, match="Invalid forward batchnorm mode") as err:
        cs231n.batchnorm_forward(rng.standard_normal((4, 2)), np.ones(2), np.zeros(2), bn_param)
    assert len(str(err.value)) < 120
    assert set(bn_param) == {"mode", "running_mean", "running_var"}
    np.testing.assert_array_equal(bn_param["running_var"], 1)


def test_bad_input_leaves_bn_param(rng):
    bn_param = {"mode": "train", "running_mean": np.zeros(2), "running_var": np.ones(2)}
    with pytest.raises(ShapeError, match=r"gamma of shape \(3,\) must broadcast against x"):
        cs231n.batchnorm_forward(rng.standard_normal((4, 2)), np.ones(3), np.zeros(2), bn_param)
    for n in (4, 1):  # bnlab's batch norm, and the batch-of-one path
        with pytest.raises(ValueError, match="eps must be a finite"):
            cs231n.batchnorm_forward(rng.standard_normal((n, 2)), 1, 0, {**bn_param, "eps": 0.0})
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            cs231n.batchnorm_forward(rng.standard_normal((n, 2)), 1, 0, {**bn_param, "momentum": 2})
    np.testing.assert_array_equal(bn_param["running_mean"], 0)


def test_nonfinite_batch_is_not_written_into_the_running_stats(rng):
    """The documented difference: the reference would average the NaN in for good."""
    x = rng.standard_normal((5, 3))
    bn_param = {"mode": "train"}
    cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    before = bn_param["running_mean"].copy(), bn_param["running_var"].copy()
    x[2, 1] = np.nan
    with pytest.warns(NonFiniteBatchWarning):
        out, _ = cs231n.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    assert np.isnan(out[:, 1]).all() and np.isfinite(out[:, [0, 2]]).all()
    np.testing.assert_array_equal(bn_param["running_mean"], before[0])
    np.testing.assert_array_equal(bn_param["running_var"], before[1])


@pytest.mark.parametrize(
    "backward,forward_name",
    [
        (cs231n.batchnorm_backward, "batchnorm_forward"),
        (cs231n.batchnorm_backward_alt, "batchnorm_forward"),
        (cs231n.spatial_batchnorm_backward, "spatial_batchnorm_forward"),
        (cs231n.layernorm_backward, "layernorm_forward"),
        (cs231n.spatial_groupnorm_backward, "spatial_groupnorm_forward"),
    ],
)
def test_foreign_cache_is_a_short_error(rng, backward, forward_name):
    """A student's own cache tuple (8x4 input): a one-line TypeError without the cache's data."""
    x = rng.standard_normal((8, 4))
    student_cache = (x, x.mean(0), x.var(0), np.ones(4), np.zeros(4), 1e-5)
    with pytest.raises(TypeError, match=f"cache must be the cache returned by {forward_name}") as e:
        backward(rng.standard_normal((8, 4)), student_cache)
    assert len(str(e.value)) < 100 and "\n" not in str(e.value)


def test_caches_of_the_other_norm_are_refused(rng):
    x = rng.standard_normal((2, 4, 2, 2))
    _, gn_cache = cs231n.spatial_groupnorm_forward(x, np.ones(4), np.zeros(4), 2, {})
    with pytest.raises(TypeError, match="layernorm_forward"):
        cs231n.layernorm_backward(rng.standard_normal(x.shape), gn_cache)


@pytest.mark.parametrize(
    "x,gamma,exc,match",
    [
        ([[1.0, 2.0]], np.ones(2), DTypeError, "x must be a numpy.ndarray"),
        (np.ones((2, 2), complex), np.ones(2), DTypeError, "x must hold real numbers"),
        (np.ones((2, 2)), np.array(["a", "b"]), DTypeError, "gamma must hold real numbers"),
        (np.ones((2, 2, 1)), np.ones(2), ShapeError, r"x must be 2-D \(N, D\)"),
        (np.ones((2, 2)), np.ones((1, 1, 1)), ShapeError, "gamma of shape"),
    ],
)
def test_inputs_the_reference_cannot_take_are_clear_errors(x, gamma, exc, match):
    with pytest.raises(exc, match=match):
        cs231n.batchnorm_forward(x, gamma, 0.0, {"mode": "train"})


# --------------------------------------------------------------------------- layer and group norm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g_form", ["vector", "row", "full", "list", "scalar"])
def test_layernorm_matches_textbook_and_autograd(rng, backend, g_form):
    x = rng.standard_normal((4, 7)) * 3 - 1
    gamma = make_param(g_form, 4, 7, np.int64 if g_form == "list" else np.float64, rng, 1.0)
    beta = make_param("row", 4, 7, np.float64, rng, 0.0)
    dout = rng.standard_normal(x.shape)
    with backend_set(backend):
        out, cache = cs231n.layernorm_forward(x, gamma, beta, {"eps": 1e-4, "mode": "train"})
        grads = cs231n.layernorm_backward(dout, cache)
    np.testing.assert_allclose(out, textbook_layernorm(x, gamma, beta, 1e-4), atol=1e-12)
    g = np.asarray(gamma, dtype=np.float64)
    ts = [torch.tensor(a, requires_grad=True) for a in (x, g, beta)]
    textbook_layernorm(*ts, 1e-4, xp=torch).backward(torch.tensor(dout))
    for ours, t in zip(grads, ts, strict=True):
        expected = t.grad.numpy().reshape(flat_rows(t.shape))
        assert ours.shape == expected.shape and rel_error(ours, expected) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_shape", ["(1,C,1,1)", "(C,)", "(C,1,1)", "(N,C,1,1)", "int"])
def test_spatial_groupnorm_matches_textbook_and_gradients(rng, backend, param_shape):
    N, C, H, W, G = 2, 6, 3, 2, 3
    shape = {"(1,C,1,1)": (1, C, 1, 1), "(C,)": (C,), "(C,1,1)": (C, 1, 1),
             "(N,C,1,1)": (N, C, 1, 1), "int": (1, C, 1, 1)}[param_shape]  # fmt: skip
    x = rng.standard_normal((N, C, H, W)) + 0.5
    gamma, beta = rng.standard_normal(shape) + 1, rng.standard_normal(shape)
    if param_shape == "int":
        gamma, beta = np.round(gamma * 3).astype(np.int64), np.round(beta * 3).astype(np.int64)
    dout = rng.standard_normal(x.shape)
    with backend_set(backend):
        out, cache = cs231n.spatial_groupnorm_forward(x, gamma, beta, G, {})
        grads = cs231n.spatial_groupnorm_backward(dout, cache)
    per_channel = (1, C, 1, 1)
    g = gamma.reshape(per_channel) if shape == (C,) else gamma
    b = beta.reshape(per_channel) if shape == (C,) else beta
    np.testing.assert_allclose(out, textbook_groupnorm(x, g, b, G), atol=1e-12)
    if param_shape == "int":
        return
    for grad, p in zip(grads, (x, gamma, beta), strict=True):

        def f():
            return cs231n.spatial_groupnorm_forward(x, gamma, beta, G, {})[0]

        assert grad.shape == p.shape
        assert rel_error(grad, numeric_gradient(f, p, dout)) < 1e-6


def test_spatial_groupnorm_bad_gamma(rng):
    with pytest.raises(ShapeError, match=r"gamma of shape \(4, 1\) must broadcast against x"):
        cs231n.spatial_groupnorm_forward(rng.standard_normal((2, 4, 2, 2)), np.ones((4, 1)),
                                         np.zeros(4), 2, {})  # fmt: skip
