"""The fast path's reused output memory (bnlab.buffers): memory comes back only when nobody
holds it, never while any tensor, view, storage or array still reaches it; the size limit; and the
fast path's dx written through the kernels' 3-D views for every layout equals the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab.buffers import ALIGN, CACHE, BufferCache  # noqa: E402
from bnlab.torch import functional as BF  # noqa: E402

KB = 1024


def _cache(limit=64 * KB):
    return BufferCache(limit=limit, min_bytes=KB)


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_released_memory_is_reused_in_any_dtype_and_shape():
    cache = _cache()
    a = cache.empty((4, 256), np.float32)  # 4 KB
    t = torch.from_numpy(a)
    ptr = _ptr(a)
    del a, t
    b = cache.empty((512,), np.float64)  # the same 4 KB
    assert _ptr(b) == ptr and b.flags.c_contiguous and b.dtype == np.float64
    assert cache.held_bytes == 4 * KB + ALIGN  # a block has room to start a view anywhere


@pytest.mark.parametrize("offset", [0, 4, 16, 36, 60])
def test_arrays_start_at_the_offset_within_a_cache_line_of_like(offset):
    """`like=`: the output shares its address modulo ALIGN with an input (so a kernel can stream
    whole lines of both); without it, a line boundary. The same block serves every offset."""
    cache = _cache()
    raw = np.empty(2 * KB + ALIGN, np.uint8)
    start = (offset - _ptr(raw)) % ALIGN
    like = raw[start : start + 2 * KB].view(np.float32)
    assert _ptr(like) % ALIGN == offset
    a = cache.empty((512,), np.float32, like=like)
    assert _ptr(a) % ALIGN == offset and a.shape == (512,) and a.flags.c_contiguous
    block = _ptr(cache._blocks[0])
    del a
    b = cache.empty((512,), np.float32)
    assert _ptr(b) % ALIGN == 0 and _ptr(cache._blocks[0]) == block and len(cache._blocks) == 1


# every way of still reaching a handed-out block (after the handed-out array itself is dropped)
HOLDERS = {
    "the array": lambda a, t: a,
    "a NumPy view": lambda a, t: a[1:],
    "the tensor": lambda a, t: t,
    "a permuted tensor view": lambda a, t: t.view(4, 8, 32).permute(2, 0, 1),
    "the storage": lambda a, t: t.untyped_storage(),
    "tensor.numpy()": lambda a, t: t.numpy(),
    "a memoryview": lambda a, t: memoryview(a),
}


def _values(kept) -> np.ndarray:
    if isinstance(kept, torch.UntypedStorage):
        kept = torch.empty(0).set_(kept)
    return kept.numpy() if isinstance(kept, torch.Tensor) else np.asarray(kept)


@pytest.mark.parametrize("holder", HOLDERS)
def test_memory_still_reachable_is_never_handed_out(holder):
    cache = _cache()
    a = cache.empty((4, 256), np.float32)
    a[:] = 7.0
    t = torch.from_numpy(a)
    kept, first = HOLDERS[holder](a, t), _ptr(a)
    del a, t
    b = cache.empty((4, 256), np.float32)
    b[:] = -1.0  # would show through `kept` if the memory were shared
    assert _ptr(b) not in range(first - 4 * KB + 1, first + 4 * KB)  # no overlap
    assert np.all(_values(kept) == 7.0)
    del kept
    assert _ptr(cache.empty((4, 256), np.float32)) == first  # now free again


def test_limit_bounds_held_memory_and_evicts_idle_blocks_first():
    block = 4 * KB + ALIGN
    cache = _cache(limit=2 * block)
    live = [cache.empty((1024,), np.float32) for _ in range(3)]  # 3 x 4 KB wanted, room for 2
    assert cache.held_bytes == 2 * block and len({_ptr(a) for a in live}) == 3
    del live
    other = cache.empty((2048,), np.float32)  # a new 8 KB size: both idle 4 KB blocks go
    assert cache.held_bytes == 8 * KB + ALIGN and len(cache._blocks) == 1
    assert _ptr(cache._blocks[0]) <= _ptr(other) < _ptr(cache._blocks[0]) + ALIGN
    cache.set_limit(0)
    assert cache.held_bytes == 8 * KB + ALIGN  # `other` is in use: kept until released
    del other
    cache.set_limit(0)
    assert cache.held_bytes == 0


def test_small_and_oversized_requests_bypass_the_cache():
    cache = _cache(limit=8 * KB)
    cache.empty((100,), np.float32), cache.empty((4096,), np.float32)  # 400 B, 16 KB
    assert cache.held_bytes == 0


@pytest.mark.parametrize("limit", [-1, 1.5, True, None])
def test_bad_limit_is_a_clear_error(limit):
    with pytest.raises(ValueError, match="limit must be a number of bytes"):
        BufferCache(limit=limit)


# --------------------------------------------------------------------------- through the fast path

BIG = (2, 8, 128, 130)  # 1.06 MB of float32: above the cache's MIN_BYTES


@pytest.fixture(autouse=True)
def _kernels():
    """The reused memory belongs to the kernel route, which these sizes would not take by
    default (bnlab.torch.dispatch): take it."""
    with bt.dispatch.kernel_route("always"):
        yield


def _fwd_bwd(m, x, dy):
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fast_path_reuses_outputs_only_after_release(fmt):
    g = torch.Generator().manual_seed(3)
    x1, x2, dy1, dy2 = (torch.randn(BIG, generator=g).to(memory_format=fmt) for _ in range(4))
    m = bt.BatchNorm2d(8)
    y1, dx1 = _fwd_bwd(m, x1, dy1)
    y1_copy, dx1_copy = y1.detach().clone(), dx1.clone()
    y2, dx2 = _fwd_bwd(m, x2, dy2)  # y1, dx1 still alive: fresh memory
    ptrs = {t.data_ptr() for t in (y1, dx1, y2, dx2)}
    assert len(ptrs) == 4
    torch.testing.assert_close(y1, y1_copy, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx1_copy, rtol=0, atol=0)
    old = {y1.data_ptr(), dx1.data_ptr()}
    del y1, dx1
    y3, dx3 = _fwd_bwd(m, x1, dy1)  # their memory comes back, with the same results
    assert {y3.data_ptr(), dx3.data_ptr()} == old
    assert y3.is_contiguous(memory_format=fmt) and dx3.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(dx3, dx1_copy, rtol=1e-6, atol=1e-6)


def test_module_cache_can_be_limited_and_emptied():
    before = CACHE.limit
    try:
        bt.set_buffer_cache_limit(0)
        assert CACHE.held_bytes == 0
        y = bt.BatchNorm2d(8)(torch.randn(BIG))
        assert CACHE.held_bytes == 0 and y.shape == BIG
        bt.set_buffer_cache_limit(before)
        bt.BatchNorm2d(8)(torch.randn(BIG))
        assert CACHE.held_bytes > 0
        bt.empty_buffer_cache()
        assert CACHE.held_bytes == 0
    finally:
        bt.set_buffer_cache_limit(before)


# --------------------------------------------------------------------------- kernel views

SHAPES = {  # layout -> how to make the (N, C, ...) tensor from a size
    "NC": lambda n, c, s: torch.randn(n, c, dtype=torch.float64),
    "NCL": lambda n, c, s: torch.randn(n, c, s, dtype=torch.float64),
    "NLC": lambda n, c, s: torch.randn(n, s, c, dtype=torch.float64).transpose(1, 2),
    "NCHW": lambda n, c, s: torch.randn(n, c, s, 3, dtype=torch.float64),
    "NHWC": lambda n, c, s: torch.randn(n, c, s, 3, dtype=torch.float64).to(
        memory_format=torch.channels_last
    ),
}


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(list(SHAPES)),
    n=st.integers(2, 5),
    c=st.integers(1, 5),
    s=st.integers(1, 6),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_path_backward_equals_reference_in_every_layout(layout, n, c, s, training, seed):
    """The fused backward written through this package's 3-D views vs the torch-ops reference
    differentiated by autograd; float64, random upstream gradient."""
    torch.manual_seed(seed)
    x = SHAPES[layout](n, c, s) * 3 + 1
    assert BF.kernel_layout(x) is not None  # `layout`, or another when strides are ambiguous
    dy = torch.randn(x.shape, dtype=torch.float64)
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    grads = []
    for fn in (BF.batch_norm, BF.batch_norm_reference):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        args = (xs, rm.clone(), rv.clone(), ws, bs, training, 0.1, 1e-5)
        with bt.dispatch.kernel_route("always"):
            y = fn(*args) if fn is BF.batch_norm else fn(*args, None)
        y.backward(dy)
        grads.append((y, xs.grad, ws.grad, bs.grad))
    assert type(grads[0][0].grad_fn).__name__ == "KernelBatchNormBackward"
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
