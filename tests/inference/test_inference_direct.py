"""The direct conv on a padded input (bnlab.inference._direct, the stems) vs the float64 conv.

Tolerance: the float32 kernel vs the float64 reference within 1e-5·sqrt(K) absolute plus 1e-5
relative (K = kh·kw·C_in; values are sums of K products of standard normals).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.inference import _act as A
from bnlab.inference import _direct as D
from bnlab.inference import _gemm as G
from bnlab.inference._packing import pack_weight

EMPTY = np.zeros(0, np.float32)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    c=st.integers(1, 5),
    kh=st.sampled_from([1, 3, 5, 7]),
    kw=st.sampled_from([1, 3, 7]),
    sh=st.integers(1, 2),
    sw=st.integers(1, 3),
    pads=st.tuples(*[st.integers(0, 3)] * 4),
    c_out=st.sampled_from([16, 32, 40, 64]),
    threads=st.sampled_from([1, 3]),
    with_scale=st.booleans(),
    act=st.sampled_from([A.IDENTITY, A.RELU, A.RELU6, (A.HARDSWISH, 1 / 6, 0.5)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_direct_conv_matches_float64_conv(
    n, h, w, c, kh, kw, sh, sw, pads, c_out, threads, with_scale, act, seed
):
    pt, pl, pb, pr = pads
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    if ho < 1 or wo < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((c_out, c, kh, kw)).astype(np.float32)
    shift = rng.standard_normal(c_out).astype(np.float32)
    scale = rng.uniform(0.5, 2, c_out).astype(np.float32) if with_scale else EMPTY
    y = D.reference(x, wt, (sh, sw), pads)
    ref = A.reference(y * (scale if with_scale else 1) + shift, act)

    xp = np.zeros(D.padded_shape(n, h, w, c, pads), np.float32)
    D.pad_input(x, pt, pl, xp)
    out = np.full((n * ho * wo, c_out), np.nan, np.float32)  # every entry must be written
    panels = G.pack_panels(pack_weight(wt))
    for r0, r1 in D.work_items(n * ho, threads, 1e18):
        D.direct_conv_range(
            xp,
            kh,
            kw,
            sh,
            sw,
            ho,
            wo,
            panels,
            out,
            r0,
            r1,
            0,
            panels.shape[0],
            scale,
            shift,
            *A.as_params(act),
        )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(kh * kw * c))


def test_work_items_cover_every_row_once():
    for rows, t in [(112, 2), (1, 4), (7, 1), (224, 3)]:
        seen = np.zeros(rows, int)
        for r0, r1 in D.work_items(rows, t, 1e18):
            seen[r0:r1] += 1
        assert (seen == 1).all()
