"""Every backward of the family vs central differences, in float64, with a random upstream gradient.

L = Σ dout · f(x, γ, β) with a random ``dout`` (never ones: batch norm's dx is then 0 whatever
the bug). Shapes cover C=1, N=2 and odd sizes in every layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from fn_support import LAYOUT_SHAPES, channels, random_affine, random_buffers

from bnlab import functional as F
from bnlab.check import TOLERANCES, numeric_gradient, rel_error

TOL = TOLERANCES["numeric"]


def _check_grads(forward, backward, params, dout):
    """Compare backward(dout, cache) against numeric gradients for each array in ``params``.

    ``forward()`` reads the arrays of ``params`` (perturbed in place by the numeric gradient).
    """
    _, cache = forward()
    analytic = backward(dout, cache)
    for name, p, a in zip(("dx", "dgamma", "dbeta"), params, analytic, strict=True):
        num = numeric_gradient(lambda: forward()[0], p, dout)
        assert a.shape == p.shape, name
        err = rel_error(a, num)
        assert err < TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("backward", [F.batch_norm_backward, F.batch_norm_backward_graph])
def test_batch_norm_train_numeric(rng, layout, shape, backward):
    x = rng.standard_normal(shape) * 1.5 + 0.3
    g, b = random_affine(rng, channels(shape, layout))
    dout = rng.standard_normal(shape)

    def forward():
        return F.batch_norm_forward(x, g, b, training=True, layout=layout)

    _check_grads(forward, backward, (x, g, b), dout)


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
def test_batch_norm_eval_numeric(rng, layout, shape):
    c = channels(shape, layout)
    x = rng.standard_normal(shape)
    g, b = random_affine(rng, c)
    rm, rv = random_buffers(rng, c)
    dout = rng.standard_normal(shape)

    def forward():
        return F.batch_norm_forward(
            x, g, b, training=False, running_mean=rm, running_var=rv, layout=layout
        )

    _check_grads(forward, F.batch_norm_backward, (x, g, b), dout)


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
def test_graph_backward_matches_closed_form(rng, layout, shape):
    x = rng.standard_normal(shape) * 3 - 1
    g, b = random_affine(rng, channels(shape, layout))
    dout = rng.standard_normal(shape)
    _, cache = F.batch_norm_forward(x, g, b, training=True, layout=layout)
    for a, c in zip(
        F.batch_norm_backward(dout, cache), F.batch_norm_backward_graph(dout, cache), strict=True
    ):
        assert rel_error(a, c) < TOLERANCES["graph"]


def test_batch_norm_without_affine_has_gamma_one_gradients(rng):
    """gamma=None behaves as γ=1, β=0; dgamma/dbeta are still returned."""
    x, dout = rng.standard_normal((4, 3, 2, 3)), rng.standard_normal((4, 3, 2, 3))
    y0, c0 = F.batch_norm_forward(x, None, None, training=True)
    y1, c1 = F.batch_norm_forward(x, np.ones(3), np.zeros(3), training=True)
    np.testing.assert_allclose(y0, y1, rtol=0, atol=1e-14)
    for a, b in zip(F.batch_norm_backward(dout, c0), F.batch_norm_backward(dout, c1), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


LN_CASES = [
    ((2, 1), 1),
    ((3, 5), 1),
    ((2, 3, 5), 1),
    ((2, 3, 5), 2),
    ((3, 2, 3, 1), 3),
    ((2, 3, 1, 4), 1),
]


@pytest.mark.parametrize("shape,k", LN_CASES)
def test_layer_norm_numeric(rng, shape, k):
    normalized = shape[len(shape) - k :]
    x = rng.standard_normal(shape) * 2 + 0.7
    g = rng.standard_normal(normalized) * 0.5 + 1
    b = rng.standard_normal(normalized)
    dout = rng.standard_normal(shape)
    _check_grads(
        lambda: F.layer_norm_forward(x, normalized, g, b), F.layer_norm_backward, (x, g, b), dout
    )


def _group_counts(c):
    return sorted({1, c} | ({2} if c % 2 == 0 else set()))


GN_CASES = [
    (lay, shape, g) for lay, shape in LAYOUT_SHAPES for g in _group_counts(channels(shape, lay))
]


@pytest.mark.parametrize("layout,shape,groups", GN_CASES)
def test_group_norm_numeric(rng, layout, shape, groups):
    x = rng.standard_normal(shape) * 2 - 0.4
    g, b = random_affine(rng, channels(shape, layout))
    dout = rng.standard_normal(shape)
    _check_grads(
        lambda: F.group_norm_forward(x, groups, g, b, layout=layout),
        F.group_norm_backward,
        (x, g, b),
        dout,
    )


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
def test_instance_norm_numeric(rng, layout, shape):
    x = rng.standard_normal(shape) + 2.0
    g, b = random_affine(rng, channels(shape, layout))
    dout = rng.standard_normal(shape)
    _check_grads(
        lambda: F.instance_norm_forward(x, g, b, layout=layout),
        F.instance_norm_backward,
        (x, g, b),
        dout,
    )


def test_numeric_gradient_helper_is_right(rng):
    """The checker itself: for f(p) = p³, ∂(Σ dout·f)/∂p = 3p²·dout."""
    p = rng.standard_normal((3, 4))
    dout = rng.standard_normal((3, 4))
    num = numeric_gradient(lambda: p**3, p, dout)
    np.testing.assert_allclose(num, 3 * p**2 * dout, rtol=1e-8, atol=1e-9)


def test_ones_upstream_gradient_would_hide_bugs(rng):
    """Why every test uses a random dout: with dout = 1, batch norm's training dx is 0."""
    x = rng.standard_normal((4, 3))
    _, cache = F.batch_norm_forward(x, None, None, training=True, layout="NC")
    dx, _, _ = F.batch_norm_backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx, 0, atol=1e-12)
