"""Argument checks shared by batch norm, Ghost BN and Batch Renorm: momentum, running buffers,
the cumulative-average counter and the size of a training batch."""

from __future__ import annotations

import numpy as np

from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import Layout
from bnlab.functional.stats import reduction_size

PRESET = "preset"  # momentum=PRESET: use the convention's own default momentum


def per_channel_count(x: np.ndarray, lay: Layout) -> int:
    return reduction_size(x.shape, lay.reduce_axes)


def resolve_momentum(momentum, conv) -> float | None:
    """``momentum="preset"`` becomes the convention's default; then a float in [0, 1] or None."""
    if isinstance(momentum, str) and momentum == PRESET:
        momentum = conv.momentum
    return v.check_momentum(momentum)


def check_running_buffers(running_mean, running_var, num_batches_tracked, c: int, training: bool):
    """The running-statistics arguments shared by batch norm, Ghost BN and Batch Renorm: (C,)
    float buffers, given together, writable when training; an optional 0-d integer counter."""
    v.check_vector(running_mean, "running_mean", c, writable=training)
    v.check_vector(running_var, "running_var", c, writable=training)
    v.check_counter(num_batches_tracked)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


def check_cumulative_counter(momentum, num_batches_tracked, tracking: bool) -> None:
    """momentum=None (cumulative average) weighs the k-th batch 1/k: it needs the counter."""
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs num_batches_tracked, "
            "a 0-d integer array counting the batches"
        )


def check_training_batch(x: np.ndarray, lay: Layout) -> int:
    m = per_channel_count(x, lay)
    if m == 0:
        raise ShapeError(f"x must not be empty when training, got shape {x.shape}")
    if m == 1:
        raise ShapeError(
            f"Expected more than 1 value per channel when training, got input of shape {x.shape} "
            f"(layout {lay.name!r}): batch statistics of a single value are undefined"
        )
    return m
