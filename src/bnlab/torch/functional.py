"""Stateless batch norm for torch; ``batch_norm`` mirrors ``torch.nn.functional.batch_norm``.

The formulas are in :mod:`bnlab.torch.reference`; the running statistics follow PyTorch's
convention (w = momentum, the weight of the new batch; momentum=None → w = 1/num_batches_tracked,
the cumulative average):

    running_mean ← (1 − w)·running_mean + w·μ      running_var ← (1 − w)·running_var + w·m/(m−1)·σ²

Each call takes one of two routes (:mod:`bnlab.torch.dispatch` decides):

* **kernels** — bnlab's fused kernels on zero-copy NumPy views (:mod:`bnlab.torch._kernel`),
  eagerly through an ``autograd.Function``, under ``torch.compile``/``torch.export`` through the
  custom ops ``torch.ops.bnlab.*`` (:mod:`bnlab.torch.ops`);
* **PyTorch's op** — everything else, and layers below the measured break-even size
  (:mod:`bnlab.torch._pytorch_op`).

On both routes a training batch with NaN/Inf never reaches the running statistics, an update
that would overflow the buffers' dtype is refused (:class:`bnlab.errors.NonFiniteBatchWarning`),
and a call that raises, is empty or is refused leaves every buffer and the counter untouched.
"""

from __future__ import annotations

import torch

from bnlab.torch import _checks
from bnlab.torch._checks import check_tensor_args, values_per_channel
from bnlab.torch._kernel import KernelBatchNorm
from bnlab.torch._layout import layout_of
from bnlab.torch._pytorch_op import pytorch_batch_norm
from bnlab.torch._running import guarded_update_
from bnlab.torch.dispatch import (
    exporting,
    functorch_active,
    kernel_eligible,
    kernel_route_layout,
    small_eval,
    tracing,
)
from bnlab.torch.reference import (
    accumulation_dtype,
    batch_norm_backward_reference,
    batch_norm_stats,
    normalize,
    per_channel,
    reduce_dims,
    reference_output,
    update_running_stats_,
)

__all__ = [
    "accumulation_dtype",
    "batch_norm",
    "batch_norm_backward_reference",
    "batch_norm_reference",
    "batch_norm_stats",
    "check_tensor_args",
    "empty_batch",
    "kernel_layout",
    "normalize",
    "per_channel",
    "reduce_dims",
    "update_running_stats_",
    "values_per_channel",
]


def empty_batch(x, weight, bias) -> torch.Tensor:
    """PyTorch's output for a zero-size batch: a copy of x scaled by weight[0] and shifted by
    bias[0] (so the gradient graph reaches the parameters, with zero gradients), in the dtype
    PyTorch's type promotion gives (an empty batch of another dtype than the parameters is
    fine)."""
    y = x.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


def kernel_layout(x: torch.Tensor, *vectors) -> str | None:
    """The layout the kernels see x in, or None when a call takes PyTorch's op whatever its size
    (another device or dtype, strided input, ...). For tests and diagnostics."""
    return layout_of(x) if kernel_eligible(x, vectors, 1e-5, traced=False) else None


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
        input: (N, C, *spatial) with any number of spatial dims; any memory format.
        running_mean, running_var: (C,) buffers, updated in place when ``training``; required
            when not training. Pass None for pure batch statistics.
        weight, bias: (C,) γ and β, or None.
        training: normalize with batch statistics (True) or the running ones (False).
        momentum: PyTorch's meaning, the weight of the new batch; None = cumulative average,
            which needs ``num_batches_tracked``.
        eps: added to the variance: > 0 in training, >= 0 in eval (PyTorch 2.13's rule).
        num_batches_tracked: 0-d int64 counter, incremented when the running statistics update.
        on_nonfinite: ``"warn"`` or ``"raise"`` for a training batch with NaN/Inf (the running
            statistics are never updated by such a batch).
        backend: bnlab backend for the kernel route (None: :func:`bnlab.get_backend`).
    Returns: y with the shape and memory format of ``input``, in its dtype.
    """
    if not training and running_mean is not None and small_eval(input):
        # the most frequent small call, kept as cheap as F.batch_norm: PyTorch's op checks the
        # tensors, handles an empty batch and is what the PyTorch route would call anyway
        _checks.check_eval_scalars(eps, momentum, on_nonfinite)
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)  # fmt: skip
    a = _checks.check_call(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, num_batches_tracked, on_nonfinite, backend)  # fmt: skip
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    return route(a)


def route(a: _checks.BatchNormArgs) -> torch.Tensor:
    """Compute a checked call by the kernels or by PyTorch's op (:mod:`bnlab.torch.dispatch`)."""
    traced = tracing()
    layout = kernel_route_layout(a, traced)
    if layout is not None and not exporting():
        _checks.check_kernel_call(a)
        if traced:
            return _traced_kernels(a)
        return KernelBatchNorm.apply(a.x, a.weight, a.bias, a.running_mean, a.running_var,
                                     a.num_batches_tracked, a.training, a.momentum, a.eps,
                                     layout, a.backend, a.policy)  # fmt: skip
    # (under jit.trace the eager update records as PyTorch's own, in place, plus the counter)
    host = not a.training or traced or not functorch_active()
    return pytorch_batch_norm(a, traced=traced, host=host)


def _traced_kernels(a: _checks.BatchNormArgs) -> torch.Tensor:
    """The kernel route as custom ops, for ``torch.compile`` / ``torch.export``: one op for the
    output, one declared in-place op for the running statistics."""
    backend = a.backend or ""
    y, mean, var, _ = torch.ops.bnlab.batch_norm(a.x, a.weight, a.bias, a.running_mean,
                                                 a.running_var, a.training, a.eps, backend,
                                                 a.policy)  # fmt: skip
    if a.tracking:
        torch.ops.bnlab.update_running_stats_(a.running_mean, a.running_var,
                                              a.num_batches_tracked, mean.detach(), var.detach(),
                                              values_per_channel(a.x), a.momentum, backend,
                                              a.policy)  # fmt: skip
    return y


def batch_norm_reference(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    num_batches_tracked=None,
    on_nonfinite="warn",
) -> torch.Tensor:
    """The whole contract of :func:`batch_norm` in plain torch ops: the output by
    :func:`bnlab.torch.reference.reference_output` (differentiable to any order) and, in
    training, the running statistics updated under bnlab's rule. What both routes are tested
    against."""
    y = reference_output(x, running_mean, running_var, weight, bias, training, eps)
    if training and running_mean is not None:
        mean, var = batch_norm_stats(x.detach())
        guarded_update_(
            running_mean,
            running_var,
            mean,
            var,
            values_per_channel(x),
            momentum,
            num_batches_tracked,
            on_nonfinite,
        )
    return y
