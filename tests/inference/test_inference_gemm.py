"""The packed GEMM and the implicit-GEMM conv (bnlab.inference._gemm) against float64 references,
the micro-kernel's prefetch plan, and the thread pool.

Tolerance: float32 kernels vs float64 references within 1e-5·sqrt(K) absolute plus 1e-5
relative (entries are sums of K products of standard normals).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.inference import _act as A
from bnlab.inference import _gemm as G
from bnlab.inference import _microkernel as MK
from bnlab.inference import reference as R
from bnlab.inference._packing import pack_grouped

EMPTY = np.zeros(0, np.float32)
NO_RES = EMPTY.reshape(0, 1)
ACTS = [
    A.IDENTITY,
    A.RELU,
    A.RELU6,
    (A.SILU, 0.0, 0.0),
    (A.HARDSWISH, 1 / 6, 0.5),
    (A.HARDSIGMOID, 1 / 6, 0.5),
    (A.SIGMOID, 0.0, 0.0),
]


# K > 512 takes the K-blocked path; N not a multiple of 32 ends in a masked panel; M not a
# multiple of 6 in a partial row block
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 5, 32),
        (6, 1, 24),
        (7, 64, 64),
        (13, 147, 100),
        (49, 300, 512),
        (100, 64, 16),
        (20, 1100, 64),
        (133, 1030, 96),
        (13, 1030, 250),
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_packed_gemm_matches_reference(rng, m, k, n, threads):
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    panels = G.pack_panels(w)
    cases = [
        (EMPTY, NO_RES, A.IDENTITY),
        (rng.standard_normal(n).astype("f4"), rng.standard_normal((m, n)).astype("f4"), A.RELU),
    ] + [(EMPTY, NO_RES, act) for act in ACTS[2:]]
    for scale, res, act in cases:
        ref = G.gemm_reference(a, w, scale, shift, res, act)
        for items in (G.work_items(m, n, k, threads), finest(m, n)):
            c = np.full((m, n), np.nan, np.float32)  # every entry must be written
            for item in items:
                G.gemm_tile_range(a, panels, c, *item, scale, shift, res, *A.as_params(act))
            np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def finest(m, n):
    """One item per (row block, panel): every tile computed on its own."""
    return [(b, b + 1, p, p + 1) for b in range(-(-m // G.MR)) for p in range(-(-n // G.NR))]


def test_gemm_writes_nothing_outside_its_matrix(rng):
    """The masked last panel and the partial last row block stay inside C: a C that is a view
    into a larger buffer keeps the guard values around it."""
    m, k, n = 7, 40, 20
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    buf = np.full(m * n + 64, 7.0, np.float32)
    c = buf[:-64].reshape(m, n)
    G.gemm_tile_range(
        a,
        G.pack_panels(w),
        c,
        0,
        2,
        0,
        1,
        EMPTY,
        np.zeros(n, "f4"),
        NO_RES,
        *A.as_params(A.IDENTITY),
    )
    assert (buf[-64:] == 7.0).all()
    np.testing.assert_allclose(c, a.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_work_items_cover_every_tile_once():
    for m, n, k, t in [(3136, 64, 576, 2), (49, 2048, 512, 2), (1, 1000, 2048, 4), (7, 24, 3, 8)]:
        blocks, panels = -(-m // G.MR), -(-n // G.NR)
        seen = np.zeros((blocks, panels), int)
        for b0, b1, p0, p1 in G.work_items(m, n, k, t):
            seen[b0:b1, p0:p1] += 1
        assert (seen == 1).all()


def test_conv_work_items_cover_every_tile_once_and_split_panels_per_thread():
    shapes = [(49, 512, 4608, 2), (196, 256, 2304, 2), (784, 128, 1152, 2), (49, 64, 9, 3)]
    for m, n, k, t in shapes:
        items = G.conv_work_items(m, n, k, t)
        blocks, panels = -(-m // G.MR), -(-n // G.NR)
        seen = np.zeros((blocks, panels), int)
        for b0, b1, p0, p1 in items:
            seen[b0:b1, p0:p1] += 1
        assert (seen == 1).all()
        if n > m and len(items) > 1:  # a panel split: one group per thread
            assert len(items) == t


def test_pool_runs_every_item_once_from_several_threads():
    pool = G.WorkPool(3)
    hits = []
    lock = threading.Lock()

    def record(i):
        with lock:
            hits.append(i)

    for _ in range(20):
        pool.run(record, [(i,) for i in range(50)])
    assert sorted(hits) == sorted(list(range(50)) * 20)


def test_pool_hands_an_item_error_to_the_caller_and_keeps_working():
    pool = G.WorkPool(2)

    def boom(i):
        if i == 3:
            raise ValueError("item 3")

    with pytest.raises(ValueError, match="item 3"):
        pool.run(boom, [(i,) for i in range(8)])
    done = []
    pool.run(lambda i: done.append(i), [(i,) for i in range(8)])
    assert sorted(done) == list(range(8))


def test_engines_share_one_pool_per_thread_count():
    assert G.shared_pool(2) is G.shared_pool(2)
    before = threading.active_count()
    for _ in range(3):
        G.shared_pool(2)
    assert threading.active_count() == before


def test_next_piece_follows_the_loop_order():
    """The K-blocked loops take pieces kb-major, panel-minor; next_piece names the successor."""
    k, pan0, pan1 = 1100, 1, 4
    order = [(kb, p) for kb in range(0, k, G.KC) for p in range(pan0, pan1)]
    for (kb, p), following in zip(order, order[1:] + [None], strict=True):
        want = -1 if following is None else following[1] * k * G.NR + following[0] * G.NR
        assert MK.next_piece(p, pan0, pan1, kb, k) == want


@pytest.mark.parametrize(("kc", "n_blocks"), [(512, 9), (512, 21), (76, 3), (512, 3), (100, 7)])
def test_prefetch_shares_cover_every_line_of_the_next_piece(kc, n_blocks):
    """Row blocks 1..n-1 (n >= 3) together prefetch every 64-byte line (16 floats) of the next
    piece; block 0 only touches its own piece (already in cache)."""
    b_off, nxt = 0, 10**6
    assert MK.prefetch_target(b_off, nxt, 0, n_blocks, kc) == (b_off, 0)
    assert MK.prefetch_target(b_off, -1, 3, n_blocks, kc) == (b_off, 0)
    lines = set()
    for j in range(1, n_blocks):
        pf, step = MK.prefetch_target(b_off, nxt, j, n_blocks, kc)
        assert step <= 16  # no line skipped within a block's range
        lines |= {(pf + kk * step - nxt) // 16 for kk in range(kc)}
    assert set(range(kc * G.NR // 16)) <= lines


# --------------------------------------------------------------------------- implicit GEMM


def conv_geometry(draw_kernel, h, w, stride, pads, dilation):
    ho = (h + pads[0] + pads[2] - dilation[0] * (draw_kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + pads[1] + pads[3] - dilation[1] * (draw_kernel[1] - 1) - 1) // stride[1] + 1
    return ho, wo


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    pads=st.tuples(*[st.integers(0, 3)] * 4),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4, 8]),
    cg_in=st.integers(1, 12),
    cg_out=st.integers(1, 40),
    act=st.sampled_from(ACTS),
    residual=st.booleans(),
    threads=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_implicit_gemm_conv_matches_float64_conv(
    n, h, w, kh, kw, sh, sw, pads, dh, dw, groups, cg_in, cg_out, act, residual, threads, seed
):
    """Any kernel size, stride, padding (asymmetric too), dilation and grouping, through the
    per-panel channel windows, against the textbook float64 conv of bnlab.inference.reference."""
    from bnlab.inference import _steps as S

    ho, wo = conv_geometry((kh, kw), h, w, (sh, sw), pads, (dh, dw))
    if ho < 1 or wo < 1:
        return
    rng = np.random.default_rng(seed)
    c_in, c_out = cg_in * groups, cg_out * groups
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    wt = rng.standard_normal((c_out, cg_in, kh, kw)).astype(np.float32)
    shift = rng.standard_normal(c_out).astype(np.float32)
    res = rng.standard_normal((n * ho * wo, c_out)).astype(np.float32) if residual else None
    y = R.conv2d(
        x.transpose(0, 3, 1, 2).astype(np.float64),
        wt.astype(np.float64),
        (sh, sw),
        pads,
        (dh, dw),
        groups,
    )
    y = y.transpose(0, 2, 3, 1).reshape(-1, c_out) + shift
    ref = A.reference(y + (0 if res is None else res), act)

    from bnlab.inference._packing import PackedConv

    conv = PackedConv("c", wt, shift, EMPTY, (sh, sw), pads, (dh, dw), groups, act)
    conv.panels, conv.ch0, conv.chn = pack_grouped(wt, groups)
    out = np.full((n * ho * wo, c_out), np.nan, np.float32)
    geom = (kh, kw, sh, sw, pads[0], pads[1], dh, dw, ho, wo)
    S.implicit_conv(G.shared_pool(threads), x, conv, geom, out, res)
    k = kh * kw * cg_in
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k) * 4)


def test_grouped_panels_are_block_diagonal():
    """A grouped weight packed per panel: each output column reads only its group's channels
    of the panel's window, with the group's weights in place."""
    rng = np.random.default_rng(0)
    groups, cg_in, cg_out = 8, 3, 4  # 8 groups of 4 outputs: one panel covers all 8 groups
    w = rng.standard_normal((groups * cg_out, cg_in, 1, 1)).astype(np.float32)
    panels, ch0, chn = pack_grouped(w, groups)
    assert panels.shape == (1, chn, 32) and chn == groups * cg_in and ch0.tolist() == [0]
    dense = np.zeros((groups * cg_in, groups * cg_out), np.float32)
    for o in range(groups * cg_out):
        g = o // cg_out
        dense[g * cg_in : (g + 1) * cg_in, o] = w[o, :, 0, 0]
    np.testing.assert_array_equal(panels[0], dense)
