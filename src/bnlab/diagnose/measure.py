"""The numbers of a diagnosis, from the moments of each BN layer's inputs (no second pass).

Per layer and channel c, with the layer's batches b = 1..B of m_b values per channel each:

    pooled data statistics   μ, σ² of the union of the batches (:func:`pool_moments`)
    mean shift               (μ − running_mean) / sqrt(σ² + ε)        in units of the data's σ
    variance ratio           σ² / running_var                          1 is a perfect match
    train-vs-eval            rms over values of  x̂_batch − x̂_running     (the normalized outputs)
    batch noise              rms over values of  x̂_batch − x̂_pooled      (sampling noise alone)

where x̂_s = (x − μ_s)/sqrt(σ²_s + ε); both rms values are exact closed forms of the batch moments
(:func:`rms_normalized_difference`), averaged over batches (weights m_b) and channels (equal
weights) before the root.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.bn_layers import LayerInfo
from bnlab.diagnose.results import LayerDiagnosis, Thresholds
from bnlab.errors import ShapeError
from bnlab.functional.stats import pool_moments


def rms_normalized_difference(var_b, mean_b, var_r, mean_r, eps: float) -> np.ndarray:
    """Per batch and channel: sqrt(mean over values of (x̂_b − x̂_r)²), exactly, from moments.

    x̂_s = (x − μ_s)/s_s with s_s = sqrt(σ²_s + ε); the batch has mean μ_b and biased variance σ²_b:

        mean((x̂_b − x̂_r)²) = σ²_b·(1/s_b − 1/s_r)² + ((μ_b − μ_r)/s_r)²

    Arrays broadcast (e.g. batches (B, C) against a reference (C,)).
    """
    s_b = np.sqrt(var_b + eps)
    s_r = np.sqrt(var_r + eps)
    return np.sqrt(var_b * (1.0 / s_b - 1.0 / s_r) ** 2 + ((mean_b - mean_r) / s_r) ** 2)


def layer_numbers(info: LayerInfo, batches: list, th: Thresholds) -> LayerDiagnosis:
    """The :class:`LayerDiagnosis` of one layer (verdict not yet filled) from its inputs' moments
    ``batches`` = [(mean (C,), var (C,), m), ...], one per batch."""
    if not batches:
        raise ShapeError(f"layer {info.name!r} was never reached by the model's forward pass")
    means, variances, counts = (np.array(v, np.float64) for v in zip(*batches, strict=True))
    mean, var, _ = pool_moments(means, variances, counts)
    w = (counts / counts.sum())[:, None]
    noise = np.sqrt(
        (w * rms_normalized_difference(variances, means, var, mean, info.eps) ** 2).sum(0).mean()
    )
    dead = [] if info.gamma is None else np.flatnonzero(np.abs(info.gamma) < th.dead_gamma).tolist()
    has_running = info.tracks_running_stats
    if has_running:
        shift, ratio, te, nonfinite = _against_running(info, means, variances, mean, var, w)
    else:
        shift, ratio = np.zeros_like(mean), np.ones_like(var)
        te, nonfinite = 0.0, []
    return LayerDiagnosis(
        name=info.name, kind=info.kind, num_features=info.num_features, momentum=info.momentum,
        convention="pytorch (momentum = weight of the new batch; running_var unbiased)",
        eps=info.eps, num_batches_tracked=info.num_batches_tracked,
        values_per_channel=float(counts.mean()), has_running_stats=has_running,
        mean_shift_sigma=shift.tolist(), var_ratio=ratio.tolist(),
        max_abs_shift_sigma=_max_abs(shift), worst_var_ratio=_worst_ratio(ratio),
        train_eval_rms=te, batch_noise_rms=float(noise),
        dead_channels=dead, nonfinite_channels=nonfinite,
    )  # fmt: skip


def _against_running(info: LayerInfo, means, variances, mean, var, w):
    """Shift and ratio per channel, the train-vs-eval rms, and the channels whose running
    statistics are not finite (left out of the rms, NaN in the per-channel lists)."""
    rm, rv = info.running_mean, info.running_var
    finite = np.isfinite(rm) & np.isfinite(rv) & (rv >= 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shift = (mean - rm) / np.sqrt(var + info.eps)
        ratio = var / rv
        per_batch = rms_normalized_difference(variances, means, rv, rm, info.eps) ** 2
    shift[~finite], ratio[~finite] = np.nan, np.nan
    ok = finite[None, :]
    te = (
        math.sqrt((w * np.where(ok, per_batch, 0)).sum(0)[finite].mean())
        if finite.any()
        else math.nan
    )
    return shift, ratio, te, np.flatnonzero(~finite).tolist()


def _max_abs(shift: np.ndarray) -> float:
    return float(np.nanmax(np.abs(shift))) if np.isfinite(shift).any() else math.nan


def _worst_ratio(ratio: np.ndarray) -> float:
    """The channel's ratio farthest from 1 in log scale (inf / nan when none is finite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.abs(np.log(ratio))
    if np.isfinite(logs).any():
        return float(ratio[np.nanargmax(logs)])
    return math.inf if np.isinf(logs).any() else math.nan
