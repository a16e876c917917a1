"""Batch-parallel matmul: the same numbers as np.matmul, bit for bit, for any chunking."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.nn._batch_parallel import batched_matmul

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 5),
    k=st.integers(1, 6),
    p=st.integers(1, 7),
    which=st.sampled_from(["both", "left2d", "right2d"]),
    threads=st.integers(1, 4),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_batched_matmul_equals_numpy(n, m, k, p, which, threads, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k) if which == "left2d" else (n, m, k)).astype(dtype)
    b = rng.standard_normal((k, p) if which == "right2d" else (n, k, p)).astype(dtype)
    got = batched_matmul(a, b, threads=threads)
    assert got.dtype == dtype and got.shape == (n, m, p)
    np.testing.assert_array_equal(got, np.matmul(a, b))


def test_batched_matmul_takes_transposed_views():
    """The conv layers pass transposed views (cols.transpose(0, 2, 1))."""
    rng = np.random.default_rng(0)
    d = rng.standard_normal((8, 4, 6)).astype(np.float32)
    cols = rng.standard_normal((8, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        batched_matmul(d, cols.transpose(0, 2, 1), threads=3),
        np.matmul(d, cols.transpose(0, 2, 1)),
    )
