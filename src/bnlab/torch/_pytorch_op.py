"""The route through PyTorch's own batch norm, with bnlab's running-statistics rule.

Taken for everything bnlab's kernels do not handle or would not be faster on (small layers,
float16/bfloat16, other devices, tensor subclasses, non-contiguous input, forward-mode AD,
``torch.func`` transforms; see :mod:`bnlab.torch.dispatch`). The output, the gradients, the
argument errors, forward-mode AD, vmap and double backward are PyTorch's. In training:

* eager, CPU buffers: PyTorch updates them in place, exactly as ``nn.BatchNorm`` does; the old
  values are kept aside (two (C,) copies) and put back if a new one is not finite — a batch with
  NaN/Inf, or an update past the buffers' dtype (float16) — and the counter is incremented only
  after a kept update. A few µs: small layers, where PyTorch's op is used because it is faster,
  stay as fast as ``nn.BatchNorm``;
* eager, other devices or bfloat16 buffers: PyTorch updates copies, committed under the rule
  (:func:`bnlab.torch._running.commit_update_`);
* eager without running statistics: a batch that is not finite is reported all the same (the
  ``on_nonfinite`` contract of :func:`bnlab.torch.functional.batch_norm`);
* traced by ``torch.compile``: the rule without a host decision (branch-free, silent);
* under ``torch.func`` transforms (``host=False``): nothing updated, nothing reported.

``torch.native_batch_norm`` gives the batch statistics with the output, but unlike
``torch.batch_norm`` it does not check the sizes of the vectors: :func:`check_sizes` does, with
PyTorch's messages, before it is called.
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.functional.running import report_nonfinite
from bnlab.torch._guard import keep_or_restore
from bnlab.torch._running import (
    commit_update_,
    refuse_overflow,
    stats_finite,
    traced_commit_,
    traced_update_,
)
from bnlab.torch.reference import batch_norm_stats, values_per_channel

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_VECTOR_NAMES = ("running_mean", "running_var", "weight", "bias")


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def check_sizes(a) -> None:
    """PyTorch's size checks of ``torch.batch_norm`` (its order, its messages)."""
    c = a.x.shape[1]
    for v in (a.running_mean, a.running_var, a.weight, a.bias):
        if v is not None and v.numel() != c:
            vectors = (a.running_mean, a.running_var, a.weight, a.bias)
            name = _VECTOR_NAMES[next(i for i, u in enumerate(vectors) if u is v)]
            raise RuntimeError(f"{name} should contain {c} elements not {v.numel()}")


def pytorch_batch_norm(a, *, traced: bool, host: bool = True) -> torch.Tensor:
    """PyTorch's batch norm of a checked call (:class:`bnlab.torch._checks.BatchNormArgs`), with
    bnlab's rules in training (module docstring). ``host``: eager decisions are allowed (False
    under ``torch.func`` transforms)."""
    x, eps = a.x, a.eps
    if not a.training:
        return torch.batch_norm(
            x, a.weight, a.bias, a.running_mean, a.running_var, False, 0.0, eps, _cudnn()
        )
    if not traced and torch._C._is_tracing():  # jit.trace, the TorchScript ONNX exporter
        return _as_recorded(a)
    if traced or not host or x.is_meta or x.dim() < 2:
        if a.running_mean is None or not host:
            return torch.batch_norm(x, a.weight, a.bias, None, None, True, 0.0, eps, _cudnn())
        return _traced_update(a)
    check_sizes(a)
    if a.running_mean is None:
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, a.weight, a.bias, None, None, True, 0.0, eps
        )
        if not stats_finite(save_mean, save_invstd):
            report_nonfinite(a.policy)
        return y
    if _host_buffers(a.running_mean, a.running_var):
        return _update_in_place(a)
    return _update_copies(a)


def _as_recorded(a) -> torch.Tensor:
    """What ``nn.BatchNorm`` does, for a tracer that records ops (no NumPy, no host decision)."""
    nbt = a.num_batches_tracked
    if a.tracking and nbt is not None:
        nbt.add_(1)
    factor = (1.0 / float(nbt) if a.momentum is None else a.momentum) if a.tracking else 0.0
    return torch.batch_norm(
        a.x, a.weight, a.bias, a.running_mean, a.running_var, True, factor, a.eps, _cudnn()
    )


def _traced_update(a) -> torch.Tensor:
    """No host decision: PyTorch updates copies of the buffers (one fused pass once compiled),
    committed branch-free; momentum=None needs 1/counter as a tensor, so the update is formed
    from the batch statistics in torch ops instead."""
    x, rm, rv, nbt = a.x, a.running_mean, a.running_var, a.num_batches_tracked
    if a.momentum is not None:
        new_mean, new_var = rm.clone(), rv.clone()
        y = torch.batch_norm(
            x, a.weight, a.bias, new_mean, new_var, True, a.momentum, a.eps, _cudnn()
        )
        traced_commit_(rm, rv, nbt, new_mean, new_var)
        return y
    y = torch.batch_norm(x, a.weight, a.bias, None, None, True, 0.0, a.eps, _cudnn())
    mean, var = batch_norm_stats(x.detach())
    traced_update_(rm, rv, mean, var, values_per_channel(x), a.momentum, nbt)
    return y


def _host_buffers(running_mean, running_var) -> bool:
    """Buffers NumPy can view: CPU, float16/32/64."""
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
    try:
        return t.numpy()  # buffers do not require grad: no detach() needed
    except RuntimeError:
        return t.detach().numpy()


def _update_in_place(a) -> torch.Tensor:
    rm, rv, nbt, momentum = a.running_mean, a.running_var, a.num_batches_tracked, a.momentum
    mean_view, var_view = _view(rm), _view(rv)
    old_mean, old_var = mean_view.copy(), var_view.copy()
    factor = momentum if momentum is not None else 1.0 / (int(nbt) + 1)
    y, save_mean, save_invstd = torch.native_batch_norm(
        a.x, a.weight, a.bias, rm, rv, True, factor, a.eps
    )
    if keep_or_restore(mean_view, var_view, old_mean, old_var):
        if nbt is not None:
            nbt.add_(1)
    elif stats_finite(save_mean, save_invstd):
        refuse_overflow(rv.dtype, a.policy)
    else:
        report_nonfinite(a.policy)
    return y


def _update_copies(a) -> torch.Tensor:
    rm, rv, nbt = a.running_mean, a.running_var, a.num_batches_tracked
    new_mean, new_var = rm.clone(), rv.clone()
    y, save_mean, save_invstd = torch.native_batch_norm(
        a.x, a.weight, a.bias, new_mean, new_var, True, _factor(a.momentum, nbt), a.eps
    )
    finite = stats_finite(save_mean, save_invstd)
    commit_update_(rm, rv, nbt, new_mean, new_var, finite, a.policy)
    return y
