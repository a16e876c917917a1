"""Ghost Batch Norm: against a transcription of Hoffer et al. 2017, against batch norm when the
virtual batch is the batch, the remainder rule, both running-statistics rules, gradients in float64
(numeric and torch autograd, random upstream gradient), and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from remedies_helpers import numeric_grad, rel_err

from bnlab.backend import numba_available
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.functional.ghost import (
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    virtual_batches,
)

EPS = 1e-5
W = 0.1  # pytorch momentum: weight of the new batch


def paper_ghost_nchw(x, gamma, beta, vbs, eps=EPS):
    """Hoffer et al. 2017, Algorithm 1 (normalization part): per virtual batch l of |B_S| samples,
    μ_l = mean, σ_l = sqrt(mean((x − μ_l)²) + ε), x̂ = (x − μ_l)/σ_l, y = γ·x̂ + β. Returns y and
    the per-virtual-batch (μ_l, biased σ²_l, number of values per channel)."""
    y = np.empty_like(x)
    stats = []
    for start in range(0, x.shape[0], vbs):
        xb = x[start : start + vbs]
        m = xb.shape[0] * xb.shape[2] * xb.shape[3]
        mu = xb.sum(axis=(0, 2, 3)) / m
        var = ((xb - mu[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)) / m
        xhat = (xb - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
        y[start : start + vbs] = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
        stats.append((mu, var, m))
    return y, stats


def _setup(rng, shape=(12, 3, 2, 2)):
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + np.arange(shape[0]).reshape(-1, 1, 1, 1) * 0.3
    return (
        x,
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        rng.standard_normal(c),
        rng.uniform(0.5, 2, c),
    )


@pytest.mark.parametrize("n,vbs", [(12, 4), (12, 3), (10, 4), (7, 2)])
def test_forward_matches_paper_transcription(rng, n, vbs):
    x, gamma, beta, _, _ = _setup(rng, (n, 3, 2, 2))
    y_ref, _ = paper_ghost_nchw(x, gamma, beta, vbs)
    y, cache = ghost_batch_norm_forward(x, gamma, beta, training=True, virtual_batch_size=vbs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert [s.stop - s.start for s in cache.slices] == [min(vbs, n - i) for i in range(0, n, vbs)]


def test_running_update_mean_rule_matches_direct_formula(rng):
    """One update per call with the sample-weighted mean over virtual batches (remainder too)."""
    x, gamma, beta, mu0, var0 = _setup(rng, (10, 3, 2, 2))
    _, stats = paper_ghost_nchw(x, gamma, beta, 4)  # virtual batches of 4, 4, 2 samples
    sizes = np.array([4, 4, 2]) / 10
    mean_bar = sum(s * mu for s, (mu, _, _) in zip(sizes, stats, strict=True))
    var_bar = sum(s * var * m / (m - 1) for s, (_, var, m) in zip(sizes, stats, strict=True))
    rm, rv, nbt = mu0.copy(), var0.copy(), np.array(0)
    ghost_batch_norm_forward(
        x, gamma, beta, training=True, virtual_batch_size=4, running_mean=rm, running_var=rv,
        num_batches_tracked=nbt,
    )  # fmt: skip
    np.testing.assert_allclose(rm, (1 - W) * mu0 + W * mean_bar, rtol=1e-12)
    np.testing.assert_allclose(rv, (1 - W) * var0 + W * var_bar, rtol=1e-12)
    assert int(nbt) == 1


def test_running_update_sequential_rule_is_one_ema_step_per_virtual_batch(rng):
    x, gamma, beta, mu0, var0 = _setup(rng, (10, 3, 2, 2))
    _, stats = paper_ghost_nchw(x, gamma, beta, 4)
    em, ev = mu0.copy(), var0.copy()
    for mu, var, m in stats:
        em = (1 - W) * em + W * mu
        ev = (1 - W) * ev + W * var * m / (m - 1)
    rm, rv, nbt = mu0.copy(), var0.copy(), np.array(0)
    ghost_batch_norm_forward(
        x, gamma, beta, training=True, virtual_batch_size=4, running_mean=rm, running_var=rv,
        num_batches_tracked=nbt, running_update="sequential",
    )  # fmt: skip
    np.testing.assert_allclose(rm, em, rtol=1e-12)
    np.testing.assert_allclose(rv, ev, rtol=1e-12)
    assert int(nbt) == 3


@pytest.mark.parametrize("running_update", ["mean", "sequential"])
@pytest.mark.parametrize(
    "layout,shape", [("NCHW", (6, 3, 2, 2)), ("NC", (9, 4)), ("NHWC", (5, 2, 2, 3))]
)
@pytest.mark.parametrize("extra", [0, 5])  # virtual batch = batch, and larger than the batch
def test_virtual_batch_equal_to_batch_is_batch_norm(rng, running_update, layout, shape, extra):
    x = rng.standard_normal(shape) + 2
    c = shape[-1] if layout == "NHWC" else shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm1, rv1 = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    rm2, rv2 = rm1.copy(), rv1.copy()
    kw = dict(training=True, layout=layout)
    y_bn, c_bn = batch_norm_forward(x, gamma, beta, running_mean=rm1, running_var=rv1, **kw)
    y_gh, c_gh = ghost_batch_norm_forward(
        x, gamma, beta, running_mean=rm2, running_var=rv2, virtual_batch_size=shape[0] + extra,
        running_update=running_update, **kw,
    )  # fmt: skip
    np.testing.assert_allclose(y_gh, y_bn, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(rm2, rm1, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(rv2, rv1, rtol=1e-14)
    dout = rng.standard_normal(shape)
    got, want = ghost_batch_norm_backward(dout, c_gh), batch_norm_backward(dout, c_bn)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_inference_ignores_virtual_batches(rng):
    x, gamma, beta, mu, var = _setup(rng)
    y, cache = ghost_batch_norm_forward(
        x, gamma, beta, training=False, virtual_batch_size=3, running_mean=mu, running_var=var
    )
    y_bn, c_bn = batch_norm_forward(
        x, gamma, beta, training=False, running_mean=mu, running_var=var
    )
    np.testing.assert_array_equal(y, y_bn)
    dout = rng.standard_normal(x.shape)
    for a, b in zip(
        ghost_batch_norm_backward(dout, cache), batch_norm_backward(dout, c_bn), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- gradients


def test_backward_matches_numeric_gradient(rng):
    x, gamma, beta, _, _ = _setup(rng, (7, 3, 2, 2))  # virtual batches of 3, 3, 1 samples
    y, cache = ghost_batch_norm_forward(x, gamma, beta, training=True, virtual_batch_size=3)
    dout = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = ghost_batch_norm_backward(dout, cache)

    def loss():
        return float((dout * paper_ghost_nchw(x, gamma, beta, 3)[0]).sum())

    assert rel_err(dx, numeric_grad(loss, x)) < 1e-7
    assert rel_err(dgamma, numeric_grad(loss, gamma)) < 1e-7
    assert rel_err(dbeta, numeric_grad(loss, beta)) < 1e-7


def test_backward_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    x, gamma, beta, _, _ = _setup(rng, (10, 3, 3, 2))
    y, cache = ghost_batch_norm_forward(x, gamma, beta, training=True, virtual_batch_size=4)
    dout = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = ghost_batch_norm_backward(dout, cache)
    tx = torch.tensor(x, requires_grad=True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    ty = torch.cat(
        [
            torch.nn.functional.batch_norm(ch, None, None, tg, tb, True, 0.0, EPS)
            for ch in tx.split(4)
        ]
    )
    ty.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not numba_available(), reason="bnlab.kernels (numba backend) not present yet")
def test_numba_backend_matches_reference(rng):
    x = rng.standard_normal((16, 4, 5, 5)).astype(np.float32)
    gamma, beta = np.ones(4, np.float32) * 1.3, np.zeros(4, np.float32) + 0.2
    dout = rng.standard_normal(x.shape).astype(np.float32)
    res = {}
    for backend in ("numpy", "numba"):
        rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
        y, cache = ghost_batch_norm_forward(
            x, gamma, beta, training=True, virtual_batch_size=6, running_mean=rm, running_var=rv,
            backend=backend,
        )  # fmt: skip
        res[backend] = (y, rm, rv, *ghost_batch_norm_backward(dout, cache))
    for a, b in zip(res["numpy"], res["numba"], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- bad input


def test_virtual_batches_split_like_torch_split():
    assert virtual_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert virtual_batches(3, 8) == [slice(0, 3)]


@pytest.mark.reliability
@pytest.mark.parametrize(
    "vbs,exc,match",
    [
        (0, ValueError, "virtual_batch_size must be >= 1"),
        (-2, ValueError, "virtual_batch_size must be >= 1"),
        (2.5, TypeError, "virtual_batch_size must be a positive integer"),
        (True, TypeError, "virtual_batch_size must be a positive integer"),
        (None, TypeError, "virtual_batch_size must be a positive integer"),
    ],
)
def test_bad_virtual_batch_size_raises_and_leaves_buffers(rng, vbs, exc, match):
    x, gamma, beta, mu, var = _setup(rng)
    rm, rv = mu.copy(), var.copy()
    with pytest.raises(exc, match=match):
        ghost_batch_norm_forward(
            x, gamma, beta, training=True, virtual_batch_size=vbs, running_mean=rm, running_var=rv
        )
    np.testing.assert_array_equal(rm, mu)
    np.testing.assert_array_equal(rv, var)


@pytest.mark.reliability
def test_remainder_of_one_value_per_channel_is_refused_naming_the_argument(rng):
    x = rng.standard_normal((9, 3))  # NC: 9 = 4 + 4 + 1 -> last virtual batch has 1 value
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 .* sizes \[4, 4, 1\]"):
        ghost_batch_norm_forward(
            x, None, None, training=True, virtual_batch_size=4, layout="NC", running_mean=rm,
            running_var=rv,
        )  # fmt: skip
    np.testing.assert_array_equal(rm, np.zeros(3))
    # with spatial positions a single-sample remainder still has several values per channel
    y, _ = ghost_batch_norm_forward(
        rng.standard_normal((9, 3, 2, 2)), None, None, training=True, virtual_batch_size=4
    )
    assert np.isfinite(y).all()


@pytest.mark.reliability
def test_bad_running_update_name(rng):
    x, gamma, beta, _, _ = _setup(rng)
    with pytest.raises(ValueError, match="running_update must be one of"):
        ghost_batch_norm_forward(
            x, gamma, beta, training=True, virtual_batch_size=4, running_update="hoffer"
        )


@pytest.mark.reliability
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("running_update", ["mean", "sequential"])
def test_nonfinite_virtual_batch_leaves_buffers_untouched(rng, running_update):
    x, gamma, beta, mu, var = _setup(rng)
    x[-1, 0, 0, 0] = np.inf  # only the last virtual batch is bad
    rm, rv = mu.copy(), var.copy()
    kw = dict(
        training=True, virtual_batch_size=4, running_mean=rm, running_var=rv,
        running_update=running_update,
    )  # fmt: skip
    with pytest.warns(NonFiniteBatchWarning):
        ghost_batch_norm_forward(x, gamma, beta, **kw)
    np.testing.assert_array_equal(rm, mu)
    np.testing.assert_array_equal(rv, var)
    with pytest.raises(NonFiniteError):
        ghost_batch_norm_forward(x, gamma, beta, on_nonfinite="raise", **kw)
    np.testing.assert_array_equal(rm, mu)


@settings(max_examples=15)
@given(
    n=st.integers(2, 13),
    vbs=st.integers(1, 15),
    c=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_any_split_equals_batch_norm_per_slice(n, vbs, c, seed):
    """For any N and virtual_batch_size: output = batch norm of each torch.split slice, and the
    backward = the per-slice backwards (NCHW with 2x2 spatial, so every slice is valid)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, 2, 2)) * 3 + 5
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    dout = rng.standard_normal(x.shape)
    y, cache = ghost_batch_norm_forward(
        x, gamma, beta, training=True, virtual_batch_size=vbs, backend="numpy"
    )
    dx, dgamma, dbeta = ghost_batch_norm_backward(dout, cache)
    dg_sum, db_sum = np.zeros(c), np.zeros(c)
    for start in range(0, n, vbs):
        s = slice(start, start + vbs)
        y_s, c_s = batch_norm_forward(x[s], gamma, beta, training=True, backend="numpy")
        np.testing.assert_allclose(y[s], y_s, rtol=1e-12, atol=1e-12)
        dx_s, dg, db = batch_norm_backward(dout[s], c_s)
        np.testing.assert_allclose(dx[s], dx_s, rtol=1e-10, atol=1e-12)
        dg_sum, db_sum = dg_sum + dg, db_sum + db
    np.testing.assert_allclose(dgamma, dg_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, db_sum, rtol=1e-12, atol=1e-12)
