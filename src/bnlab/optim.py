"""``SGD`` with momentum and weight decay, PyTorch's update rule (``torch.optim.SGD``).

For each parameter p with gradient g, at step t:

    g ← g + λ·p                                  (weight_decay λ, L2 penalty λ/2·‖p‖²)
    b ← g                       if t = 1         (momentum buffer, μ > 0)
    b ← μ·b + (1 − τ)·g         otherwise        (dampening τ)
    g ← g + μ·b  if nesterov  else  b
    p ← p − lr·g

The update is done in place on ``p.data`` in the parameter's dtype. Momentum buffers are kept per
parameter (by position in ``params``), saved by :meth:`state_dict` for bit-identical resume.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.errors import ShapeError
from bnlab.nn.module import Parameter


def _check_hyper(name: str, value, *, low: float = 0.0, allow_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (v == low and not allow_low):
        bound = f">= {low}" if allow_low else f"> {low}"
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}")
    return v


class SGD:
    """Stochastic gradient descent: ``SGD(params, lr, momentum=0, dampening=0, weight_decay=0,
    nesterov=False)``; ``step()`` applies one update, ``zero_grad()`` clears the gradients."""

    def __init__(
        self, params, lr: float, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False
    ):
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("SGD got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a bnlab.nn.Parameter, got {type(p).__name__}")
        self.lr = _check_hyper("lr", lr, allow_low=False)
        self.momentum = _check_hyper("momentum", momentum)
        self.dampening = _check_hyper("dampening", dampening)
        self.weight_decay = _check_hyper("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.buffers: list[np.ndarray | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One update of every parameter that has a gradient (see the module docstring)."""
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p)

    def _update(self, i: int, p: Parameter) -> None:
        dt = p.data.dtype.type
        g = p.grad
        if self.weight_decay:
            g = g + dt(self.weight_decay) * p.data
        if self.momentum:
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = np.array(g, dtype=p.data.dtype, copy=True)
            else:
                buf *= dt(self.momentum)
                buf += dt(1.0 - self.dampening) * g
            g = g + dt(self.momentum) * buf if self.nesterov else buf
        p.data -= dt(self.lr) * g

    # ------------------------------------------------------------------ checkpointing
    def hyperparameters(self) -> dict:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers as ``{"momentum_buffer.<i>": array}`` (i = position in params)."""
        return {
            f"momentum_buffer.{i}": np.array(b, copy=True)
            for i, b in enumerate(self.buffers)
            if b is not None
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore momentum buffers; every key and shape is checked before anything changes."""
        new: list[np.ndarray | None] = [None] * len(self.params)
        for key, value in state.items():
            prefix, _, idx = key.partition(".")
            if prefix != "momentum_buffer" or not idx.isdigit() or int(idx) >= len(self.params):
                raise KeyError(
                    f"unexpected optimizer state key {key!r} (expected momentum_buffer.<i> with "
                    f"i < {len(self.params)})"
                )
            p = self.params[int(idx)]
            if value.shape != p.data.shape:
                raise ShapeError(
                    f"optimizer state {key!r}: expected shape {p.data.shape}, got {value.shape}"
                )
            new[int(idx)] = np.array(value, dtype=p.data.dtype, copy=True)
        self.buffers = new
