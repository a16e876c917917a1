"""cs231n assignment 2's normalization API, computed by bnlab's reference math.

Same function names, signatures and ``bn_param`` / ``ln_param`` / ``gn_param`` semantics as the
assignment's ``cs231n/layers.py``, so a student can put an answer next to bnlab's or swap bnlab's
in with one import (``docs/clients.md``):

    >>> from bnlab.functional.cs231n import batchnorm_forward, batchnorm_backward_alt
    >>> out, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    >>> dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)

Inputs are taken as NumPy's arithmetic in the assignment takes them: x is an ndarray of floats,
integers or booleans (integers compute in float64); γ and β are anything that broadcasts in
``gamma * x_hat + beta`` (arrays of any real dtype, lists, numbers), and the output has the dtype
NumPy gives that expression (integer γ with float64 x: float64; float64 γ with float32 x: float64).

``bn_param`` keys (as in cs231n):

- ``mode``: ``"train"`` or ``"test"`` (required);
- ``eps``: default 1e-5;
- ``momentum``: default 0.9, the weight of the *old* running value (the ``cs231n`` preset):
  ``running_mean = momentum · running_mean + (1 − momentum) · sample_mean``, same for the biased
  ``sample_var``;
- ``running_mean`` / ``running_var``: created as zeros on the first call (cs231n starts the running
  variance at zero, unlike PyTorch's ones). Training stores the updated values back as new arrays;
  arrays passed in are never modified, as in cs231n;
- ``layernorm``: when true, batch statistics are used and no running statistics are kept (the flag
  students set when they build a layer norm as ``batchnorm_forward(x.T, gamma.reshape(-1, 1),
  beta.reshape(-1, 1), ln_param)``).

Where bnlab differs from the assignment's reference (``docs/conventions.md``, "cs231n"): a NaN/Inf
training batch warns and leaves the running statistics unchanged; eps must be > 0 and momentum in
[0, 1]; an empty training batch is an error; spatial γ, β hold one value per channel. A training
batch of one sample returns β, as the reference does (x̂ = 0 when the variance is 0).

The caches are bnlab objects, not cs231n's tuples: use them with this module's backward functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from bnlab.errors import NonFiniteBatchWarning, ShapeError
from bnlab.functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from bnlab.functional._cs231n_args import (
    Affine,
    affine,
    affine_grads,
    as_given,
    as_param,
    check_cache,
    check_eps,
    check_momentum,
    float_dout,
    float_input,
    param_dict,
)

MODES = ("train", "test")

# --------------------------------------------------------------------------- batch norm


@dataclass
class BatchNormAdapterCache:
    """What :func:`batchnorm_backward` / ``_alt`` / :func:`spatial_batchnorm_backward` need."""

    bn: BatchNormCache | None  # bnlab's cache; None for a training batch of one value per channel
    affine: Affine
    xhat: np.ndarray | None  # kept when the adapter applied γ, β itself
    shape: tuple


def _running_stat(bn_param: dict, key: str, c: int, stat_dtype, training: bool) -> np.ndarray:
    """``bn_param[key]`` as a (C,) float array: a private copy when training (updated in place,
    stored back as a new array, as cs231n stores new arrays); zeros when absent."""
    value = bn_param.get(key)
    if value is None:
        return np.zeros(c, stat_dtype)
    a = as_param(value, f"bn_param[{key!r}]")
    if a.shape != (c,) and a.size != 1:
        raise ShapeError(
            f"bn_param[{key!r}] must have shape ({c},), one value per feature of x, got {a.shape} "
            "(a bn_param of another layer? a layer norm built on batchnorm_forward(x.T, ...) "
            "sets bn_param['layernorm'] = True and keeps none)"
        )
    dtype = np.result_type(a.dtype, stat_dtype)
    if training:
        return np.array(np.broadcast_to(a, (c,)), dtype=dtype)
    return np.broadcast_to(a, (c,)).astype(dtype, copy=False)


def _cs231n_update(buffer: np.ndarray, stat: np.ndarray, momentum: float) -> None:
    buffer[...] = momentum * buffer + (1.0 - momentum) * stat


def _batch_of_one(xc, aff: Affine, eps, momentum, running):
    """Training with one value per channel: σ² = 0, so x̂ = 0 and out = β (NaN where x is not
    finite), and the running averages take the sample as mean and 0 as variance (cs231n)."""
    eps, momentum = check_eps(eps), check_momentum(momentum)
    xhat = (xc - xc) / np.sqrt(eps)
    out = (aff.gamma_b * xhat + aff.beta_b).astype(aff.dtype, copy=False)
    if running is not None:
        mean = xc.reshape(-1)
        if np.isfinite(mean).all():
            _cs231n_update(running[0], mean, momentum)
            _cs231n_update(running[1], np.zeros_like(mean), momentum)
        else:
            warnings.warn("x contains NaN or Inf: the running statistics were left unchanged",
                          NonFiniteBatchWarning, stacklevel=4)  # fmt: skip
    return out, BatchNormAdapterCache(None, aff, xhat, xc.shape)


def _batchnorm(x, gamma, beta, bn_param, spatial: bool):
    param_dict(bn_param, "bn_param")
    mode = bn_param.get("mode")
    if not (isinstance(mode, str) and mode in MODES):
        shown = repr(mode) if isinstance(mode, str) and len(mode) < 20 else type(mode).__name__
        raise ValueError(f"Invalid forward batchnorm mode {shown}: bn_param['mode'] must be "
                         "'train' or 'test'")  # fmt: skip
    xf = float_input(x, "x", "(N, C, H, W)" if spatial else "(N, D)")
    c = xf.shape[1]
    if spatial:
        shapes, view, unit = ((c,), (1, c), (1, c, 1, 1)), (1, c, 1, 1), "channel"
    else:
        shapes, view, unit = ((c,), (1, c)), (c,), "feature"
    aff = affine(gamma, beta, xf, shapes, view, unit, broadcast=not spatial)
    xc = xf.astype(aff.dtype, copy=False)
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    layernorm = bool(bn_param.get("layernorm", False))
    training = mode == "train" or layernorm
    running = None
    if not layernorm:
        running = tuple(_running_stat(bn_param, k, c, xf.dtype, training)
                        for k in ("running_mean", "running_var"))  # fmt: skip
    if training and xf.size == c and c > 0:  # one value per channel
        out, cache = _batch_of_one(xc, aff, eps, momentum, running)
    else:
        out, cache = _bnlab_batchnorm(xc, aff, training, running, eps, momentum, spatial)
    if running is not None:
        if training:
            bn_param["running_mean"], bn_param["running_var"] = running
        else:  # cs231n stores what it used: the arrays given, or the zeros it created
            bn_param.setdefault("running_mean", running[0])
            bn_param.setdefault("running_var", running[1])
    return out, cache


def _bnlab_batchnorm(xc, aff: Affine, training, running, eps, momentum, spatial):
    rm, rv = running if running is not None else (None, None)
    y, bn = batch_norm_forward(
        xc,
        aff.gamma,  # None off the per-channel path: bnlab returns x̂ and γ, β are applied here
        aff.beta,
        training=training,
        running_mean=rm,
        running_var=rv,
        momentum=momentum,
        eps=eps,
        layout="NCHW" if spatial else "NC",
        convention="cs231n",
    )
    if aff.per_channel:
        return y, BatchNormAdapterCache(bn, aff, None, xc.shape)
    out = aff.gamma_b * y + aff.beta_b
    return out, BatchNormAdapterCache(bn, aff, y, xc.shape)


def _bn_backward(dout, cache, graph: bool, forward: str):
    cache = check_cache(cache, BatchNormAdapterCache, forward)
    d = float_dout(dout, cache.shape)
    aff, flat = cache.affine, True  # cs231n documents dgamma (D,) / (C,)
    if cache.bn is None:  # batch of one: x̂ does not depend on x, dx = 0
        dx = np.zeros(cache.shape, np.result_type(d.dtype, aff.dtype))
        return (dx, *affine_grads(d, cache.xhat, aff, flat))
    backward = batch_norm_backward_graph if graph else batch_norm_backward
    return _backward_through_affine(backward, d, cache.bn, cache.xhat, aff, flat)


def _backward_through_affine(backward, d, norm_cache, xhat, aff: Affine, flat: bool):
    """(dx, dγ, dβ) of γ·x̂ + β: a per-channel γ goes through the norm's own ``backward``; any
    other shape of γ scales ``d`` first and takes its gradients from x̂."""
    if aff.per_channel:
        dx, dg, db = backward(d, norm_cache)
        return dx, as_given(dg, aff.gamma_shape, flat), as_given(db, aff.beta_shape, flat)
    dx = backward(d * aff.gamma_b, norm_cache)[0]
    return (dx, *affine_grads(d, xhat, aff, flat))


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, D) with gamma, beta (D,); returns ``(out, cache)``.

    train: out = γ·(x − μ_B)/sqrt(σ²_B + eps) + β  (σ²_B biased), running stats updated;
    test:  out = γ·(x − running_mean)/sqrt(running_var + eps) + β.
    γ, β may be anything broadcasting against (N, D), as in cs231n's ``gamma * x_hat + beta``.
    """
    return _batchnorm(x, gamma, beta, bn_param, spatial=False)


def batchnorm_backward(dout, cache: BatchNormAdapterCache):
    """Backward through the staged computational graph; returns (dx, dgamma, dbeta).

    dgamma, dbeta have the shapes gamma, beta were given in, a row (1, D) or column (D, 1) as a
    flat (D,) (cs231n's documented shape)."""
    return _bn_backward(dout, cache, graph=True, forward="batchnorm_forward")


def batchnorm_backward_alt(dout, cache: BatchNormAdapterCache):
    """Closed-form backward, dx = γ·rstd/m·(m·dy − Σdy − x̂·Σdy·x̂); returns (dx, dgamma, dbeta)."""
    return _bn_backward(dout, cache, graph=False, forward="batchnorm_forward")


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch norm of x (N, C, H, W) per channel over (N, H, W); gamma, beta (C,) (also (1, C),
    (1, C, 1, 1) or a single value)."""
    return _batchnorm(x, gamma, beta, bn_param, spatial=True)


def spatial_batchnorm_backward(dout, cache: BatchNormAdapterCache):
    """Returns dx (N, C, H, W) and dgamma, dbeta in the shapes gamma, beta were given."""
    return _bn_backward(dout, cache, graph=False, forward="spatial_batchnorm_forward")


# --------------------------------------------------------------------------- layer and group norm


@dataclass
class NormAdapterCache:
    """What :func:`layernorm_backward` / :func:`spatial_groupnorm_backward` need."""

    kind: str  # "layernorm" | "groupnorm"
    norm: object  # bnlab's layer/group norm cache
    affine: Affine
    xhat: np.ndarray | None  # kept when the adapter applied γ, β itself
    shape: tuple


def _norm_output(y, norm, aff: Affine, kind: str, shape):
    if aff.per_channel:
        return y, NormAdapterCache(kind, norm, aff, None, shape)
    return aff.gamma_b * y + aff.beta_b, NormAdapterCache(kind, norm, aff, y, shape)


def _norm_backward(dout, cache, kind: str, backward, flat: bool):
    cache = check_cache(cache, NormAdapterCache, f"spatial_{kind}_forward"
                         if kind == "groupnorm" else f"{kind}_forward")  # fmt: skip
    if cache.kind != kind:
        raise TypeError(f"cache must be the cache returned by {kind}_forward, got {cache.kind}'s")
    d = float_dout(dout, cache.shape)
    return _backward_through_affine(backward, d, cache.norm, cache.xhat, cache.affine, flat)


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer norm of x (N, D) over D with gamma, beta (D,); ``ln_param["eps"]`` default 1e-5.

    out = γ·(x − μ_n)/sqrt(σ²_n + eps) + β with μ_n, σ²_n (biased) over the D features of sample
    n. Other ``ln_param`` keys (e.g. ``mode``) are ignored: train and test compute the same.
    """
    param_dict(ln_param, "ln_param")
    xf = float_input(x, "x", "(N, D)")
    d = xf.shape[1]
    aff = affine(gamma, beta, xf, ((d,), (1, d)), (d,), "feature", broadcast=True)
    xc = xf.astype(aff.dtype, copy=False)
    y, norm = layer_norm_forward(xc, d, aff.gamma, aff.beta, eps=ln_param.get("eps", 1e-5))
    return _norm_output(y, norm, aff, "layernorm", xc.shape)


def layernorm_backward(dout, cache: NormAdapterCache):
    """Returns dx (N, D) and dgamma, dbeta (D,) (in the shapes gamma, beta were given)."""
    return _norm_backward(dout, cache, "layernorm", layer_norm_backward, flat=True)


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group norm of x (N, C, H, W) with G groups of C/G channels; gamma, beta (1, C, 1, 1).

    Statistics per sample and group over (C/G, H, W); ``gn_param["eps"]`` default 1e-5.
    γ, β of shape (C,) (older cs231n docstrings) are per channel too; other shapes broadcast
    against x as in cs231n's ``gamma * x_hat + beta``.
    """
    param_dict(gn_param, "gn_param")
    xf = float_input(x, "x", "(N, C, H, W)")
    c = xf.shape[1]
    shapes = ((c,), (1, c, 1, 1), (c, 1, 1))
    aff = affine(gamma, beta, xf, shapes, (1, c, 1, 1), "channel", broadcast=True)
    xc = xf.astype(aff.dtype, copy=False)
    eps = gn_param.get("eps", 1e-5)
    y, norm = group_norm_forward(xc, G, aff.gamma, aff.beta, eps=eps, layout="NCHW")
    return _norm_output(y, norm, aff, "groupnorm", xc.shape)


def spatial_groupnorm_backward(dout, cache: NormAdapterCache):
    """Returns dx (N, C, H, W) and dgamma, dbeta in the shapes gamma, beta were given."""
    return _norm_backward(dout, cache, "groupnorm", group_norm_backward, flat=False)


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
