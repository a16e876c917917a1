"""The engine's memory-bound kernels (pooling, elementwise, layout) and the depthwise conv and
activations, each against the float64 NCHW reference of bnlab.inference.reference (hypothesis).

Tolerances (float32 kernels vs float64): pooling and elementwise steps round once per value:
1e-6 relative (max pooling is exact); sums over a window or a map: 1e-6 relative to the largest
|input| times sqrt(window); the depthwise conv: 1e-5·sqrt(kh·kw); activations: 2e-6 relative to
max(1, |x|) (the exp of :mod:`bnlab.inference._act` is ~2 ulp).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.inference import _act as A
from bnlab.inference import _depthwise as DW
from bnlab.inference import _kernels as K
from bnlab.inference import _strips as ST
from bnlab.inference import reference as R
from bnlab.inference.graph import conv_out_hw

EMPTY = np.zeros(0, np.float32)
NO_RES = EMPTY.reshape(0, 1)
SEEDS = st.integers(0, 2**31 - 1)
ACTS = [
    A.IDENTITY,
    A.RELU,
    A.RELU6,
    (A.CLIP, -0.5, 0.25),
    (A.SIGMOID, 0.0, 0.0),
    (A.SILU, 0.0, 0.0),
    (A.HARDSWISH, 1 / 6, 0.5),
    (A.HARDSIGMOID, 1 / 6, 0.5),
    (A.HARDSIGMOID, 0.2, 0.5),
]


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw64(y):
    return y.transpose(0, 3, 1, 2).astype(np.float64)


def halves(rows):
    """Two row ranges, as two threads take them."""
    return [(0, rows // 2), (rows // 2, rows)]


# --------------------------------------------------------------------------- activations


@settings(max_examples=60, deadline=None)
@given(act=st.sampled_from(ACTS), scale=st.sampled_from([1.0, 5.0, 30.0, 100.0]), seed=SEEDS)
def test_activations_match_float64(act, scale, seed):
    """Every activation on values up to ±100 (exp over- and underflow for sigmoid and SiLU)."""
    x = (np.random.default_rng(seed).standard_normal((7, 37)) * scale).astype(np.float32)
    y = x.copy()
    A.activate_rows(y, 0, 7, 0, 37, *A.as_params(act))
    ref = A.reference(x.astype(np.float64), act)
    err = np.abs(y - ref) / np.maximum(1, np.abs(x))
    assert err.max() <= 2e-6, (A.NAMES[act[0]], err.max())


def test_exp32_is_accurate_over_its_range():
    import numba

    @numba.njit
    def run(v):
        out = np.empty_like(v)
        for i in range(v.shape[0]):
            out[i] = A.exp32(v[i])
        return out

    v = np.linspace(-87, 88, 100_001).astype(np.float32)
    rel = np.abs(run(v) / np.exp(v.astype(np.float64)) - 1)
    assert rel.max() < 5e-7  # ~4 ulp at worst
    assert run(np.array([-200.0, 200.0], np.float32)).tolist() == [
        np.float32(np.exp(-87.0)),
        np.float32(np.exp(88.0)),
    ]


# --------------------------------------------------------------------------- pooling


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 20),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    pad=st.integers(0, 2),
    dil=st.integers(1, 2),
    ceil_mode=st.booleans(),
    include_pad=st.booleans(),
    seed=SEEDS,
)
def test_pooling_matches_float64(
    n, c, h, w, kh, kw, sh, sw, pad, dil, ceil_mode, include_pad, seed
):
    pads = (min(pad, kh // 2), min(pad, kw // 2)) * 2  # PyTorch's limit: pad <= kernel / 2
    ho, wo = conv_out_hw(h, w, (kh, kw), (sh, sw), pads, (dil, dil), ceil_mode)
    if ho < 1 or wo < 1:
        return
    x = (np.random.default_rng(seed).standard_normal((n, c, h, w)) - 1).astype(np.float32)
    xn = nhwc(x)
    out = np.full((n, ho, wo, c), np.nan, np.float32)
    for r0, r1 in halves(n * ho):
        K.maxpool_nhwc(xn, (kh, kw, sh, sw, pads[0], pads[1], dil, dil), out, r0, r1)
    ref = R.max_pool(x.astype(np.float64), (kh, kw), (sh, sw), pads, (dil, dil), ceil_mode)
    np.testing.assert_array_equal(nchw64(out), ref)  # a max rounds nothing

    ho, wo = conv_out_hw(h, w, (kh, kw), (sh, sw), pads, (1, 1), ceil_mode)
    out = np.full((n, ho, wo, c), np.nan, np.float32)
    for r0, r1 in halves(n * ho):
        K.avgpool_nhwc(xn, (kh, kw, sh, sw, *pads), include_pad, out, r0, r1)
    ref = R.avg_pool(x.astype(np.float64), (kh, kw), (sh, sw), pads, ceil_mode, include_pad)
    np.testing.assert_allclose(nchw64(out), ref, rtol=0, atol=1e-6 * np.abs(x).max() * kh * kw)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    oh=st.integers(1, 8),
    ow=st.integers(1, 8),
    seed=SEEDS,
)
def test_adaptive_and_global_average_pooling_match_float64(n, c, h, w, oh, ow, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    out = np.full((n, oh, ow, c), np.nan, np.float32)
    for r0, r1 in halves(n * oh):
        K.adaptive_avgpool_nhwc(nhwc(x), out, r0, r1)
    ref = R.adaptive_avg_pool(x.astype(np.float64), (oh, ow))
    atol = 1e-6 * np.abs(x).max() * np.sqrt(h * w)
    np.testing.assert_allclose(nchw64(out), ref, rtol=0, atol=atol)
    g = np.full((n, c), np.nan, np.float32)
    K.global_avgpool(nhwc(x).reshape(n, h * w, c), g, 0, n)
    np.testing.assert_allclose(g, x.astype(np.float64).mean(axis=(2, 3)), rtol=0, atol=atol)


# --------------------------------------------------------------------------- elementwise


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), c=st.integers(1, 70), act=st.sampled_from(ACTS), seed=SEEDS)
def test_elementwise_steps_match_float64(rows, c, act, seed):
    """add (+ activation), mul, an unfolded BN as affine (+ activation), a bare activation."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((rows, c)).astype(np.float32) for _ in range(2))
    scale, shift = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype("f4")
    prm = A.as_params(act)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cases = [
        (lambda o, r0, r1: K.add_rows(a, b, o, r0, r1, *prm), A.reference(a64 + b64, act)),
        (lambda o, r0, r1: K.mul_rows(a, b, o, r0, r1), a64 * b64),
        (
            lambda o, r0, r1: K.affine_rows(a, scale, shift, o, r0, r1, *prm),
            A.reference(a64 * scale + shift, act),
        ),
        (lambda o, r0, r1: K.act_rows(a, o, r0, r1, *prm), A.reference(a64, act)),
    ]
    for run, ref in cases:
        out = np.full((rows, c), np.nan, np.float32)
        for r0, r1 in halves(rows):
            run(out, r0, r1)
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), hw=st.integers(1, 50), c=st.integers(1, 70), seed=SEEDS)
def test_squeeze_excitation_scale_matches_float64(n, hw, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, hw, c)).astype(np.float32)
    s = rng.uniform(0, 1, (n, c)).astype(np.float32)
    out = np.full_like(x, np.nan)
    for r0, r1 in halves(n * hw):
        K.scale_channels(x, s, out, r0, r1)
    np.testing.assert_allclose(out, x.astype(np.float64) * s[:, None, :], rtol=1e-7, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 30), h=st.integers(1, 6), w=st.integers(1, 6), seed=SEEDS
)
def test_flatten_concat_softmax_and_layouts(n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    xn = nhwc(x)
    back = np.empty_like(xn)
    K.nchw_to_nhwc(x, back)
    np.testing.assert_array_equal(back, xn)
    again = np.empty_like(x)
    K.nhwc_to_nchw(xn, again)
    np.testing.assert_array_equal(again, x)
    flat = np.empty((n, c * h * w), np.float32)
    K.flatten_nchw(xn.reshape(n, h * w, c), flat)
    np.testing.assert_array_equal(flat, x.reshape(n, -1))  # PyTorch's flatten order
    y = rng.standard_normal((n, h, w, 5)).astype(np.float32)
    cat = np.empty((n * h * w, c + 5), np.float32)
    K.copy_columns(xn.reshape(-1, c), cat, 0)
    K.copy_columns(y.reshape(-1, 5), cat, c)
    np.testing.assert_array_equal(cat.reshape(n, h, w, c + 5), np.concatenate([xn, y], axis=3))
    logits = (rng.standard_normal((n, c)) * 30).astype(np.float32)
    p = np.empty_like(logits)
    K.softmax_rows(logits, p)
    ref = R.node_forward(_softmax_node(), [logits.astype(np.float64)])
    np.testing.assert_allclose(p, ref, rtol=1e-6, atol=1e-7)
    assert K.all_finite(x.reshape(-1))
    x[0, 0, 0, 0] = np.inf
    assert not K.all_finite(x.reshape(-1))


def _softmax_node():
    from bnlab.inference.graph import Node

    return Node("softmax", ["x"], "y", "softmax")


# --------------------------------------------------------------------------- depthwise


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 50),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.sampled_from([1, 3, 5, 7]),
    stride=st.integers(1, 3),
    dil=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 3)] * 4),
    act=st.sampled_from(ACTS[:7]),
    with_scale=st.booleans(),
    with_res=st.booleans(),
    seed=SEEDS,
)
def test_depthwise_conv_matches_float64(
    n, c, h, w, k, stride, dil, pads, act, with_scale, with_res, seed
):
    ho, wo = conv_out_hw(h, w, (k, k), (stride, stride), pads, (dil, dil))
    if ho < 1 or wo < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    shift = rng.standard_normal(c).astype(np.float32)
    scale = rng.uniform(0.5, 2, c).astype(np.float32) if with_scale else EMPTY
    res = rng.standard_normal((n * ho * wo, c)).astype(np.float32) if with_res else NO_RES
    y = R.conv2d(x.astype(np.float64), wt.astype(np.float64), (stride, stride), pads, (dil, dil), c)
    y = y.transpose(0, 2, 3, 1).reshape(-1, c) * (scale if with_scale else 1) + shift
    pre = y + (res if with_res else 0)
    out = np.full((n * ho * wo, c), np.nan, np.float32)
    geom = (k, k, stride, stride, pads[0], pads[1], dil, dil, ho, wo)
    for r0, r1 in DW.work_items(n * ho, 2, 1e18):
        ST.strip_rows(
            nhwc(x), DW.pack_weight(wt), geom, out, r0, r1, scale, shift, res, *A.as_params(act)
        )
    np.testing.assert_allclose(out, A.reference(pre, act), rtol=1e-5, atol=1e-5 * k)


# --------------------------------------------------------------------------- grouped


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    cg=st.sampled_from([2, 4, 8, 16]),
    vectors=st.integers(1, 3),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    act=st.sampled_from(ACTS[:7]),
    with_scale=st.booleans(),
    with_res=st.booleans(),
    seed=SEEDS,
)
def test_grouped_conv_matches_float64(
    n, cg, vectors, h, w, k, stride, pads, act, with_scale, with_res, seed
):
    """Groups of 2-16 channels (ResNeXt's), C a multiple of 16, against the float64 conv."""
    from bnlab.inference import _grouped as GR

    c = max(16, 2 * cg) * vectors  # at least two groups, a multiple of 16
    ho, wo = conv_out_hw(h, w, (k, k), (stride, stride), pads)
    if ho < 1 or wo < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, cg, k, k)).astype(np.float32)
    shift = rng.standard_normal(c).astype(np.float32)
    scale = rng.uniform(0.5, 2, c).astype(np.float32) if with_scale else EMPTY
    res = rng.standard_normal((n * ho * wo, c)).astype(np.float32) if with_res else NO_RES
    y = R.conv2d(
        x.astype(np.float64), wt.astype(np.float64), (stride, stride), pads, (1, 1), c // cg
    )
    y = y.transpose(0, 2, 3, 1).reshape(-1, c) * (scale if with_scale else 1) + shift
    pre = y + (res if with_res else 0)
    assert GR.supported(c, c, c // cg)
    out = np.full((n * ho * wo, c), np.nan, np.float32)
    geom = (k, k, stride, stride, pads[0], pads[1], 1, 1, ho, wo)
    for r0, r1 in DW.work_items(n * ho, 2, 1e18):
        ST.strip_rows(
            nhwc(x), GR.pack_weight(wt), geom, out, r0, r1, scale, shift, res, *A.as_params(act)
        )
    np.testing.assert_allclose(out, A.reference(pre, act), rtol=1e-5, atol=1e-5 * k * np.sqrt(cg))
