"""Shared helpers of the nn tests: numeric gradients and the PyTorch twin of a bnlab module."""

from __future__ import annotations

import numpy as np

import bnlab.nn.activation
import bnlab.nn.conv
import bnlab.nn.pooling
from bnlab.check import numeric_gradient


def set_engine_kernels(monkeypatch, on: bool) -> None:
    """Force the engine's numba kernels on or off (independently of the BN backend)."""
    monkeypatch.setattr(bnlab.nn.conv, "use_numba", lambda: on)
    monkeypatch.setattr(bnlab.nn.pooling, "use_numba", lambda: on)
    monkeypatch.setattr(bnlab.nn.activation, "use_numba", lambda: on)


def numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every entry of ``a`` (in place)."""
    return numeric_gradient(f, a, 1.0, h)


def to_torch_state(module):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in module.state_dict().items()}
