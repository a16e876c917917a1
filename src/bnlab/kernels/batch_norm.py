"""Fused batch-norm kernels on canonical 3-D views (what :mod:`bnlab.functional` dispatches to).

x3, dy3, out are C-contiguous: (N, C, S) when ``channels_last`` is False (NCHW, NCL) and (N, S, C)
when True (NHWC, NLC, and NC as (N, 1, C)); per-channel vectors are (C,). Statistics are
accumulated in float64 and returned in the accumulation dtype (float64 for float64 input, float32
otherwise); outputs have x's dtype. m = N·S values per channel.

    training forward   μ, σ² = moments(x)                         pass 1: read x
                       y = (x − μ)·(γ·rstd) + β,  rstd = 1/√(σ²+ε)  pass 2: read x, write y
    inference forward  y = x·scale + shift                        one pass
    training backward  Σdy, Σdy·(x − μ)                           pass 1: read dy, x
                       dβ = Σdy,  dγ = rstd·Σdy·(x − μ)
                       dx = γ·rstd·(dy − Σdy/m − x̂·dγ/m)            pass 2: read dy, x, write dx
    inference backward dx = dy·γ·rstd  (dγ, dβ as above)

Tensors whose channels fit in cache (channels-last with few rows: a column tile of every row fits
in L2; channels-first with long rows and channels of at most 2 MiB) run each training pass as a
single launch instead (:mod:`._fused`, chosen by ``core.fused_tiles`` from the shape only): same
formulas, the second read of a channel from cache.

float16 input is staged through a float32 copy (numba has no float16 arithmetic on the CPU).
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.functional._validate import check_eps as _check_eps

from . import _reduce, core

_FLOATS = (np.float16, np.float32, np.float64)


# --------------------------------------------------------------------------- checks


def _check_array(a, name: str, ndim: int = 3, what: str = "(N, C, S) or (N, S, C)") -> np.ndarray:
    """A C-contiguous float array of ``ndim`` dims (the kernels index raw memory: nothing else
    may pass)."""
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.type not in _FLOATS:
        raise DTypeError(f"{name} must be float16, float32 or float64, got {a.dtype}")
    if a.ndim != ndim:
        raise ShapeError(f"{name} must be a {ndim}-D {what} view, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _check_3d(a, name: str) -> np.ndarray:
    return _check_array(a, name)


def _channels(x3: np.ndarray, channels_last: bool) -> int:
    return x3.shape[2] if channels_last else x3.shape[1]


def _check_vec(v, name: str, c: int) -> np.ndarray:
    """A (C,) per-channel vector, returned as float64."""
    if not isinstance(v, np.ndarray) or v.dtype.type not in _FLOATS:
        raise DTypeError(f"{name} must be a float numpy.ndarray of shape ({c},), got {v!r}")
    if v.shape != (c,):
        raise ShapeError(f"{name} must have shape ({c},) (one value per channel), got {v.shape}")
    return v.astype(np.float64)


def _check_out(out, x3: np.ndarray, name: str = "out") -> np.ndarray:
    """A caller's buffer must match x exactly and be C-contiguous: it is written, never copied."""
    if out is None:
        return np.empty_like(x3)
    ok = (
        isinstance(out, np.ndarray)
        and out.shape == x3.shape
        and out.dtype == x3.dtype
        and out.flags.c_contiguous
        and out.flags.writeable
    )
    if not ok:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ShapeError(
            f"{name} must be a writable C-contiguous ndarray of shape {x3.shape} and dtype "
            f"{x3.dtype}, got {got}"
        )
    return out


def _check_nonempty(x3: np.ndarray, name: str = "x3") -> None:
    if x3.size == 0:
        raise ShapeError(f"{name} must not be empty, got shape {x3.shape}")


def acc_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype).type is np.float64 else np.dtype(np.float32)


# --------------------------------------------------------------------------- float16 staging


def _compute_dtype(a: np.ndarray) -> np.ndarray:
    """float16 is computed in float32 (a staging copy), byte-swapped data in native order (a
    copy: numba cannot type it); native float32/64 pass through untouched."""
    if a.dtype.type is np.float16:  # either byte order
        return a.astype(np.float32)
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _result(y: np.ndarray, out: np.ndarray | None, dtype) -> np.ndarray:
    """Deliver a float32 staging result into ``out`` (or a new array) of the caller's dtype."""
    if y.dtype == dtype and (out is None or y is out):
        return y
    if out is None:
        return y.astype(dtype)
    np.copyto(out, y, casting="same_kind")
    return out


def _kernel_buffer(x: np.ndarray, xw: np.ndarray, out) -> np.ndarray:
    """The array the kernel writes: the caller's (checked) ``out`` unless x is staged through
    another dtype (then a new one, whose result :func:`_result` delivers into ``out``)."""
    return out if out is not None and xw is x else np.empty_like(xw)


def _work_out(x: np.ndarray, xw: np.ndarray, out, name: str = "out") -> np.ndarray | None:
    """The buffer the kernel writes: the caller's ``out`` unless x is staged through float32."""
    if out is None:
        return None
    _check_out(out, x, name)
    return out if xw is x else None


# --------------------------------------------------------------------------- forward


def bn_train_forward(x3, weight, bias, eps, channels_last, out=None):
    """Training forward: returns (y3, mean, var), mean/var (C,) biased, accumulation dtype."""
    x = _check_3d(x3, "x3")
    _check_nonempty(x)
    c = _channels(x, channels_last)
    g, b = _check_vec(weight, "weight", c), _check_vec(bias, "bias", c)
    if out is not None:
        _check_out(out, x)
    y, mean, var, _, _ = bn_train_forward_unchecked(x, g, b, _check_eps(eps), channels_last, out)
    return y, mean, var


def bn_train_forward_unchecked(x, g, b, eps: float, channels_last: bool, out=None):
    """:func:`bn_train_forward` for a caller that has checked the arguments itself
    (:mod:`bnlab.functional`): x a non-empty C-contiguous 3-D float array, g, b (C,) float64,
    eps a float > 0, out None or a writable C-contiguous array of x's shape and dtype.
    (Every check costs a few microseconds per call, more in a cold cache: on a (256, 4096)
    batch they were a fifth of the time of the public API.)

    Returns (y3, mean, var, rstd, finite): the statistics in the accumulation dtype, rstd =
    1/√(var + ε) computed in that dtype, finite = whether mean and var are all finite."""
    xw = _compute_dtype(x)
    buf = _kernel_buffer(x, xw, out)
    tiles = core.fused_tiles(xw, channels_last)
    if tiles:
        mean, var = core.fused_train_forward(xw, g, b, eps, channels_last, tiles, buf)
    else:
        mean, var = core.channel_moments(xw, channels_last)
        rstd = 1.0 / np.sqrt(var + eps)
        core.affine(xw, mean, g * rstd, b, channels_last, buf)
    return (_result(buf, out, x.dtype), *_statistics_in(acc_dtype(x.dtype), mean, var, eps))


def _statistics_in(acc, mean64, var64, eps: float):
    """(mean, var, rstd, finite) in the accumulation dtype ``acc`` (see
    :func:`._reduce.finish_statistics`)."""
    c = mean64.shape[0]
    mean, var, rstd = np.empty(c, acc), np.empty(c, acc), np.empty(c, acc)
    finite = _reduce.finish_statistics(mean64, var64, eps, mean, var, rstd)
    return mean, var, rstd, bool(finite)


def bn_eval_forward(x3, scale, shift, channels_last, out=None):
    """Inference forward: y = x·scale + shift per channel (scale = γ·rstd, shift = β − μ·scale)."""
    x = _check_3d(x3, "x3")
    c = _channels(x, channels_last)
    a, b = _check_vec(scale, "scale", c), _check_vec(shift, "shift", c)
    if out is not None:
        _check_out(out, x)
    return bn_eval_forward_unchecked(x, a, b, channels_last, out)


def bn_eval_forward_unchecked(x, a, b, channels_last: bool, out=None):
    """:func:`bn_eval_forward` for a caller that has checked the arguments (as for
    :func:`bn_train_forward_unchecked`; a, b (C,) float64)."""
    xw = _compute_dtype(x)
    buf = _kernel_buffer(x, xw, out)
    core.affine(xw, np.zeros(a.shape[0]), a, b, channels_last, buf)
    return _result(buf, out, x.dtype)


# --------------------------------------------------------------------------- backward


def _checked_backward_inputs(dy3, x3, mean, rstd, weight, channels_last, dx):
    """Checked (dy, x, mean, rstd, γ): dy and x C-contiguous 3-D of one shape, the vectors (C,)
    float64; and dx checked against x when given."""
    x = _check_3d(x3, "x3")
    dy = _check_3d(dy3, "dy3")
    if dy.shape != x.shape:
        raise ShapeError(f"dy3 must have the shape of x3 {x.shape}, got {dy.shape}")
    _check_nonempty(x)
    c = _channels(x, channels_last)
    mean, rstd, g = (
        _check_vec(v, n, c) for v, n in ((mean, "mean"), (rstd, "rstd"), (weight, "weight"))
    )
    if dx is not None:
        _check_out(dx, x, "dx")
    return dy, x, mean, rstd, g


def _param_grads(dyw, xw, mean, rstd, channels_last):
    """(Σdy, dγ = rstd·Σdy·(x − μ)), float64 (C,): the backward's only reduction."""
    sum_dy, sum_dyxmu = core.channel_grad_sums(dyw, xw, mean, channels_last)
    return sum_dy, rstd * sum_dyxmu


def _staged(dy, x, dx):
    """(dy, x) in the compute dtype (dy cast to x's), the buffer the kernel writes, x's dtype."""
    xw = _compute_dtype(x)
    dyw = dy if dy.dtype == xw.dtype else dy.astype(xw.dtype)
    buf = _kernel_buffer(x, xw, dx)
    return dyw, xw, buf, x.dtype


def bn_backward(dy3, x3, mean, rstd, weight, channels_last, dx=None):
    """Training backward: returns (dx3, dweight, dbias); dweight/dbias in the accumulation dtype.
    ``dx``: optional buffer for the input gradient (shape and dtype of x3, C-contiguous).

    With A = γ·rstd: dx = A·dy + B·(x − μ) + D, B = −A·rstd·dγ/m, D = −A·Σdy/m."""
    args = _checked_backward_inputs(dy3, x3, mean, rstd, weight, channels_last, dx)
    return bn_backward_unchecked(*args, channels_last, dx)


def bn_backward_unchecked(dy, x, mean, rstd, g, channels_last: bool, dx=None):
    """:func:`bn_backward` for a caller that has checked the arguments (dy, x non-empty
    C-contiguous 3-D arrays of one shape; mean, rstd, g (C,) float64; dx None or a matching
    buffer), as for :func:`bn_train_forward_unchecked`."""
    dyw, xw, buf, dtype = _staged(dy, x, dx)
    acc = acc_dtype(dtype)
    tiles = core.fused_tiles(xw, channels_last)
    if tiles:
        dgamma, sum_dy = core.fused_backward(dyw, xw, mean, rstd, g, channels_last, tiles, buf)
        return _result(buf, dx, dtype), dgamma.astype(acc), sum_dy.astype(acc)
    m = xw.size // _channels(xw, channels_last)
    sum_dy, dgamma = _param_grads(dyw, xw, mean, rstd, channels_last)
    a = g * rstd
    core.backward_elementwise(
        dyw, xw, mean, a, -a * rstd * dgamma / m, -a * sum_dy / m, channels_last, buf
    )
    return _result(buf, dx, dtype), dgamma.astype(acc), sum_dy.astype(acc)


def bn_eval_backward(dy3, x3, mean, rstd, weight, channels_last, dx=None):
    """Inference backward (statistics are constants): dx = dy·γ·rstd; dγ = Σdy·x̂; dβ = Σdy."""
    args = _checked_backward_inputs(dy3, x3, mean, rstd, weight, channels_last, dx)
    return bn_eval_backward_unchecked(*args, channels_last, dx)


def bn_eval_backward_unchecked(dy, x, mean, rstd, g, channels_last: bool, dx=None):
    """:func:`bn_eval_backward` for a caller that has checked the arguments (as for
    :func:`bn_backward_unchecked`)."""
    dyw, xw, buf, dtype = _staged(dy, x, dx)
    sum_dy, dgamma = _param_grads(dyw, xw, mean, rstd, channels_last)
    c = mean.shape[0]
    core.affine(dyw, np.zeros(c), g * rstd, np.zeros(c), channels_last, buf)
    acc = acc_dtype(dtype)
    return _result(buf, dx, dtype), dgamma.astype(acc), sum_dy.astype(acc)
