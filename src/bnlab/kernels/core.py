"""Layout-level drivers of the numba kernels: per-channel reductions and elementwise passes over a
canonical 3-D view, with the fixed chunking of :mod:`._chunks`.

A 3-D array is channels-first (N, C, S) or channels-last (N, S, C). The kernels see channels-first
as is and channels-last as (R, C) rows with R = N·S. Two degenerate cases are swapped to the
layout that vectorizes: channels-last with C = 1 is the same memory as channels-first (N, 1, S),
and channels-first with S = 1 the same as channels-last (N, C).

Small tensors run on one thread: below ``PARALLEL_MIN_VALUES`` values a parallel launch costs
more than the work (much more on a loaded machine, where the second thread may not be scheduled).
The chunking does not depend on the thread count, so the results are the same bits either way.

These drivers trust their inputs (shapes, contiguity, dtypes); :mod:`.batch_norm` checks them.
"""

from __future__ import annotations

from contextlib import nullcontext

import numba
import numpy as np

from bnlab.errors import ShapeError

from . import _chunks, _elementwise, _fused, _lanes, _reduce, _stream

PARALLEL_MIN_VALUES = 1 << 17  # below this many values per pass, one thread is faster


class _OneThread:
    """Runs the enclosed kernel launches on one numba thread, then restores the count."""

    def __enter__(self):
        self.previous = numba.get_num_threads()
        numba.set_num_threads(1)

    def __exit__(self, *exc):
        numba.set_num_threads(self.previous)


_ALL_THREADS = nullcontext()


def threads_for(values: int):
    """A context in which the enclosed kernel launches run: on one thread when the pass is small
    (a plain class and a shared no-op context, not a generator: this is on every call's path)."""
    return _ALL_THREADS if values >= PARALLEL_MIN_VALUES else _OneThread()


def kernel_view(a: np.ndarray, channels_last: bool) -> tuple[np.ndarray, bool]:
    """(view, channels_last) as the kernels take it: (N, C, S) or (R, C)."""
    if channels_last:
        n, s, c = a.shape
        if c == 1 and s > 1:
            return a.reshape(n, 1, s), False
        return a.reshape(n * s, c), True
    n, c, s = a.shape
    if s == 1 and c > 1:
        return a.reshape(n, c), True
    return a, False


def fused_tiles(x3: np.ndarray, channels_last: bool) -> int:
    """How the single-launch kernels (:mod:`._fused`) split this tensor: the number of column
    tiles of a channels-last view, -1 for per-channel tasks of a channels-first view, 0 when it
    streams instead (too many rows or too big channels to stay in cache, short rows, few
    channels). A function of the shape only."""
    x, cl = kernel_view(x3, channels_last)
    if cl:
        return _chunks.fused_tiles(x.shape[0], x.shape[1], x.itemsize)
    return -1 if _chunks.fused_channels(*x.shape, x.itemsize) else 0


def fused_train_forward(x3, g, b, eps: float, channels_last: bool, tiles: int, out):
    """Training forward in one launch (see :mod:`._fused`); returns (mean, var) float64 (C,)."""
    x, cl = kernel_view(x3, channels_last)
    o, _ = kernel_view(out, channels_last)
    c = x.shape[-1] if cl else x.shape[1]
    mean, var = np.empty(c), np.empty(c)
    with threads_for(2 * x.size):
        if cl:
            _fused.train_forward_cl(x, g, b, eps, tiles, mean, var, o)
        else:
            _fused.train_forward_cf(x, g, b, eps, _stream.streams(o, x), mean, var, o)
    return mean, var


def fused_backward(dy3, x3, mean, rstd, g, channels_last: bool, tiles: int, dx3):
    """Training backward in one launch (see :mod:`._fused`); returns (dgamma, dbeta) float64."""
    dy, cl = kernel_view(dy3, channels_last)
    x, _ = kernel_view(x3, channels_last)
    dx, _ = kernel_view(dx3, channels_last)
    c = x.shape[-1] if cl else x.shape[1]
    dgamma, dbeta = np.empty(c), np.empty(c)
    with threads_for(3 * x.size):
        if cl:
            _fused.backward_cl(dy, x, mean, rstd, g, tiles, dx, dgamma, dbeta)
        else:
            _fused.backward_cf(dy, x, mean, rstd, g, _stream.streams(dx, dy, x), dx, dgamma, dbeta)
    return dgamma, dbeta


def _row_split(s: int) -> tuple[bool, int]:
    """(short, pieces): short channels-first rows are summed column-wise and never cut."""
    if s < _chunks.SHORT_ROW:
        return True, 1
    return False, _chunks.row_pieces(s)


def _partials(groups: int, c: int, k: int) -> list[np.ndarray]:
    return [np.empty((groups, c)) for _ in range(k)]


def _wide_parts(arrays):
    """Channels-last (R, C) arrays as [(views, k)] parts of wide rows, in a fixed order.

    A (R, C) row of few channels is too short a loop to vectorize well (per-row overhead
    dominates: NHWC with C = 64 ran at a third of the copy speed). k consecutive rows are the same
    memory as one row of k·C values (lane j·C + ch is channel ch), so the bulk is viewed as
    (R // k, k·C) and the R mod k leftover rows are a second, narrow part (k = 1)."""
    rows, c = arrays[0].shape
    k = max(1, min(rows, _chunks.WIDE_ROW // c))
    bulk = rows // k * k
    parts = [([a[:bulk].reshape(bulk // k, k * c) for a in arrays], k)]
    if bulk < rows:
        parts.append(([a[bulk:] for a in arrays], 1))
    return parts


def _register_parts(arrays, width: int):
    """Channels-last (R, C) arrays as [(views, k)] parts for the register-accumulator kernels
    (:mod:`._lanes`): the bulk viewed as rows of exactly ``width`` = k·C lanes, the R mod k
    leftover rows as a narrow part (k = 1)."""
    rows, c = arrays[0].shape
    k = width // c
    bulk = rows // k * k
    parts = []
    if bulk:
        parts.append(([a[:bulk].reshape(bulk // k, width) for a in arrays], k))
    if bulk < rows:
        parts.append(([a[bulk:] for a in arrays], 1))
    return parts


def _reduce_cl(kernels, arrays, per_channel, n_partials: int):
    """Run a channels-last reduction over the wide-row parts of ``arrays`` and return its (G, C)
    partials, parts one after the other (no copy for a single part).

    ``kernels`` = (narrow, wide, lanes): ``narrow(*views, *vectors, blocks, tiles, *partials)`` for
    the (R, C) part, partials (blocks, C); ``wide(*views, *vectors, k, blocks, *partials)`` for a
    part widened k times, one task per row block over whole rows (``wide_row_blocks``), its lanes
    folded into (blocks, C) partials in the kernel; ``lanes(width)`` the kernel with the same
    arguments for rows of a register width (:mod:`._lanes`), used when C has one.
    ``per_channel`` (C,) vectors are tiled k times for a part of the widened kernel (the register
    kernels take them as they are)."""
    narrow, wide, lanes = kernels
    c = arrays[0].shape[1]
    width = _lanes.register_width(c)
    parts = []
    for views, k in _register_parts(arrays, width) if width else _wide_parts(arrays):
        rows, row_width = views[0].shape
        if width and row_width == width:
            blocks = _chunks.wide_row_blocks(rows, row_width)
            p = _partials(blocks, c, n_partials)
            lanes(width)(*views, *per_channel, k, blocks, *p)
        elif k > 1:
            blocks = _chunks.wide_row_blocks(rows, row_width)
            p = _partials(blocks, c, n_partials)
            wide(*views, *[np.tile(v, k) for v in per_channel], k, blocks, *p)
        else:
            blocks = _chunks.row_blocks(rows, row_width)
            p = _partials(blocks, c, n_partials)
            narrow(*views, *per_channel, blocks, _chunks.channel_tiles(row_width), *p)
        parts.append(p)
    if len(parts) == 1:
        return parts[0]
    return [np.concatenate(ps) for ps in zip(*parts, strict=True)]


_MOMENTS_CL = (_reduce.moments_cl, _reduce.moments_wide, _lanes.moments)  # narrow, wide, lanes
_GRAD_SUMS_CL = (_reduce.grad_sums_cl, _reduce.grad_sums_wide, _lanes.grad_sums)


def channel_moments(x3: np.ndarray, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (C,), float64, of a non-empty 3-D array.

    One read of x; see :mod:`._reduce` for the shifted sums and the parallel merge."""
    if x3.size == 0:
        raise ShapeError(f"x must not be empty to compute statistics, got shape {x3.shape}")
    x, cl = kernel_view(x3, channels_last)
    c = x.shape[-1] if cl else x.shape[1]
    with threads_for(x.size):
        if cl:
            p_cnt, p_mean, p_m2 = _reduce_cl(_MOMENTS_CL, [x], [], 3)
        else:
            short, pieces = _row_split(x.shape[2])
            groups = _chunks.channel_groups(x.shape[0], c, pieces)
            p_cnt, p_mean, p_m2 = _partials(groups, c, 3)
            if short:
                cblocks = _chunks.short_channel_blocks(c, groups)
                _reduce.moments_cf_short(x, groups, cblocks, p_cnt, p_mean, p_m2)
            else:
                _reduce.moments_cf(x, groups, pieces, p_cnt, p_mean, p_m2)
    mean, var = np.empty(c), np.empty(c)
    _reduce.merge_moments(p_cnt, p_mean, p_m2, mean, var)
    return mean, var


def channel_grad_sums(
    dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray, channels_last: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel Σ dy and Σ dy·(x − mean) (C,), float64; one read of dy and x."""
    dy, cl = kernel_view(dy3, channels_last)
    x, _ = kernel_view(x3, channels_last)
    c = x.shape[-1] if cl else x.shape[1]
    mean = np.ascontiguousarray(mean, dtype=np.float64)
    with threads_for(2 * x.size):
        if cl:
            p_dy, p_dyxmu = _reduce_cl(_GRAD_SUMS_CL, [dy, x], [mean], 2)
        else:
            short, pieces = _row_split(x.shape[2])
            groups = _chunks.channel_groups(x.shape[0], c, pieces)
            p_dy, p_dyxmu = _partials(groups, c, 2)
            if short:
                cblocks = _chunks.short_channel_blocks(c, groups)
                _reduce.grad_sums_cf_short(dy, x, mean, groups, cblocks, p_dy, p_dyxmu)
            else:
                _reduce.grad_sums_cf(dy, x, mean, groups, pieces, p_dy, p_dyxmu)
    sum_dy, sum_dyxmu = np.empty(c), np.empty(c)
    _reduce.sum_partials(p_dy, sum_dy)
    _reduce.sum_partials(p_dyxmu, sum_dyxmu)
    return sum_dy, sum_dyxmu


def _coef(v: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=dtype)


def _wide_rows(arrays, coefs):
    """Channels-last elementwise work as [(arrays, coefs, stream)] parts of wide rows (see
    :func:`_wide_parts`), the per-channel coefficients tiled k times for a widened part. A part
    streams its output (``arrays[-1]``) when :func:`._stream.streams_rows` allows it, with its
    coefficient rows aligned like its data rows."""
    parts = []
    for views, k in _wide_parts(arrays):
        rows = [np.tile(v, k) for v in coefs]
        stream = _stream.streams_rows(views[-1], *views[:-1])
        if stream:
            rows = [_stream.aligned_like(v, views[-1]) for v in rows]
        parts.append((views, rows, stream))
    return parts


def _lane_layout(width: int, inputs, out):
    """(head, blocks, stream) for the register-coefficient elementwise kernels (:mod:`._lanes`)
    on channels-last (R, C) arrays with C dividing ``width``: the arrays are walked flat, in
    line-aligned stretches of ``width`` values after out's ``head``."""
    rows, c = out.shape
    blocks = _chunks.row_blocks(rows * c // width, width)
    return _lanes.head(out), blocks, _stream.streams(out, *inputs)


def affine(x3, m, a, b, channels_last: bool, out: np.ndarray) -> np.ndarray:
    """out = (x − m)·a + b per channel, computed in x's dtype; one read, one write (non-temporal
    when out is big and aligned like x: :func:`._stream.streams`)."""
    x, cl = kernel_view(x3, channels_last)
    o, _ = kernel_view(out, channels_last)
    coefs = [_coef(v, x.dtype) for v in (m, a, b)]
    with threads_for(2 * x.size):
        if not cl:
            stream = _stream.streams(o, x)
            n, c, s = x.shape
            if s < _chunks.SHORT_ROW:
                blocks = _chunks.short_row_blocks(n, c)
                _elementwise.affine_cf_short(x, *coefs, blocks, stream, o)
            else:
                _elementwise.affine_cf(x, *coefs, _chunks.row_pieces(s), stream, o)
            return out
        width = _lanes.register_width(x.shape[1])
        if width:
            head, blocks, stream = _lane_layout(width, [x], o)
            _lanes.affine(width)(x.reshape(-1), *coefs, head, blocks, stream, o.reshape(-1))
            return out
        for (xp, op), (mp, ap, bp), stream in _wide_rows([x, o], coefs):
            _elementwise.affine_cl(xp, mp, ap, bp, _chunks.row_blocks(*xp.shape), stream, op)
    return out


def backward_elementwise(dy3, x3, mu, ca, cb, cd, channels_last: bool, dx3) -> np.ndarray:
    """dx = A·dy + B·(x − μ) + D per channel, in x's dtype; one read of dy and x, one write
    (non-temporal when dx is big and aligned like dy and x)."""
    dy, cl = kernel_view(dy3, channels_last)
    x, _ = kernel_view(x3, channels_last)
    dx, _ = kernel_view(dx3, channels_last)
    coefs = [_coef(v, x.dtype) for v in (mu, ca, cb, cd)]
    with threads_for(3 * x.size):
        if not cl:
            stream = _stream.streams(dx, dy, x)
            n, c, s = x.shape
            if s < _chunks.SHORT_ROW:
                blocks = _chunks.short_row_blocks(n, c)
                _elementwise.backward_cf_short(dy, x, *coefs, blocks, stream, dx)
            else:
                _elementwise.backward_cf(dy, x, *coefs, _chunks.row_pieces(s), stream, dx)
            return dx3
        width = _lanes.register_width(x.shape[1])
        if width:
            head, blocks, stream = _lane_layout(width, [dy, x], dx)
            flat = [a.reshape(-1) for a in (dy, x, dx)]
            _lanes.backward(width)(flat[0], flat[1], *coefs, head, blocks, stream, flat[2])
            return dx3
        for (dyp, xp, dxp), cp, stream in _wide_rows([dy, x, dx], coefs):
            _elementwise.backward_cl(dyp, xp, *cp, _chunks.row_blocks(*xp.shape), stream, dxp)
    return dx3
