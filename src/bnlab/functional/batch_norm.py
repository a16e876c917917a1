"""Batch normalization: forward, two backward derivations, and a ``torch.nn.functional`` twin.

Training (per channel c, over the m = N·spatial values of that channel):

    μ_c  = mean(x_c)            σ²_c = mean((x_c − μ_c)²)        (biased: divide by m)
    x̂    = (x − μ_c) / sqrt(σ²_c + ε)
    y    = γ_c · x̂ + β_c

Inference uses the running statistics instead of μ_c, σ²_c. The running statistics are updated
in place following a named convention (:mod:`bnlab.conventions`, ``docs/conventions.md``).

Shapes: x (N, C), (N, C, L), (N, L, C), (N, C, H, W) or (N, H, W, C) as named by ``layout``;
γ, β, running_mean, running_var (C,).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.backend import resolve_backend
from bnlab.buffers import output_like
from bnlab.conventions import get_convention
from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import Layout, accumulation_dtype, check_input
from bnlab.functional.running import batch_is_finite, report_nonfinite, update_running_stats
from bnlab.functional.stats import (
    inverse_std,
    moments,
    reduction_size,
    standardize,
    standardize_backward,
)

PRESET = "preset"  # momentum=PRESET: use the convention's own default momentum


@dataclass
class BatchNormCache:
    """What the backward pass needs. ``mean``/``var``/``rstd``/``gamma`` are (C,) vectors."""

    backend: str
    layout: Layout
    training: bool
    x: np.ndarray
    mean: np.ndarray  # batch mean (training) or running mean (inference)
    var: np.ndarray  # biased batch variance (training) or running variance (inference)
    rstd: np.ndarray  # 1 / sqrt(var + eps)
    gamma: np.ndarray  # ones when no weight was given
    eps: float
    xhat: np.ndarray | None = None  # kept by the reference backend only


# --------------------------------------------------------------------------- validation


def _per_channel_count(x: np.ndarray, lay: Layout) -> int:
    return reduction_size(x.shape, lay.reduce_axes)


def resolve_momentum(momentum, conv) -> float | None:
    """``momentum="preset"`` becomes the convention's default; then a float in [0, 1] or None."""
    if isinstance(momentum, str) and momentum == PRESET:
        momentum = conv.momentum
    return v.check_momentum(momentum)


def check_running_buffers(running_mean, running_var, num_batches_tracked, c: int, training: bool):
    """The running-statistics arguments shared by batch norm, Ghost BN and Batch Renorm: (C,)
    float buffers, given together, writable when training; an optional 0-d integer counter."""
    v.check_vector(running_mean, "running_mean", c, writable=training)
    v.check_vector(running_var, "running_var", c, writable=training)
    v.check_counter(num_batches_tracked)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


def check_cumulative_counter(momentum, num_batches_tracked, tracking: bool) -> None:
    """momentum=None (cumulative average) weighs the k-th batch 1/k: it needs the counter."""
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs num_batches_tracked, "
            "a 0-d integer array counting the batches"
        )


def check_training_batch(x: np.ndarray, lay: Layout) -> int:
    m = _per_channel_count(x, lay)
    if m == 0:
        raise ShapeError(f"x must not be empty when training, got shape {x.shape}")
    if m == 1:
        raise ShapeError(
            f"Expected more than 1 value per channel when training, got input of shape {x.shape} "
            f"(layout {lay.name!r}): batch statistics of a single value are undefined"
        )
    return m


def _affine_vectors(gamma, beta, c: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """γ, β as (C,) arrays in the accumulation dtype; missing ones become 1 and 0."""
    g = np.ones(c, dtype) if gamma is None else gamma.astype(dtype, copy=False)
    b = np.zeros(c, dtype) if beta is None else beta.astype(dtype, copy=False)
    return g, b


# --------------------------------------------------------------------------- backends


def _canonical_3d(a: np.ndarray, lay: Layout) -> np.ndarray:
    """View as (N, C, S) for channels-first layouts, (N, S, C) for NC and channels-last ones."""
    a = np.ascontiguousarray(a)
    n, c = a.shape[0], a.shape[lay.channel_axis]
    if lay.channels_last or lay.ndim == 2:
        return a.reshape(n, -1, c)
    return a.reshape(n, c, -1)


def _is_channel_last_3d(lay: Layout) -> bool:
    return lay.channels_last or lay.ndim == 2


def _reference_train(x, lay, g, b, eps):
    mean, var = moments(x, lay.reduce_axes)
    rstd = inverse_std(var, eps)
    xhat = standardize(x, mean, rstd)
    y = xhat * lay.per_channel(g) + lay.per_channel(b)
    return y, mean.ravel(), var.ravel(), rstd.ravel(), xhat


def _train_forward(x, lay, g, b, eps, backend, out):
    """Returns (y, mean, var, rstd, finite, xhat-or-None): the batch statistics in the
    accumulation dtype, rstd = 1/√(var + ε), finite = whether mean and var are all finite."""
    if backend == "numpy":
        y, mean, var, rstd, xhat = _reference_train(x, lay, g, b, eps)
        finite = batch_is_finite(mean, var)
        return _into(out, y, x.dtype), mean, var, rstd, finite, xhat
    from bnlab.kernels.batch_norm import bn_train_forward_unchecked

    out = output_like(x) if out is None else out
    out3 = _kernel_out(out, lay)
    g64, b64 = g.astype(np.float64), b.astype(np.float64)
    x3, cl = _canonical_3d(x, lay), _is_channel_last_3d(lay)
    y3, mean, var, rstd, finite = bn_train_forward_unchecked(x3, g64, b64, eps, cl, out3)
    return _deliver(y3, out3, out, x.shape), mean, var, rstd, finite, None


def _eval_forward(x, lay, scale, shift, backend, out):
    """y = x · scale + shift per channel (the inference form of batch norm)."""
    if backend == "numpy":
        acc = scale.dtype
        y = x.astype(acc, copy=False) * lay.per_channel(scale) + lay.per_channel(shift)
        return _into(out, y, x.dtype)
    from bnlab.kernels.batch_norm import bn_eval_forward_unchecked

    out = output_like(x) if out is None else out
    out3 = _kernel_out(out, lay)
    a64, b64 = scale.astype(np.float64), shift.astype(np.float64)
    x3, cl = _canonical_3d(x, lay), _is_channel_last_3d(lay)
    return _deliver(bn_eval_forward_unchecked(x3, a64, b64, cl, out3), out3, out, x.shape)


def _kernel_out(out, lay):
    """out as the kernels' 3-D view; None for a non-contiguous out (reshaping it would copy, and
    the kernel would fill the copy): the kernel then allocates and _deliver copies into out."""
    if out is None or not out.flags.c_contiguous:
        return None
    return _canonical_3d(out, lay)


def _deliver(y3, out3, out, shape):
    if out is None:
        return y3.reshape(shape)
    if out3 is None:
        np.copyto(out, y3.reshape(shape))
    return out


def _into(out, y, dtype):
    if out is None:
        return y.astype(dtype, copy=False)
    np.copyto(out, y, casting="unsafe")
    return out


# --------------------------------------------------------------------------- forward


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    training: bool,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    momentum: float | None | str = PRESET,
    eps: float = 1e-5,
    layout: str = "NCHW",
    convention: str = "pytorch",
    num_batches_tracked: np.ndarray | None = None,
    on_nonfinite: str = "warn",
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch norm forward pass; returns ``(out, cache)`` for :func:`batch_norm_backward`.

    Args:
        x: input in ``layout`` (float16/32/64; float16 statistics accumulate in float32).
        gamma, beta: (C,) scale and shift, or None for 1 and 0.
        training: normalize with the batch statistics (True) or the running ones (False).
        running_mean, running_var: (C,) buffers. Training: updated in place when given.
            Inference: required.
        momentum: in the *convention's* meaning (pytorch: weight of the new batch, default 0.1;
            keras/flax/cs231n/d2l: weight of the old value). ``"preset"`` (default) takes the
            convention's default; ``None`` is the cumulative moving average, which needs
            ``num_batches_tracked``.
        eps: added to the variance inside the square root.
        convention: ``pytorch`` | ``keras`` | ``flax`` | ``cs231n`` | ``d2l``.
        num_batches_tracked: optional 0-d integer array, incremented in place per training update.
        on_nonfinite: a training batch with NaN/Inf never reaches the buffers; ``"warn"`` (default)
            warns and returns the (non-finite) output, ``"raise"`` raises NonFiniteError.
        backend: ``"numpy"`` (this reference) or ``"numba"`` (fused kernels); None: the default.
        out: optional preallocated output (shape and dtype of x).
    """
    lay = check_input(x, layout)
    training = v.check_training(training)
    conv = get_convention(convention)
    momentum = resolve_momentum(momentum, conv)
    eps = v.check_eps(eps)
    v.check_policy(on_nonfinite)
    backend = resolve_backend(backend)
    if x.size == 0:
        backend = "numpy"  # nothing to compute, and the kernels take non-empty arrays only
    c = x.shape[lay.channel_axis]
    v.check_vector(gamma, "gamma", c)
    v.check_vector(beta, "beta", c)
    check_running_buffers(running_mean, running_var, num_batches_tracked, c, training)
    v.check_out(out, x)
    acc = accumulation_dtype(x.dtype)
    g, b = _affine_vectors(gamma, beta, c, acc)

    if not training:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        mean = running_mean.astype(acc)
        var = running_var.astype(acc)
        rstd = inverse_std(var, eps)
        scale = g * rstd
        shift = b - mean * scale
        y = _eval_forward(x, lay, scale, shift, backend, out)
        return y, BatchNormCache(backend, lay, False, x, mean, var, rstd, g, eps)

    count = check_training_batch(x, lay)
    tracking = running_mean is not None
    check_cumulative_counter(momentum, num_batches_tracked, tracking)
    y, mean, var, rstd, finite, xhat = _train_forward(x, lay, g, b, eps, backend, out)
    if not finite:
        report_nonfinite(on_nonfinite)
    elif tracking:
        update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            count,
            momentum,
            conv,
            num_batches_tracked,
            on_nonfinite,
            blend=_compiled_blend(backend),
        )
    return y, BatchNormCache(backend, lay, True, x, mean, var, rstd, g, eps, xhat)


def _compiled_blend(backend: str):
    """The numba backend updates running statistics in one compiled call (same formula)."""
    if backend == "numpy":
        return None
    from bnlab.kernels.running import blend_running

    return blend_running


# --------------------------------------------------------------------------- backward


def _check_dout(dout, cache: BatchNormCache) -> None:
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be the BatchNormCache from batch_norm_forward, got {cache!r}")
    check_input(dout, cache.layout, "dout")
    if dout.shape != cache.x.shape:
        raise ShapeError(f"dout must have the shape of x {cache.x.shape}, got {dout.shape}")


def _xhat(cache: BatchNormCache) -> np.ndarray:
    if cache.xhat is not None:
        return cache.xhat
    lay = cache.layout
    return standardize(cache.x, lay.per_channel(cache.mean), lay.per_channel(cache.rstd))


def _param_grads(dout, xhat, lay):
    axes = lay.reduce_axes
    d = dout.astype(xhat.dtype, copy=False)
    return (d * xhat).sum(axis=axes), d.sum(axis=axes)


def batch_norm_backward(dout: np.ndarray, cache: BatchNormCache, *, out: np.ndarray | None = None):
    """Closed-form backward (cs231n's ``batchnorm_backward_alt``); returns (dx, dgamma, dbeta).

    ``out``: optional preallocated dx (shape and dtype of the forward's x); the numba kernels write
    into it directly when it is C-contiguous, otherwise dx is computed and copied in.

    Training, per channel over its m values:

        dβ = Σ dy          dγ = Σ dy·x̂
        dx = γ·rstd/m · (m·dy − Σ dy − x̂·Σ dy·x̂)

    Inference (statistics are constants): dx = γ·rstd·dy.
    dgamma and dbeta are returned even when the forward had no affine parameters.
    """
    _check_dout(dout, cache)
    v.check_out(out, cache.x, "out")
    if cache.backend == "numba":
        return _kernel_backward(dout, cache, out)
    lay = cache.layout
    xhat = _xhat(cache)
    d = dout.astype(xhat.dtype, copy=False)
    dgamma, dbeta = _param_grads(d, xhat, lay)
    dxhat = d * lay.per_channel(cache.gamma)
    if cache.training:
        dx = standardize_backward(dxhat, xhat, lay.per_channel(cache.rstd), lay.reduce_axes)
    else:
        dx = dxhat * lay.per_channel(cache.rstd)
    return _into(out, dx, cache.x.dtype), dgamma, dbeta


def _kernel_backward(dout, cache: BatchNormCache, out):
    from bnlab.kernels.batch_norm import bn_backward_unchecked, bn_eval_backward_unchecked

    lay = cache.layout
    cl = _is_channel_last_3d(lay)
    x3, d3 = _canonical_3d(cache.x, lay), _canonical_3d(dout, lay)
    out = output_like(cache.x) if out is None else out
    out3 = _kernel_out(out, lay)
    vectors = [v.astype(np.float64) for v in (cache.mean, cache.rstd, cache.gamma)]
    fn = bn_backward_unchecked if cache.training else bn_eval_backward_unchecked
    dx3, dgamma, dbeta = fn(d3, x3, *vectors, cl, out3)
    return _deliver(dx3, out3, out, cache.x.shape), dgamma, dbeta


def batch_norm_backward_graph(dout: np.ndarray, cache: BatchNormCache):
    """Backward through the staged computational graph (cs231n's ``batchnorm_backward``).

    Forward stages, each inverted in reverse order below (m values per channel):
        xmu = x − μ;  sq = xmu²;  var = Σsq/m;  sqrtvar = sqrt(var + ε);  ivar = 1/sqrtvar;
        x̂ = xmu·ivar;  y = γ·x̂ + β
    Kept next to the closed form as a check: both must agree to rounding.
    """
    _check_dout(dout, cache)
    if not cache.training:
        return batch_norm_backward(dout, cache)
    lay = cache.layout
    axes = lay.reduce_axes
    m = _per_channel_count(cache.x, lay)
    acc = cache.mean.dtype
    x = cache.x.astype(acc, copy=False)
    d = dout.astype(acc, copy=False)
    gamma = lay.per_channel(cache.gamma)
    # forward stages
    xmu = x - lay.per_channel(cache.mean)
    var = lay.per_channel(cache.var)
    sqrtvar = np.sqrt(var + acc.type(cache.eps))
    ivar = 1.0 / sqrtvar
    xhat = xmu * ivar
    # backward stages
    dbeta = d.sum(axis=axes)
    dgamma = (d * xhat).sum(axis=axes)
    dxhat = d * gamma
    divar = (dxhat * xmu).sum(axis=axes, keepdims=True)
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / (sqrtvar**2) * divar
    dvar = 0.5 / sqrtvar * dsqrtvar
    dsq = np.ones_like(x) * dvar / m
    dxmu2 = 2.0 * xmu * dsq
    dx1 = dxmu1 + dxmu2
    dmu = -dx1.sum(axis=axes, keepdims=True)
    dx2 = np.ones_like(x) * dmu / m
    dx = dx1 + dx2
    return dx.astype(cache.x.dtype, copy=False), dgamma, dbeta


# --------------------------------------------------------------------------- torch-style


def batch_norm(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    layout: str = "NCHW",
    *,
    num_batches_tracked: np.ndarray | None = None,
    on_nonfinite: str = "warn",
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``torch.nn.functional.batch_norm`` in NumPy (PyTorch convention), returning only the output.

    ``momentum`` is the weight of the new batch; ``momentum=None`` is the cumulative moving average
    and needs ``num_batches_tracked`` (a 0-d integer array, incremented in place, like
    ``BatchNorm2d.num_batches_tracked``). With ``training=True`` and no buffers, only batch
    statistics are used.
    """
    y, _ = batch_norm_forward(
        x,
        weight,
        bias,
        training=training,
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
        eps=eps,
        layout=layout,
        convention="pytorch",
        num_batches_tracked=num_batches_tracked,
        on_nonfinite=on_nonfinite,
        backend=backend,
        out=out,
    )
    return y
