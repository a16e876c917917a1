"""d2l's from-scratch batch norm (Dive into Deep Learning, "Batch Normalization"), minus its traps.

``batch_norm`` takes d2l's positional signature, so it drops into the chapter's own ``BatchNorm``
class (``docs/clients.md``):

    from bnlab.torch.d2l import batch_norm        # the chapter up to d2l 0.17: momentum=0.9
    from bnlab.torch.d2l import batch_norm_v1 as batch_norm   # d2l 1.0: momentum=0.1

The two d2l versions mean opposite things by ``momentum`` (:mod:`bnlab.conventions`):

    d2l-0.17 (the ``d2l`` preset, default):  moving ← momentum · moving + (1 − momentum) · stat
    d2l-1.0:                                  moving ← (1 − momentum) · moving + momentum · stat

A momentum equal to the *other* version's default (0.1 under d2l-0.17, 0.9 under d2l-1.0) warns
(:class:`MomentumMeaningWarning`). The moving variance accumulates the biased batch variance.

d2l infers the mode from ``torch.is_grad_enabled()``: evaluation under autograd (a saliency map, an
adversarial example) silently uses batch statistics and moves the moving averages, and a training
step under ``no_grad`` uses the moving ones. Without ``training=`` this function does the same, for
the drop-in, and warns once (:class:`GradModeWarning`); pass ``training=``. :class:`BatchNorm`
passes ``self.training`` and registers the moving statistics as buffers (d2l keeps them as plain
attributes, not in ``state_dict``, not moved by ``.to()``).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from bnlab.conventions import get_convention, momentum_lookalike
from bnlab.errors import NonFiniteBatchWarning, ShapeError


class GradModeWarning(UserWarning):
    """batch_norm was called without ``training=``: the mode follows torch.is_grad_enabled()."""


class MomentumMeaningWarning(UserWarning):
    """A momentum that is the other d2l version's default: probably written for that version."""


class MissingMovingStatisticsWarning(UserWarning):
    """A state_dict without moving_mean/moving_var (a d2l model's) was loaded with strict=False."""


_warned = {"grad_mode": False}

GRAD_MODE_MESSAGE = (
    "bnlab.torch.d2l.batch_norm: no training= given, so the mode follows "
    "torch.is_grad_enabled() as in d2l: a forward with autograd on normalizes with the batch "
    "statistics and moves the moving averages even in evaluation (a saliency map, an adversarial "
    "example), and one under torch.no_grad() uses the moving averages even when training. Pass "
    "training=self.training (bnlab.torch.BatchNorm does)."
)

MISSING_STATISTICS_MESSAGE = (
    "the state_dict has no moving_mean/moving_var for a bnlab.torch.BatchNorm: d2l's BatchNorm "
    "keeps them as plain attributes, not buffers, so a d2l model's state_dict never saves them. "
    "Load with strict=False, then recompute them from training batches with "
    "bnlab.recalibrate(model, batches); until then evaluation normalizes with mean 0, variance 1."
)


def _loading_strictly() -> bool:
    """The ``strict`` of the ``Module.load_state_dict`` call under way. PyTorch hands
    ``_load_from_state_dict`` ``strict=True`` in either mode and applies strictness afterwards,
    so the caller's frame is the only place that knows; True if it cannot be found."""
    frame = sys._getframe(1)
    code = nn.Module.load_state_dict.__code__
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return True


def _batch_moments(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over every axis but the channel axis 1, kept broadcastable."""
    dims = (0,) if X.dim() == 2 else (0, 2, 3)
    mean = X.mean(dim=dims, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
    return mean, var


def _check_momentum(momentum, conv, stacklevel: int) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1], got {type(momentum).__name__}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    other = momentum_lookalike(momentum, conv)
    if other is not None:
        weighs = "the new batch" if other.momentum_weighs_new else "the old moving value"
        here = "the new batch" if conv.momentum_weighs_new else "the old moving value"
        warnings.warn(
            f"momentum={momentum} is the default of the {other.name!r} convention, where it weighs "
            f"{weighs}; here ({conv.name!r}) it weighs {here}. For the other meaning pass "
            f"convention={other.name!r}"
            + (" (or use batch_norm_v1)" if other.name == "d2l-1.0" else ""),
            MomentumMeaningWarning,
            stacklevel=stacklevel,
        )
    return float(momentum)


def _resolve_training(training) -> bool:
    if training is None:
        if not _warned["grad_mode"]:
            _warned["grad_mode"] = True
            warnings.warn(GRAD_MODE_MESSAGE, GradModeWarning, stacklevel=4)
        return torch.is_grad_enabled()
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    return training


def batch_norm(
    X, gamma, beta, moving_mean, moving_var, eps, momentum, *, training=None, convention="d2l"
):
    """d2l's ``batch_norm``: returns ``(Y, moving_mean, moving_var)``; nothing is modified.

        training:  μ, σ² = batch mean and biased variance per channel
                   Y = γ·(X − μ)/sqrt(σ² + ε) + β
                   moving ← (1 − w)·moving + w·(μ or σ²)   (returned, detached)
        inference: Y = γ·(X − moving_mean)/sqrt(moving_var + ε) + β; moving stats returned as is

    w is the weight of the new batch for ``momentum`` in ``convention``'s meaning: 1 − momentum
    for ``"d2l"`` / ``"d2l-0.17"`` (default), momentum for ``"d2l-1.0"``; any preset of
    :mod:`bnlab.conventions` works (``pytorch`` also makes the moving variance unbiased).
    ``training``: True/False; None infers it from ``torch.is_grad_enabled()`` as d2l does (warns
    once). A training batch with NaN/Inf warns and returns the moving statistics unchanged.

    Shapes: X (N, C) with γ, β, moving stats (1, C), or X (N, C, H, W) with them (1, C, 1, 1).
    """
    return _checked(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, convention)


def _checked(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, convention):
    """Check the arguments (warnings point at the caller of batch_norm / batch_norm_v1)."""
    conv = get_convention(convention)
    momentum = _check_momentum(momentum, conv, stacklevel=4)
    training = _resolve_training(training)
    return _batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, conv)


def _batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training: bool, conv):
    """The math of :func:`batch_norm`, arguments already checked."""
    if training and X.dim() not in (2, 4):
        raise ShapeError(f"X must be 2-D (N, C) or 4-D (N, C, H, W), got shape {tuple(X.shape)}")
    if not training:
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
        return gamma * X_hat + beta, moving_mean.detach(), moving_var.detach()
    mean, var = _batch_moments(X)
    X_hat = (X - mean) / torch.sqrt(var + eps)
    Y = gamma * X_hat + beta
    new_mean, new_var = _moving_update(X, moving_mean, moving_var, mean, var, momentum, conv)
    return Y, new_mean, new_var


@torch.no_grad()
def _moving_update(X, moving_mean, moving_var, mean, var, momentum, conv):
    """(1 − w)·moving + w·stat, or the moving statistics unchanged for a non-finite batch."""
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        warnings.warn(
            "X contains NaN or Inf: the batch statistics are not finite, so the moving statistics "
            "were returned unchanged",
            NonFiniteBatchWarning,
            stacklevel=6,  # the caller of batch_norm (no_grad's wrapper is a frame too)
        )
        return moving_mean.detach(), moving_var.detach()
    w = conv.new_batch_weight(momentum)
    if conv.unbiased_running_var:
        m = X.numel() // X.shape[1]
        var = var * (m / max(m - 1, 1))
    new_mean = (1.0 - w) * moving_mean + w * mean.reshape(moving_mean.shape)
    new_var = (1.0 - w) * moving_var + w * var.reshape(moving_var.shape)
    return new_mean.detach(), new_var.detach()


def batch_norm_v1(X, gamma, beta, moving_mean, moving_var, eps, momentum, *, training=None):
    """d2l 1.0's ``batch_norm``: :func:`batch_norm` with ``convention="d2l-1.0"``, where
    ``momentum`` (0.1 in the chapter) is the weight of the new batch."""
    return _checked(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, "d2l-1.0")


class BatchNorm(nn.Module):
    """d2l's ``BatchNorm(num_features, num_dims)`` (num_dims 2: after a Linear, 4: after a conv).

    Parameters ``gamma`` (ones), ``beta`` (zeros); buffers ``moving_mean`` (zeros) and
    ``moving_var`` (ones), all of shape (1, C) or (1, C, 1, 1): they are in ``state_dict`` and
    move with ``.to()``. The mode is ``self.training`` (set by ``.train()`` / ``.eval()``).
    ``momentum`` is in ``convention``'s meaning, default that convention's default (0.9 for
    ``"d2l"``, 0.1 for ``"d2l-1.0"``). A training batch with NaN/Inf warns
    (:class:`bnlab.errors.NonFiniteBatchWarning`) and leaves the moving statistics unchanged.

    Loading a state_dict without the moving statistics (a d2l model's: d2l never saves them)
    explains that and points to :func:`bnlab.recalibrate`.
    """

    def __init__(self, num_features: int, num_dims: int, eps: float = 1e-5,
                 momentum: float | None = None, *, convention: str = "d2l"):  # fmt: skip
        super().__init__()
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 (fully connected) or 4 (conv), got {num_dims}")
        conv = get_convention(convention)
        momentum = conv.momentum if momentum is None else momentum
        self.momentum = _check_momentum(momentum, conv, stacklevel=3)
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.num_features, self.eps, self.convention = num_features, eps, conv.name
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Y, moving_mean, moving_var = _batch_norm(  # momentum checked once, in __init__
            X, self.gamma, self.beta, self.moving_mean, self.moving_var, self.eps,
            self.momentum, self.training, get_convention(self.convention),
        )  # fmt: skip
        if self.training:
            with torch.no_grad():  # in place: the buffers keep their identity (DDP, hooks)
                self.moving_mean.copy_(moving_mean)
                self.moving_var.copy_(moving_var)
        return Y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        has_params = any(prefix + k in state_dict for k in ("gamma", "beta"))
        lacks_stats = any(prefix + k not in state_dict for k in ("moving_mean", "moving_var"))
        if has_params and lacks_stats:
            if not _loading_strictly():
                warnings.warn(MISSING_STATISTICS_MESSAGE, MissingMovingStatisticsWarning,
                              stacklevel=2)  # fmt: skip
            elif MISSING_STATISTICS_MESSAGE not in error_msgs:  # once, not once per layer
                error_msgs.append(MISSING_STATISTICS_MESSAGE)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum} ({self.convention})"
