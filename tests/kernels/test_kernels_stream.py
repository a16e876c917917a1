"""Streaming (non-temporal) stores: the same bits as ordinary stores, for every kernel that uses
them, every alignment of the rows, and both float dtypes; and the rule that decides when to use
them. The threshold is lowered here so that small tensors take the streaming path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.buffers import CACHE
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.kernels import _chunks, _elementwise, _fused, _lanes, _stream, core

LINE = _stream.LINE


def _at_offset(values: np.ndarray, offset_bytes: int) -> np.ndarray:
    """A copy of the 1-D or N-D ``values`` whose data starts ``offset_bytes`` past a line."""
    raw = np.empty(values.nbytes + LINE, np.uint8)
    start = (offset_bytes - raw.ctypes.data) % LINE
    out = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


# --------------------------------------------------------------------------- row helpers


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    n=st.integers(0, 70),
    y_off=st.integers(0, 15),
    x_off=st.integers(0, 15),
    seed=st.integers(0, 2**32 - 1),
)
def test_row_helpers_equal_the_plain_expressions_bit_for_bit(dtype, n, y_off, x_off, seed):
    """Head, whole lines and tail, at any start within a line (inputs aligned differently from
    the output too): exactly NumPy's (x − m)·a + b and (A·dy + B·(x − μ)) + D."""
    rng = np.random.default_rng(seed)
    item = np.dtype(dtype).itemsize
    x, dy, m, a, b, d = (
        _at_offset(rng.standard_normal(n).astype(dtype), x_off * item) for _ in range(6)
    )
    y = _at_offset(np.zeros(n, dtype), y_off * item)
    _stream.affine_row(x, m, a, b, y)
    np.testing.assert_array_equal(y, (x - m) * a + b)
    _stream.backward_row(dy, x, m, a, b, d, y)
    np.testing.assert_array_equal(y, a * dy + b * (x - m) + d)
    mc, ac, bc, dc = (dtype(v) for v in rng.standard_normal(4))
    _stream.affine_row_scalar(x, mc, ac, bc, y)
    np.testing.assert_array_equal(y, (x - mc) * ac + bc)
    _stream.backward_row_scalar(dy, x, mc, ac, bc, dc, y)
    np.testing.assert_array_equal(y, ac * dy + bc * (x - mc) + dc)
    _stream.ln_affine_row(x, mc, ac, a, b, y)  # layer norm: (x − μ)·rstd·γ + β
    np.testing.assert_array_equal(y, (x - mc) * ac * a + b)
    _stream.ln_dx_row(dy, x, mc, ac, a, bc, dc, y)  # rstd·(dy·γ − ca − (x − μ)·rstd·cb)
    np.testing.assert_array_equal(y, ac * (dy * a - bc - (x - mc) * ac * dc))


# --------------------------------------------------------------------------- the decision


def test_streams_only_big_float_outputs_aligned_like_their_inputs(monkeypatch):
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 4096)
    big = np.zeros(1024, np.float32)  # 4 KiB
    assert _stream.streams(_at_offset(big, 16), _at_offset(big, 16), _at_offset(big, 16))
    assert not _stream.streams(_at_offset(big[:1023], 0), _at_offset(big[:1023], 0))  # small
    assert not _stream.streams(_at_offset(big, 16), _at_offset(big, 20))  # split loads
    assert not _stream.streams(_at_offset(np.zeros(2048, np.float16), 0))  # no float16 path
    odd = _at_offset(big, 1)  # float32 at a byte offset of 1: no element starts a line
    assert not odd.flags.aligned and not _stream.streams(odd, _at_offset(big, 1))
    rows = _at_offset(np.zeros((16, 64), np.float32), 0)  # 256-byte rows: whole lines
    assert _stream.streams_rows(rows, _at_offset(rows, 0))
    odd = _at_offset(np.zeros((16, 65), np.float32), 0)  # 260-byte rows: offsets drift
    assert not _stream.streams_rows(odd, _at_offset(odd, 0))
    v = np.arange(7, dtype=np.float32)
    for off in (0, 4, 36):
        aligned = _stream.aligned_like(v, _at_offset(big, off))
        assert aligned.ctypes.data % LINE == off and np.array_equal(aligned, v)


# --------------------------------------------------------------------------- every kernel


class _Launches(list):
    """The recorded ``stream`` flags; ``kernels``: the names of the spied kernels that ran."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def clear(self):
        super().clear()
        self.kernels.clear()


@pytest.fixture
def spy_streams(monkeypatch):
    """Record the ``stream`` flag every streaming-capable kernel is launched with (and, in
    ``.kernels``, which elementwise/single-launch kernel ran)."""
    seen = _Launches()

    def wrap(module, name, flag_index):
        kernel = getattr(module, name)

        def spy(*args):
            seen.append(args[flag_index])
            seen.kernels.append(name)
            return kernel(*args)

        monkeypatch.setattr(module, name, spy)

    for name, i in (("affine_cf", 5), ("affine_cl", 5), ("backward_cf", 7), ("backward_cl", 7),
                    ("affine_cf_short", 5), ("backward_cf_short", 7)):  # fmt: skip
        wrap(_elementwise, name, i)
    wrap(_fused, "train_forward_cf", 4)
    wrap(_fused, "backward_cf", 5)
    for name, i in (("affine", 6), ("backward", 8)):  # the register-coefficient kernels
        pick = getattr(_lanes, name)

        def spying_pick(width, pick=pick, i=i, name=name):
            kernel = pick(width)

            def spy(*args):
                seen.append(args[i])
                seen.kernels.append(f"_lanes.{name}")
                return kernel(*args)

            return spy

        monkeypatch.setattr(_lanes, name, spying_pick)
    return seen


def _fwd_bwd(x, dy, layout, training, out_off=None):
    c = x.shape[-1] if layout in ("NHWC", "NC") else x.shape[1]
    rng = np.random.default_rng(1)
    acc = np.float64 if x.dtype == np.float64 else np.float32
    g, b = rng.standard_normal(c).astype(acc), rng.standard_normal(c).astype(acc)
    rm, rv = rng.standard_normal(c).astype(acc), (0.5 + rng.random(c)).astype(acc)
    out = None if out_off is None else _at_offset(np.zeros_like(x), out_off)
    y, cache = batch_norm_forward(
        x, g, b, training=training, running_mean=rm, running_var=rv, layout=layout, out=out
    )
    dx, dg, db = batch_norm_backward(dy, cache)
    return [y.copy(), dx.copy(), dg, db, rm, rv]


CASES = [  # (shape, layout, fused single-launch?) — each big enough for several tasks
    ((3, 5, 6, 31), "NCHW", False),  # short channels-first rows (S = 186 < SHORT_ROW)
    ((2, 4, 8, 81), "NCHW", False),  # long channels-first rows (S = 648), two passes
    ((2, 4, 8, 81), "NCHW", True),  # per-channel single launch
    ((4, 5, 7, 16), "NHWC", False),  # register coefficients, 64 lanes (_lanes)
    ((4, 5, 7, 12), "NHWC", False),  # register coefficients, 192 lanes
    ((2, 3, 5, 80), "NHWC", False),  # no register width: widened rows of whole lines
    ((4, 5, 7, 10), "NHWC", False),  # widened rows of 240 bytes: no streaming, same path
    ((40, 64), "NC", False),
]


@pytest.mark.parametrize(("shape", "layout", "fused"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_off", [0, 16])
def test_streaming_kernels_give_the_bits_of_ordinary_stores(
    monkeypatch, spy_streams, shape, layout, fused, dtype, training, x_off
):
    monkeypatch.setattr(_chunks, "FUSED_TILE_BYTES", 0)
    monkeypatch.setattr(_chunks, "FUSED_CHANNEL_BYTES", (1 << 30) if fused else 0)
    monkeypatch.setattr(_chunks, "WIDE_ROW", 64)
    monkeypatch.setattr(core, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(CACHE, "min_bytes", 0)  # small outputs aligned like x too
    rng = np.random.default_rng(0)
    x = _at_offset((3.0 + rng.standard_normal(shape)).astype(dtype), x_off)
    dy = _at_offset(rng.standard_normal(shape).astype(dtype), x_off)
    if layout == "NCHW":  # the single launch runs exactly when the label says so
        x3 = x.reshape(shape[0], shape[1], -1)
        assert (core.fused_tiles(x3, False) == -1) == fused
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 1 << 62)
    plain = _fwd_bwd(x, dy, layout, training)
    assert not any(spy_streams)
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 0)
    spy_streams.clear()
    streamed = _fwd_bwd(x, dy, layout, training)
    if layout == "NCHW":  # and the short-row kernels exactly for short rows
        short = np.prod(shape[2:]) < _chunks.SHORT_ROW
        assert any(k.endswith("_cf_short") for k in spy_streams.kernels) == short
    row_bytes = 64 // shape[-1] * shape[-1] * np.dtype(dtype).itemsize  # a widened NHWC row
    in_registers = _lanes.register_width(shape[-1]) > 0  # streams from any common offset
    expect_stream = layout != "NHWC" or in_registers or row_bytes % LINE == 0
    assert spy_streams and all(spy_streams) == expect_stream
    spy_streams.clear()
    misaligned = _fwd_bwd(x, dy, layout, training, out_off=x_off + 8)  # out= not like x
    assert spy_streams and not spy_streams[0]  # the forward into `out` did not stream
    for p, s, m in zip(plain, streamed, misaligned, strict=True):
        np.testing.assert_array_equal(s, p)
        np.testing.assert_array_equal(m, p)


@pytest.mark.parametrize("streamable", [True, False])
def test_functional_outputs_start_where_their_input_starts_within_a_line(monkeypatch, streamable):
    """bnlab.buffers hands out outputs big enough to stream aligned like x (so the kernels can
    stream them), smaller cached ones at a line boundary (no address lookup of x)."""
    shape = (4, 64, 32, 32)  # 1 MiB of float32: cached by bnlab.buffers
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", (1 << 20) if streamable else (2 << 20))
    for off in (0, 16, 48):
        x = _at_offset(np.random.default_rng(off).standard_normal(shape).astype(np.float32), off)
        y, cache = batch_norm_forward(x, None, None, training=True, backend="numba")
        dx, _, _ = batch_norm_backward(np.ones_like(x) * 0.5 + x, cache)
        want = off if streamable else 0
        assert y.ctypes.data % LINE == want and dx.ctypes.data % LINE == want


def test_unaligned_arrays_never_stream_and_give_the_plain_results(monkeypatch, spy_streams):
    """float32 data at an odd byte offset (np.frombuffer of a byte string can do that): the
    kernels must not issue line stores (they would fault), and compute the same values."""
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(CACHE, "min_bytes", 0)
    rng = np.random.default_rng(3)
    shape = (4, 8, 6, 20)
    x0 = rng.standard_normal(shape).astype(np.float32)
    dy0 = rng.standard_normal(shape).astype(np.float32)
    x, dy = _at_offset(x0, 1), _at_offset(dy0, 1)
    assert not x.flags.aligned
    got = _fwd_bwd(x, dy, "NCHW", True)
    assert spy_streams and not any(spy_streams)
    for g, e in zip(got, _fwd_bwd(x0, dy0, "NCHW", True), strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("d", "x_off"), [(64, 0), (64, 16), (48, 16), (60, 0)])
def test_layer_norm_streaming_rows_give_the_bits_of_ordinary_stores(monkeypatch, dtype, d, x_off):
    """The single-pass layer-norm kernels with streaming y and dx (rows of whole lines; d = 60
    float32 rows are not, and must not stream) against ordinary stores."""
    from bnlab.kernels import _rows
    from bnlab.kernels import layer_norm as ln_module

    monkeypatch.setattr(_chunks, "SHORT_ROW", 1)  # small rows take the single-pass kernels
    seen = []
    for name, flag in (("ln_forward_rows", 5), ("ln_grad_sums", 13)):
        kernel = getattr(_rows, name)

        def spy(*args, kernel=kernel, flag=flag):
            seen.append(args[flag])
            return kernel(*args)

        monkeypatch.setattr(_rows, name, spy)
    rng = np.random.default_rng(d)
    x = _at_offset((2.0 + rng.standard_normal((37, d))).astype(dtype), x_off)
    dy = _at_offset(rng.standard_normal((37, d)).astype(dtype), x_off)
    g = rng.standard_normal(d).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)

    def run():
        y = _at_offset(np.zeros_like(x), x_off)
        dx = _at_offset(np.zeros_like(x), x_off)
        _, mean, rstd = ln_module.ln_forward(x, g, b, 1e-5, out=y)
        _, dg, db = ln_module.ln_backward(dy, x, mean, rstd, g, dx=dx)
        return [y, mean, rstd, dx, dg, db]

    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 1 << 62)
    plain = run()
    assert seen == [False, False]
    seen.clear()
    monkeypatch.setattr(_stream, "STREAM_MIN_BYTES", 0)
    streamed = run()
    assert seen == [d * np.dtype(dtype).itemsize % LINE == 0] * 2
    for p, q in zip(plain, streamed, strict=True):
        np.testing.assert_array_equal(q, p)
