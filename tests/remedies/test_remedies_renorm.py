"""Batch Renormalization: against a transcription of Ioffe 2017 (Algorithm 1), against batch norm
when rmax=1, dmax=0, gradients in float64 (numeric and torch autograd, random upstream gradient),
the warm-up schedule, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from remedies_helpers import numeric_grad, rel_err

from bnlab.backend import numba_available
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.functional.renorm import (
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_forward,
    check_renorm_limits,
)

EPS = 1e-5
MOMENTUM = 0.1  # pytorch convention: weight of the new batch


# --------------------------------------------------------------------------- paper transcription


def paper_renorm_nchw(x, gamma, beta, mu, var_run, rmax, dmax, eps=EPS, momentum=MOMENTUM):
    """Ioffe 2017, Algorithm 1, written out per channel with loops, NCHW, pytorch convention for
    the moving averages (σ = sqrt(running_var + ε), see the module docstring)."""
    n, c, h, w = x.shape
    y = np.empty_like(x)
    new_mu, new_var = mu.copy(), var_run.copy()
    r_all, d_all = np.empty(c), np.empty(c)
    for ch in range(c):
        xc = x[:, ch]
        m = xc.size
        mu_b = xc.sum() / m
        var_b = ((xc - mu_b) ** 2).sum() / m
        sigma_b = math.sqrt(var_b + eps)
        sigma = math.sqrt(var_run[ch] + eps)
        r = min(max(sigma_b / sigma, 1.0 / rmax), rmax)
        d = min(max((mu_b - mu[ch]) / sigma, -dmax), dmax)
        xhat = (xc - mu_b) / sigma_b * r + d
        y[:, ch] = gamma[ch] * xhat + beta[ch]
        new_mu[ch] = mu[ch] + momentum * (mu_b - mu[ch])
        new_var[ch] = var_run[ch] + momentum * (var_b * m / (m - 1) - var_run[ch])
        r_all[ch], d_all[ch] = r, d
    return y, new_mu, new_var, r_all, d_all


def _setup(rng, shape=(6, 4, 3, 2), dtype=np.float64):
    c = shape[1]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    # running stats far from the batch's for some channels (clipping active), close for others
    mu = np.array([0.5, 3.0, -4.0, 0.4][:c], dtype)
    var = np.array([4.0, 0.1, 40.0, 3.5][:c], dtype)
    return x, gamma, beta, mu, var


def test_forward_matches_paper_transcription_with_clipping_active(rng):
    x, gamma, beta, mu, var = _setup(rng)
    rmax, dmax = 2.0, 1.0
    y_ref, mu_ref, var_ref, r_ref, d_ref = paper_renorm_nchw(x, gamma, beta, mu, var, rmax, dmax)
    # the setup must exercise both clipped and unclipped channels, or the test proves little
    assert np.any(np.isclose(np.abs(r_ref), rmax) | np.isclose(r_ref, 1 / rmax))
    assert np.any((r_ref < rmax) & (r_ref > 1 / rmax))
    assert np.any(np.isclose(np.abs(d_ref), dmax)) and np.any(np.abs(d_ref) < dmax)
    rm, rv = mu.copy(), var.copy()
    y, cache = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=rm, running_var=rv, rmax=rmax, dmax=dmax,
        momentum=MOMENTUM, backend="numpy",
    )  # fmt: skip
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.r, r_ref, rtol=1e-12)
    np.testing.assert_allclose(cache.d, d_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rm, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(rv, var_ref, rtol=1e-12)


def test_unclipped_renorm_output_equals_the_running_statistics_normalization(rng):
    """With infinite limits r, d undo the batch statistics: y = γ·(x − μ)/σ + β with the running
    μ, σ (the paper's motivation: training then computes inference's function)."""
    x, gamma, beta, mu, var = _setup(rng)
    y, _ = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=mu.copy(), running_var=var.copy(),
        rmax=math.inf, dmax=math.inf, backend="numpy",
    )  # fmt: skip
    shp = (1, -1, 1, 1)
    expected = gamma.reshape(shp) * (x - mu.reshape(shp)) / np.sqrt(var.reshape(shp) + EPS)
    np.testing.assert_allclose(y, expected + beta.reshape(shp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "layout,shape", [("NCHW", (5, 3, 2, 3)), ("NC", (7, 3)), ("NHWC", (4, 2, 3, 3))]
)
def test_rmax1_dmax0_is_batch_norm(rng, layout, shape):
    x = rng.standard_normal(shape) * 3 + 1
    c = shape[-1] if layout == "NHWC" else shape[1]
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    buffers = [(rng.standard_normal(c), rng.uniform(0.1, 5, c)) for _ in range(2)]
    buffers[1] = (buffers[0][0].copy(), buffers[0][1].copy())
    (rm1, rv1), (rm2, rv2) = buffers
    kw = dict(training=True, layout=layout, backend="numpy")
    y_bn, c_bn = batch_norm_forward(x, gamma, beta, running_mean=rm1, running_var=rv1, **kw)
    y_rn, c_rn = batch_renorm_forward(
        x, gamma, beta, running_mean=rm2, running_var=rv2, rmax=1.0, dmax=0.0, **kw
    )
    np.testing.assert_allclose(y_rn, y_bn, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(rm2, rm1)
    np.testing.assert_array_equal(rv2, rv1)
    dout = rng.standard_normal(shape)
    for got, want in zip(
        batch_renorm_backward(dout, c_rn), batch_norm_backward(dout, c_bn), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_inference_is_batch_norm_inference(rng):
    x, gamma, beta, mu, var = _setup(rng)
    y, cache = batch_renorm_forward(
        x, gamma, beta, training=False, running_mean=mu, running_var=var, rmax=2.0, dmax=1.0
    )
    y_bn, c_bn = batch_norm_forward(
        x, gamma, beta, training=False, running_mean=mu, running_var=var
    )
    np.testing.assert_allclose(y, y_bn, rtol=1e-13)
    dout = rng.standard_normal(x.shape)
    for got, want in zip(
        batch_renorm_backward(dout, cache), batch_norm_backward(dout, c_bn), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- gradients


def _renorm_fixed_rd(x, gamma, beta, r, d):
    """The training forward with r and d held constant (the paper's stop-gradient)."""
    axes, shp = (0, 2, 3), (1, -1, 1, 1)
    mu = x.mean(axis=axes, keepdims=True)
    sigma_b = np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + EPS)
    xhat = (x - mu) / sigma_b * r.reshape(shp) + d.reshape(shp)
    return gamma.reshape(shp) * xhat + beta.reshape(shp)


def test_backward_matches_numeric_gradient_with_r_d_constant(rng):
    x, gamma, beta, mu, var = _setup(rng, shape=(4, 4, 2, 2))
    y, cache = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=mu.copy(), running_var=var.copy(),
        rmax=2.0, dmax=1.0, backend="numpy",
    )  # fmt: skip
    dout = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = batch_renorm_backward(dout, cache)
    r, d = cache.r.copy(), cache.d.copy()

    def loss():
        return float((dout * _renorm_fixed_rd(x, gamma, beta, r, d)).sum())

    assert rel_err(dx, numeric_grad(loss, x)) < 1e-7
    assert rel_err(dgamma, numeric_grad(loss, gamma)) < 1e-7
    assert rel_err(dbeta, numeric_grad(loss, beta)) < 1e-7


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_backward_matches_torch_autograd_with_detached_r_d(rng, layout):
    torch = pytest.importorskip("torch")
    x, gamma, beta, mu, var = _setup(rng, shape=(5, 4, 3, 3))
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    rmax, dmax = 1.5, 0.5
    y, cache = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=mu.copy(), running_var=var.copy(),
        rmax=rmax, dmax=dmax, layout=layout, backend="numpy",
    )  # fmt: skip
    dout = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = batch_renorm_backward(dout, cache)

    tx = torch.tensor(x if layout == "NCHW" else x.transpose(0, 3, 1, 2), requires_grad=True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    mu_b = tx.mean(dim=(0, 2, 3))
    sigma_b = torch.sqrt(tx.var(dim=(0, 2, 3), unbiased=False) + EPS)
    sigma = torch.sqrt(torch.tensor(var) + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mu_b - torch.tensor(mu)) / sigma, -dmax, dmax).detach()
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    ty = v(tg) * ((tx - v(mu_b)) / v(sigma_b) * v(r) + v(d)) + v(tb)
    tdout = torch.tensor(dout if layout == "NCHW" else dout.transpose(0, 3, 1, 2))
    ty.backward(tdout)
    tdx = tx.grad.numpy() if layout == "NCHW" else tx.grad.numpy().transpose(0, 2, 3, 1)
    ty_np = ty.detach().numpy()
    np.testing.assert_allclose(
        y, ty_np if layout == "NCHW" else ty_np.transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(dx, tdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not numba_available(), reason="bnlab.kernels (numba backend) not present yet")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_numba_backend_matches_reference(rng, layout):
    x, gamma, beta, mu, var = _setup(rng, shape=(8, 4, 5, 5), dtype=np.float32)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    elif layout == "NC":
        x = np.ascontiguousarray(x[:, :, 0, 0])
    dout = rng.standard_normal(x.shape).astype(np.float32)
    outs = {}
    for backend in ("numpy", "numba"):
        rm, rv = mu.copy(), var.copy()
        y, cache = batch_renorm_forward(
            x, gamma, beta, training=True, running_mean=rm, running_var=rv, rmax=2.0, dmax=1.0,
            layout=layout, backend=backend,
        )  # fmt: skip
        outs[backend] = (y, rm, rv, cache.r, cache.d, *batch_renorm_backward(dout, cache))
    for a, b in zip(outs["numpy"], outs["numba"], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- schedule


def test_schedule_warms_up_then_ramps_linearly_to_the_final_limits():
    s = RenormSchedule(rmax=3.0, dmax=5.0, warmup_steps=100, rmax_full_step=500, dmax_full_step=300)
    assert s(0) == (1.0, 0.0) and s(100) == (1.0, 0.0)
    assert s(300) == pytest.approx((2.0, 5.0))  # rmax halfway, dmax just complete
    assert s(200) == pytest.approx((1.5, 2.5))
    assert s(500) == (3.0, 5.0) and s(10**9) == (3.0, 5.0)
    steps = range(0, 600, 7)
    rmaxes = [s(k)[0] for k in steps]
    assert rmaxes == sorted(rmaxes)


def test_schedule_limits_drive_the_forward(rng):
    """At step 0 the schedule gives batch norm; the forward accepts its output directly."""
    x, gamma, beta, mu, var = _setup(rng)
    rmax, dmax = RenormSchedule()(0)
    y, _ = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=mu.copy(), running_var=var.copy(),
        rmax=rmax, dmax=dmax,
    )  # fmt: skip
    y_bn, _ = batch_norm_forward(x, gamma, beta, training=True)
    np.testing.assert_allclose(y, y_bn, rtol=1e-12, atol=1e-12)


@pytest.mark.reliability
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rmax=0.5), "rmax must be >= 1"),
        (dict(dmax=-0.1), "dmax must be >= 0"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=10, rmax_full_step=5), "rmax_full_step must be >= warmup_steps"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RenormSchedule(**kwargs)


# --------------------------------------------------------------------------- bad input


@pytest.mark.reliability
@pytest.mark.parametrize(
    "rmax,dmax,exc,match",
    [
        (0.99, 1.0, ValueError, "rmax must be >= 1"),
        (0.0, 1.0, ValueError, "rmax must be >= 1"),
        (math.nan, 1.0, ValueError, "rmax must be >= 1"),
        (2.0, -1e-9, ValueError, "dmax must be >= 0"),
        (2.0, math.nan, ValueError, "dmax must be >= 0"),
        ("3", 1.0, TypeError, "rmax must be a float"),
        (2.0, True, TypeError, "dmax must be a float"),
    ],
)
def test_bad_limits_raise_and_leave_buffers_untouched(rng, rmax, dmax, exc, match):
    x, gamma, beta, mu, var = _setup(rng)
    rm, rv = mu.copy(), var.copy()
    with pytest.raises(exc, match=match):
        batch_renorm_forward(
            x, gamma, beta, training=True, running_mean=rm, running_var=rv, rmax=rmax, dmax=dmax
        )
    np.testing.assert_array_equal(rm, mu)
    np.testing.assert_array_equal(rv, var)
    with pytest.raises(exc, match=match):
        check_renorm_limits(rmax, dmax)


@pytest.mark.reliability
def test_missing_running_stats_is_a_clear_error(rng):
    x, gamma, beta, mu, _ = _setup(rng)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_renorm_forward(x, gamma, beta, training=True, running_mean=mu, running_var=None)


@pytest.mark.reliability
def test_nonfinite_batch_leaves_buffers_untouched(rng):
    x, gamma, beta, mu, var = _setup(rng)
    x[0, 1, 0, 0] = np.nan
    rm, rv = mu.copy(), var.copy()
    with pytest.warns(NonFiniteBatchWarning):
        batch_renorm_forward(x, gamma, beta, training=True, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, mu)
    np.testing.assert_array_equal(rv, var)
    with pytest.raises(NonFiniteError):
        batch_renorm_forward(
            x, gamma, beta, training=True, running_mean=rm, running_var=rv, on_nonfinite="raise"
        )
    np.testing.assert_array_equal(rm, mu)


@pytest.mark.reliability
def test_single_value_per_channel_is_refused(rng):
    x = rng.standard_normal((1, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_renorm_forward(
            x, None, None, training=True, running_mean=rm, running_var=rv, layout="NC"
        )
    np.testing.assert_array_equal(rv, np.ones(3))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_float16_input_and_large_mean(rng, backend):
    """float16 is computed in float32 (its statistics too); a mean of 1e4 (float32) or 1e6
    (float64) does not cancel the variance (Flax's "large mean" test)."""
    if backend == "numba" and not numba_available():
        pytest.skip("numba backend not present")
    x, gamma, beta, mu, var = _setup(rng, shape=(6, 4, 3, 3))
    rm, rv = mu.copy(), var.copy()
    y16, _ = batch_renorm_forward(
        x.astype(np.float16), gamma, beta, training=True, running_mean=rm.astype(np.float32),
        running_var=rv.astype(np.float32), rmax=2.0, dmax=1.0, backend=backend,
    )  # fmt: skip
    y64, _ = batch_renorm_forward(
        x, gamma, beta, training=True, running_mean=rm.copy(), running_var=rv.copy(), rmax=2.0,
        dmax=1.0, backend=backend,
    )  # fmt: skip
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16, y64, rtol=5e-3, atol=5e-3)
    for offset, dtype, tol in ((1e4, np.float32, 2e-3), (1e6, np.float64, 1e-8)):
        yb, _ = batch_renorm_forward(
            (x + offset).astype(dtype), gamma, beta, training=True,
            running_mean=(mu + offset).astype(dtype), running_var=var.astype(dtype), rmax=2.0,
            dmax=1.0, backend=backend,
        )  # fmt: skip
        np.testing.assert_allclose(yb, y64, rtol=tol, atol=tol)
