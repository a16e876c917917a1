"""The two elementwise expressions of the kernels, each written once, and the rows that apply them.

    affine   y  = (x − m)·a + b          normalize (training: m = μ, a = γ·rstd, b = β;
                                        inference: m = 0, a = γ·rstd, b = β − μ·a;
                                        group norm per channel; layer norm with a = rstd·γ_j)
    dx       dx = A·dy + B·(x − m) + D   the closed-form input gradient of batch/group/layer norm

The coefficients of a row are scalars (one channel's row, channels-first), arrays indexed like
the row (a channels-last row of channels), or a pair (s, g) meaning s·g[j] (layer norm's
rstd·γ): :func:`at` reads each. Arithmetic is
in the data's dtype (the callers pass the coefficients in it), like the NumPy reference; no
fused multiply-adds (no ``fastmath``), so every path gives the same bits for the same
coefficients.

``stream``: write the row's whole lines with non-temporal stores (:mod:`._stream`): each line is
the same expression evaluated on vectors (its Python source traced into vector instructions,
operation for operation, so both ways give the same bits). A register lane row says so
(``lanes``): its indices are then compile-time constants, and its coefficient rows stay in
registers.
"""

from __future__ import annotations

from numba import njit, types
from numba.extending import intrinsic, overload

from ._stream import LINE, head, line_writer


@njit(cache=True, inline="always")
def affine(x, m, a, b):
    """(x − m)·a + b"""
    return (x - m) * a + b


@njit(cache=True, inline="always")
def bn_dx(dy, x, m, a, b, d):
    """A·dy + B·(x − m) + D"""
    return a * dy + b * (x - m) + d


def at(v, j):
    """Coefficient j of a row: v[j] for a coefficient row, v itself for a scalar, s·g[j] for a
    pair (s, g) (layer norm's rstd·γ, formed on the fly) (compiled code only)."""
    raise NotImplementedError("at runs inside compiled kernels only")


@overload(at, inline="always")
def _at(v, j):
    if isinstance(v, types.Array):
        return lambda v, j: v[j]
    if isinstance(v, types.BaseTuple):
        return lambda v, j: v[0] * v[1][j]
    return lambda v, j: v


def values_per_line(a):
    """Values of a's dtype per 64-byte line, as a compile-time constant (compiled code only)."""
    return LINE // a.itemsize


@overload(values_per_line, inline="always")
def _values_per_line(a):
    n = LINE // (a.dtype.bitwidth // 8)
    return lambda a: n


@intrinsic
def affine_line(typingctx, y, i, x, m, a, b):
    """y[i : i + L] = affine(x, m, a, b) over one line, non-temporal (see ``line_writer``)."""
    return types.void(y, i, x, m, a, b), line_writer(affine)


@intrinsic
def dx_line(typingctx, dx, i, dy, x, m, a, b, d):
    """dx[i : i + L] = bn_dx(dy, x, m, a, b, d) over one line, non-temporal."""
    return types.void(dx, i, dy, x, m, a, b, d), line_writer(bn_dx)


@njit(cache=True, inline="always")
def affine_row(x, m, a, b, y, stream, lanes=0):
    """y = affine(x, m, a, b) over the 1-D row y (x like y; m, a, b scalars or rows).
    ``lanes`` > 0 (a compile-time constant): the row is exactly that many values from a line
    boundary (a register lane row: every index is then a constant)."""
    n = lanes if lanes > 0 else y.shape[0]
    if not stream:
        for j in range(n):
            y[j] = affine(x[j], at(m, j), at(a, j), at(b, j))
        return
    step = values_per_line(y)
    h = 0 if lanes > 0 else head(y)
    body = h + (n - h) // step * step
    for j in range(h):
        y[j] = affine(x[j], at(m, j), at(a, j), at(b, j))
    for j0 in range(h, body, step):
        affine_line(y, j0, x, m, a, b)
    for j in range(body, n):
        y[j] = affine(x[j], at(m, j), at(a, j), at(b, j))


@njit(cache=True, inline="always")
def dx_row(dy, x, m, a, b, d, dx, stream, lanes=0):
    """dx = bn_dx(dy, x, m, a, b, d) over the 1-D row dx (coefficients scalars or rows);
    ``lanes`` as for :func:`affine_row`."""
    n = lanes if lanes > 0 else dx.shape[0]
    if not stream:
        for j in range(n):
            dx[j] = bn_dx(dy[j], x[j], at(m, j), at(a, j), at(b, j), at(d, j))
        return
    step = values_per_line(dx)
    h = 0 if lanes > 0 else head(dx)
    body = h + (n - h) // step * step
    for j in range(h):
        dx[j] = bn_dx(dy[j], x[j], at(m, j), at(a, j), at(b, j), at(d, j))
    for j0 in range(h, body, step):
        dx_line(dx, j0, dy, x, m, a, b, d)
    for j in range(body, n):
        dx[j] = bn_dx(dy[j], x[j], at(m, j), at(a, j), at(b, j), at(d, j))
