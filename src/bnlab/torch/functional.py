"""Stateless batch norm for torch; ``batch_norm`` mirrors ``torch.nn.functional.batch_norm``.

Training, per channel c over its m = N·spatial values (biased variance, eps inside the sqrt):

    μ_c = mean(x_c)    σ²_c = mean((x_c − μ_c)²)    x̂ = (x − μ_c)/sqrt(σ²_c + ε)    y = γ_c·x̂ + β_c

and the running statistics, when given, follow PyTorch's convention (w = momentum, the weight of
the new batch; momentum=None → w = 1/num_batches_tracked, the cumulative average):

    running_mean ← (1 − w)·running_mean + w·μ      running_var ← (1 − w)·running_var + w·m/(m−1)·σ²

Inference uses the running statistics in place of μ, σ². Backward (training):

    dβ = Σ dy     dγ = Σ dy·x̂     dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))

Two implementations of these formulas, chosen per call:

* **fast path** — CPU float32/float64 input stored contiguously as NCHW / channels_last (or
  (N, C) / (N, C, L) / (N, L, C)), parameters of the same dtype: an ``autograd.Function`` that hands
  zero-copy NumPy views of the tensors (and of the running buffers, updated in place, and of a
  preallocated output) to :func:`bnlab.functional.batch_norm_forward`/``_backward``, which run the
  backend selected by :func:`bnlab.get_backend` (numba kernels or the NumPy reference).
* **reference** — everything else (float16/bfloat16 with float32 statistics, non-contiguous input,
  other devices): the same formulas written as plain torch ops, differentiated by autograd.

Double backward (``create_graph=True``) through the fast path uses the closed-form backward written
in differentiable torch ops (:func:`batch_norm_backward_reference`), so ``gradgradcheck`` passes.

Unlike PyTorch, a training batch with NaN/Inf never reaches the running statistics (bnlab's rule,
:class:`bnlab.errors.NonFiniteBatchWarning`), and a batch that raises leaves every buffer untouched.
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.errors import ShapeError
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.functional._validate import check_eps, check_momentum, check_policy
from bnlab.functional.running import report_nonfinite
from bnlab.torch._layout import empty_like_in_layout, layout_of, to_numpy

FAST_DTYPES = (torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# PyTorch's ScalarType names, used in its "not implemented for" messages
_SCALAR_TYPE_NAMES = {
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
}


# --------------------------------------------------------------------------- helpers


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1: what batch norm averages over."""
    return (0, *range(2, x.dim()))


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (C,) vector as (1, C, 1, ...) so that it broadcasts against x (N, C, ...)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in float64 for float64 input, float32 otherwise (float16/bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_per_channel(x: torch.Tensor) -> int:
    """m = N · spatial size: how many values each channel statistic is computed from."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


# --------------------------------------------------------------------------- validation


def _type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_vector_sizes(x: torch.Tensor, **vectors) -> None:
    c = x.shape[1]
    for name, v in vectors.items():
        if v is not None and v.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {v.numel()}")


def _check_dtypes(x: torch.Tensor, params: list[torch.Tensor]) -> None:
    """PyTorch's CPU rule: parameters share one dtype, which is x's or, for float16/bfloat16
    input only, float32 (statistics kept in float32)."""
    if not (x.dtype.is_floating_point and x.dtype in _SCALAR_TYPE_NAMES):
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_type_name(x.dtype)}'")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        first, other = params[0].dtype, next(d for d in dtypes if d != params[0].dtype)
        raise RuntimeError(
            f"expected scalar type {_type_name(first)} but found {_type_name(other)}"
        )
    if not dtypes or dtypes == {x.dtype}:
        return
    (p,) = dtypes
    if x.dtype in _LOW_PRECISION and p == torch.float32:
        return
    if p == torch.float32 or x.dtype == torch.float64:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")


def check_tensor_args(x, running_mean, running_var, weight, bias) -> None:
    """Types, dims, dtypes and (C,) sizes, with PyTorch's exception types and messages."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ShapeError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(x.shape)}")
    given = {"running_mean": running_mean, "running_var": running_var}
    given |= {"weight": weight, "bias": bias}
    _check_dtypes(x, [v for v in given.values() if v is not None])
    _check_vector_sizes(x, **given)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


def check_batch_norm_args(x, running_mean, running_var, weight, bias, training) -> None:
    """The checks of ``F.batch_norm``, with PyTorch's exception types and messages; run before
    anything is modified, so a bad call leaves every buffer untouched."""
    check_tensor_args(x, running_mean, running_var, weight, bias)
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and values_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


# --------------------------------------------------------------------------- reference (torch ops)


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


@torch.no_grad()
def update_running_stats_(
    running_mean, running_var, mean, var, count: int, momentum, num_batches_tracked=None
) -> None:
    """PyTorch's update, in place: r ← (1 − w)·r + w·s with the unbiased m/(m−1)·σ² for the
    variance; w = momentum, or 1/num_batches_tracked (after counting this batch) for None."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    w = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    unbiased = var * (count / (count - 1))
    running_mean.copy_((1.0 - w) * running_mean + w * mean.to(running_mean.dtype))
    running_var.copy_((1.0 - w) * running_var + w * unbiased.to(running_var.dtype))


def _statistics_are_finite(mean: torch.Tensor, var: torch.Tensor) -> bool:
    return bool(torch.isfinite(mean).all() and torch.isfinite(var).all())


def batch_norm_reference(
    x, running_mean, running_var, weight, bias, training, momentum, eps,
    num_batches_tracked=None, on_nonfinite="warn",
) -> torch.Tensor:  # fmt: skip
    """The module docstring's formulas in plain torch ops; autograd differentiates them (any
    order). float16/bfloat16 input is computed in float32 and the output cast back."""
    if training:
        mean, var = batch_norm_stats(x)
    else:
        acc = accumulation_dtype(x.dtype)
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = normalize(x, mean, var, weight, bias, eps).to(x.dtype)
    if training and not _under_functorch(x):  # vmap allows no data-dependent branch
        if not _statistics_are_finite(mean.detach(), var.detach()):
            report_nonfinite(on_nonfinite)
        elif running_mean is not None:
            update_running_stats_(
                running_mean, running_var, mean.detach(), var.detach(),
                values_per_channel(x), momentum, num_batches_tracked,
            )  # fmt: skip
    return y


def batch_norm_backward_reference(dy, x, weight, eps, training, mean=None, var=None):
    """Closed-form gradients (dx, dγ, dβ) in differentiable torch ops (used for double backward).

    Training (μ, σ² recomputed from x so that their dependence on x is differentiated too):
        dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))
    Inference (``mean``/``var`` are the running statistics, constants):  dx = γ·rstd·dy
    Shapes: dy, x (N, C, ...); weight, mean, var (C,).
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


# --------------------------------------------------------------------------- fast path


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """Zero-copy NumPy view of a CPU tensor (a 1-D buffer or the 0-d batch counter)."""
    return None if t is None else t.detach().numpy()


class FastBatchNorm(torch.autograd.Function):
    """bnlab's fused batch norm behind autograd: zero-copy NumPy views in and out.

    Inputs: x (N, C, ...) stored in ``layout``; weight, bias, running_mean, running_var (C,) or
    None; num_batches_tracked 0-d int64 or None. Buffers are updated in place by the kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, layout, backend, on_nonfinite):  # fmt: skip
        out, out_array = empty_like_in_layout(x, layout)
        _, cache = batch_norm_forward(
            to_numpy(x, layout), _np(weight), _np(bias),
            training=training, running_mean=_np(running_mean), running_var=_np(running_var),
            momentum=momentum, eps=eps, layout=layout, convention="pytorch",
            num_batches_tracked=_np(num_batches_tracked), on_nonfinite=on_nonfinite,
            backend=backend, out=out_array,
        )  # fmt: skip
        ctx.cache, ctx.layout, ctx.eps = cache, layout, eps
        ctx.save_for_backward(x, weight)  # the version counters catch in-place edits of x
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            dx, dgamma, dbeta = _differentiable_backward(ctx, grad_out, x, weight)
        else:
            dx, dgamma, dbeta = _kernel_backward(ctx, grad_out)
        need = ctx.needs_input_grad
        dgamma = dgamma.to(weight.dtype) if need[1] else None
        dbeta = dbeta.to(x.dtype) if need[2] else None
        return (dx if need[0] else None, dgamma, dbeta) + (None,) * 9


def _kernel_backward(ctx, grad_out):
    """(dx, dγ, dβ) by the forward's backend; dx in x's memory format, written by the backward
    straight into cache-reused memory (:mod:`bnlab.buffers`: no page faults). grad_out is
    read through a zero-copy view (copied only if it arrives in another memory format)."""
    dy, cache = to_numpy(grad_out, ctx.layout), ctx.cache
    dx, dx_array = empty_like_in_layout(grad_out, ctx.layout)
    _, dgamma, dbeta = batch_norm_backward(dy, cache, out=dx_array)
    return dx, torch.from_numpy(dgamma), torch.from_numpy(dbeta)


def _differentiable_backward(ctx, grad_out, x, weight):
    cache = ctx.cache
    if cache.training:
        return batch_norm_backward_reference(grad_out, x, weight, ctx.eps, True)
    mean, var = torch.from_numpy(cache.mean), torch.from_numpy(cache.var)
    return batch_norm_backward_reference(grad_out, x, weight, ctx.eps, False, mean, var)


def _under_functorch(*tensors) -> bool:
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


def fast_path_layout(x, *vectors) -> str | None:
    """The layout for the fast path, or None when the reference must run (see module docs)."""
    if x.device.type != "cpu" or x.dtype not in FAST_DTYPES or x.is_conj() or x.is_neg():
        return None
    if _under_functorch(x, *vectors):  # torch.func.grad/vmap/jvp: plain torch ops compose
        return None
    for v in vectors:
        if v is not None and (v.device.type != "cpu" or v.dtype != x.dtype or v.dim() != 1):
            return None
        if v is not None and not v.is_contiguous():  # a copy would not see the in-place update
            return None
    return layout_of(x)


# --------------------------------------------------------------------------- entry point


def _empty_batch(x, weight, bias) -> torch.Tensor:
    """A zero-size batch: an empty output still connected to weight and bias (zero gradients)."""
    acc = accumulation_dtype(x.dtype)
    y = x.to(acc, copy=True)
    if weight is not None:
        y = y * per_channel(weight.to(acc), x)
    if bias is not None:
        y = y + per_channel(bias.to(acc), x)
    return y.to(x.dtype)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    on_nonfinite: str = "warn",
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` computed by bnlab (formulas in the module docstring).

    Args:
        input: (N, C), (N, C, L) or (N, C, H, W); any memory format.
        running_mean, running_var: (C,) buffers, updated in place when ``training``; required
            when not training. Pass None for pure batch statistics.
        weight, bias: (C,) γ and β, or None.
        training: normalize with batch statistics (True) or the running ones (False).
        momentum: PyTorch's meaning, the weight of the new batch; None = cumulative average,
            which needs ``num_batches_tracked``.
        num_batches_tracked: 0-d int64 counter, incremented when the running statistics update.
        on_nonfinite: ``"warn"`` or ``"raise"`` for a training batch with NaN/Inf (the running
            statistics are never updated by such a batch).
        backend: bnlab backend for the fast path (None: :func:`bnlab.get_backend`).
    Returns: y with the shape, dtype and memory format of ``input``.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    momentum, eps = check_momentum(momentum), check_eps(eps)
    check_policy(on_nonfinite)
    tracking = training and running_mean is not None
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    if not tracking:
        num_batches_tracked = None
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    if training and not tracking:
        running_mean = running_var = None
    layout = fast_path_layout(input, weight, bias, running_mean, running_var)
    if layout is None:
        return batch_norm_reference(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, on_nonfinite,
        )  # fmt: skip
    return FastBatchNorm.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked,
        bool(training), momentum, eps, layout, backend, on_nonfinite,
    )  # fmt: skip
