"""The direct conv on a padded input (bnlab.inference._direct, the stem) vs the im2col reference.

Tolerance: the float32 kernel vs the float64 reference within 1e-5·sqrt(K) absolute plus 1e-5
relative (K = kh·kw·C_in; values are sums of K products of standard normals).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.inference import _direct as D
from bnlab.inference import _gemm as G
from bnlab.inference import _kernels as K

EMPTY = np.zeros(0, np.float32)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    c=st.integers(1, 5),
    kk=st.sampled_from([1, 3, 5, 7]),
    stride=st.integers(1, 2),
    c_out=st.sampled_from([32, 64]),
    threads=st.sampled_from([1, 3]),
    with_scale=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_direct_conv_matches_im2col_reference(n, h, w, c, kk, stride, c_out, threads, with_scale,
                                              relu, seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    pad = kk // 2
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wk = rng.standard_normal((kk * kk * c, c_out)).astype(np.float32)
    shift = rng.standard_normal(c_out).astype(np.float32)
    scale = rng.uniform(0.5, 2, c_out).astype(np.float32) if with_scale else EMPTY
    ho, wo = (h + 2 * pad - kk) // stride + 1, (w + 2 * pad - kk) // stride + 1
    col = K.im2col_nhwc_ref(x, kk, kk, stride, pad)
    ref = G.gemm_reference(col, wk, scale, shift, EMPTY.reshape(0, 1), relu)

    xp = np.zeros(D.padded_shape(n, h, w, c, kk, stride, pad), np.float32)
    D.pad_input(x, pad, xp)
    out = np.full((n * ho * wo, c_out), np.nan, np.float32)  # every entry must be written
    for r0, r1 in D.work_items(n * ho, threads):
        D.direct_conv_range(xp, kk, stride, ho, wo, G.pack_panels(wk), out, r0, r1, 0,
                            c_out // G.NR, scale, shift, relu)  # fmt: skip
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(wk.shape[0]))


def test_padded_input_is_wide_enough_for_the_last_pixel_block():
    """A last block of 6 output pixels reads s·(6·blocks − 1) + k columns: all inside xp."""
    for h, w, k, s, p in [(224, 224, 7, 2, 3), (5, 5, 3, 1, 1), (9, 13, 7, 2, 3), (4, 1, 1, 1, 0)]:
        wo = (w + 2 * p - k) // s + 1
        blocks = -(-wo // G.MR)
        _, hp, wp, _ = D.padded_shape(1, h, w, 3, k, s, p)
        assert hp == h + 2 * p and wp >= w + 2 * p and wp >= s * (blocks * G.MR - 1) + k


def test_work_items_cover_every_row_once():
    for rows, t in [(112, 2), (1, 4), (7, 1), (224, 3)]:
        seen = np.zeros(rows, int)
        for r0, r1 in D.work_items(rows, t):
            seen[r0:r1] += 1
        assert (seen == 1).all()
