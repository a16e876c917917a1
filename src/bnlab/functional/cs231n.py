"""cs231n assignment 2's normalization API, computed by bnlab's reference math.

Same function names, signatures and ``bn_param`` / ``ln_param`` / ``gn_param`` semantics as the
assignment's ``cs231n/layers.py``, so a student can put an answer next to bnlab's:

    >>> from bnlab.functional import cs231n as ref
    >>> out, cache = ref.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    >>> dx, dgamma, dbeta = ref.batchnorm_backward_alt(dout, cache)

``bn_param`` keys (as in cs231n):

- ``mode``: ``"train"`` or ``"test"`` (required);
- ``eps``: default 1e-5;
- ``momentum``: default 0.9, the weight of the *old* running value (the ``cs231n`` convention):
  ``running_mean = momentum · running_mean + (1 − momentum) · sample_mean``, same for the biased
  ``sample_var``;
- ``running_mean`` / ``running_var``: default ``np.zeros(D, dtype=x.dtype)`` (cs231n starts the
  running variance at zero, unlike PyTorch's ones). The updated values are stored back into
  ``bn_param`` as new arrays; arrays passed in are not modified, as in cs231n.

The caches are bnlab objects, not cs231n's tuples: use them with this module's backward functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional.batch_norm import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
)
from bnlab.functional.group_norm import group_norm_backward, group_norm_forward
from bnlab.functional.layer_norm import NormCache, layer_norm_backward, layer_norm_forward

MODES = ("train", "test")


def _running_buffer(bn_param: dict, key: str, c: int, dtype) -> np.ndarray:
    """A private, writable copy of ``bn_param[key]`` (zeros of length C when absent)."""
    value = bn_param.get(key)
    if value is None:
        return np.zeros(c, dtype=dtype)
    return np.array(value, copy=True)


def _batchnorm(x, gamma, beta, bn_param: dict, layout: str):
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict, got {type(bn_param).__name__}")
    mode = bn_param.get("mode")
    if mode not in MODES:
        raise ValueError(f'Invalid forward batchnorm mode "{mode}": bn_param["mode"] must be '
                         f"one of {MODES}")  # fmt: skip
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    c = x.shape[1] if isinstance(x, np.ndarray) and x.ndim >= 2 else 0
    dtype = x.dtype if isinstance(x, np.ndarray) else np.float64
    running_mean = _running_buffer(bn_param, "running_mean", c, dtype)
    running_var = _running_buffer(bn_param, "running_var", c, dtype)
    out, cache = batch_norm_forward(
        x,
        gamma,
        beta,
        training=mode == "train",
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
        eps=eps,
        layout=layout,
        convention="cs231n",
    )
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, D) with gamma, beta (D,); returns ``(out, cache)``.

    train: out = γ·(x − μ_B)/sqrt(σ²_B + eps) + β  (σ²_B biased), running stats updated;
    test:  out = γ·(x − running_mean)/sqrt(running_var + eps) + β.
    """
    return _batchnorm(x, gamma, beta, bn_param, "NC")


def batchnorm_backward(dout, cache: BatchNormCache):
    """Backward through the staged computational graph; returns (dx, dgamma, dbeta)."""
    return batch_norm_backward_graph(dout, cache)


def batchnorm_backward_alt(dout, cache: BatchNormCache):
    """Closed-form backward, dx = γ·rstd/m·(m·dy − Σdy − x̂·Σdy·x̂); returns (dx, dgamma, dbeta)."""
    return batch_norm_backward(dout, cache)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, C, H, W) per channel over (N, H, W); gamma, beta (C,)."""
    return _batchnorm(x, gamma, beta, bn_param, "NCHW")


def spatial_batchnorm_backward(dout, cache: BatchNormCache):
    """Returns dx (N, C, H, W), dgamma (C,), dbeta (C,)."""
    return batch_norm_backward(dout, cache)


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer norm of x (N, D) over D with gamma, beta (D,); ``ln_param["eps"]`` default 1e-5."""
    if not isinstance(ln_param, dict):
        raise TypeError(f"ln_param must be a dict, got {type(ln_param).__name__}")
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ShapeError(f"x must be a 2-D array (N, D), got {getattr(x, 'shape', type(x))}")
    return layer_norm_forward(x, x.shape[1], gamma, beta, eps=ln_param.get("eps", 1e-5))


def layernorm_backward(dout, cache: NormCache):
    """Returns dx (N, D), dgamma (D,), dbeta (D,)."""
    return layer_norm_backward(dout, cache)


@dataclass
class GroupNormCache:
    """bnlab's group-norm cache plus the shape cs231n gave gamma ((1, C, 1, 1) or (C,))."""

    norm: NormCache
    param_shape: tuple[int, ...]


def _as_channel_vector(p, name: str, c: int) -> np.ndarray:
    """cs231n passes gamma/beta as (1, C, 1, 1) (older versions: (C,)); bnlab wants (C,)."""
    if not isinstance(p, np.ndarray) or p.shape not in ((c,), (1, c, 1, 1)):
        raise ShapeError(
            f"{name} must have shape (1, {c}, 1, 1) or ({c},), got {getattr(p, 'shape', p)}"
        )
    return p.reshape(c)


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group norm of x (N, C, H, W) with G groups of C/G channels; gamma, beta (1, C, 1, 1).

    Statistics per sample and group over (C/G, H, W); ``gn_param["eps"]`` default 1e-5.
    """
    if not isinstance(gn_param, dict):
        raise TypeError(f"gn_param must be a dict, got {type(gn_param).__name__}")
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ShapeError(f"x must be a 4-D array (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    c = x.shape[1]
    g = _as_channel_vector(gamma, "gamma", c)
    b = _as_channel_vector(beta, "beta", c)
    out, cache = group_norm_forward(x, G, g, b, eps=gn_param.get("eps", 1e-5), layout="NCHW")
    return out, GroupNormCache(cache, gamma.shape)


def spatial_groupnorm_backward(dout, cache: GroupNormCache):
    """Returns dx (N, C, H, W) and dgamma, dbeta in the shape gamma was given."""
    if not isinstance(cache, GroupNormCache):
        raise TypeError(f"cache must come from spatial_groupnorm_forward, got {type(cache)}")
    dx, dgamma, dbeta = group_norm_backward(dout, cache.norm)
    return dx, dgamma.reshape(cache.param_shape), dbeta.reshape(cache.param_shape)


__all__ = [
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "batchnorm_forward",
    "layernorm_backward",
    "layernorm_forward",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_forward",
    "spatial_groupnorm_backward",
    "spatial_groupnorm_forward",
]
