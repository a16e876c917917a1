"""Determinism: the work partitioning is a function of the shape only, so 1 and 2 threads and
repeated runs give bit-identical results. The limits are shrunk here so that small tensors are
split into many chunks (row pieces, groups, channel blocks, row blocks, column tiles) and every
pass runs in parallel."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from kernels_support import tiny_limits

from bnlab.kernels import bn_backward, bn_eval_backward, bn_eval_forward, bn_train_forward, paths

MAX_THREADS = numba.config.NUMBA_NUM_THREADS

CASES = [  # (x3 shape, channels_last)
    ((3, 2, 131), False),  # long rows in pieces, several groups per channel
    ((5, 1, 97), False),  # short rows, one channel: the groups carry the parallelism
    ((9, 2, 13), False),  # short rows, several groups
    ((3, 7, 20), False),  # short rows, several channels per task
    ((4, 37, 11), True),  # lane rows in memory, several row blocks, column tiles
    ((4, 37, 24), True),  # register lanes: 192-lane rows, leftover values
    ((8, 50, 3), True),  # register lanes: 192-lane rows, 2 blocks
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


@pytest.mark.parametrize("single_launch", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "channels_last"), CASES)
def test_kernels_bit_identical_across_threads_and_runs(shape, channels_last, dtype, single_launch):
    if MAX_THREADS < 2:
        pytest.skip("numba has a single thread here: nothing to compare")
    rng = np.random.default_rng(0)
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    with tiny_limits(single_launch):
        layout = "NLC" if channels_last else "NCL"
        assert paths.plan(shape, layout, dtype, 2).parallel
        assert not paths.plan(shape, layout, dtype, 1).parallel  # the one-thread twin runs
        one = _with_threads(1, _all_outputs, x, dy, channels_last)
        two = _with_threads(2, _all_outputs, x, dy, channels_last)
        again = _with_threads(2, _all_outputs, x, dy, channels_last)
    for a, b, c in zip(one, two, again, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), "1 vs 2 threads differ"
        assert b.tobytes() == c.tobytes(), "two runs with 2 threads differ"


@pytest.mark.parametrize("single_launch", [False, True])
@pytest.mark.parametrize(("shape", "channels_last"), CASES)
def test_kernels_chunk_merging_matches_float64_statistics(shape, channels_last, single_launch):
    """The merged chunk statistics equal NumPy's float64 mean and biased variance."""
    rng = np.random.default_rng(1)
    x = (-7.0 + 2.0 * rng.standard_normal(shape)).astype(np.float64)
    c = shape[2] if channels_last else shape[1]
    with tiny_limits(single_launch):
        _, mean, var = bn_train_forward(x, np.ones(c), np.zeros(c), 1e-5, channels_last)
        dy = rng.standard_normal(shape)
        rstd = 1.0 / np.sqrt(var + 1e-5)
        _, dw, db = bn_backward(dy, x, mean, rstd, np.ones(c), channels_last)
    axes = (0, 1) if channels_last else (0, 2)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-12, atol=1e-14)
    xhat = (x - np.expand_dims(mean, axes)) * np.expand_dims(rstd, axes)
    np.testing.assert_allclose(db, dy.sum(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, (dy * xhat).sum(axis=axes), rtol=1e-12, atol=1e-12)
