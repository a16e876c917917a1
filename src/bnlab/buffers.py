"""Reused memory for large outputs of the fast paths (y in forward, dx in backward): the numba
backend of :mod:`bnlab.functional` (through its seam, ``bnlab.functional._dispatch``) and
:mod:`bnlab.torch`'s fast path.

Why: a freshly mapped array costs a first touch of every page: the OS zeroes each page as it is
first written, which for a (64, 64, 56, 56) float32 tensor (51 MB) took about as long as one more
pass over it — a fifth of bnlab's whole forward+backward. Training calls BN with the same shapes
every step, so the memory of last step's y and dx is handed out again instead: no page faults, no
zeroing. (The same idea as PyTorch's CUDA caching allocator; PyTorch's CPU tensors do not do it.)

Safety: a block is handed out again only when nothing but this cache refers to it. Every array
handed out is a view whose ``base`` is the block, and ``torch.from_numpy`` makes the tensor's
storage hold that view; so every tensor, view, storage or NumPy array that can reach the memory
counts in ``sys.getrefcount(block)``. "Nothing else" is the count of a block held only by the
cache's list, measured once with the same code (:data:`_IDLE_REFS`), not assumed.

Cost: up to ``limit`` bytes stay allocated between steps (default :data:`DEFAULT_LIMIT`);
:func:`set_buffer_cache_limit` changes it (0 turns caching off and frees everything idle). Arrays
smaller than :data:`MIN_BYTES` are never cached: the C heap reuses those without page faults.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20  # below this, malloc's heap recycles freed memory without fresh pages
ALIGN = 64  # a cache line: blocks are ALIGN bytes longer, so a view can start at any offset
DEFAULT_LIMIT = 256 << 20  # enough for y and dx of several ResNet-50 stage-1 BN layers


def _refcounts(blocks: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(b) for b in blocks]


_IDLE_REFS = _refcounts([np.empty(1)])[0]  # a block only a list refers to, seen through this code


class BufferCache:
    """Blocks of raw memory (uint8 arrays) handed out as typed C-contiguous arrays, reused once
    every user has let go of them; at most ``limit`` bytes are held (least recently used idle
    blocks are dropped to make room; when everything is in use, new arrays are not cached).
    A request takes the most recently used idle block of its size: the one whose memory is the
    likeliest to be in the CPU cache still (a forward whose output is released before the
    backward then writes dx into the same warm memory)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, min_bytes: int = MIN_BYTES):
        self.limit, self.min_bytes = _check_bytes(limit, "limit"), min_bytes
        self._blocks: list[np.ndarray] = []  # least recently handed out first
        self._offsets: dict[int, int] = {}  # id(block) -> its address modulo ALIGN
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return sum(b.nbytes for b in self._blocks)

    def empty(self, shape: tuple[int, ...], dtype, like: np.ndarray | None = None) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` (maybe reused memory).

        ``like``: a cached array starts at the same address modulo :data:`ALIGN` as this one, so
        a kernel reading ``like`` and writing the result can use whole-line (streaming) stores
        on both (see ``bnlab.kernels._stream``); without it, at a line boundary. (Addresses
        are looked up as little as possible: right after PyTorch has run, one ``a.ctypes.data``
        took ~30 µs.)"""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or nbytes + ALIGN > self.limit:
            return np.empty(shape, dtype)
        with self._lock:
            block, offset = self._take(nbytes + ALIGN)
        want = 0 if like is None else like.ctypes.data % ALIGN
        start = (want - offset) % ALIGN
        return block[start : start + nbytes].view(dtype).reshape(shape)

    def _take(self, nbytes: int) -> tuple[np.ndarray, int]:
        """(a block of ``nbytes``, its address modulo ALIGN): a reused idle one or a new one."""
        idle = [r == _IDLE_REFS for r in _refcounts(self._blocks)]
        # the most recently used fitting block: the likeliest to be still in cache
        for i in reversed(range(len(idle))):
            if idle[i] and self._blocks[i].nbytes == nbytes:
                block = self._blocks.pop(i)
                self._blocks.append(block)  # most recently used last
                return block, self._offsets[id(block)]
        self._evict_idle(self.held_bytes + nbytes - self.limit, idle)
        block = np.empty(nbytes, np.uint8)
        offset = block.ctypes.data % ALIGN
        if self.held_bytes + nbytes <= self.limit:
            self._blocks.append(block)
            self._offsets[id(block)] = offset
        return block, offset

    def _evict_idle(self, excess: int, idle: list[bool]) -> None:
        """Drop idle blocks, least recently used first, until ``excess`` bytes are freed."""
        keep = []
        for block, free in zip(self._blocks, idle, strict=True):
            if free and excess > 0:
                excess -= block.nbytes
            else:
                keep.append(block)
        self._blocks = keep
        self._offsets = {id(b): self._offsets[id(b)] for b in keep}

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = _check_bytes(limit, "limit")
            idle = [r == _IDLE_REFS for r in _refcounts(self._blocks)]
            self._evict_idle(self.held_bytes - self.limit, idle)

    def clear(self) -> None:
        """Forget every block (those still in use stay valid: their users keep them alive)."""
        with self._lock:
            self._blocks = []
            self._offsets = {}


def _check_bytes(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a number of bytes (an int >= 0), got {value!r}")
    return value


CACHE = BufferCache()


def set_buffer_cache_limit(limit: int) -> None:
    """How many bytes of freed fast-path outputs bnlab.torch keeps for reuse (0: none)."""
    CACHE.set_limit(limit)


def empty_buffer_cache() -> None:
    """Release the memory of every idle cached output buffer."""
    CACHE.clear()
