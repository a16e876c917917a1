"""d2l's from-scratch batch norm (Dive into Deep Learning, "Batch Normalization"), minus its traps.

d2l infers the mode from ``torch.is_grad_enabled()`` (so evaluation under autograd, e.g. a
saliency map, silently uses batch statistics and corrupts the moving averages) and keeps the moving
statistics as plain tensor attributes (not in ``state_dict``, not moved by ``.to()``). Here the
function takes an explicit ``training`` flag and the module registers them as buffers.

Momentum follows the ``d2l`` convention of :mod:`bnlab.conventions`: ``momentum`` is the weight of
the *old* moving value (default 0.9):

    moving ← momentum · moving + (1 − momentum) · batch_statistic

(The English d2l 1.0 text writes the same update as ``(1 − m)·moving + m·stat`` with m = 0.1.)
The moving variance accumulates the *biased* batch variance, as in d2l.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.errors import ShapeError
from bnlab.functional.running import report_nonfinite

D2L_MOMENTUM = 0.9  # weight of the old moving value


def _batch_moments(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over every axis but the channel axis 1, kept broadcastable."""
    dims = (0,) if X.dim() == 2 else (0, 2, 3)
    mean = X.mean(dim=dims, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
    return mean, var


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, *, training: bool):
    """d2l's ``batch_norm``: returns ``(Y, moving_mean, moving_var)``; nothing is modified.

        training:  μ, σ² = batch mean and biased variance per channel
                   Y = γ·(X − μ)/sqrt(σ² + ε) + β
                   moving ← momentum·moving + (1 − momentum)·(μ or σ²)   (returned, detached)
        inference: Y = γ·(X − moving_mean)/sqrt(moving_var + ε) + β; moving stats returned as is

    Shapes: X (N, C) with γ, β, moving stats (1, C), or X (N, C, H, W) with them (1, C, 1, 1).
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    if X.dim() not in (2, 4):
        raise ShapeError(f"X must be 2-D (N, C) or 4-D (N, C, H, W), got shape {tuple(X.shape)}")
    if not training:
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        mean, var = _batch_moments(X)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean.reshape(moving_mean.shape)
        moving_var = momentum * moving_var + (1.0 - momentum) * var.reshape(moving_var.shape)
    Y = gamma * X_hat + beta
    return Y, moving_mean.detach(), moving_var.detach()


class BatchNorm(nn.Module):
    """d2l's ``BatchNorm(num_features, num_dims)`` (num_dims 2: after a Linear, 4: after a conv).

    A training batch with NaN/Inf warns (:class:`bnlab.errors.NonFiniteBatchWarning`) and leaves
    the moving statistics unchanged, as every bnlab batch norm does (d2l would average it in).

    Parameters ``gamma`` (ones), ``beta`` (zeros); buffers ``moving_mean`` (zeros) and
    ``moving_var`` (ones), all of shape (1, C) or (1, C, 1, 1): they are in ``state_dict`` and
    move with ``.to()``. The mode is ``self.training`` (set by ``.train()`` / ``.eval()``).
    """

    def __init__(self, num_features: int, num_dims: int, eps: float = 1e-5,
                 momentum: float = D2L_MOMENTUM):  # fmt: skip
        super().__init__()
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 (fully connected) or 4 (conv), got {num_dims}")
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Y, moving_mean, moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=self.eps, momentum=self.momentum, training=self.training,
        )  # fmt: skip
        if self.training:
            self._update_moving_statistics(moving_mean, moving_var)
        return Y

    @torch.no_grad()
    def _update_moving_statistics(self, moving_mean, moving_var) -> None:
        """In place (the buffers keep their identity for DDP and hooks), and only when finite:
        like every bnlab batch norm, a NaN/Inf batch warns and leaves the statistics alone."""
        if not (torch.isfinite(moving_mean).all() and torch.isfinite(moving_var).all()):
            report_nonfinite("warn", "X")
            return
        self.moving_mean.copy_(moving_mean)
        self.moving_var.copy_(moving_var)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum} (d2l: old weight)"
