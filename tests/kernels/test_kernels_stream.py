"""Streaming (non-temporal) stores: the same bits as ordinary stores, for every kernel that uses
them, every alignment of the rows, and both float dtypes; and the rule that decides when they are
used. The size threshold is lowered here (``stream_bytes``) so that small tensors stream."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_support import LINE, at_offset, tiny_limits
from numba import njit

from bnlab.buffers import CACHE
from bnlab.functional import (
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from bnlab.kernels import _elementwise, _stream, explain, paths


@njit
def _rows(x, dy, m, a, b, d, y, dx, stream):
    _elementwise.affine_row(x, m, a, b, y, stream)
    _elementwise.dx_row(dy, x, m, a, b, d, dx, stream)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    n=st.integers(0, 70),
    y_off=st.integers(0, 15),
    x_off=st.integers(0, 15),
    scalars=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rows_stream_the_bits_of_the_plain_expressions(dtype, n, y_off, x_off, scalars, seed):
    """Head, whole lines and tail, at any start within a line (inputs aligned differently from
    the output too), coefficients per element or scalar: exactly NumPy's (x − m)·a + b and
    A·dy + B·(x − m) + D, streamed or not."""
    rng = np.random.default_rng(seed)
    item = np.dtype(dtype).itemsize
    x, dy, m, a, b, d = (at_offset(rng.standard_normal(n).astype(dtype), x_off * item)
                         for _ in range(6))  # fmt: skip
    if scalars:
        m, a, b, d = (dtype(v) for v in rng.standard_normal(4))
    for stream in (False, True):
        y = at_offset(np.zeros(n, dtype), y_off * item)
        dx = at_offset(np.zeros(n, dtype), y_off * item)
        _rows(x, dy, m, a, b, d, y, dx, stream)
        np.testing.assert_array_equal(y, (x - m) * a + b)
        np.testing.assert_array_equal(dx, a * dy + b * (x - m) + d)


def test_streams_only_float_arrays_aligned_like_each_other():
    big = np.zeros(1024, np.float32)
    assert _stream.streams(at_offset(big, 16), at_offset(big, 16), at_offset(big, 16))
    assert not _stream.streams(at_offset(big, 16), at_offset(big, 20))  # split loads
    assert not _stream.streams(at_offset(np.zeros(2048, np.float16), 0))  # no float16 path
    odd = at_offset(big, 1)  # float32 at a byte offset of 1: no element starts a line
    assert not odd.flags.aligned and not _stream.streams(odd, at_offset(big, 1))


def test_the_plan_streams_outputs_of_at_least_stream_bytes():
    with paths.limits(stream_bytes=4096):
        assert paths.plan((4, 8, 32), "NCL", np.float32).stream  # 4 KiB
        assert not paths.plan((4, 8, 31), "NCL", np.float32).stream
        assert paths.plan((64, 16), "NC", np.float32, norm="layer_norm").stream


CASES = [  # (shape, layout, single launch?) — each big enough for several tasks
    ((3, 5, 6, 31), "NCHW", False),  # short channels-first rows (S = 186 < short_row)
    ((2, 4, 8, 81), "NCHW", False),  # long channels-first rows (S = 648) in pieces, two passes
    ((2, 4, 8, 81), "NCHW", True),  # per-channel single launch
    ((4, 5, 7, 16), "NHWC", False),  # register lanes, 64-lane rows
    ((4, 5, 7, 12), "NHWC", False),  # register lanes, 192-lane rows
    ((2, 3, 5, 80), "NHWC", False),  # lane rows in memory
    ((4, 5, 7, 10), "NHWC", True),  # column tiles (the single launch never streams)
    ((40, 64), "NC", False),
]


def _fwd_bwd(x, dy, layout, training, out=None):
    c = x.shape[-1] if layout in ("NHWC", "NC") else x.shape[1]
    rng = np.random.default_rng(1)
    acc = np.float64 if x.dtype == np.float64 else np.float32
    g, b = rng.standard_normal(c).astype(acc), rng.standard_normal(c).astype(acc)
    rm, rv = rng.standard_normal(c).astype(acc), (0.5 + rng.random(c)).astype(acc)
    y, cache = batch_norm_forward(x, g, b, training=training, running_mean=rm, running_var=rv,
                                  layout=layout, out=out, backend="numba")  # fmt: skip
    dx, dg, db = batch_norm_backward(dy, cache)
    return [y.copy(), dx.copy(), dg, db, rm, rv]


@pytest.mark.parametrize(("shape", "layout", "single"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_off", [0, 16])
def test_streaming_kernels_give_the_bits_of_ordinary_stores(
    monkeypatch, shape, layout, single, dtype, training, x_off
):
    monkeypatch.setattr(CACHE, "min_bytes", 0)  # small outputs aligned like x too
    rng = np.random.default_rng(0)
    x = at_offset((3.0 + rng.standard_normal(shape)).astype(dtype), x_off)
    dy = at_offset(rng.standard_normal(shape).astype(dtype), x_off)
    with tiny_limits(single, short_row=200, stream_bytes=1 << 62):
        p = explain(x, layout, training=training, backend="numba").plan
        assert p.path.endswith("single-launch" if single else "two-pass") and not p.stream
        plain = _fwd_bwd(x, dy, layout, training)
    with tiny_limits(single, short_row=200, stream_bytes=0):
        assert explain(x, layout, training=training, backend="numba").plan.stream
        streamed = _fwd_bwd(x, dy, layout, training)
        out = at_offset(np.zeros_like(x), x_off + 8)  # out= not aligned like x: no streaming
        misaligned = _fwd_bwd(x, dy, layout, training, out=out)
    for p_, s, m in zip(plain, streamed, misaligned, strict=True):
        np.testing.assert_array_equal(s, p_)
        np.testing.assert_array_equal(m, p_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_off", [0, 16])
def test_layer_and_group_norm_streaming_give_the_bits_of_ordinary_stores(dtype, x_off):
    rng = np.random.default_rng(2)
    x = at_offset((2.0 + rng.standard_normal((6, 8, 40))).astype(dtype), x_off)
    dy = at_offset(rng.standard_normal(x.shape).astype(dtype), x_off)
    g = rng.standard_normal(8).astype(dtype)
    gl = rng.standard_normal(40).astype(dtype)

    def run():
        _, c1 = group_norm_forward(x, 4, g, g, layout="NCL", backend="numba")
        _, c2 = layer_norm_forward(x, 40, gl, gl, backend="numba")
        outs = [*group_norm_backward(dy, c1), *layer_norm_backward(dy, c2)]
        return [c1.mean, c1.rstd, c2.mean, *outs]

    with paths.limits(stream_bytes=1 << 62, parallel_min_values=0):
        plain = run()
    with paths.limits(stream_bytes=0, parallel_min_values=0):
        streamed = run()
    for p_, s in zip(plain, streamed, strict=True):
        np.testing.assert_array_equal(s, p_)


@pytest.mark.parametrize("streamable", [True, False])
def test_functional_outputs_start_where_their_input_starts_within_a_line(streamable):
    """bnlab.buffers hands out outputs the plan streams aligned like x (so the kernels can
    stream them), others at a line boundary (no address lookup of x)."""
    shape = (4, 64, 32, 32)  # 1 MiB of float32: cached by bnlab.buffers
    with paths.limits(stream_bytes=(1 << 20) if streamable else (2 << 20)):
        for off in (0, 16, 48):
            x = at_offset(np.random.default_rng(off).standard_normal(shape).astype(np.float32), off)
            y, cache = batch_norm_forward(x, None, None, training=True, backend="numba")
            dx, _, _ = batch_norm_backward(np.ones_like(x) * 0.5 + x, cache)
            want = off if streamable else 0
            assert y.ctypes.data % LINE == want and dx.ctypes.data % LINE == want


def test_unaligned_arrays_are_staged_and_give_the_plain_results():
    """float32 data at an odd byte offset (np.frombuffer of a byte string can do that): the
    kernels compute an aligned copy (explain says so), with the same values."""
    rng = np.random.default_rng(3)
    shape = (4, 8, 6, 20)
    x0 = rng.standard_normal(shape).astype(np.float32)
    dy0 = rng.standard_normal(shape).astype(np.float32)
    x, dy = at_offset(x0, 1), at_offset(dy0, 1)
    assert not x.flags.aligned
    assert any("misaligned" in s for s in explain(x, backend="numba").staging)
    with paths.limits(stream_bytes=0):
        got = _fwd_bwd(x, dy, "NCHW", True)
    for g, e in zip(got, _fwd_bwd(x0, dy0, "NCHW", True), strict=True):
        np.testing.assert_array_equal(g, e)
