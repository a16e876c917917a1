"""Layer normalization: statistics per sample over the trailing ``normalized_shape`` axes.

For x of shape (*, *normalized_shape), k = len(normalized_shape), M = prod(normalized_shape):

    μ, σ² over the last k axes (biased),  x̂ = (x − μ)/sqrt(σ² + ε),  y = γ ⊙ x̂ + β

γ, β have shape ``normalized_shape`` (elementwise affine, as in ``torch.nn.LayerNorm``).
No running statistics: training and inference compute the same thing.

Two backends, as for batch norm (``backend=``, :mod:`bnlab.backend`): ``"numpy"`` is the reference
below (its :class:`NormCache` holds x̂); ``"numba"`` runs ``bnlab.kernels.ln_forward/ln_backward``
on the (M, D) view (M = samples, D = prod(normalized_shape)) and its :class:`NormKernelCache`
holds x, mean and rstd instead. Validation happens once, before the dispatch, so both backends
raise the same errors; the backward dispatches on the cache it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.backend import resolve_backend
from bnlab.buffers import output_like
from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import accumulation_dtype, check_float_array
from bnlab.functional.stats import inverse_std, moments, standardize, standardize_backward


@dataclass
class NormCache:
    """Cache of layer/group norm: x̂ and rstd in the grouped view, plus how to undo the view."""

    xhat: np.ndarray  # standardized input, in the *normalization view* (see to_view)
    rstd: np.ndarray  # 1/sqrt(σ² + ε), keepdims in the normalization view
    gamma: np.ndarray | None  # affine weight, broadcastable against the input
    stat_axes: tuple[int, ...]  # axes of the view reduced for the statistics
    param_axes: tuple[int, ...]  # axes of the input summed for dgamma/dbeta
    input_shape: tuple[int, ...]
    dtype: np.dtype
    to_view: object  # input-shaped array -> normalization view
    from_view: object  # normalization view -> input-shaped array


@dataclass
class NormKernelCache:
    """Cache of layer/group norm on the numba backend: x and the statistics, no x̂.

    ``x`` is the kernel view: (M, D) for layer norm, (N, C, S) for group norm (channels-first).
    """

    kind: str  # "layer_norm" | "group_norm"
    x: np.ndarray  # C-contiguous kernel view of the input
    mean: np.ndarray  # (M,) for layer norm, (N, G) for group norm; accumulation dtype
    rstd: np.ndarray  # same shape as mean
    gamma: np.ndarray | None  # flat (D,) or (C,) in the accumulation dtype; None: no affine
    num_groups: int | None  # group norm only
    param_shape: tuple[int, ...]  # shape of dgamma/dbeta (normalized_shape or (C,))
    input_shape: tuple[int, ...]
    dtype: np.dtype
    backend: str = "numba"


def normalize_forward(x, stat_axes, to_view, from_view, gamma_b, beta_b, param_axes, eps):
    """Shared forward of the per-sample norms: standardize in a view, apply the affine outside."""
    xv = to_view(x)
    mean, var = moments(xv, stat_axes)
    rstd = inverse_std(var, eps)
    xhat = standardize(xv, mean, rstd)
    y = from_view(xhat)
    if gamma_b is not None:
        y = y * gamma_b
    if beta_b is not None:
        y = y + beta_b
    cache = NormCache(
        xhat, rstd, gamma_b, stat_axes, param_axes, x.shape, x.dtype, to_view, from_view
    )
    return y.astype(x.dtype, copy=False), cache, mean, var


def normalize_backward(dout, cache: NormCache | NormKernelCache):
    """Shared backward: (dx, dgamma, dbeta); dgamma/dbeta are None without affine parameters.

    Dispatches on the cache: a :class:`NormKernelCache` (numba forward) runs the kernels."""
    check_float_array(dout, "dout")
    if dout.shape != cache.input_shape:
        raise ShapeError(f"dout must have the shape of x {cache.input_shape}, got {dout.shape}")
    if isinstance(cache, NormKernelCache):
        return _kernel_backward(dout, cache)
    d = dout.astype(cache.xhat.dtype, copy=False)
    xhat = cache.from_view(cache.xhat)
    dgamma = dbeta = None
    if cache.gamma is not None:
        dgamma = (d * xhat).sum(axis=cache.param_axes)
        dbeta = d.sum(axis=cache.param_axes)
        d = d * cache.gamma
    dx = standardize_backward(cache.to_view(d), cache.xhat, cache.rstd, cache.stat_axes)
    return cache.from_view(dx).astype(cache.dtype, copy=False), dgamma, dbeta


def _kernel_backward(dout, cache: NormKernelCache):
    from bnlab import kernels

    d = np.ascontiguousarray(dout).reshape(cache.x.shape)
    dx = output_like(cache.x)  # reused memory, as batch norm's outputs
    if cache.kind == "layer_norm":
        dx, dgamma, dbeta = kernels.ln_backward(
            d, cache.x, cache.mean, cache.rstd, cache.gamma, dx=dx
        )
    else:
        dx, dgamma, dbeta = kernels.gn_backward(
            d, cache.x, cache.mean, cache.rstd, cache.gamma, cache.num_groups, dx=dx
        )
    if cache.gamma is None:  # as the reference: no parameter gradients without a weight
        return dx.reshape(cache.input_shape), None, None
    shape = cache.param_shape
    return dx.reshape(cache.input_shape), dgamma.reshape(shape), dbeta.reshape(shape)


def _identity(a):
    return a


def _as_shape(normalized_shape) -> tuple[int, ...]:
    """An int or a sequence of ints (NumPy integers too), as a tuple of Python ints."""
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        shape = None
    if not shape or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape
    ):
        raise ShapeError(
            f"normalized_shape must be an int or a non-empty sequence of ints, "
            f"got {normalized_shape!r}"
        )
    return tuple(int(s) for s in shape)


def layer_norm_forward(
    x, normalized_shape, gamma=None, beta=None, eps: float = 1e-5, *, backend: str | None = None
):
    """Layer norm forward; returns ``(out, cache)``.

    Args:
        x: (*, *normalized_shape) float array.
        normalized_shape: int or tuple, the trailing shape to normalize over.
        gamma, beta: arrays of shape ``normalized_shape`` or None.
        backend: ``"numpy"`` (the reference) or ``"numba"`` (kernels on the (M, D) view);
            None: the default (:func:`bnlab.backend.get_backend`).
    """
    check_float_array(x, "x")
    eps = v.check_eps(eps)
    backend = resolve_backend(backend)
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k :]) != shape:
        raise ShapeError(
            f"normalized_shape {shape} must equal the trailing dims of x, got x shape {x.shape}"
        )
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None:
            check_float_array(p, name)
            if p.shape != shape:
                raise ShapeError(f"{name} must have shape {shape}, got {p.shape}")
    acc = accumulation_dtype(x.dtype)
    axes = tuple(range(x.ndim - k, x.ndim))
    param_axes = tuple(range(x.ndim - k))
    g = None if gamma is None else gamma.astype(acc, copy=False)
    b = None if beta is None else beta.astype(acc, copy=False)
    if backend == "numba" and x.size > 0:  # the kernels refuse empty input; the reference doesn't
        return _layer_norm_kernel(x, shape, g, b, eps)
    y, cache, _, _ = normalize_forward(x, axes, _identity, _identity, g, b, param_axes, eps)
    return y, cache


def _layer_norm_kernel(x, shape, g, b, eps):
    from bnlab import kernels

    d = int(np.prod(shape))
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    flat_g = None if g is None else g.reshape(d)
    flat_b = None if b is None else b.reshape(d)
    out = output_like(x2)  # reused memory, as batch norm's outputs
    y2, mean, rstd = kernels.ln_forward(x2, flat_g, flat_b, eps, out=out)
    cache = NormKernelCache("layer_norm", x2, mean, rstd, flat_g, None, shape, x.shape, x.dtype)
    return y2.reshape(x.shape), cache


def layer_norm_backward(dout, cache: NormCache | NormKernelCache):
    """Layer norm backward: (dx, dgamma, dbeta); see :func:`standardize_backward`."""
    return normalize_backward(dout, cache)
