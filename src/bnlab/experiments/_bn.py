"""Bookkeeping around the batch-norm layers of a bnlab ``Sequential`` (no BN math here).

Running statistics are read and written through the modules' own buffers; statistics are
computed by :func:`bnlab.functional.moments` and moving averages updated by
:func:`bnlab.functional.running.update_running_stats`.
"""

from __future__ import annotations

import contextlib

import numpy as np


def bn_layers(model) -> list:
    """The BatchNorm1d/2d modules of ``model`` in forward order."""
    from bnlab.nn import BatchNorm1d, BatchNorm2d  # noqa: PLC0415

    return [m for m in model.modules() if isinstance(m, (BatchNorm1d, BatchNorm2d))]


def get_running(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """Copies of (running_mean, running_var) of every BN layer."""
    return [(m.running_mean.copy(), m.running_var.copy()) for m in bn_layers(model)]


def set_running(model, stats: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write (mean, var) pairs into the BN layers' buffers (in place, keeping dtypes)."""
    layers = bn_layers(model)
    if len(stats) != len(layers):
        raise ValueError(
            f"stats must have one (mean, var) per BN layer ({len(layers)}), got {len(stats)}"
        )
    for m, (mean, var) in zip(layers, stats, strict=True):
        m.running_mean[...] = mean
        m.running_var[...] = var


@contextlib.contextmanager
def momentum(model, value: float | None):
    """Temporarily set every BN layer's (PyTorch-meaning) momentum; None = cumulative average."""
    layers = bn_layers(model)
    old = [m.momentum for m in layers]
    for m in layers:
        m.momentum = value
    try:
        yield
    finally:
        for m, v in zip(layers, old, strict=True):
            m.momentum = v


@contextlib.contextmanager
def running_stats_restored(model):
    """Whatever happens inside, the BN buffers (and counters) are restored on exit."""
    saved = {k: v.copy() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


def bn_input_moments(model, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Forward ``x`` through ``model`` in training mode without gradients; for each BN layer
    return (batch mean (C,), biased batch variance (C,), m = values per channel) of its input.

    The BN layers run in training mode, so buffers move (wrap in :func:`running_stats_restored`
    or set :func:`momentum` as needed).
    """
    from bnlab.functional import moments  # noqa: PLC0415
    from bnlab.nn import no_grad  # noqa: PLC0415

    layers = {id(m) for m in bn_layers(model)}
    found = []
    model.train()
    with no_grad():
        for layer in model:
            if id(layer) in layers:
                axes = (0,) if x.ndim == 2 else (0, 2, 3)
                mean, var = moments(x.astype(np.float64), axes)
                found.append((mean.ravel(), var.ravel(), x.size // x.shape[1]))
            x = layer.forward(x)
    return found
