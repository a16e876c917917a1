"""Zero-copy views between torch tensors and the NumPy layouts of :mod:`bnlab.functional`.

A tensor's memory order decides the layout name, so that ``t.numpy()`` (or a permuted view of it)
is C-contiguous and shares memory with the tensor:

=============================== ======= ==================================
tensor (logical shape)          layout  NumPy view
=============================== ======= ==================================
(N, C) contiguous               NC      t
(N, C, L) contiguous            NCL     t
(N, C, L) with stride(1) == 1   NLC     t.transpose(1, 2)      (N, L, C)
(N, C, H, W) contiguous         NCHW    t
(N, C, H, W) channels_last      NHWC    t.permute(0, 2, 3, 1)  (N, H, W, C)
=============================== ======= ==================================
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.buffers import CACHE

# how to go from the logical (N, C, ...) tensor to the layout's axis order, and back
_TO_LAYOUT = {"NC": None, "NCL": None, "NCHW": None, "NLC": (0, 2, 1), "NHWC": (0, 2, 3, 1)}
_FROM_LAYOUT = {"NLC": (0, 2, 1), "NHWC": (0, 3, 1, 2)}


def layout_of(t: torch.Tensor) -> str | None:
    """The bnlab layout name whose NumPy view of ``t`` is contiguous, or None if there is none."""
    if t.dim() == 2:
        return "NC" if t.is_contiguous() else None
    if t.dim() == 3:
        if t.is_contiguous():
            return "NCL"
        return "NLC" if t.transpose(1, 2).is_contiguous() else None
    if t.dim() == 4:
        if t.is_contiguous():
            return "NCHW"
        return "NHWC" if t.is_contiguous(memory_format=torch.channels_last) else None
    return None


def to_numpy(t: torch.Tensor, layout: str) -> np.ndarray:
    """A NumPy array in ``layout`` sharing memory with ``t`` (copies only if ``t`` is not already
    stored in that order, e.g. an upstream gradient in another memory format)."""
    t = t.detach()
    perm = _TO_LAYOUT[layout]
    if perm is not None:
        t = t.permute(*perm)
    return t.contiguous().numpy()


def from_numpy(a: np.ndarray, layout: str) -> torch.Tensor:
    """The logical (N, C, ...) tensor sharing memory with an array in ``layout``."""
    t = torch.from_numpy(a)
    perm = _FROM_LAYOUT.get(layout)
    return t if perm is None else t.permute(*perm)


def layout_shape(t: torch.Tensor, layout: str) -> tuple[int, ...]:
    """The shape of ``t``'s NumPy view in ``layout`` (e.g. (N, H, W, C) for NHWC)."""
    perm = _TO_LAYOUT[layout]
    return tuple(t.shape) if perm is None else tuple(t.shape[i] for i in perm)


def empty_like_in_layout(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised tensor with x's shape, dtype and memory order: (tensor, its NumPy view in
    ``layout``, C-contiguous, which is what the kernels write).

    The memory comes from NumPy, not from torch's CPU allocator, and large blocks are reused once
    free (:mod:`bnlab.buffers`): torch maps fresh 4 KB pages for every large tensor (a 51 MB
    ``torch.empty(...).fill_(0)`` took ~9x as long as the same on reused NumPy memory here). The
    tensor is an ordinary CPU tensor sharing that memory.
    """
    a = CACHE.empty(layout_shape(x, layout), torch_to_numpy_dtype(x.dtype))
    return from_numpy(a, layout), a


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    known = _NUMPY_DTYPES.get(dtype)
    return np.dtype(known) if known else torch.empty((), dtype=dtype).numpy().dtype
