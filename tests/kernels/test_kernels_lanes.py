"""The register-accumulator channels-last kernels (:mod:`bnlab.kernels._lanes`): which channel
counts take them, and that they compute what the plain float64 / in-dtype NumPy math computes —
for row counts with leftover rows (R not a multiple of k = W / C), data at any whole-item offset
within a cache line (where the registers' lane rows start), x and dy at one offset and out at the
same or another one (then nothing streams), several row blocks run in parallel, and with and
without streaming stores. (Offsets that are not a multiple of the item size make numba compile
separate unaligned kernels; they were checked by hand, not here.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_patching import attributes_set
from kernels_tolerances import assert_matches

from bnlab.kernels import _chunks, _lanes, _stream, core

LINE = _stream.LINE
# >= 1000 examples per kernel in CI (the bar), counting only the tests that surely take
# these kernels: the functional property tests reach them for some channel counts only
EXAMPLES = 1000 if os.environ.get("CI") == "true" else 150
REGISTER_CHANNELS = sorted(  # C = 1 is run as channels-first (N, 1, S): not these kernels
    {c for w in _lanes.REGISTER_WIDTHS for c in range(2, w + 1) if w % c == 0}
)


@pytest.mark.parametrize(
    ("c", "width"),
    [(1, 64), (2, 64), (3, 192), (5, 0), (12, 192), (48, 192), (64, 64), (80, 0), (96, 192),
     (100, 0), (128, 128), (256, 256), (257, 0), (512, 0), (0, 0)],
)  # fmt: skip
def test_register_width_is_the_narrowest_width_that_whole_rows_fill(c, width):
    assert _lanes.register_width(c) == width


def _at_offset(values: np.ndarray, offset_values: int) -> np.ndarray:
    """A copy of ``values`` starting ``offset_values`` elements past a cache-line boundary."""
    size = values.itemsize
    raw = np.empty(values.nbytes + 2 * LINE, np.uint8)
    start = (offset_values * size - raw.ctypes.data) % LINE
    out = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


def _many_blocks_and_streams(stream: bool):
    """Several row blocks even for small tensors, in parallel, streaming stores on or off."""
    names = {
        (_chunks, "MIN_TASKS"): 5,
        (_chunks, "MIN_BLOCK_ROWS"): 1,
        (_chunks, "MIN_BLOCK_VALUES"): 8,
        (core, "PARALLEL_MIN_VALUES"): 0,
        (_stream, "STREAM_MIN_BYTES"): 0 if stream else 1 << 62,
    }
    return attributes_set(names)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    c=st.sampled_from(REGISTER_CHANNELS),
    rows=st.integers(1, 700),
    dtype=st.sampled_from([np.float32, np.float64]),
    offset=st.integers(0, 15),
    out_offset=st.one_of(st.none(), st.integers(0, 15)),
    stream=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_register_kernels_match_numpy(c, rows, dtype, offset, out_offset, stream, seed):
    """Statistics and gradient sums vs float64 NumPy; the elementwise passes bit for bit against
    the same expressions in the array's dtype."""
    rng = np.random.default_rng(seed)
    shape = (1, rows, c)
    x = _at_offset((rng.uniform(-50, 50) + rng.standard_normal(shape)).astype(dtype), offset)
    dy = _at_offset(rng.standard_normal(shape).astype(dtype), offset)
    out = _at_offset(np.zeros(shape, dtype), offset if out_offset is None else out_offset)
    coefs = [rng.standard_normal(c).astype(dtype) for _ in range(4)]
    x64, dy64 = x.reshape(rows, c).astype(np.float64), dy.reshape(rows, c).astype(np.float64)
    with _many_blocks_and_streams(stream):
        mean, var = core.channel_moments(x, True)
        sum_dy, sum_dyxmu = core.channel_grad_sums(dy, x, mean, True)
        y = core.affine(x, *coefs[:3], True, out).copy()
        dx = core.backward_elementwise(dy, x, *coefs, True, out).copy()
    ref_mean = x64.mean(axis=0)
    assert_matches(mean, ref_mean, np.float64, "mean")
    assert_matches(var, x64.var(axis=0), np.float64, "var")
    assert_matches(sum_dy, dy64.sum(axis=0), np.float64, "sum dy")
    assert_matches(sum_dyxmu, (dy64 * (x64 - mean)).sum(axis=0), np.float64, "sum dy(x - mu)")
    m, a, b, d = coefs
    np.testing.assert_array_equal(y, (x - m) * a + b)
    np.testing.assert_array_equal(dx, a * dy + b * (x - m) + d)


@pytest.mark.parametrize("c", [3, 16, 64, 100])
def test_register_kernels_run_exactly_when_c_has_a_register_width(monkeypatch, c):
    calls = []

    def spy(kernel, name):
        return lambda *args: calls.append(name) or kernel(*args)

    for table, names in ((_lanes._KERNELS, ("moments", "grad_sums")),
                         (_lanes._ELEMENTWISE, ("affine", "backward"))):  # fmt: skip
        for width, kernels in list(table.items()):
            spies = tuple(spy(k, n) for k, n in zip(kernels, names, strict=True))
            monkeypatch.setitem(table, width, spies)
    x = np.random.default_rng(0).standard_normal((2, 200, c))
    mean, _ = core.channel_moments(x, True)
    core.channel_grad_sums(x, x, mean, True)
    core.affine(x, mean, mean, mean, True, np.empty_like(x))
    core.backward_elementwise(x, x, mean, mean, mean, mean, True, np.empty_like(x))
    expected = ["moments", "grad_sums", "affine", "backward"] if _lanes.register_width(c) else []
    assert calls == expected
