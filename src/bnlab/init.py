"""Seeded weight initialisation, matching ``torch.nn.init`` formulas.

Every function takes an explicit ``rng`` (``numpy.random.Generator``); ``rng=None`` uses bnlab's
global generator, re-seeded by :func:`manual_seed` (the analogue of ``torch.manual_seed``), so a
model built after ``manual_seed(s)`` is reproducible.

Fans of a weight of shape (out, in, *kernel):  fan_in = in·prod(kernel), fan_out = out·prod(kernel).

    xavier_uniform:   U(−a, a),  a = gain · sqrt(6 / (fan_in + fan_out))      (Glorot & Bengio)
    kaiming_uniform:  U(−b, b),  b = gain · sqrt(3 / fan_in),  gain = sqrt(2 / (1 + a²))
    PyTorch default for Conv/Linear: kaiming_uniform(a=√5) → b = 1/sqrt(fan_in); bias U(±1/√fan_in)
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.errors import ShapeError

_GLOBAL = {"rng": np.random.default_rng(0)}


def manual_seed(seed: int) -> np.random.Generator:
    """Re-seed bnlab's global initialisation generator and return it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _GLOBAL["rng"] = np.random.default_rng(int(seed))
    return _GLOBAL["rng"]


def get_rng(rng: np.random.Generator | None = None) -> np.random.Generator:
    """``rng`` itself, or the global generator when None."""
    if rng is None:
        return _GLOBAL["rng"]
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    return rng


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of shape (out, in, *kernel); needs at least 2 dims."""
    if len(shape) < 2:
        raise ShapeError(f"fan in/out need a weight with at least 2 dims, got shape {shape}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def uniform_(array: np.ndarray, low: float, high: float, rng=None) -> np.ndarray:
    """Fill ``array`` in place with U(low, high) draws (drawn in float64, then cast)."""
    array[...] = get_rng(rng).uniform(low, high, size=array.shape)
    return array


def zeros_(array: np.ndarray) -> np.ndarray:
    array[...] = 0
    return array


def ones_(array: np.ndarray) -> np.ndarray:
    array[...] = 1
    return array


def xavier_uniform_(array: np.ndarray, gain: float = 1.0, rng=None) -> np.ndarray:
    """In place: U(−a, a) with a = gain·sqrt(6/(fan_in + fan_out)) (d2l's init for LeNet)."""
    fan_in, fan_out = fans(array.shape)
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(array, -a, a, rng)


def kaiming_uniform_(array: np.ndarray, a: float = 0.0, rng=None) -> np.ndarray:
    """In place: U(−b, b) with b = sqrt(2/(1 + a²))·sqrt(3/fan_in) (leaky-ReLU gain, fan_in)."""
    fan_in, _ = fans(array.shape)
    bound = math.sqrt(2.0 / (1.0 + a * a)) * math.sqrt(3.0 / fan_in)
    return uniform_(array, -bound, bound, rng)


def default_conv_linear_(weight: np.ndarray, bias: np.ndarray | None, rng=None) -> None:
    """PyTorch's reset_parameters() of Conv/Linear: kaiming_uniform(a=√5) and U(±1/√fan_in)."""
    rng = get_rng(rng)
    kaiming_uniform_(weight, a=math.sqrt(5.0), rng=rng)
    if bias is not None:
        fan_in, _ = fans(weight.shape)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, rng)
