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

from bnlab.conventions import get_convention
from bnlab.errors import ShapeError
from bnlab.functional import _dispatch
from bnlab.functional import _validate as v
from bnlab.functional._bn_args import (
    PRESET,
    check_cumulative_counter,
    check_running_buffers,
    check_training_batch,
    per_channel_count,
    resolve_momentum,
)
from bnlab.functional._layout import Layout, check_input
from bnlab.functional.running import batch_is_finite, report_nonfinite, update_running_stats
from bnlab.functional.stats import (
    accumulation_dtype,
    inverse_std,
    normalize,
    normalize_backward,
    standardize,
)


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
    dtype: np.dtype | None = None  # the forward input's dtype (x may be a float32 staging copy)
    fingerprint: object = None  # _dispatch.Fingerprint of x when x is the caller's array

    @property
    def input_dtype(self) -> np.dtype:
        return self.x.dtype if self.dtype is None else self.dtype


def _affine_vectors(gamma, beta, c: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """γ, β as (C,) arrays in the accumulation dtype; missing ones become 1 and 0."""
    g = np.ones(c, dtype) if gamma is None else gamma.astype(dtype, copy=False)
    b = np.zeros(c, dtype) if beta is None else beta.astype(dtype, copy=False)
    return g, b


# --------------------------------------------------------------------------- reference math


def _reference_train(x, lay, g, b, eps):
    """(y, mean, var, rstd, x̂): the batch statistics (C,) in the accumulation dtype."""
    xhat, mean, var, rstd = normalize(x, lay.reduce_axes, eps)
    y = xhat * lay.per_channel(g) + lay.per_channel(b)
    return y, mean.ravel(), var.ravel(), rstd.ravel(), xhat


def _reference_eval(x, lay, scale, shift):
    """y = x · scale + shift per channel (the inference form of batch norm)."""
    acc = scale.dtype
    return x.astype(acc, copy=False) * lay.per_channel(scale) + lay.per_channel(shift)


def _f64(*vectors):
    return [np.asarray(u, np.float64) for u in vectors]


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
        momentum: in the *convention's* meaning (pytorch, d2l-1.0: weight of the new batch,
            default 0.1; keras/flax: weight of the old value, 0.99; cs231n, d2l-0.17 (alias d2l):
            weight of the old value, 0.9). ``"preset"`` (default) takes the
            convention's default; ``None`` is the cumulative moving average, which needs
            ``num_batches_tracked``.
        eps: added to the variance inside the square root.
        convention: ``pytorch`` | ``keras`` | ``flax`` | ``cs231n`` | ``d2l-0.17`` (= ``d2l``) |
            ``d2l-1.0`` (see ``docs/conventions.md``).
        num_batches_tracked: optional 0-d integer array, incremented in place per training update.
        on_nonfinite: a training batch with NaN/Inf never reaches the buffers; ``"warn"`` (default)
            warns and returns the (non-finite) output, ``"raise"`` raises NonFiniteError.
        backend: ``"numpy"`` (this reference) or ``"numba"`` (fused kernels); None: the default.
        out: optional preallocated output (shape and dtype of x). It may be x itself or
            overlap it: the result is the same as with a separate buffer.

    The cache keeps x for the backward by reference (no copy; a private copy only when ``out``
    overlaps x). Keep x unchanged until :func:`batch_norm_backward` (or pass a copy): a backward
    that needs x and finds it modified raises :class:`~bnlab.errors.InputModifiedError` instead
    of returning wrong gradients.
    """
    lay = check_input(x, layout)
    training = v.check_training(training)
    conv = get_convention(convention)
    momentum = resolve_momentum(momentum, conv)
    eps = v.check_eps(eps)
    v.check_policy(on_nonfinite)
    choice = _dispatch.choose(backend, "batch_norm", "train" if training else "eval", x.size)
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
        return _eval_forward(x, lay, g, b, running_mean, running_var, eps, choice.backend, out)

    count = check_training_batch(x, lay)
    tracking = running_mean is not None
    check_cumulative_counter(momentum, num_batches_tracked, tracking)
    y, cache, finite = _train_forward(x, lay, g, b, eps, choice.backend, out)
    if not finite:
        report_nonfinite(on_nonfinite)
    elif tracking:
        update_running_stats(
            running_mean,
            running_var,
            cache.mean,
            cache.var,
            count,
            momentum,
            conv,
            num_batches_tracked,
            on_nonfinite,
            blend=_compiled_blend(choice.backend),
        )
    return y, cache


def _train_forward(x, lay, g, b, eps, backend, out):
    """(y, cache, finite) of a training forward; finite: the statistics are all finite."""
    if backend == "numba":
        run = _dispatch.bn_train_kernels(x, lay.name, *_f64(g, b), eps, out)
        cache = BatchNormCache(
            backend, lay, True, run.x, run.mean, run.var, run.rstd, g, eps, None, x.dtype,
            run.fingerprint,
        )  # fmt: skip
        return run.y, cache, run.finite
    xk, fingerprint = _dispatch.kept_input(x, out)
    y, mean, var, rstd, xhat = _reference_train(xk, lay, g, b, eps)
    cache = BatchNormCache(backend, lay, True, xk, mean, var, rstd, g, eps, xhat, x.dtype,
                           fingerprint)  # fmt: skip
    return _dispatch.deliver(out, y, x.dtype), cache, batch_is_finite(mean, var)


def _eval_forward(x, lay, g, b, running_mean, running_var, eps, backend, out):
    """Inference: y = x·scale + shift with scale = γ·rstd, shift = β − μ·scale (running μ, σ²)."""
    acc = g.dtype
    mean, var = running_mean.astype(acc), running_var.astype(acc)  # copies: the cache keeps them
    rstd = inverse_std(var, eps)
    scale = g * rstd
    shift = b - mean * scale
    if backend == "numba":
        run = _dispatch.bn_eval_kernels(x, lay.name, *_f64(scale, shift), out, keep=True)
        y, xk, fingerprint = run.y, run.x, run.fingerprint
    else:
        xk, fingerprint = _dispatch.kept_input(x, out)
        y = _dispatch.deliver(out, _reference_eval(xk, lay, scale, shift), x.dtype)
    cache = BatchNormCache(backend, lay, False, xk, mean, var, rstd, g, eps, None, x.dtype,
                           fingerprint)  # fmt: skip
    return y, cache


def _compiled_blend(backend: str):
    """The numba backend updates running statistics in one compiled call (same formula)."""
    if backend == "numpy":
        return None
    from bnlab.kernels.running import blend_running

    return blend_running


# --------------------------------------------------------------------------- backward


def _check_dout(dout, cache: BatchNormCache) -> None:
    if not isinstance(cache, BatchNormCache):
        raise TypeError("cache must be the BatchNormCache from batch_norm_forward, got "
                        f"{type(cache).__name__}")  # fmt: skip
    check_input(dout, cache.layout, "dout")
    if dout.shape != cache.x.shape:
        raise ShapeError(f"dout must have the shape of x {cache.x.shape}, got {dout.shape}")


def _kept_x(cache: BatchNormCache) -> np.ndarray:
    """The forward's x, refused (InputModifiedError) if it changed since the forward."""
    _dispatch.check_kept(cache.x, cache.fingerprint)
    return cache.x


def _xhat(cache: BatchNormCache) -> np.ndarray:
    if cache.xhat is not None:
        return cache.xhat
    lay = cache.layout
    return standardize(_kept_x(cache), lay.per_channel(cache.mean), lay.per_channel(cache.rstd))


def _param_grads(dout, xhat, lay):
    axes = lay.reduce_axes
    d = dout.astype(xhat.dtype, copy=False)
    return (d * xhat).sum(axis=axes), d.sum(axis=axes)


def batch_norm_backward(dout: np.ndarray, cache: BatchNormCache, *, out: np.ndarray | None = None):
    """Closed-form backward (cs231n's ``batchnorm_backward_alt``); returns (dx, dgamma, dbeta).

    ``out``: optional preallocated dx (shape and dtype of the forward's x); it may be dout
    itself or overlap it (the result is the same as with a separate buffer).

    Training, per channel over its m values:

        dβ = Σ dy          dγ = Σ dy·x̂
        dx = γ·rstd/m · (m·dy − Σ dy − x̂·Σ dy·x̂)

    Inference (statistics are constants): dx = γ·rstd·dy.
    dgamma and dbeta are returned even when the forward had no affine parameters.
    Raises :class:`~bnlab.errors.InputModifiedError` when it needs the forward's x and x was
    modified since (see :func:`batch_norm_forward`).
    """
    _check_dout(dout, cache)
    dtype = cache.input_dtype
    v.check_output(out, cache.x.shape, dtype, "out")
    lay = cache.layout
    if cache.backend == "numba":
        x = _kept_x(cache)
        vectors = _f64(cache.mean, cache.rstd, cache.gamma)
        return _dispatch.bn_backward_kernels(
            dout, x, lay.name, *vectors, cache.training, out, dtype=dtype
        )
    xhat = _xhat(cache)
    d = dout.astype(xhat.dtype, copy=False)
    dgamma, dbeta = _param_grads(d, xhat, lay)
    dxhat = d * lay.per_channel(cache.gamma)
    if cache.training:
        dx = normalize_backward(dxhat, xhat, lay.per_channel(cache.rstd), lay.reduce_axes)
    else:
        dx = dxhat * lay.per_channel(cache.rstd)
    return _dispatch.deliver(out, dx, dtype), dgamma, dbeta


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
    m = per_channel_count(cache.x, lay)
    acc = cache.mean.dtype
    x = _kept_x(cache).astype(acc, copy=False)
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
    return dx.astype(cache.input_dtype, copy=False), dgamma, dbeta


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
