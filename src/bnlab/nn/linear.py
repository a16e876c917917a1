"""``Linear``, ``Flatten``, ``Identity``.

Linear:  y = x Wᵀ + b      x (N, in) · W (out, in) → y (N, out)
         dx = dy W,  dW = dyᵀ x,  db = Σₙ dy
"""

from __future__ import annotations

import math

import numpy as np

from bnlab import init
from bnlab.errors import ShapeError
from bnlab.nn._util import check_dout, check_x, float_dtype, positive_int
from bnlab.nn.module import Module, Parameter


class Linear(Module):
    """Fully connected layer (``torch.nn.Linear``): weight (out, in), bias (out,).

    Input (N, in_features) or (*, in_features); output (..., out_features).
    Set ``input_grad = False`` on a first layer to skip dx (backward then returns None).
    """

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        dt = float_dtype(dtype)
        self.weight = Parameter(np.empty((self.out_features, self.in_features), dt))
        b = Parameter(np.empty(self.out_features, dt)) if bias else None
        self.register_parameter("bias", b)
        self.input_grad = True
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        b = None if self.bias is None else self.bias.data
        init.default_conv_linear_(self.weight.data, b, rng)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(range(1, 33)), "Linear", "(*, in_features)")
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"Linear: input must have {self.in_features} features in its last dim, "
                f"got shape {x.shape}"
            )
        x2 = x.reshape(-1, self.in_features)
        y = x2 @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        if self._need_cache():
            self._cache = (x2, x.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        x2, xshape = self._cached()
        check_dout(dout, (*xshape[:-1], self.out_features), "Linear")
        d2 = dout.reshape(-1, self.out_features)
        self.weight.accumulate(d2.T @ x2)
        if self.bias is not None:
            self.bias.accumulate(d2.sum(axis=0))
        if not self.input_grad:
            return None
        return (d2 @ self.weight.data).reshape(xshape)


class Flatten(Module):
    """Flatten dims ``start_dim..end_dim`` into one (``torch.nn.Flatten``; default from dim 1)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        s, e = self.start_dim % x.ndim, self.end_dim % x.ndim
        if s > e:
            raise ShapeError(f"Flatten: start_dim {self.start_dim} is after end_dim {self.end_dim}")
        self._cache = x.shape
        return x.reshape(*x.shape[:s], math.prod(x.shape[s : e + 1]), *x.shape[e + 1 :])

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout.reshape(self._cached())


class Identity(Module):
    """y = x (a placeholder, e.g. for a removed layer)."""

    def forward(self, x):
        return x

    def backward(self, dout):
        return dout
