"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", Algorithm 1).

Training, per channel c over its m values (σ²_B is the biased batch variance):

    μ_B = mean(x_c)                  σ_B = sqrt(σ²_B + ε)
    σ   = sqrt(running_var + ε)
    r   = clip(σ_B / σ,                 1/rmax, rmax)      stop-gradient: a constant in backward
    d   = clip((μ_B − running_mean) / σ, −dmax,  dmax)     stop-gradient: a constant in backward
    x̂   = (x − μ_B) / σ_B · r + d
    y   = γ·x̂ + β

then the running statistics are updated exactly as batch norm updates them (a named convention,
:mod:`bnlab.conventions`), *after* r and d were computed from the old values.
Inference is batch norm's: y = γ·(x − running_mean)/σ + β.

Because r and d are constants of the backward pass, training batch renorm *is* batch norm with the
per-channel affine γ' = γ·r, β' = γ·d + β:

    y  = γ'·x̂_BN + β'                      x̂_BN = (x − μ_B)/σ_B
    dx = batch-norm backward with γ'       dβ = Σ dy        dγ = r·Σ dy·x̂_BN + d·Σ dy

This module computes it exactly that way (the forward is batch norm's inference form
``x·scale + shift`` with the *batch* statistics, the backward is batch norm's training backward), so
the fused kernels behind the backend switch serve batch renorm too. rmax = 1, dmax = 0 force r = 1,
d = 0: batch norm, bit for bit.

Deviation from the paper, on purpose: the paper keeps a moving average of σ; we keep one of the
variance (``running_var``, BatchNorm's buffer) and use σ = sqrt(running_var + ε). A BatchRenorm
state_dict is then a BatchNorm state_dict, and inference is BatchNorm's inference. Under the
pytorch convention running_var is unbiased (n/(n−1)·σ²_B), as in ``torch.nn.BatchNorm2d``.

Shapes: x in ``layout`` (NC, NCL, NLC, NCHW, NHWC); γ, β, running_mean, running_var, r, d (C,).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from bnlab.conventions import get_convention
from bnlab.functional import _dispatch
from bnlab.functional import _validate as v
from bnlab.functional._bn_args import (
    PRESET,
    check_cumulative_counter,
    check_running_buffers,
    check_training_batch,
    resolve_momentum,
)
from bnlab.functional._layout import Layout, check_input
from bnlab.functional.batch_norm import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_forward,
)
from bnlab.functional.running import batch_is_finite, report_nonfinite, update_running_stats
from bnlab.functional.stats import moments

__all__ = [
    "RenormCache",
    "RenormSchedule",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "check_renorm_limits",
    "renorm_corrections",
]


# --------------------------------------------------------------------------- limits and schedule


def _check_limit(value, name: str, lowest: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float >= {lowest:g} ({meaning}), got {value!r}")
    value = float(value)
    if math.isnan(value) or value < lowest:
        raise ValueError(f"{name} must be >= {lowest:g} ({meaning}), got {value!r}")
    return value


def check_renorm_limits(rmax, dmax) -> tuple[float, float]:
    """Validate the clipping limits: rmax >= 1 (r ∈ [1/rmax, rmax]), dmax >= 0 (d ∈ [−dmax, dmax]).

    ``math.inf`` is allowed for both (no clipping at all).
    """
    rmax = _check_limit(rmax, "rmax", 1.0, "r is clipped to [1/rmax, rmax]; rmax=1 means r=1")
    dmax = _check_limit(dmax, "dmax", 0.0, "d is clipped to [-dmax, dmax]; dmax=0 means d=0")
    return rmax, dmax


def _check_step(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RenormSchedule:
    """The paper's warm-up of the clipping limits, as a function of the training step.

    (rmax, dmax) = (1, 0) — plain batch norm — for the first ``warmup_steps`` steps, then each limit
    grows linearly until it reaches its final value at step ``rmax_full_step`` resp.
    ``dmax_full_step`` (the paper: 5k steps of warm-up, rmax = 3 reached at 40k, dmax = 5 at 25k;
    it says "gradually" without the shape of the ramp; linear is our choice).

    >>> RenormSchedule()(0), RenormSchedule()(40_000)
    ((1.0, 0.0), (3.0, 5.0))
    """

    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 5_000
    rmax_full_step: int = 40_000
    dmax_full_step: int = 25_000

    def __post_init__(self):
        check_renorm_limits(self.rmax, self.dmax)
        warm = _check_step(self.warmup_steps, "warmup_steps")
        for name in ("rmax_full_step", "dmax_full_step"):
            if _check_step(getattr(self, name), name) < warm:
                raise ValueError(
                    f"{name} must be >= warmup_steps ({warm}), got {getattr(self, name)!r}"
                )

    @staticmethod
    def _ramp(step: int, start: int, end: int, first: float, last: float) -> float:
        if step <= start:
            return first
        if step >= end:
            return last
        return first + (last - first) * (step - start) / (end - start)

    def __call__(self, step: int) -> tuple[float, float]:
        """(rmax, dmax) to use at training ``step`` (0-based, an integer >= 0)."""
        step = _check_step(step, "step")
        rmax = self._ramp(step, self.warmup_steps, self.rmax_full_step, 1.0, self.rmax)
        dmax = self._ramp(step, self.warmup_steps, self.dmax_full_step, 0.0, self.dmax)
        return rmax, dmax


# --------------------------------------------------------------------------- the math


def renorm_corrections(
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[np.ndarray, np.ndarray]:
    """r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B − μ)/σ, −dmax, dmax); all arguments (C,).

    σ_B = sqrt(batch_var + ε) (batch_var biased), σ = sqrt(running_var + ε). Returned in the
    dtype of ``batch_mean``.
    """
    dt = batch_mean.dtype
    sigma_b = np.sqrt(batch_var + dt.type(eps))
    sigma = np.sqrt(running_var.astype(dt) + dt.type(eps))
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax).astype(dt, copy=False)
    d = np.clip((batch_mean - running_mean.astype(dt)) / sigma, -dmax, dmax).astype(dt, copy=False)
    return r, d


def batch_moments(x: np.ndarray, lay: Layout, backend: str | None) -> tuple[np.ndarray, ...]:
    """Per-channel batch mean and biased variance (C,), in the accumulation dtype: the family's
    stats helper (NumPy backend) or the kernels' statistics pass (numba backend, the one
    ``bn_train_forward`` runs)."""
    if _dispatch.choose(backend, "batch_norm", "train", x.size).backend == "numba":
        return _dispatch.bn_moments_kernels(x, lay.name)
    mean, var = moments(x, lay.reduce_axes)
    return mean.ravel(), var.ravel()


@dataclass
class RenormCache:
    """What :func:`batch_renorm_backward` needs.

    ``bn`` is a batch-norm cache whose γ is γ' = γ·r (training) or γ (inference); r, d are (C,).
    """

    bn: BatchNormCache
    r: np.ndarray
    d: np.ndarray


def _check_buffers(running_mean, running_var, c: int, training: bool):
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch renorm needs running_mean and running_var: in training r and d compare the "
            "batch statistics with them, in inference they normalize"
        )
    check_running_buffers(running_mean, running_var, None, c, training)


def batch_renorm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    training: bool,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    rmax: float = 3.0,
    dmax: float = 5.0,
    momentum: float | None | str = PRESET,
    eps: float = 1e-5,
    layout: str = "NCHW",
    convention: str = "pytorch",
    num_batches_tracked: np.ndarray | None = None,
    on_nonfinite: str = "warn",
    backend: str | None = None,
) -> tuple[np.ndarray, RenormCache]:
    """Batch renorm forward; returns ``(out, cache)`` for :func:`batch_renorm_backward`.

    Arguments are those of :func:`bnlab.functional.batch_norm_forward` plus ``rmax`` (>= 1) and
    ``dmax`` (>= 0), the clipping limits of r and d (use a :class:`RenormSchedule` to warm them up).
    ``running_mean``/``running_var`` are required; in training they are read (for r, d) and then
    updated in place. Invalid arguments raise before any buffer is touched; a batch with NaN/Inf
    leaves the buffers unchanged (``on_nonfinite``: warn or raise).

    The cache keeps x by reference, as batch norm's does: keep x unchanged until the backward (or
    pass a copy); a modified x makes the backward raise :class:`~bnlab.errors.InputModifiedError`
    rather than return wrong gradients.
    """
    lay = check_input(x, layout)
    training = v.check_training(training)
    rmax, dmax = check_renorm_limits(rmax, dmax)
    conv = get_convention(convention)
    momentum = resolve_momentum(momentum, conv)
    eps = v.check_eps(eps)
    v.check_policy(on_nonfinite)
    c = x.shape[lay.channel_axis]
    v.check_vector(gamma, "gamma", c)
    v.check_vector(beta, "beta", c)
    _check_buffers(running_mean, running_var, c, training)
    v.check_counter(num_batches_tracked)
    choice = _dispatch.choose(backend, "batch_norm", "train" if training else "eval", x.size)
    common = dict(eps=eps, layout=lay.name, backend=choice.backend)

    if not training:
        y, bn = batch_norm_forward(
            x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var,
            **common,
        )  # fmt: skip
        ones = np.ones(c, bn.mean.dtype)
        return y, RenormCache(bn, ones, np.zeros_like(ones))

    check_cumulative_counter(momentum, num_batches_tracked, tracking=True)
    count = check_training_batch(x, lay)
    mean, var = batch_moments(x, lay, common["backend"])
    r, d = renorm_corrections(mean, var, running_mean, running_var, eps, rmax, dmax)
    g = np.ones(c, mean.dtype) if gamma is None else gamma.astype(mean.dtype)
    b = np.zeros(c, mean.dtype) if beta is None else beta.astype(mean.dtype)
    # γ'·x̂_BN + β' computed as x·scale + shift with the batch statistics (inference form).
    y, bn = batch_norm_forward(
        x, g * r, g * d + b, training=False, running_mean=mean, running_var=var, **common
    )
    if not batch_is_finite(mean, var):
        report_nonfinite(on_nonfinite)
    else:
        update_running_stats(
            running_mean, running_var, mean, var, count, momentum, conv, num_batches_tracked
        )
    # The statistics are the batch's own: the backward is batch norm's *training* backward.
    return y, RenormCache(dataclasses.replace(bn, training=True), r, d)


def batch_renorm_backward(dout: np.ndarray, cache: RenormCache):
    """Backward of :func:`batch_renorm_forward`; returns (dx, dgamma, dbeta).

    Training (r, d constants; m values per channel):

        dβ = Σ dy      dγ = Σ dy·x̂ = r·Σ dy·x̂_BN + d·Σ dy
        dx = γ·r·rstd/m · (m·dy − Σ dy − x̂_BN·Σ dy·x̂_BN)      (batch norm's, with γ' = γ·r)

    Inference: batch norm's inference backward, dx = γ·dy/σ.
    """
    if not isinstance(cache, RenormCache):
        raise TypeError(f"cache must be the RenormCache from batch_renorm_forward, got {cache!r}")
    dx, dgamma_bn, dbeta = batch_norm_backward(dout, cache.bn)
    if not cache.bn.training:
        return dx, dgamma_bn, dbeta
    return dx, cache.r * dgamma_bn + cache.d * dbeta, dbeta
