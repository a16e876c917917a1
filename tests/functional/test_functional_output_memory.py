"""Large outputs of the numba backend come from bnlab.buffers: memory nobody holds any more is
handed out again (no page faults), memory anybody still reaches never is."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab import functional as F
from bnlab.buffers import CACHE, MIN_BYTES

pytest.importorskip("numba")

SHAPE = (32, 8, 32, 32)  # 1 MiB of float32: the smallest size the cache keeps


def _forward(x):
    return F.batch_norm_forward(x, None, None, training=True, backend="numba")


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_output_memory_is_reused_only_once_released(rng):
    assert np.prod(SHAPE) * 4 >= MIN_BYTES
    x1, x2 = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    y1, cache1 = _forward(x1)
    assert any(y1.base is block for block in CACHE._blocks), "output not from bnlab.buffers"
    kept = y1.copy()
    view = y1[:, ::2]  # a view keeps the block reachable after y1 itself is gone
    block1 = id(y1.base)  # ids: holding the blocks themselves would keep them in use
    del y1
    y2, _ = _forward(x2)
    assert id(y2.base) != block1, "memory still reachable through a view was handed out again"
    np.testing.assert_array_equal(view, kept[:, ::2])
    block2, held = id(y2.base), len(CACHE._blocks)
    del view, y2
    y3, _ = _forward(x1)
    # both blocks are free again: the most recently used one (likeliest in cache) comes back
    assert id(y3.base) == block2 or CACHE.limit == 0, "released output memory was not reused"
    assert len(CACHE._blocks) == held, "a new block was allocated although two were free"
    np.testing.assert_array_equal(y3, kept)


def test_backward_dx_memory_is_not_handed_out_while_held(rng):
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    _, cache = _forward(x)
    dx1, _, _ = F.batch_norm_backward(dy, cache)
    assert any(dx1.base is block for block in CACHE._blocks), "dx not from bnlab.buffers"
    kept = dx1.copy()
    dx2, _, _ = F.batch_norm_backward(2 * dy, cache)
    assert dx1.ctypes.data != dx2.ctypes.data
    np.testing.assert_array_equal(dx1, kept)
    np.testing.assert_allclose(dx2, 2 * kept, rtol=1e-5, atol=1e-6)
