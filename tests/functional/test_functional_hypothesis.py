"""Property tests over shapes, layouts and dtypes.

Every result computed in float16/float32/float64 must be within ``dtype_tolerance(dtype, κ)`` (the
per-dtype tolerances are stated once, in :mod:`bnlab.check`; κ is the input's centering condition
number) of the same computation in float64 on the same (rounded) values; float64 results satisfy
the defining properties of the normalization.
"""

from __future__ import annotations

import os

import numpy as np
from fn_support import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab.check import centering_condition, dtype_tolerance, rel_error
from bnlab.functional._layout import LAYOUTS, get_layout

DTYPES = [np.float16, np.float32, np.float64]
EXAMPLES = int(os.environ.get("BNLAB_HYPOTHESIS_EXAMPLES", "40"))


@st.composite
def problems(draw, min_per_channel=2, channel_multiple=1):
    """(layout, x, dout, gamma, beta) in float64, and the dtype to test in."""
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    lay = get_layout(layout)
    c = channel_multiple * draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 4)) for _ in range(lay.ndim)]
    dims[0] = draw(st.integers(1, 5))
    dims[lay.channel_axis] = c
    per_channel = int(np.prod(dims)) // c
    if per_channel < min_per_channel:
        dims[0] *= min_per_channel
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    offset = scale * draw(st.sampled_from([0.0, -3.0, 10.0]))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dims) * scale + offset
    dout = rng.standard_normal(dims)
    gamma = rng.standard_normal(c) * 0.5 + 1
    beta = rng.standard_normal(c)
    # round every input to the tested dtype once: both computations see the same values
    x, dout, gamma, beta = (a.astype(dtype).astype(np.float64) for a in (x, dout, gamma, beta))
    return layout, x, dout, gamma, beta, dtype


def _in(dtype, *arrays):
    return [a.astype(dtype) for a in arrays]


def _assert_within(dtype, ours, ref, what, condition):
    for name, a, r in zip(("y", "dx", "dgamma", "dbeta"), ours, ref, strict=True):
        tol = dtype_tolerance(dtype, condition, gradient=name != "y")
        if name == "y" or name == "dx":
            assert a.dtype == dtype, f"{what} {name} dtype {a.dtype}"
        err = rel_error(a, r)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.1e} in {dtype}"


@settings(max_examples=EXAMPLES)
@given(problems(), st.booleans(), st.sampled_from(BACKENDS))
def test_batch_norm_any_dtype_close_to_float64(p, training, backend):
    layout, x, dout, gamma, beta, dtype = p
    c = x.shape[get_layout(layout).channel_axis]
    rm, rv = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)

    def run(dt, be):
        bufs = {"running_mean": rm.copy(), "running_var": rv.copy()}
        xx, g, b, d = _in(dt, x, gamma, beta, dout)
        y, cache = F.batch_norm_forward(xx, g, b, training=training, layout=layout, backend=be,
                                        **bufs)  # fmt: skip
        return [y, *F.batch_norm_backward(d, cache)], bufs, cache

    ours, bufs, _ = run(dtype, backend)
    ref, ref_bufs, cache = run(np.float64, "numpy")
    kappa = centering_condition(x, cache.rstd)
    what = f"batch_norm[{'train' if training else 'eval'}] {layout}"
    _assert_within(dtype, ours, ref, what, kappa)
    for k in bufs:
        assert rel_error(bufs[k], ref_bufs[k]) <= dtype_tolerance(dtype, kappa, gradient=False), k


@settings(max_examples=EXAMPLES)
@given(problems(min_per_channel=1, channel_multiple=2), st.sampled_from([1, 2]))
def test_group_norm_any_dtype_close_to_float64(p, channels_per_group):
    layout, x, dout, gamma, beta, dtype = p
    c = x.shape[get_layout(layout).channel_axis]
    groups = c // channels_per_group

    def run(dt):
        xx, g, b, d = _in(dt, x, gamma, beta, dout)
        y, cache = F.group_norm_forward(xx, groups, g, b, layout=layout)
        return [y, *F.group_norm_backward(d, cache)], cache

    ours, _ = run(dtype)
    ref, cache = run(np.float64)
    kappa = centering_condition(x, cache.rstd)
    _assert_within(dtype, ours, ref, f"group_norm G={groups} {layout}", kappa)


@settings(max_examples=EXAMPLES)
@given(problems(min_per_channel=1), st.integers(1, 3))
def test_layer_norm_any_dtype_close_to_float64(p, k):
    _, x, dout, _, _, dtype = p
    k = min(k, x.ndim)
    normalized = x.shape[x.ndim - k :]
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(normalized) + 1).astype(dtype).astype(np.float64)
    b = rng.standard_normal(normalized).astype(dtype).astype(np.float64)

    def run(dt):
        xx, gg, bb, d = _in(dt, x, g, b, dout)
        y, cache = F.layer_norm_forward(xx, normalized, gg, bb)
        return [y, *F.layer_norm_backward(d, cache)], cache

    ours, _ = run(dtype)
    ref, cache = run(np.float64)
    kappa = centering_condition(x, cache.rstd)
    _assert_within(dtype, ours, ref, f"layer_norm {normalized}", kappa)


@settings(max_examples=EXAMPLES)
@given(problems())
def test_batch_norm_training_output_is_normalized(p):
    """Per channel, y has mean β and variance γ²·σ²/(σ² + ε) (float64 math)."""
    layout, x, _, gamma, beta, _ = p
    lay = get_layout(layout)
    eps = 1e-5
    y, _ = F.batch_norm_forward(x, gamma, beta, training=True, eps=eps, layout=layout)
    var = x.var(axis=lay.reduce_axes)
    np.testing.assert_allclose(
        y.mean(axis=lay.reduce_axes), beta, atol=1e-9 * (1 + np.abs(beta).max())
    )
    np.testing.assert_allclose(
        y.var(axis=lay.reduce_axes), gamma**2 * var / (var + eps), rtol=1e-9, atol=1e-12
    )


@settings(max_examples=EXAMPLES)
@given(problems())
def test_layouts_agree_after_transposition(p):
    """The same data in any layout gives the same result, transposed (NCHW as the reference)."""
    layout, x, dout, gamma, beta, _ = p
    lay = get_layout(layout)
    first = {2: "NC", 3: "NCL", 4: "NCHW"}[lay.ndim]

    def cf(a):
        return np.moveaxis(a, lay.channel_axis, 1)

    y, cache = F.batch_norm_forward(x, gamma, beta, training=True, layout=layout)
    dx, dg, db = F.batch_norm_backward(dout, cache)
    y1, cache1 = F.batch_norm_forward(cf(x), gamma, beta, training=True, layout=first)
    dx1, dg1, db1 = F.batch_norm_backward(cf(dout), cache1)
    for a, b in ((cf(y), y1), (cf(dx), dx1), (dg, dg1), (db, db1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
