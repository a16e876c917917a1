"""Zero-copy views between torch tensors (N, C, *spatial) and the NumPy layouts of
:mod:`bnlab.functional`.

Batch norm only needs to know where the channel axis is, so every tensor the kernels take is seen
as one of three C-contiguous NumPy arrays sharing its memory:

================================================ ======= =====================================
tensor (logical shape, any number of spatial dims) layout  NumPy view
================================================ ======= =====================================
(N, C) contiguous                                 NC      (N, C)
(N, C, *S) contiguous (NCL, NCHW, NCDHW)          NCL     (N, C, prod(S))
(N, C, *S) channels last (NLC, NHWC, NDHWC)       NLC     (N, prod(S), C)
================================================ ======= =====================================

The output of the kernels is allocated in the same way (:func:`new_output`), so it keeps the
input's memory format; the same function with torch's allocator gives the fake (meta) output of
the custom ops, so compiled graphs see exactly the strides the kernels produce.
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.buffers import CACHE

LAYOUTS = ("NC", "NCL", "NLC")


def _to_last(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, *S, C): the permutation under which a channels-last tensor is dense."""
    return t.permute(0, *range(2, t.dim()), 1)


def _from_last(t: torch.Tensor) -> torch.Tensor:
    """(N, *S, C) -> (N, C, *S)."""
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def layout_of(t: torch.Tensor) -> str | None:
    """The layout whose NumPy view of ``t`` is C-contiguous, or None if there is none."""
    if t.dim() < 2:
        return None
    if t.is_contiguous():
        return "NC" if t.dim() == 2 else "NCL"
    if t.dim() > 2 and _to_last(t).is_contiguous():
        return "NLC"
    return None


def view_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape of the NumPy view of a tensor of ``shape`` in ``layout``."""
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    return {"NC": (n, c), "NCL": (n, c, s), "NLC": (n, s, c)}[layout]


def to_numpy(t: torch.Tensor, layout: str) -> np.ndarray:
    """A NumPy array in ``layout`` sharing memory with ``t`` (copies only if ``t`` is not already
    stored in that order, e.g. an upstream gradient in another memory format)."""
    t = t.detach()
    shape = view_shape(tuple(t.shape), layout)
    if layout == "NLC":
        t = _to_last(t)
    return t.contiguous().reshape(shape).numpy()


def vector(t: torch.Tensor | None) -> np.ndarray | None:
    """Zero-copy NumPy view of a (C,) vector or the 0-d batch counter."""
    return None if t is None else t.detach().numpy()


def new_output(x: torch.Tensor, layout: str, alloc=None) -> tuple[torch.Tensor, np.ndarray | None]:
    """An uninitialised tensor with x's shape and dtype stored in ``layout``: (tensor, its NumPy
    view in the layout). ``alloc(shape, dtype)`` returns the NumPy block (default: the reuse
    cache of :mod:`bnlab.buffers`, whose freshly written pages cost no page faults); with
    ``alloc="torch"`` the memory is torch's and the view is None (used for fake tensors)."""
    shape = tuple(x.shape)
    stored = (shape[0], *shape[2:], shape[1]) if layout == "NLC" else shape
    if alloc == "torch":
        t, a = torch.empty(stored, dtype=x.dtype, device=x.device), None
    else:
        a = (alloc or CACHE.empty)(view_shape(shape, layout), torch_to_numpy_dtype(x.dtype))
        t = torch.from_numpy(a).reshape(stored)
    return (_from_last(t) if layout == "NLC" else t), a


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    known = _NUMPY_DTYPES.get(dtype)
    return np.dtype(known) if known else torch.empty((), dtype=dtype).numpy().dtype
