"""Arguments of the cs231n adapters (:mod:`bnlab.functional.cs231n`) taken as NumPy's arithmetic
in the assignment takes them: dtype promotion, γ/β broadcasting, and the gradients of γ/β in the
shapes they were given."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnlab.errors import DTypeError, ShapeError

_FLOATS = (np.float16, np.float32, np.float64)

# --------------------------------------------------------------------------- arguments


def param_dict(p, name: str) -> dict:
    if not isinstance(p, dict):
        raise TypeError(f"{name} must be a dict, got {type(p).__name__}")
    return p


def _as_float(a: np.ndarray, name: str) -> np.ndarray:
    """Floats keep their dtype; booleans and integers become float64 (what ``x.mean()`` gives)."""
    if a.dtype.type in _FLOATS:
        return a
    if a.dtype.kind in "biu":
        return a.astype(np.float64)
    raise DTypeError(f"{name} must hold real numbers (float, int or bool), got dtype {a.dtype}")


def float_input(x, name: str, shape_text: str) -> np.ndarray:
    """x (or dout) as a float ndarray with as many axes as ``shape_text`` names."""
    if not isinstance(x, np.ndarray):
        raise DTypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    ndim = shape_text.count(",") + 1
    if x.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D {shape_text}, got shape {x.shape}")
    return _as_float(x, name)


def float_dout(dout, shape: tuple) -> np.ndarray:
    if not isinstance(dout, np.ndarray) or dout.shape != shape:
        got = getattr(dout, "shape", type(dout).__name__)
        raise ShapeError(f"dout must be an ndarray of the forward input's shape {shape}, got {got}")
    return _as_float(dout, "dout")


def check_cache(cache, cls, forward: str):
    if not isinstance(cache, cls):
        got = type(cache).__name__
        raise TypeError(f"cache must be the cache returned by {forward}, got {got}")
    return cache


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_eps(value) -> float:
    """bn_param['eps'] on the batch-of-one path (bnlab's batch norm checks it otherwise)."""
    v = _number(value, "eps")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"eps must be a finite number > 0, got {v}")
    return v


def check_momentum(value) -> float:
    """bn_param['momentum'] on the batch-of-one path."""
    v = _number(value, "momentum")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {v}")
    return v


# --------------------------------------------------------------------------- gamma and beta


@dataclass
class Affine:
    """γ, β as the caller gave them and as bnlab applies them.

    ``per_channel``: both hold one value per channel (or one value): bnlab applies them as the
    (C,) vectors ``gamma``/``beta``. Otherwise ``gamma_b``/``beta_b`` broadcast against x by
    NumPy's rules and the adapter applies them to bnlab's x̂.
    """

    dtype: np.dtype  # the dtype of gamma * x_hat + beta
    per_channel: bool
    gamma: np.ndarray | None  # (C,) on the per-channel path
    beta: np.ndarray | None
    gamma_b: np.ndarray  # broadcastable against x
    beta_b: np.ndarray
    gamma_shape: tuple  # as given: dgamma and dbeta come back in these shapes
    beta_shape: tuple


def as_param(p, name: str) -> np.ndarray:
    a = p if isinstance(p, np.ndarray) else np.asarray(p)
    if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and a.dtype.type not in _FLOATS):
        raise DTypeError(f"{name} must hold real numbers (float, int or bool), got dtype {a.dtype}")
    return a


def _weak(p, a: np.ndarray):
    """What NumPy promotes with: a Python number stays weak (NEP 50), anything else its dtype."""
    return p if isinstance(p, (bool, int, float)) else a.dtype


def _channel_vector(a: np.ndarray, c: int, shapes, ndim: int, dtype) -> np.ndarray | None:
    """``a`` as a (C,) vector if it has one of ``shapes`` or is a single value with at most
    ``ndim`` axes (more would add axes to the output), else None."""
    if a.size == 1 and a.ndim <= ndim:
        return np.full(c, a.reshape(()), dtype=dtype)
    if a.shape in shapes:
        return a.reshape(c).astype(dtype, copy=False)
    return None


def affine(gamma, beta, x: np.ndarray, shapes, channel_shape, unit: str, broadcast: bool):
    """γ, β for x. ``shapes``: the shapes that mean "one value per channel"; ``channel_shape``
    views a (C,) vector against x; ``broadcast``: any other shape that broadcasts against x is
    applied by NumPy's rules (else it is refused)."""
    c = x.shape[1]
    g, b = as_param(gamma, "gamma"), as_param(beta, "beta")
    dtype = np.result_type(x.dtype, _weak(gamma, g), _weak(beta, b))
    gv = _channel_vector(g, c, shapes, x.ndim, dtype)
    bv = _channel_vector(b, c, shapes, x.ndim, dtype)
    if gv is not None and bv is not None:
        gb, bb = gv.reshape(channel_shape), bv.reshape(channel_shape)
        return Affine(dtype, True, gv, bv, gb, bb, g.shape, b.shape)
    for a, vector, name in ((g, gv, "gamma"), (b, bv, "beta")):
        if vector is not None:
            continue
        if not broadcast:
            raise ShapeError(
                f"{name} must hold one value per {unit} of x: shape "
                f"{' or '.join(str(s) for s in shapes)}, got {a.shape}"
            )
        try:
            ok = np.broadcast_shapes(a.shape, x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            raise ShapeError(
                f"{name} of shape {a.shape} must broadcast against x of shape {x.shape} "
                f"(cs231n: one value per {unit}, shape ({c},))"
            )
    gb = g.astype(dtype, copy=False) if gv is None else gv.reshape(channel_shape)
    bb = b.astype(dtype, copy=False) if bv is None else bv.reshape(channel_shape)
    return Affine(dtype, False, None, None, gb, bb, g.shape, b.shape)


def _sum_to_shape(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum g over the axes along which an array of ``shape`` was broadcast to g's shape."""
    lead = g.ndim - len(shape)
    r = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and r.shape[i] != 1)
    return r.sum(axis=axes, keepdims=True) if axes else r


def as_given(grad: np.ndarray, shape: tuple, flat_rows: bool) -> np.ndarray:
    """A parameter gradient in the shape the parameter was given. ``flat_rows``: a row (1, D) or
    column (D, 1) gets a flat (D,) gradient, the shape cs231n documents for dgamma."""
    size = math.prod(shape)
    grad = grad.reshape(shape) if grad.size == size else grad.sum().reshape(shape)
    if flat_rows and len(shape) == 2 and 1 in shape:
        return grad.reshape(size)
    return grad


def affine_grads(dout, xhat, aff: Affine, flat_rows: bool):
    """dγ, dβ of ``out = gamma_b · x̂ + beta_b`` in the shapes γ, β were given."""
    dg = _sum_to_shape(dout * xhat, aff.gamma_b.shape)
    db = _sum_to_shape(dout, aff.beta_b.shape)
    return as_given(dg, aff.gamma_shape, flat_rows), as_given(db, aff.beta_shape, flat_rows)
