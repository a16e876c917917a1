"""Batch norm's formulas in plain, differentiable torch ops: the reference the kernels are checked
against, and the math of every backward that must itself be differentiated or vmapped (double
backward, batched gradients) — the kernels' NumPy backward can be neither.

Training, per channel c over its m = N·spatial values (biased variance, eps inside the sqrt):

    μ_c = mean(x_c)    σ²_c = mean((x_c − μ_c)²)    x̂ = (x − μ_c)/sqrt(σ²_c + ε)    y = γ_c·x̂ + β_c

    dβ = Σ dy     dγ = Σ dy·x̂     dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))

Inference uses the running statistics (constants) in place of μ, σ²: dx = γ·rstd·dy.
Shapes: x, y, dy (N, C, *spatial); μ, σ², γ, β (C,).
"""

from __future__ import annotations

import torch

from bnlab.torch._checks import values_per_channel


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1: what batch norm averages over."""
    return (0, *range(2, x.dim()))


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (C,) vector as (1, C, 1, ...) so that it broadcasts against x (N, C, ...)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in float64 for float64 input, float32 otherwise (float16/bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (C,), in the accumulation dtype; differentiable."""
    var, mean = torch.var_mean(x.to(accumulation_dtype(x.dtype)), dim=reduce_dims(x), correction=0)
    return mean, var


def normalize(x, mean, var, weight, bias, eps: float) -> torch.Tensor:
    """y = γ·(x − μ)/sqrt(σ² + ε) + β in the statistics' dtype (μ, σ², γ, β are (C,))."""
    rstd = torch.rsqrt(var + eps)
    y = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(rstd, x)
    if weight is not None:
        y = y * per_channel(weight.to(mean.dtype), x)
    if bias is not None:
        y = y + per_channel(bias.to(mean.dtype), x)
    return y


def reference_output(
    x, running_mean, running_var, weight, bias, training: bool, eps: float
) -> torch.Tensor:
    """y by the formulas above (batch statistics when ``training``, else the running ones);
    autograd differentiates it to any order. Modifies nothing. float16/bfloat16 input is
    computed in float32 and the output cast back."""
    if training:
        mean, var = batch_norm_stats(x)
    else:
        acc = accumulation_dtype(x.dtype)
        mean, var = running_mean.to(acc), running_var.to(acc)
    return normalize(x, mean, var, weight, bias, eps).to(x.dtype)


def batch_norm_backward_reference(dy, x, weight, eps, training, mean=None, var=None):
    """Closed-form gradients (dx, dγ, dβ) in differentiable torch ops.

    Training (μ, σ² recomputed from x so that their dependence on x is differentiated too):
        dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))
    Inference (``mean``/``var`` are the running statistics, constants):  dx = γ·rstd·dy
    """
    if training:
        mean, var = batch_norm_stats(x)
    acc = mean.dtype
    dims = reduce_dims(x)
    rstd = per_channel(torch.rsqrt(var + eps), x)
    xhat = (x.to(acc) - per_channel(mean, x)) * rstd
    d = dy.to(acc)
    dbeta, dgamma = d.sum(dims), (d * xhat).sum(dims)
    dxhat = d if weight is None else d * per_channel(weight.to(acc), x)
    if training:
        dxhat = (
            dxhat - dxhat.mean(dims, keepdim=True) - xhat * (dxhat * xhat).mean(dims, keepdim=True)
        )
    return (dxhat * rstd).to(x.dtype), dgamma, dbeta


@torch.no_grad()
def update_running_stats_(
    running_mean, running_var, mean, var, count: int, momentum, num_batches_tracked=None
) -> None:
    """PyTorch's update, in place, unguarded (the caller checks finiteness): r ← (1 − w)·r + w·s
    with the unbiased m/(m−1)·σ² for the variance; w = momentum, or 1/num_batches_tracked (after
    counting this batch) for None."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    w = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    unbiased = var * (count / (count - 1))
    running_mean.copy_((1.0 - w) * running_mean + w * mean.to(running_mean.dtype))
    running_var.copy_((1.0 - w) * running_var + w * unbiased.to(running_var.dtype))


__all__ = [
    "accumulation_dtype",
    "batch_norm_backward_reference",
    "batch_norm_stats",
    "normalize",
    "per_channel",
    "reduce_dims",
    "reference_output",
    "update_running_stats_",
    "values_per_channel",
]
