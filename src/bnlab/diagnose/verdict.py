"""The verdict rules: which numbers are problems, what to do about them, whether folding is safe."""

from __future__ import annotations

import math

import numpy as np

from bnlab.bn_layers import LayerInfo
from bnlab.diagnose.results import LayerDiagnosis, Thresholds


def _never_updated(lay: LayerDiagnosis, info: LayerInfo) -> bool:
    return (
        info.num_batches_tracked == 0
        and np.all(info.running_mean == 0)
        and np.all(info.running_var == 1)
    )


def apply_verdict(lay: LayerDiagnosis, info: LayerInfo, th: Thresholds) -> None:
    """Fill ``verdict``, ``problems``, ``advice`` and ``fold`` from the numbers."""
    level = {"ok": 0, "warn": 1, "bad": 2}
    worst = 0

    def flag(severity: str, problem: str, advice: str) -> None:
        nonlocal worst
        worst = max(worst, level[severity])
        lay.problems.append(problem)
        if advice not in lay.advice:
            lay.advice.append(advice)

    recalibrate = (
        "recalibrate: re-estimate the running statistics on data like the evaluation data "
        "(bnlab.recalibrate), with the model in its final weights"
    )
    if not lay.has_running_stats:
        lay.verdict, lay.fold = "ok", "no: no running statistics (eval uses batch statistics)"
        lay.advice.append("no running statistics are tracked: eval behaves like training")
        return
    if lay.nonfinite_channels:
        flag(
            "bad",
            f"running statistics are NaN/Inf in {len(lay.nonfinite_channels)} channel(s) "
            f"{_short(lay.nonfinite_channels)}",
            "find the batch that produced NaN/Inf (bnlab keeps such batches out of the buffers, "
            "not all code does), then " + recalibrate,
        )
    elif _never_updated(lay, info):
        flag(
            "bad",
            "running statistics were never updated (num_batches_tracked=0, mean 0, var 1)",
            "the layer never ran in training mode or its buffers were not saved: " + recalibrate,
        )
    shift, ratio = lay.max_abs_shift_sigma, lay.worst_var_ratio
    ratio_out = abs(math.log(ratio)) if ratio > 0 and math.isfinite(ratio) else math.inf
    lim = math.log(th.var_ratio)
    if math.isfinite(shift) and shift > th.shift_sigma:
        flag(
            "bad" if shift > 2 * th.shift_sigma else "warn",
            f"batch mean is {shift:.2f} σ away from running_mean (limit {th.shift_sigma:g})",
            recalibrate,
        )
    if ratio_out > lim:
        flag(
            "bad" if ratio_out > 2 * lim else "warn",
            f"batch/running variance ratio {ratio:.3g} "
            f"(limit {1 / th.var_ratio:g}..{th.var_ratio:g})",
            recalibrate,
        )
    if lay.batch_noise_rms > th.batch_noise:
        flag(
            "bad" if lay.batch_noise_rms > 2 * th.batch_noise else "warn",
            f"batch statistics are noisy: rms(x̂_batch − x̂_pooled) = {lay.batch_noise_rms:.3f} "
            f"with {lay.values_per_channel:.0f} values per channel per batch",
            "use a larger batch, or Ghost BN / Batch Renorm (bnlab.nn.ghost, bnlab.nn.renorm), "
            "or GroupNorm / LayerNorm, which need no batch statistics",
        )
    if lay.dead_channels:
        frac = len(lay.dead_channels) / lay.num_features
        flag(
            "warn" if frac > 0.5 else "ok",
            f"{len(lay.dead_channels)} dead channel(s) (|γ| < {th.dead_gamma:g}) "
            f"{_short(lay.dead_channels)}: their output is the constant β",
            "dead channels are harmless to fold and could be pruned",
        )
    lay.verdict = {0: "ok", 1: "warn", 2: "bad"}[worst]
    if lay.nonfinite_channels:
        lay.fold = "unsafe: non-finite running statistics would make the folded weights NaN"
    elif worst == 0 or not any("running" in p for p in lay.problems):
        lay.fold = "safe: folding with these running statistics is exact in eval mode"
    else:
        lay.fold = "exact but not advised: folding bakes in the mismatch; recalibrate first"


def advise_first_layer(layers: list[LayerDiagnosis]) -> None:
    first = layers[0]
    if (
        first.has_running_stats
        and not first.nonfinite_channels
        and any("away from running_mean" in p or "variance ratio" in p for p in first.problems)
    ):
        first.advice.append(
            "this is the first batch-norm layer, the closest to the model input: unless its "
            "running statistics were modified, the evaluation inputs are distributed differently "
            "from the training inputs (data shift): check the preprocessing, or recalibrate on "
            "the new data"
        )


def _short(items: list[int], k: int = 6) -> str:
    return "[" + ", ".join(map(str, items[:k])) + (", ..." if len(items) > k else "") + "]"
