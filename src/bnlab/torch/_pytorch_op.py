"""The route through PyTorch's own ``batch_norm``, with bnlab's running-statistics rule.

Taken for everything bnlab's kernels do not handle or would not be faster on (small layers,
float16/bfloat16, other devices, tensor subclasses, non-contiguous input, forward-mode AD,
``torch.func`` transforms; see :mod:`bnlab.torch.dispatch`). The output and the gradients are
PyTorch's (so are forward-mode AD, vmap and double backward). The running statistics:

* eager: PyTorch updates *copies* of the buffers (its exact numerics, momentum=None included);
  the copies are committed under bnlab's rule (:func:`bnlab.torch._running.commit_update_`);
* traced by ``torch.compile``: the same rule without a host decision
  (:func:`bnlab.torch._running.traced_update_`), from the batch statistics in torch ops;
* under ``torch.func`` transforms: not updated (vmap forbids the data-dependent rule; PyTorch's
  own modules raise there instead).
"""

from __future__ import annotations

import torch

from bnlab.torch._running import all_finite, commit_update_, traced_update_
from bnlab.torch.reference import batch_norm_stats, values_per_channel


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def pytorch_batch_norm(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum,
    eps: float,
    num_batches_tracked,
    policy: str,
    *,
    traced: bool,
    update: bool = True,
) -> torch.Tensor:
    """PyTorch's batch norm; with ``training`` and running statistics (and ``update``), the
    buffers are updated under bnlab's rule. Arguments as :func:`bnlab.torch.functional.batch_norm`
    (already checked)."""
    if not training:
        return torch.batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, _cudnn()
        )
    if running_mean is None or not update:
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, _cudnn())
    count = values_per_channel(x)
    if traced or x.device.type == "meta":
        y = torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, _cudnn())
        mean, var = batch_norm_stats(x.detach())
        traced_update_(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
        return y
    factor = 1.0 / (int(num_batches_tracked) + 1) if momentum is None else momentum
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, new_mean, new_var, True, factor, eps
    )
    # an infinite variance gives invstd 0, which is finite: count it as not finite
    finite = all_finite(save_mean, save_invstd) and bool((save_invstd.detach() > 0).all())
    commit_update_(
        running_mean, running_var, num_batches_tracked, new_mean, new_var, finite, policy
    )
    return y
