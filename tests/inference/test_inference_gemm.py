"""The packed AVX-512 GEMM (bnlab.inference._gemm) against its float64 reference, and its pool."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bnlab.inference import _gemm as G


# K > 512 takes the K-blocked path (3 K blocks; 133 rows = 2 row chunks on one thread)
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 5, 32),
        (6, 1, 32),
        (7, 64, 64),
        (13, 147, 96),
        (49, 300, 512),
        (100, 64, 256),
        (20, 1100, 64),
        (133, 1030, 96),
        (13, 1030, 256),  # N > M: split by panels (3 threads), each item K-blocked
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_packed_gemm_matches_reference(rng, m, k, n, threads):
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    panels = G.pack_panels(w)
    for scale, res, relu in [
        (np.zeros(0, np.float32), np.zeros((0, 1), np.float32), False),
        (rng.standard_normal(n).astype(np.float32), rng.standard_normal((m, n)).astype("f4"), True),
    ]:
        c = np.full((m, n), np.nan, np.float32)  # every entry must be written
        for item in G.work_items(m, n, k, threads):
            G.gemm_tile_range(a, panels, c, *item, scale, shift, res, relu)
        ref = G.gemm_reference(a, w, scale, shift, res, relu)
        np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_work_items_cover_every_tile_once():
    for m, n, k, t in [(3136, 64, 576, 2), (49, 2048, 512, 2), (1, 1024, 2048, 4), (7, 64, 3, 8)]:
        blocks, panels = -(-m // G.MR), n // G.NR
        seen = np.zeros((blocks, panels), int)
        for b0, b1, p0, p1 in G.work_items(m, n, k, t):
            seen[b0:b1, p0:p1] += 1
        assert (seen == 1).all()


def test_conv_work_items_cover_every_tile_once_and_split_panels_per_thread():
    shapes = [(49, 512, 4608, 2), (196, 256, 2304, 2), (784, 128, 1152, 2), (49, 64, 9, 3)]
    for m, n, k, t in shapes:
        items = G.conv_work_items(m, n, k, t)
        blocks, panels = -(-m // G.MR), n // G.NR
        seen = np.zeros((blocks, panels), int)
        for b0, b1, p0, p1 in items:
            seen[b0:b1, p0:p1] += 1
        assert (seen == 1).all()
        if n > m and len(items) > 1:  # a panel split: one group per thread
            assert len(items) == t


def test_pack_panels_refuses_ragged_n():
    with pytest.raises(ValueError, match="multiple of 32"):
        G.pack_panels(np.zeros((4, 33), np.float32))


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


@pytest.mark.parametrize(
    ("n", "h", "w", "c", "kk", "stride", "pad", "c_out"),
    [(1, 9, 7, 3, 7, 2, 3, 64), (2, 6, 6, 16, 3, 1, 1, 32), (1, 7, 5, 40, 3, 2, 1, 96),
     (1, 7, 7, 130, 3, 1, 1, 64),  # K = 1170: three K blocks (512, 512, 146), a 1-row last block
     (2, 9, 9, 60, 3, 1, 1, 32)],  # K = 540 and 162 rows: two K blocks, two row chunks
)  # fmt: skip
def test_implicit_gemm_conv_matches_im2col_reference(rng, n, h, w, c, kk, stride, pad, c_out):
    from bnlab.inference import _kernels as K

    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wk = rng.standard_normal((kk * kk * c, c_out)).astype(np.float32)
    shift = rng.standard_normal(c_out).astype(np.float32)
    ho, wo = (h + 2 * pad - kk) // stride + 1, (w + 2 * pad - kk) // stride + 1
    m = n * ho * wo
    res = rng.standard_normal((m, c_out)).astype(np.float32)
    ref = G.gemm_reference(K.im2col_nhwc_ref(x, kk, kk, stride, pad), wk, np.zeros(0, "f4"),
                           shift, res, True)  # fmt: skip
    whole = [(0, -(-m // G.MR), 0, c_out // G.NR)]  # one item: every row chunk in one call
    for items in (G.work_items(m, c_out, wk.shape[0], 2), whole):
        out = np.full((m, c_out), np.nan, np.float32)
        for item in items:
            G.conv_tile_range(x, kk, stride, pad, ho, wo, G.pack_panels(wk), out, *item,
                              np.zeros(0, np.float32), shift, res, True)  # fmt: skip
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(wk.shape[0]))


def test_engines_share_one_pool_per_thread_count():
    assert G.shared_pool(2) is G.shared_pool(2)
    before = threading.active_count()
    for _ in range(3):
        G.shared_pool(2)
    assert threading.active_count() == before


def test_next_piece_follows_the_loop_order():
    """The K-blocked loops take pieces kb-major, panel-minor; _next_piece names the successor."""
    k, pan0, pan1 = 1100, 1, 4
    order = [(kb, p) for kb in range(0, k, G.KC) for p in range(pan0, pan1)]
    for (kb, p), following in zip(order, order[1:] + [None], strict=True):
        want = -1 if following is None else following[1] * k * G.NR + following[0] * G.NR
        assert G._next_piece(p, pan0, pan1, kb, k) == want


@pytest.mark.parametrize(("kc", "n_blocks"), [(512, 9), (512, 21), (76, 3), (512, 3), (100, 7)])
def test_prefetch_shares_cover_every_line_of_the_next_piece(kc, n_blocks):
    """Row blocks 1..n-1 (n >= 3) together prefetch every 64-byte line (16 floats) of the next
    piece; block 0 only touches its own piece (already in cache)."""
    b_off, nxt = 0, 10**6
    assert G._prefetch_target(b_off, nxt, 0, n_blocks, kc) == (b_off, 0)
    assert G._prefetch_target(b_off, -1, 3, n_blocks, kc) == (b_off, 0)
    lines = set()
    for j in range(1, n_blocks):
        pf, step = G._prefetch_target(b_off, nxt, j, n_blocks, kc)
        assert step <= 16  # no line skipped within a block's range
        lines |= {(pf + kk * step - nxt) // 16 for kk in range(kc)}
    assert set(range(kc * G.NR // 16)) <= lines
