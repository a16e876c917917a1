"""Determinism: the chunking is a function of the shape only, so 1 and 2 threads and repeated runs
give bit-identical results. The chunk sizes are shrunk here so that small tensors are split into
many chunks (row segments, groups, row blocks, channel tiles) and run in parallel."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from bnlab.kernels import (
    _chunks,
    bn_backward,
    bn_eval_backward,
    bn_eval_forward,
    bn_train_forward,
    core,
)

MAX_THREADS = numba.config.NUMBA_NUM_THREADS


@pytest.fixture(params=["streaming", "fused"])
def tiny_chunks(request, monkeypatch):
    """Many small chunks and no single-thread shortcut, so the chunk merging is exercised;
    channels-last cases run once through the streaming passes and once through the single-launch
    column tiles (tiles of one channel), channels-first long rows through the per-channel
    single-launch kernels."""
    fused = request.param == "fused"
    monkeypatch.setattr(_chunks, "FUSED_TILE_BYTES", (1 << 30) if fused else 0)
    monkeypatch.setattr(_chunks, "FUSED_MIN_WIDTH", 1)
    monkeypatch.setattr(_chunks, "FUSED_MIN_TILES", 20)
    monkeypatch.setattr(_chunks, "FUSED_CHANNEL_BYTES", (1 << 30) if fused else 0)
    monkeypatch.setattr(_chunks, "FUSED_MIN_CHANNELS", 1)
    monkeypatch.setattr(_chunks, "SEGMENT", 40)
    monkeypatch.setattr(_chunks, "SHORT_ROW", 100)
    monkeypatch.setattr(_chunks, "MIN_TASKS", 7)
    monkeypatch.setattr(_chunks, "MIN_BLOCK_ROWS", 3)
    monkeypatch.setattr(_chunks, "MIN_BLOCK_VALUES", 16)
    monkeypatch.setattr(_chunks, "CHANNEL_TILE", 5)
    monkeypatch.setattr(_chunks, "MAX_SHORT_TASKS", 4)  # several channels per short-row task
    monkeypatch.setattr(_chunks, "WIDE_ROW", 40)  # (4, 37, 11): 49 rows of 33, 1 leftover row
    monkeypatch.setattr(core, "PARALLEL_MIN_VALUES", 0)


CASES = [  # (x3 shape, channels_last)
    ((3, 2, 131), False),  # several segments per row, several groups per channel
    ((5, 1, 97), False),  # short rows, one channel: the groups carry the parallelism
    ((9, 2, 13), False),  # short rows, several groups
    ((3, 7, 20), False),  # short rows, several channels per task
    ((4, 37, 11), True),  # several row blocks and channel tiles
    ((4, 37, 24), True),  # register accumulators (_lanes): 192-lane rows, 6 blocks, 4 leftover rows
    ((8, 50, 3), True),  # register accumulators: 192-lane rows, 2 blocks, 16 leftover rows
    ((2, 50, 1), True),  # C = 1 channels-last: run as channels-first
    ((6, 9, 1), False),  # S = 1 channels-first: run as channels-last
]


def _all_outputs(x, dy, channels_last):
    c = x.shape[2] if channels_last else x.shape[1]
    acc = np.float64 if x.dtype == np.float64 else np.float32
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal(c).astype(acc), rng.standard_normal(c).astype(acc)
    y, mean, var = bn_train_forward(x, w, b, 1e-5, channels_last)
    rstd = (1.0 / np.sqrt(var + acc(1e-5))).astype(acc)
    outs = [y, mean, var]
    outs += bn_backward(dy, x, mean, rstd, w, channels_last)
    outs.append(bn_eval_forward(x, w, b, channels_last))
    outs += bn_eval_backward(dy, x, mean, rstd, w, channels_last)
    return outs


def _with_threads(n, fn, *args):
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "channels_last"), CASES)
def test_kernels_bit_identical_across_threads_and_runs(tiny_chunks, shape, channels_last, dtype):
    if MAX_THREADS < 2:
        pytest.skip("numba has a single thread here: nothing to compare")
    rng = np.random.default_rng(0)
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    one = _with_threads(1, _all_outputs, x, dy, channels_last)
    two = _with_threads(2, _all_outputs, x, dy, channels_last)
    again = _with_threads(2, _all_outputs, x, dy, channels_last)
    for a, b, c in zip(one, two, again, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), "1 vs 2 threads differ"
        assert b.tobytes() == c.tobytes(), "two runs with 2 threads differ"


@pytest.mark.parametrize(("shape", "channels_last"), CASES)
def test_kernels_chunk_merging_matches_float64_statistics(tiny_chunks, shape, channels_last):
    """The merged chunk statistics equal NumPy's float64 mean and biased variance."""
    rng = np.random.default_rng(1)
    x = (-7.0 + 2.0 * rng.standard_normal(shape)).astype(np.float64)
    c = shape[2] if channels_last else shape[1]
    _, mean, var = bn_train_forward(x, np.ones(c), np.zeros(c), 1e-5, channels_last)
    axes = (0, 1) if channels_last else (0, 2)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-12, atol=1e-14)
    dy = rng.standard_normal(shape)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    _, dw, db = bn_backward(dy, x, mean, rstd, np.ones(c), channels_last)
    xhat = (x - np.expand_dims(mean, axes)) * np.expand_dims(rstd, axes)
    np.testing.assert_allclose(db, dy.sum(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, (dy * xhat).sum(axis=axes), rtol=1e-12, atol=1e-12)
