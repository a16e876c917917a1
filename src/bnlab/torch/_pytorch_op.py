"""The route through PyTorch's own ``batch_norm``, with bnlab's running-statistics rule.

Taken for everything bnlab's kernels do not handle or would not be faster on (small layers,
float16/bfloat16, other devices, tensor subclasses, non-contiguous input, forward-mode AD,
``torch.func`` transforms; see :mod:`bnlab.torch.dispatch`). The output, the gradients, the
argument errors, forward-mode AD, vmap and double backward are PyTorch's. The running statistics:

* eager, CPU buffers: PyTorch updates them in place, exactly as ``nn.BatchNorm`` does; the old
  values are kept aside (two (C,) copies) and put back if the new ones are not finite — a batch
  with NaN/Inf, or an update past the buffers' dtype (float16) — and the counter is incremented
  only after a kept update. This costs a few µs: small layers, where PyTorch's op is used
  because it is faster, stay as fast as ``nn.BatchNorm``;
* eager, other devices or bfloat16 buffers: PyTorch updates copies, committed under the rule
  (:func:`bnlab.torch._running.commit_update_`);
* traced by ``torch.compile``: the rule without a host decision
  (:func:`bnlab.torch._running.traced_update_`), from the batch statistics in torch ops;
* under ``torch.func`` transforms: not updated (vmap forbids the data-dependent rule; PyTorch's
  own modules raise there instead).
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.functional.running import report_nonfinite
from bnlab.torch._guard import keep_or_restore
from bnlab.torch._running import (
    all_finite,
    commit_update_,
    refuse_overflow,
    traced_commit_,
    traced_update_,
)
from bnlab.torch.reference import batch_norm_stats, values_per_channel

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def pytorch_batch_norm(a, *, traced: bool, update: bool = True) -> torch.Tensor:
    """PyTorch's batch norm of a checked call (:class:`bnlab.torch._checks.BatchNormArgs`; its
    op checks the tensors itself); in training with running statistics (and ``update``), the
    buffers are updated under bnlab's rule."""
    x, running_mean, running_var, weight, bias = (
        a.x,
        a.running_mean,
        a.running_var,
        a.weight,
        a.bias,
    )
    training, momentum, eps = a.training, a.momentum, a.eps
    num_batches_tracked, policy = a.num_batches_tracked, a.policy
    if not training:
        return torch.batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, _cudnn()
        )
    if running_mean is None or not update:
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, _cudnn())
    if traced or x.is_meta:
        return _traced_update(
            x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked
        )
    if _host_buffers(running_mean, running_var, num_batches_tracked):
        return _update_in_place(
            x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, policy
        )
    return _update_copies(
        x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, policy
    )


def _traced_update(
    x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked
) -> torch.Tensor:
    """No host decision: PyTorch updates copies of the buffers (one fused pass once compiled),
    committed branch-free; momentum=None needs 1/counter as a tensor, so the update is formed
    from the batch statistics in torch ops instead."""
    if momentum is not None:
        new_mean, new_var = running_mean.clone(), running_var.clone()
        y = torch.native_batch_norm(x, weight, bias, new_mean, new_var, True, momentum, eps)[0]
        traced_commit_(running_mean, running_var, num_batches_tracked, new_mean, new_var)
        return y
    y = torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, _cudnn())
    mean, var = batch_norm_stats(x.detach())
    count = values_per_channel(x)
    traced_update_(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y


def _host_buffers(running_mean, running_var, num_batches_tracked) -> bool:
    """Buffers NumPy can view: CPU, float16/32/64 (the counter is only touched by torch)."""
    return (
        running_mean.is_cpu
        and running_var.is_cpu
        and running_mean.dtype in _NUMPY_FLOATS
        and running_var.dtype in _NUMPY_FLOATS
    )


def _factor(momentum, num_batches_tracked) -> float:
    """PyTorch's weight of the new batch: momentum, or 1/(batches counted with this one)."""
    return 1.0 / (int(num_batches_tracked) + 1) if momentum is None else momentum


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _update_in_place(
    x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, policy
) -> torch.Tensor:
    mean_view, var_view = _view(running_mean), _view(running_var)
    old_mean, old_var = mean_view.copy(), var_view.copy()
    factor = _factor(momentum, num_batches_tracked)
    y, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, factor, eps
    )
    if keep_or_restore(mean_view, var_view, old_mean, old_var):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return y
    if _batch_finite(save_mean, save_invstd):
        refuse_overflow(running_var.dtype, policy)
    else:
        report_nonfinite(policy)
    return y


def _batch_finite(save_mean, save_invstd) -> bool:
    """PyTorch's saved statistics: an infinite variance gives invstd 0, which is finite."""
    invstd = save_invstd.detach()
    return all_finite(save_mean, invstd) and bool((invstd > 0).all())


def _update_copies(
    x, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, policy
) -> torch.Tensor:
    new_mean, new_var = running_mean.clone(), running_var.clone()
    factor = _factor(momentum, num_batches_tracked)
    y, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, new_mean, new_var, True, factor, eps
    )
    commit_update_(
        running_mean,
        running_var,
        num_batches_tracked,
        new_mean,
        new_var,
        _batch_finite(save_mean, save_invstd),
        policy,
    )
    return y
