"""Activations of the engine's fused epilogues: codes, a vectorizable float32 exp, references.

An activation is ``(code, a, b)``; the epilogue of a conv, linear, add or affine step applies

    NONE          v
    CLIP          min(max(v, a), b)           ReLU = CLIP(0, inf), ReLU6 = CLIP(0, 6)
    SIGMOID       1 / (1 + exp(−v))
    SILU          v / (1 + exp(−v))           (Swish)
    HARDSIGMOID   min(max(a·v + b, 0), 1)     PyTorch: a = 1/6, b = 1/2; ONNX default a = 0.2
    HARDSWISH     v · HARDSIGMOID(v)          a = 1/6, b = 1/2

``exp`` is computed in float32 as 2^n · p(r), n = round(v·log2 e), r = v − n·ln 2 (ln 2 split in
a high and a low part), p the degree-7 Taylor polynomial of e^r on |r| <= ln(2)/2 (truncation
< 6e-9 relative) and 2^n built from its IEEE bits: no libm call, so LLVM vectorizes the loops
that use it (a scalar ``expf`` per element would cost more than the conv it follows).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

NONE, CLIP, SIGMOID, SILU, HARDSIGMOID, HARDSWISH = range(6)
NAMES = {
    NONE: "none",
    CLIP: "clip",
    SIGMOID: "sigmoid",
    SILU: "silu",
    HARDSIGMOID: "hardsigmoid",
    HARDSWISH: "hardswish",
}

IDENTITY = (NONE, 0.0, 0.0)
RELU = (CLIP, 0.0, float("inf"))
RELU6 = (CLIP, 0.0, 6.0)

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # 16 significant bits: n·_LN2_HI is exact
_LN2_LO = np.float32(1.428606765330187e-06)
_LO, _HI = np.float32(-87.0), np.float32(88.0)  # exp underflows / overflows beyond
_C = tuple(np.float32(1.0 / f) for f in (1, 1, 2, 6, 24, 120, 720, 5040))
_ONE, _ZERO, _HALF = np.float32(1.0), np.float32(0.0), np.float32(0.5)


@intrinsic
def _pow2(typingctx, n):
    """2.0**n as float32 for an int32 n in [-126, 127]: the bits (n + 127) << 23."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        bits = builder.shl(
            builder.add(args[0], ir.Constant(ir.IntType(32), 127)), ir.Constant(ir.IntType(32), 23)
        )
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


@numba.njit(inline="always", nogil=True, cache=True, error_model="numpy")
def exp32(v):  # pragma: no cover - compiled
    """e^v in float32, relative error ~2 ulp, clamped to [e^−87, e^88]."""
    v = min(max(v, _LO), _HI)
    n = np.floor(v * _LOG2E + _HALF)
    r = (v - n * _LN2_HI) - n * _LN2_LO
    p = _C[7]
    p = p * r + _C[6]
    p = p * r + _C[5]
    p = p * r + _C[4]
    p = p * r + _C[3]
    p = p * r + _C[2]
    p = p * r + _C[1]
    p = p * r + _C[0]
    return p * _pow2(np.int32(n))


@numba.njit(inline="always", nogil=True, cache=True, error_model="numpy")
def activate(v, act, a, b):  # pragma: no cover - compiled
    """One value through activation ``act`` with parameters a, b (float32 in, float32 out)."""
    if act == CLIP:
        return min(max(v, a), b)
    if act == SIGMOID:
        return _ONE / (_ONE + exp32(-v))
    if act == SILU:
        return v / (_ONE + exp32(-v))
    if act == HARDSIGMOID:
        return min(max(a * v + b, _ZERO), _ONE)
    if act == HARDSWISH:
        return v * min(max(a * v + b, _ZERO), _ONE)
    return v


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def activate_rows(y, r0, r1, j0, j1, act, a, b):  # pragma: no cover - compiled
    """In place: y[r, j0:j1] = act(y[r, j0:j1]) for r0 <= r < r1 (y 2-D, rows contiguous)."""
    if act == NONE:
        return
    for r in range(r0, r1):
        row = y[r, j0:j1]
        if act == CLIP:
            for j in range(row.shape[0]):
                row[j] = min(max(row[j], a), b)
        elif act == SIGMOID:
            for j in range(row.shape[0]):
                row[j] = _ONE / (_ONE + exp32(-row[j]))
        elif act == SILU:
            for j in range(row.shape[0]):
                row[j] = row[j] / (_ONE + exp32(-row[j]))
        elif act == HARDSIGMOID:
            for j in range(row.shape[0]):
                row[j] = min(max(a * row[j] + b, _ZERO), _ONE)
        else:
            for j in range(row.shape[0]):
                v = row[j]
                row[j] = v * min(max(a * v + b, _ZERO), _ONE)


def reference(v: np.ndarray, act) -> np.ndarray:
    """The activation in float64 (or v's dtype), the obvious NumPy way."""
    code, a, b = act
    if code == NONE:
        return v
    if code == CLIP:
        return np.clip(v, a, b)
    if code == SIGMOID:
        with np.errstate(over="ignore"):  # exp(−v) = inf for very negative v: the limit 0
            return 1.0 / (1.0 + np.exp(-v))
    if code == SILU:
        with np.errstate(over="ignore"):
            return v / (1.0 + np.exp(-v))
    if code == HARDSIGMOID:
        return np.clip(a * v + b, 0.0, 1.0)
    if code == HARDSWISH:
        return v * np.clip(a * v + b, 0.0, 1.0)
    raise ValueError(f"unknown activation code {code}")


def as_params(act) -> tuple[int, np.float32, np.float32]:
    """(code, a, b) as the kernels take them."""
    code, a, b = act
    return int(code), np.float32(a), np.float32(b)
