"""Winograd F(4x4, 3x3) (bnlab.inference._winograd) against the direct conv in float64.

Tolerance (float32 kernel vs float64 direct conv, relative to the largest |output|): 3e-5 on
these small shapes. The float32 direct conv (implicit GEMM) reaches ~1e-6 here; Winograd's
transforms (entries up to 8 in A^T, 5 in B^T) cost about one more decimal digit, measured
2-8e-6 on random data (docs/inference.md has the ResNet-50 layer shapes).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.inference import _act as A
from bnlab.inference import _winograd as W
from bnlab.inference._gemm import NR

RTOL = 3e-5
EMPTY = np.zeros(0, np.float32)
NO_RES = EMPTY.reshape(0, 1)


def run_winograd(x, wt, scale, shift, relu, threads=1, chunk=None, residual=NO_RES, act=None):
    """All work items of one conv, in reverse order (items must be independent)."""
    n, h, w, c = x.shape
    th, tw = W.tile_grid(h, w)
    out = np.full((n * h * w, wt.shape[0]), np.nan, np.float32)  # every entry must be written
    up = W.pack_filter(wt)
    act = act or (A.RELU if relu else A.IDENTITY)
    for item in reversed(W.work_items(n * th * tw, c, wt.shape[0], threads, chunk)):
        W.winograd_tile_range(x, up, out, *item, scale, shift, residual, *A.as_params(act))
    return out


@settings(max_examples=30, deadline=None)
@given(
    d=st.lists(st.floats(-10, 10), min_size=6, max_size=6),
    g=st.lists(st.floats(-10, 10), min_size=3, max_size=3),
)
def test_transform_matrices_compute_a_correlation(d, g):
    """F(4, 3) in float64: A^T((G g) ⊙ (B^T d)) is the valid correlation of d and g."""
    d, g = np.array(d), np.array(g)
    ref = np.correlate(d, g, "valid")
    atol = 1e-11 * (1 + np.abs(d).max() * np.abs(g).max())
    np.testing.assert_allclose(W.winograd_1d_reference(d, g), ref, rtol=0, atol=atol)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    c_in=st.integers(1, 40),  # vectors of 16 channels and a scalar tail
    c_out=st.sampled_from([32, 64, 96, 40]),  # 40: a masked last panel
    threads=st.sampled_from([1, 2, 3]),
    chunk=st.sampled_from([None, 1, 2, 5, 7]),
    with_scale=st.booleans(),
    with_residual=st.booleans(),
    act=st.sampled_from([A.IDENTITY, A.RELU, A.RELU6, (A.SILU, 0.0, 0.0)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_winograd_matches_direct_conv(
    n, h, w, c_in, c_out, threads, chunk, with_scale, with_residual, act, seed
):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    wt = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    shift = rng.standard_normal(c_out).astype(np.float32)
    scale = rng.uniform(0.5, 2, c_out).astype(np.float32) if with_scale else EMPTY
    res = rng.standard_normal((n * h * w, c_out)).astype(np.float32) if with_residual else NO_RES
    out = run_winograd(x, wt, scale, shift, False, threads, chunk, res, act)
    pre = W.conv3x3_reference(x, wt, scale, shift, False) + (res if with_residual else 0)
    ref = A.reference(pre, act)  # slopes <= 1.1: the bound on the pre-activation carries over
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * np.abs(pre).max())


def test_winograd_matches_torch_conv(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 9, 14, 8)).astype(np.float32)
    wt = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    shift = rng.standard_normal(32).astype(np.float32)
    out = run_winograd(x, wt, EMPTY, shift, relu=False, threads=2)
    xt, wtt = torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), torch.from_numpy(wt).double()
    ref = torch.nn.functional.conv2d(xt, wtt, torch.from_numpy(shift).double(), padding=1)
    ref = ref.numpy().transpose(0, 2, 3, 1).reshape(-1, 32)
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * np.abs(ref).max())


def test_error_is_near_the_direct_float32_conv_on_a_resnet_shape(rng):
    """14x14, 256 -> 256 channels (ResNet-50 layer3): below the stated bound, and within 30x of
    the float32 direct conv's error (both vs float64; measured ~15x: about one decimal digit)."""
    x = np.abs(rng.standard_normal((1, 14, 14, 256))).astype(np.float32)  # post-ReLU activations
    wt = (rng.standard_normal((256, 256, 3, 3)) / 48).astype(np.float32)
    shift = rng.standard_normal(256).astype(np.float32)
    ref = W.conv3x3_reference(x, wt, EMPTY, shift, False)
    direct32 = W.conv3x3_reference(x, wt, EMPTY, shift, False, dtype=np.float32)
    err_w = np.abs(run_winograd(x, wt, EMPTY, shift, False) - ref).max() / np.abs(ref).max()
    err_d = np.abs(direct32 - ref).max() / np.abs(ref).max()
    assert err_w < RTOL
    assert err_w < 30 * max(err_d, 1e-7)


def test_work_items_cover_every_tile_and_panel_once():
    for tiles, c_in, c_out, threads, chunk in [
        (196, 64, 64, 2, None),
        (16, 256, 256, 2, None),
        (4, 512, 512, 1, None),
        (13, 3, 96, 3, 5),
        (1, 1, 32, 4, None),
    ]:
        seen = np.zeros((tiles, -(-c_out // NR)), int)
        for t0, t1, p0, p1 in W.work_items(tiles, c_in, c_out, threads, chunk):
            seen[t0:t1, p0:p1] += 1
        assert (seen == 1).all()


def test_few_tiles_are_split_by_panels_for_threads():
    items = W.work_items(16, 256, 256, 2)
    assert len(items) >= 2 and all(t0 == 0 for t0, *_ in items)


def test_pack_filter_refuses_bad_weights():
    with pytest.raises(ValueError, match="3x3"):
        W.pack_filter(np.zeros((32, 4, 5, 5), np.float32))


def test_engine_with_winograd_equals_engine_without(rng):
    """Whole network, small images (so every stage has >= 8 tiles and takes Winograd) and a
    torch-free state dict: the Winograd engine agrees with the direct implicit-GEMM engine."""
    torch = pytest.importorskip("torch")
    from torch_resnet import randomized_resnet50

    import bnlab.inference

    sd = {k: v.numpy().copy() for k, v in randomized_resnet50(seed=1).state_dict().items()}
    x = rng.standard_normal((3, 3, 64, 96)).astype(np.float32)
    fast = bnlab.inference.compile(sd, threads=2)
    slow = bnlab.inference.compile(sd, threads=2, winograd=False)
    out, ref = fast(x), slow(x)
    assert "winograd_conv 3x3" in fast._plans[(0, 3, 64, 96)].labels  # the plan uses Winograd
    assert "winograd_conv 3x3" not in slow._plans[(0, 3, 64, 96)].labels
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert torch is not None
