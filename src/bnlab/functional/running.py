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
    on_nonfinite: str = "warn",
    blend=None,
) -> bool:
    """Update the buffers in place:  r ← (1 − w)·r + w·s  (mean and variance alike).

    ``batch_var`` is the biased σ²_B; it is multiplied by count/(count − 1) first when the
    convention keeps an unbiased running variance. ``count`` is the number of values per channel.

    The new values are formed in float64 and written only if they are finite *in the buffers'
    dtype*: a finite batch whose variance exceeds a float16 buffer's range (65504) would otherwise
    turn ``running_var`` into Inf. Such an update is refused like a non-finite batch (warn or
    raise per ``on_nonfinite``), leaving buffers and counter untouched. Returns whether it wrote.

    ``blend``: an optional compiled version of the same update (the numba backend's
    :func:`bnlab.kernels.running.blend_running`); it returns None for dtypes it does not take.
    """
    tracked = None if num_batches_tracked is None else int(num_batches_tracked) + 1
    w = new_batch_weight(momentum, convention, tracked)
    unbiased = convention.unbiased_running_var
    args = (running_mean, running_var, batch_mean, batch_var, w, count, unbiased)
    written = None if blend is None else blend(*args)
    if written is None:
        written = _blend_numpy(*args)
    if not written:
        _refuse_overflow(*args, on_nonfinite)
        return False
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    return True


def _new_values(running_mean, running_var, batch_mean, batch_var, w, count, unbiased):
    """(new mean, new var) in float64, before the cast to the buffers' dtype."""
    var = batch_var * (count / (count - 1)) if unbiased else batch_var
    f64 = np.float64
    new_mean = (1.0 - w) * running_mean.astype(f64, copy=False) + w * batch_mean.astype(
        f64, copy=False
    )
    new_var = (1.0 - w) * running_var.astype(f64, copy=False) + w * var.astype(f64, copy=False)
    return new_mean, new_var


def _blend_numpy(running_mean, running_var, batch_mean, batch_var, w, count, unbiased) -> bool:
    new_mean, new_var = _new_values(
        running_mean, running_var, batch_mean, batch_var, w, count, unbiased
    )
    with np.errstate(over="ignore"):
        cast_mean = new_mean.astype(running_mean.dtype, copy=False)
        cast_var = new_var.astype(running_var.dtype, copy=False)
    if not (np.isfinite(cast_mean).all() and np.isfinite(cast_var).all()):
        return False
    running_mean[...] = cast_mean
    running_var[...] = cast_var
    return True


def _refuse_overflow(running_mean, running_var, batch_mean, batch_var, w, count, unbiased, policy):
    new = _new_values(running_mean, running_var, batch_mean, batch_var, w, count, unbiased)
    msg = _overflow_message((running_mean, running_var), new)
    if policy == "raise":
        raise NonFiniteError(msg)
    warnings.warn(msg, NonFiniteBatchWarning, stacklevel=4)


def _overflow_message(buffers, new_values) -> str:
    """Why an update was refused: a buffer that already holds NaN/Inf, or which new value
    does not fit its buffer's dtype (with its largest magnitude)."""
    unchanged = "the running statistics were left unchanged"
    names = ("running_mean", "running_var")
    for name, buf in zip(names, buffers, strict=True):
        if not np.isfinite(buf).all():
            return f"{name} already holds NaN or Inf: {unchanged}; reset or reload the buffers"
    for name, buf, new in zip(names, buffers, new_values, strict=True):
        with np.errstate(over="ignore"):
            fits = np.isfinite(new.astype(buf.dtype))
        if not fits.all():
            return (
                f"the running-statistics update overflows the buffers' dtype: new {name} up "
                f"to {np.abs(new).max():.4g} does not fit {buf.dtype}; {unchanged}; "
                "keep buffers in float32"
            )
    return f"the running-statistics update is not finite: {unchanged}"
