"""Pure fold functions vs PyTorch fusion utilities and vs running the unfolded layers (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.errors import DTypeError, ShapeError
from bnlab.fold import bn_scale_shift, fold_bn_conv, fold_bn_linear, fold_conv_bn

torch = pytest.importorskip("torch")
F = torch.nn.functional
EPS = 1e-5


def _bn(rng, c):
    """Random BN state: (mean, var, gamma, beta), float64, var bounded away from 0."""
    return (
        rng.standard_normal(c),
        rng.uniform(0.2, 2.0, c),
        rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c),
        rng.standard_normal(c),
    )


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _bn_ref(z, mean, var, gamma, beta):
    return F.batch_norm(_t(z), _t(mean), _t(var), _t(gamma), _t(beta), False, 0.0, EPS).numpy()


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "with_bias"),
    [(4, 6, 1, False), (4, 6, 2, True), (6, 6, 6, False), (3, 9, 3, True)],  # plain/grouped/dw
)
def test_fold_conv_bn_matches_torch_fuse_and_unfolded(rng, c_in, c_out, groups, with_bias):
    w = rng.standard_normal((c_out, c_in // groups, 3, 3))
    b = rng.standard_normal(c_out) if with_bias else None
    mean, var, gamma, beta = _bn(rng, c_out)
    w2, b2 = fold_conv_bn(w, b, mean, var, EPS, gamma, beta)

    tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(
        _t(w), None if b is None else _t(b), _t(mean), _t(var), EPS, _t(gamma), _t(beta)
    )
    np.testing.assert_allclose(w2, tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-12, atol=1e-14)

    x = rng.standard_normal((2, c_in, 7, 6))
    conv = F.conv2d(_t(x), _t(w), None if b is None else _t(b), stride=2, padding=1, groups=groups)
    ref = _bn_ref(conv.numpy(), mean, var, gamma, beta)
    out = F.conv2d(_t(x), _t(w2), _t(b2), stride=2, padding=1, groups=groups).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_fold_conv_bn_linear_matches_torch_fuse_linear(rng):
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    mean, var, gamma, beta = _bn(rng, 5)
    w2, b2 = fold_conv_bn(w, b, mean, var, EPS, gamma, beta)
    tw, tb = torch.nn.utils.fusion.fuse_linear_bn_weights(
        _t(w), _t(b), _t(mean), _t(var), EPS, _t(gamma), _t(beta)
    )
    np.testing.assert_allclose(w2, tw.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-12)


def test_fold_keeps_float32_dtype(rng):
    w = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    mean, var, gamma, beta = (a.astype(np.float32) for a in _bn(rng, 4))
    w2, b2 = fold_conv_bn(w, None, mean, var, EPS, gamma, beta)
    assert w2.dtype == b2.dtype == np.float32


@pytest.mark.parametrize(("groups", "stride"), [(1, 1), (2, 2), (4, 1)])
def test_fold_bn_conv_exact_without_padding(rng, groups, stride):
    c_in, c_out = 4, 8
    w = rng.standard_normal((c_out, c_in // groups, 3, 3))
    b = rng.standard_normal(c_out)
    mean, var, gamma, beta = _bn(rng, c_in)
    x = rng.standard_normal((2, c_in, 8, 7)) * 3 + 1
    ref = F.conv2d(
        _t(_bn_ref(x, mean, var, gamma, beta)), _t(w), _t(b), stride=stride, groups=groups
    ).numpy()
    w2, b2 = fold_bn_conv(mean, var, EPS, gamma, beta, w, b, padding=0, groups=groups)
    out = F.conv2d(_t(x), _t(w2), _t(b2), stride=stride, groups=groups).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_fold_bn_conv_refuses_padding_and_approximate_is_exact_inside_only(rng):
    c_in, c_out = 3, 5
    w, b = rng.standard_normal((c_out, c_in, 3, 3)), None
    mean, var, gamma, beta = _bn(rng, c_in)
    with pytest.raises(ValueError, match="zero-pads its input.*approximate=True"):
        fold_bn_conv(mean, var, EPS, gamma, beta, w, b, padding=1)
    with pytest.raises(ValueError, match="zero-pads"):
        fold_bn_conv(mean, var, EPS, gamma, beta, w, b, padding=(0, 1))

    x = rng.standard_normal((1, c_in, 6, 6))
    ref = F.conv2d(_t(_bn_ref(x, mean, var, gamma, beta)), _t(w), padding=1).numpy()
    w2, b2 = fold_bn_conv(mean, var, EPS, gamma, beta, w, b, padding=1, approximate=True)
    out = F.conv2d(_t(x), _t(w2), _t(b2), padding=1).numpy()
    np.testing.assert_allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-10, atol=1e-10)
    border_err = np.abs(out - ref)[..., 0, :].max()
    assert border_err > 1e-3  # the documented border error is real, not hypothetical


def test_fold_bn_linear_exact(rng):
    w, b = rng.standard_normal((4, 6)), rng.standard_normal(4)
    mean, var, gamma, beta = _bn(rng, 6)
    x = rng.standard_normal((5, 6)) * 2 - 1
    ref = _bn_ref(x, mean, var, gamma, beta) @ w.T + b
    w2, b2 = fold_bn_linear(mean, var, EPS, gamma, beta, w, b)
    np.testing.assert_allclose(x @ w2.T + b2, ref, rtol=1e-12, atol=1e-12)


def test_scale_shift_without_affine(rng):
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 1.5, 3)
    s, t = bn_scale_shift(None, None, mean, var, EPS)
    np.testing.assert_allclose(s, 1 / np.sqrt(var + EPS))
    np.testing.assert_allclose(t, -mean / np.sqrt(var + EPS))


def test_fold_bad_input_names_the_argument(rng):
    w = rng.standard_normal((4, 2, 3, 3))
    mean, var, gamma, beta = _bn(rng, 4)
    with pytest.raises(ShapeError, match="running_mean must have shape \\(4,\\)"):
        fold_conv_bn(w, None, mean[:3], var, EPS, gamma, beta)
    with pytest.raises(ShapeError, match="bias must have shape"):
        fold_conv_bn(w, np.zeros(3), mean, var, EPS, gamma, beta)
    with pytest.raises(DTypeError, match="weight must be a floating-point"):
        fold_conv_bn(w.astype(int), None, mean, var, EPS, gamma, beta)
    with pytest.raises(ValueError, match="running_var must be >= 0"):
        fold_conv_bn(w, None, mean, -var, EPS, gamma, beta)
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        fold_conv_bn(w, None, mean, var, 0.0, gamma, beta)
    with pytest.raises(ShapeError, match="running_mean \\(C_in=2"):
        fold_bn_conv(mean, var, EPS, gamma, beta, w)
    with pytest.raises(ShapeError, match="not divisible by groups=3"):
        fold_bn_conv(mean, var, EPS, gamma, beta, w, groups=3)


@pytest.mark.parametrize("bad", ["mean_nan", "var_nan", "gamma_inf", "eps_inf"])
def test_fold_refuses_non_finite_statistics_and_eps(bad):
    """A NaN running statistic or eps=inf must not turn into NaN or zero folded weights."""
    from bnlab.errors import NonFiniteError
    from bnlab.fold import bn_scale_shift

    g, b, m, v = np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)
    eps = 1e-5
    if bad == "mean_nan":
        m[1] = np.nan
    elif bad == "var_nan":
        v[0] = np.nan
    elif bad == "gamma_inf":
        g[2] = np.inf
    else:
        eps = float("inf")
    with pytest.raises((NonFiniteError, ValueError), match="NaN or Inf|eps"):
        bn_scale_shift(g, b, m, v, eps)
