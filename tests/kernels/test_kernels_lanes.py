"""The channels-last two-pass kernels, whose lane rows live in registers when C divides a register
width (64, 128, 192, 256 lanes) and in memory otherwise: which channel counts take registers, and
that they compute what float64 / in-dtype NumPy math computes — for row counts with leftover
values (R not a multiple of k = W / C), data at any whole-item offset within a cache line (where
the lane rows start), out at the same or another offset (then nothing streams), several row
blocks in parallel, with and without streaming stores."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_support import at_offset
from kernels_tolerances import assert_matches

from bnlab.kernels import batch_norm, paths

# >= 1000 examples per kernel in CI, counting only the tests that surely take these kernels
EXAMPLES = 1000 if os.environ.get("CI") == "true" else 150
WIDTHS = paths.LIMITS.register_widths
REGISTER_CHANNELS = sorted({c for w in WIDTHS for c in range(2, w + 1) if w % c == 0})
CHANNELS = REGISTER_CHANNELS + [5, 7, 80, 100, 300]  # and some lane rows in memory


@pytest.mark.parametrize(
    ("c", "width"),
    [(1, 64), (2, 64), (3, 192), (5, 0), (12, 192), (48, 192), (64, 64), (80, 0), (96, 192),
     (100, 0), (128, 128), (256, 256), (257, 0), (512, 0), (0, 0)],
)  # fmt: skip
def test_register_width_is_the_narrowest_width_that_whole_rows_fill(c, width):
    assert paths.register_width(c) == width


@pytest.mark.parametrize("c", [3, 16, 64, 100])
def test_the_plan_keeps_lanes_in_registers_exactly_when_c_has_a_register_width(c):
    with paths.limits(tile_bytes=0):
        p = paths.plan((2, 200, c), "NLC", np.float32)
    assert p.path == "cl-two-pass"
    assert p.chunks["registers"] == bool(paths.register_width(c))
    assert p.chunks["width"] % c == 0 and p.chunks["width"] >= min(c, 64)


def _many_blocks(stream: bool):
    return paths.limits(tile_bytes=0, min_tasks=5, min_block_rows=1, min_block_values=8,
                        parallel_min_values=0, stream_bytes=0 if stream else 1 << 62)  # fmt: skip


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    c=st.sampled_from(CHANNELS),
    rows=st.integers(1, 700),
    dtype=st.sampled_from([np.float32, np.float64]),
    offset=st.integers(0, 15),
    out_offset=st.one_of(st.none(), st.integers(0, 15)),
    stream=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lane_kernels_match_numpy(c, rows, dtype, offset, out_offset, stream, seed):
    """Statistics and gradient sums vs float64 NumPy; the elementwise passes bit for bit against
    the same expressions in the array's dtype."""
    rng = np.random.default_rng(seed)
    item = np.dtype(dtype).itemsize
    x = at_offset((rng.uniform(-50, 50) + rng.standard_normal((rows, c))).astype(dtype),
                  offset * item)  # fmt: skip
    dy = at_offset(rng.standard_normal((rows, c)).astype(dtype), offset * item)
    out = at_offset(
        np.zeros((rows, c), dtype), (offset if out_offset is None else out_offset) * item
    )
    m, a, b, d = (rng.standard_normal(c) for _ in range(4))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    with _many_blocks(stream):
        p = paths.plan((rows, c), "NC", dtype, 2)
        assert p.path == "cl-two-pass"
        mean, var = batch_norm.run_moments(x, p)
        sum_dy, sum_dyxmu = batch_norm.run_grad_sums(dy, x, mean, p)
        batch_norm.run_affine(x, m, a, b, p, stream, out)
        y = out.copy()
        batch_norm.run_dx(dy, x, m, a, b, d, p, stream, out)
    assert_matches(mean, x64.mean(axis=0), np.float64, "mean")
    assert_matches(var, x64.var(axis=0), np.float64, "var")
    assert_matches(sum_dy, dy64.sum(axis=0), np.float64, "sum dy")
    assert_matches(sum_dyxmu, (dy64 * (x64 - mean)).sum(axis=0), np.float64, "sum dy(x - mu)")
    m, a, b, d = (v.astype(dtype) for v in (m, a, b, d))
    np.testing.assert_array_equal(y, (x - m) * a + b)
    np.testing.assert_array_equal(out, a * dy + b * (x - m) + d)
