"""bnlab's running-statistics rule for torch tensors (the rule of
:mod:`bnlab.functional.running`, mirrored for the paths that do not run bnlab's kernels):

* a batch whose statistics are not finite never reaches the buffers (``NonFiniteBatchWarning``,
  or ``NonFiniteError`` with ``on_nonfinite="raise"``);
* an update that is not finite *in the buffers' dtype* (a float16 ``running_var`` past 65504) is
  refused the same way, so a buffer never becomes Inf;
* a refused update does not count: ``num_batches_tracked`` is incremented only with a write.

Eager code decides on the host and can warn (:func:`commit_update_`); code traced by
``torch.compile`` cannot branch on data, so :func:`traced_update_` applies the same rule with
``torch.where`` and stays silent.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from bnlab.errors import NonFiniteBatchWarning, NonFiniteError
from bnlab.functional.running import report_nonfinite

_F64 = torch.float64
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (no host sync)."""
    ok = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        ok = ok & torch.isfinite(t).all()
    return ok


def all_finite(*tensors: torch.Tensor) -> bool:
    """Host decision: every element finite. NumPy on CPU (a few µs cheaper per call than
    torch's reductions, which matters on layers of a few hundred values)."""
    if all(t.is_cpu and t.dtype in _NUMPY_FLOATS for t in tensors):
        return all(bool(np.isfinite(t.detach().numpy()).all()) for t in tensors)
    return bool(_finite(*tensors))


def stats_finite(save_mean: torch.Tensor, save_invstd: torch.Tensor) -> bool:
    """The batch statistics PyTorch's op saves are finite (an infinite variance gives invstd 0,
    which is finite: counted as not finite). Host decision, NumPy on CPU."""
    if save_mean.is_cpu and save_mean.dtype in _NUMPY_FLOATS and save_invstd.dtype in _NUMPY_FLOATS:
        mean, invstd = save_mean.detach().numpy(), save_invstd.detach().numpy()
        return bool(np.isfinite(mean).all() and (np.isfinite(invstd) & (invstd > 0)).all())
    invstd = save_invstd.detach()
    return all_finite(save_mean, invstd) and bool((invstd > 0).all())


def refuse_overflow(dtype: torch.dtype, policy: str) -> None:
    """Report an update that is not finite in the buffers' dtype (they were left unchanged)."""
    msg = (
        f"the running-statistics update overflows the buffers' dtype ({dtype}): the running "
        "statistics were left unchanged; keep buffers in float32"
    )
    if policy == "raise":
        raise NonFiniteError(msg)
    warnings.warn(msg, NonFiniteBatchWarning, stacklevel=4)


@torch.no_grad()
def commit_update_(
    running_mean,
    running_var,
    num_batches_tracked,
    new_mean,
    new_var,
    batch_finite: bool,
    policy: str,
    what: str = "x",
) -> bool:
    """Write ``new_mean``/``new_var`` (already in the buffers' dtype) into the buffers and count
    the batch, unless the batch was not finite or the new values are not; returns whether it
    wrote. Eager only (decides on the host)."""
    if not batch_finite:
        report_nonfinite(policy, what)
        return False
    if not all_finite(new_mean, new_var):
        refuse_overflow(running_var.dtype, policy)
        return False
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


def new_running_values(running_mean, running_var, mean, var, count: int, w):
    """PyTorch's update formed in float64 and rounded to the buffers' dtype:
    (1 − w)·r + w·μ and (1 − w)·r + w·m/(m−1)·σ². ``w`` a float or a 0-d tensor."""
    unbiased = var.to(_F64) * (count / (count - 1))
    new_mean = (1.0 - w) * running_mean.to(_F64) + w * mean.to(_F64)
    new_var = (1.0 - w) * running_var.to(_F64) + w * unbiased
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


@torch.no_grad()
def guarded_update_(
    running_mean,
    running_var,
    mean,
    var,
    count: int,
    momentum,
    num_batches_tracked=None,
    policy: str = "warn",
    what: str = "x",
) -> bool:
    """The whole rule from batch statistics (μ, biased σ², (C,)): w = momentum, or
    1/(num_batches_tracked + 1) for ``momentum=None`` (the cumulative average). Eager."""
    if momentum is None:
        w = 1.0 / (int(num_batches_tracked) + 1)
    else:
        w = momentum
    finite = all_finite(mean, var)
    new_mean, new_var = new_running_values(running_mean, running_var, mean, var, count, w)
    return commit_update_(
        running_mean, running_var, num_batches_tracked, new_mean, new_var, finite, policy, what
    )


@torch.no_grad()
def traced_commit_(running_mean, running_var, num_batches_tracked, new_mean, new_var) -> None:
    """Branch-free commit (for ``torch.compile``): the buffers get ``torch.where(ok, new, old)``
    and the counter ``+ ok``, ok = every new value finite in the buffers' dtype (a non-finite
    batch makes them NaN or Inf too). Nothing is reported: that would need a host decision."""
    ok = _finite(new_mean, new_var)
    running_mean.copy_(torch.where(ok, new_mean, running_mean))
    running_var.copy_(torch.where(ok, new_var, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))


@torch.no_grad()
def traced_update_(
    running_mean, running_var, mean, var, count: int, momentum, num_batches_tracked=None
) -> None:
    """:func:`guarded_update_` without a host decision, from batch statistics: w = momentum, or
    1/(num_batches_tracked + 1) as a tensor for ``momentum=None``."""
    if momentum is None:
        w = 1.0 / (num_batches_tracked.to(_F64) + 1.0)
    else:
        w = momentum
    new_mean, new_var = new_running_values(running_mean, running_var, mean, var, count, w)
    bad_batch = ~_finite(mean, var)  # NaN the new values of a non-finite batch, whatever w
    new_mean = torch.where(bad_batch, torch.nan, new_mean)
    traced_commit_(running_mean, running_var, num_batches_tracked, new_mean, new_var)
