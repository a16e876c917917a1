"""Element-wise activations.

ReLU:     y = max(x, 0)                 dx = dy · [x > 0]
Sigmoid:  y = 1 / (1 + e^{−x})          dx = dy · y · (1 − y)
          computed as ½(1 + tanh(x/2)): the same function, no overflow for large |x|.
"""

from __future__ import annotations

import numpy as np

from bnlab.nn._util import check_dout, check_x, use_numba
from bnlab.nn.module import Module


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """σ(x) = ½(1 + tanh(x/2)) in x's dtype; ``out`` may be x itself."""
    y = np.multiply(x, x.dtype.type(0.5), out=np.empty_like(x) if out is None else out)
    np.tanh(y, out=y)
    y += 1
    y *= y.dtype.type(0.5)
    return y


def sigmoid_backward_reference(y: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """dx = dy · y · (1 − y), as ((1 − y)·y)·dy: two in-place passes after one allocation."""
    g = np.subtract(1, y, dtype=y.dtype)
    g *= y
    g *= dout
    return g


def sigmoid_backward(y: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """dx = dy · y · (1 − y): one fused numba pass under the numba backend, else the reference."""
    if not use_numba() or dout.dtype != y.dtype:
        return sigmoid_backward_reference(y, dout)
    from bnlab.nn import _kernels

    dx = np.empty(y.shape, y.dtype)
    yf, df = np.ascontiguousarray(y).reshape(-1), np.ascontiguousarray(dout).reshape(-1)
    _kernels.sigmoid_backward(yf, df, dx.reshape(-1))
    return dx


class ReLU(Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(range(0, 33)), "ReLU", "a float array")
        y = np.maximum(x, 0, out=x if self.inplace else None)
        if self._need_cache():
            self._cache = y  # y > 0 exactly where x > 0
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        y = self._cached()
        check_dout(dout, y.shape, "ReLU")
        return np.where(y > 0, dout, dout.dtype.type(0))


class Sigmoid(Module):
    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(range(0, 33)), "Sigmoid", "a float array")
        y = sigmoid(x)
        if self._need_cache():
            self._cache = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        y = self._cached()
        check_dout(dout, y.shape, "Sigmoid")
        return sigmoid_backward(y, dout)
