"""Running-statistics bookkeeping shared by every batch-norm backend and module.

The update itself is the convention's formula (see :mod:`bnlab.conventions`); this module adds the
guard that keeps a non-finite batch out of the buffers and the cumulative average (momentum=None).
"""

from __future__ import annotations

import warnings

import numpy as np

from bnlab.conventions import NormConvention
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError

NONFINITE_POLICIES = ("warn", "raise")


def batch_is_finite(mean: np.ndarray, var: np.ndarray) -> bool:
    """A NaN or Inf anywhere in a channel makes its mean or variance non-finite, so the (C,)
    statistics are enough to tell whether the batch is safe for the running averages."""
    return bool(np.isfinite(mean).all() and np.isfinite(var).all())


def report_nonfinite(policy: str, what: str = "x") -> None:
    """Warn (default) or raise for a batch with NaN/Inf; the buffers were not touched."""
    msg = (
        f"{what} contains NaN or Inf: the batch statistics are not finite, so the running "
        "statistics were left unchanged"
    )
    if policy == "raise":
        raise NonFiniteError(msg)
    warnings.warn(msg, NonFiniteBatchWarning, stacklevel=3)


def new_batch_weight(
    momentum: float | None, convention: NormConvention, num_batches_tracked
) -> float:
    """Weight of the new batch in the moving average.

    ``momentum=None`` is PyTorch's cumulative moving average: the k-th batch gets weight 1/k,
    so after k batches the running value is the plain mean of the k batch statistics.
    ``num_batches_tracked`` must already count the current batch.
    """
    if momentum is None:
        return 1.0 / float(int(num_batches_tracked))
    return convention.new_batch_weight(momentum)


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    count: int,
    momentum: float | None,
    convention: NormConvention,
    num_batches_tracked: np.ndarray | None = None,
) -> None:
    """Update the buffers in place:  r ← (1 − w)·r + w·s  (mean and variance alike).

    ``batch_var`` is the biased σ²_B; it is multiplied by count/(count − 1) first when the
    convention keeps an unbiased running variance. ``count`` is the number of values per channel.
    """
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    w = new_batch_weight(momentum, convention, num_batches_tracked)
    var = batch_var * (count / (count - 1)) if convention.unbiased_running_var else batch_var
    dt = running_mean.dtype
    running_mean[...] = (1.0 - w) * running_mean + w * batch_mean.astype(dt)
    running_var[...] = (1.0 - w) * running_var + w * var.astype(running_var.dtype)
