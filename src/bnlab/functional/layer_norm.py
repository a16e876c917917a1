"""Layer normalization: statistics per sample over the trailing ``normalized_shape`` axes.

For x of shape (*, *normalized_shape), k = len(normalized_shape), M = prod(normalized_shape):

    μ, σ² over the last k axes (biased),  x̂ = (x − μ)/sqrt(σ² + ε),  y = γ ⊙ x̂ + β

γ, β have shape ``normalized_shape`` (elementwise affine, as in ``torch.nn.LayerNorm``).
No running statistics: training and inference compute the same thing.

Two backends, as for batch norm (``backend=``, :mod:`bnlab.backend`): ``"numpy"`` is the reference
below (its :class:`NormCache` holds x̂); ``"numba"`` runs the layer-norm kernels on the (M, D) view
(M = samples, D = prod(normalized_shape)) through the seam (``_dispatch``), and its
:class:`NormKernelCache` holds x, mean and rstd instead. Validation happens once, before the
dispatch, so both backends raise the same errors; the backward dispatches on the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional import _dispatch
from bnlab.functional import _validate as v
from bnlab.functional._layout import check_float_array
from bnlab.functional.stats import (
    NormCache,
    accumulation_dtype,
    normalize_forward,
    normalize_grads,
)


@dataclass
class NormKernelCache:
    """Cache of layer/group norm on the numba backend: x and the statistics, no x̂.

    ``x`` is the kernel view: (M, D) for layer norm, (N, C, S) for group norm (channels-first),
    the caller's memory (then ``fingerprint`` checks it is unchanged) or a private copy.
    """

    kind: str  # "layer_norm" | "group_norm"
    x: np.ndarray  # C-contiguous kernel view of the input (compute dtype)
    mean: np.ndarray  # (M,) for layer norm, (N, G) for group norm; accumulation dtype
    rstd: np.ndarray  # same shape as mean
    gamma: np.ndarray | None  # flat (D,) or (C,) in the accumulation dtype; None: no affine
    num_groups: int | None  # group norm only
    param_shape: tuple[int, ...]  # shape of dgamma/dbeta (normalized_shape or (C,))
    input_shape: tuple[int, ...]
    dtype: np.dtype
    backend: str = "numba"
    fingerprint: object = None  # _dispatch.Fingerprint of x, None for a private copy


def normalize_backward(dout, cache: NormCache | NormKernelCache):
    """The per-sample norms' backward: (dx, dgamma, dbeta); dgamma/dbeta are None without
    affine parameters. Dispatches on the cache: a :class:`NormKernelCache` (numba forward) runs
    the kernels, after checking that x did not change since the forward."""
    if not isinstance(cache, (NormCache, NormKernelCache)):
        raise TypeError(f"cache must come from the forward pass, got {type(cache).__name__}")
    check_float_array(dout, "dout")
    if dout.shape != cache.input_shape:
        raise ShapeError(f"dout must have the shape of x {cache.input_shape}, got {dout.shape}")
    if isinstance(cache, NormKernelCache):
        return _kernel_backward(dout, cache)
    return normalize_grads(dout, cache)


def _kernel_backward(dout, cache: NormKernelCache):
    _dispatch.check_kept(cache.x, cache.fingerprint)
    d = dout.reshape(cache.x.shape)  # a view when dout is C-contiguous (the seam stages it)
    g = np.ones(cache.x.shape[1]) if cache.gamma is None else cache.gamma.astype(np.float64)
    mean, rstd = cache.mean.astype(np.float64), cache.rstd.astype(np.float64)
    if cache.kind == "layer_norm":
        dx, dgamma, dbeta = _dispatch.ln_backward_kernels(
            d, cache.x, mean, rstd, g, None, dtype=cache.dtype
        )
    else:
        dx, dgamma, dbeta = _dispatch.gn_backward_kernels(
            d, cache.x, cache.num_groups, mean, rstd, g, None, dtype=cache.dtype
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
            None: the default (the kernels from a measured size on, see ``docs/kernels.md``).

    The kernels' cache keeps x by reference (the reference's keeps x̂): keep x unchanged until
    the backward, or pass a copy; a backward that finds x modified raises
    :class:`~bnlab.errors.InputModifiedError` instead of returning wrong gradients.
    """
    check_float_array(x, "x")
    eps = v.check_eps(eps)
    choice = _dispatch.choose(backend, "layer_norm", "train", x.size)
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
    if choice.backend == "numba":
        return _layer_norm_kernel(x, shape, g, b, eps)
    y, cache, _, _ = normalize_forward(x, axes, _identity, _identity, g, b, param_axes, eps)
    return y, cache


def _layer_norm_kernel(x, shape, g, b, eps):
    d = int(np.prod(shape))
    flat_g = None if g is None else g.reshape(d)
    flat_b = None if b is None else b.reshape(d)
    g64 = np.ones(d) if g is None else flat_g.astype(np.float64)
    b64 = np.zeros(d) if b is None else flat_b.astype(np.float64)
    run = _dispatch.ln_kernels(x.reshape(-1, d), g64, b64, eps, None)
    cache = NormKernelCache("layer_norm", run.x, run.mean, run.rstd, flat_g, None, shape,
                            x.shape, x.dtype, fingerprint=run.fingerprint)  # fmt: skip
    return run.y.reshape(x.shape), cache


def layer_norm_backward(dout, cache: NormCache | NormKernelCache):
    """Layer norm backward: (dx, dgamma, dbeta); see :func:`standardize_backward`."""
    return normalize_backward(dout, cache)
