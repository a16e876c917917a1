"""Layer-norm kernels on a (M, D) view (M rows = samples, D = prod(normalized_shape)), through the
same reduction core as batch norm: the row statistics are those of ``core.channel_moments`` of the
view (1, M, D) — each row is a "channel" — so they are shifted, chunked, merged and deterministic
alike.

    forward   μ_r, σ²_r = moments of row r;  rstd_r = 1/sqrt(σ²_r + ε)
              y = (x − μ_r)·rstd_r·γ_j + β_j
    backward  dγ_j = Σ_r dy·x̂,  dβ_j = Σ_r dy
              dx = rstd_r·(dy·γ − mean_j(dy·γ) − x̂·mean_j(dy·γ·x̂))

Rows of 512..16384 values take one pass over memory per direction (the row is read again from
cache for its output: ``_rows.ln_forward_rows``, ``_rows.ln_grad_sums`` with ``write_dx``); other
rows take two (``core.channel_moments`` then the affine; the sums, then ``_rows.ln_dx``). Both
give the same bits.

Called by ``bnlab.functional.layer_norm_forward`` on the "numba" backend (see docs/kernels.md).
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError

from . import _chunks, _reduce, _rows, _stream, core
from .batch_norm import (
    _check_array,
    _check_eps,
    _check_nonempty,
    _check_out,
    _check_vec,
    _compute_dtype,
    _result,
    _work_out,
    acc_dtype,
)

_ROWS = "(M, D)"


def _param(v, name: str, d: int, fill: float) -> np.ndarray:
    """A (D,) affine parameter as float64; None is the identity value ``fill``."""
    return np.full(d, fill) if v is None else _check_vec(v, name, d)


def ln_forward(x2, weight, bias, eps, out=None):
    """Layer-norm forward on (M, D): returns (y2, mean (M,), rstd (M,)), mean/rstd in the
    accumulation dtype. weight/bias (D,) or None (γ = 1, β = 0)."""
    x = _check_array(x2, "x2", 2, _ROWS)
    _check_nonempty(x, "x2")
    rows, d = x.shape
    g, b = _param(weight, "weight", d, 1.0), _param(bias, "bias", d, 0.0)
    eps = _check_eps(eps)
    xw = _compute_dtype(x)
    buf = _check_out(_work_out(x, xw, out), xw)
    dt = xw.dtype
    blocks = _chunks.row_blocks(rows, d)
    if _single_pass(d):
        mean, rstd = np.empty(rows), np.empty(rows)
        stream, (gw, bw) = _streaming(buf, [xw], [g.astype(dt), b.astype(dt)])
        with core.threads_for(x.size):
            _rows.ln_forward_rows(xw, eps, gw, bw, blocks, stream, mean, rstd, buf)
    else:
        mean, var = core.channel_moments(xw.reshape(1, rows, d), False)
        rstd = 1.0 / np.sqrt(var + eps)
        with core.threads_for(2 * x.size):
            _rows.ln_affine(
                xw, mean.astype(dt), rstd.astype(dt), g.astype(dt), b.astype(dt), blocks, buf
            )
    acc = acc_dtype(x.dtype)
    return _result(buf, out, x.dtype), mean.astype(acc), rstd.astype(acc)


def _streaming(out, inputs, rows):
    """(stream?, the (D,) coefficient rows) for a single-pass kernel writing ``out``: streaming
    stores when :func:`._stream.streams_rows` allows, with the rows aligned like out's."""
    if not _stream.streams_rows(out, *inputs):
        return False, rows
    return True, [_stream.aligned_like(v, out) for v in rows]


def _single_pass(d: int) -> bool:
    """Rows that stay cached between their sums and their output and are one long-row segment
    of the reduction core (whose statistics the single-pass kernel reproduces exactly); shorter
    rows keep the column-wise short-row sums, which vectorize better across many tiny rows."""
    return _chunks.SHORT_ROW <= d and _chunks.row_pieces(d) == 1


def ln_backward(dy2, x2, mean, rstd, weight, dx=None):
    """Layer-norm backward on (M, D): returns (dx2, dweight (D,), dbias (D,)), the parameter
    gradients in the accumulation dtype; weight None means γ = 1."""
    x = _check_array(x2, "x2", 2, _ROWS)
    dy = _check_array(dy2, "dy2", 2, _ROWS)
    if dy.shape != x.shape:
        raise ShapeError(f"dy2 must have the shape of x2 {x.shape}, got {dy.shape}")
    _check_nonempty(x, "x2")
    rows, d = x.shape
    mu, rs = _check_vec(mean, "mean", rows), _check_vec(rstd, "rstd", rows)
    g = _param(weight, "weight", d, 1.0)
    xw = _compute_dtype(x)
    dyw = dy if dy.dtype == xw.dtype else dy.astype(xw.dtype)
    buf = _check_out(_work_out(x, xw, dx, "dx"), xw, "dx")
    blocks = _chunks.row_blocks(rows, d)
    row_a, row_b = np.empty(rows), np.empty(rows)
    p_dg, p_db = np.empty((blocks, d)), np.empty((blocks, d))
    dt = xw.dtype
    single = _single_pass(d)
    g_dt = g.astype(dt)
    stream, (gw,) = _streaming(buf, [dyw, xw], [g_dt]) if single else (False, [g_dt])
    with core.threads_for((2 if single else 3) * x.size):
        _rows.ln_grad_sums(
            dyw, xw, mu, rs, g, gw, blocks, row_a, row_b, p_dg, p_db, buf, single, stream
        )
        if not single:
            _rows.ln_dx(
                dyw, xw, mu.astype(dt), rs.astype(dt), g_dt,
                (row_a / d).astype(dt), (row_b / d).astype(dt), blocks, buf,
            )  # fmt: skip
    dgamma, dbeta = np.empty(d), np.empty(d)
    _reduce.sum_partials(p_dg, dgamma)
    _reduce.sum_partials(p_db, dbeta)
    acc = acc_dtype(x.dtype)
    return _result(buf, dx, x.dtype), dgamma.astype(acc), dbeta.astype(acc)
