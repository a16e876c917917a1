"""Aggregation over seeds (mean ± sample std) and the one number formatter used everywhere.

The report is rendered from the JSON-round-tripped result with :func:`fmt` and :func:`fmt_pm`,
so every number in ``reports/experiments.md`` is literally derived from ``results.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def mean_std(values: Iterable[float | None]) -> dict:
    """``{"mean", "std", "n", "n_failed"}`` over the finite values; std is the sample std
    (ddof=1), ``None`` with fewer than two finite values. Non-finite values (a diverged run)
    are counted in ``n_failed`` instead of poisoning the mean."""
    values = list(values)
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n_all = len(values)
    if not vals:
        return {"mean": None, "std": None, "n": 0, "n_failed": n_all}
    mean = math.fsum(vals) / len(vals)
    std = None
    if len(vals) > 1 and len(set(vals)) == 1:
        std = 0.0  # identical values: exactly 0, not a rounding residue like 1.7e-17
    elif len(vals) > 1:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return {"mean": mean, "std": std, "n": len(vals), "n_failed": n_all - len(vals)}


def fmt(x: float | None) -> str:
    """4 decimals for ordinary numbers, scientific notation for tiny or huge ones."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.3e}"
    return f"{x:.4f}"


def fmt_pm(stat: dict) -> str:
    """``0.8534 ± 0.0041`` (or ``0.8534`` with one seed; failed runs are noted)."""
    if stat["mean"] is None:
        return f"n/a ({stat['n_failed']} failed)"
    text = fmt(stat["mean"]) if stat["std"] is None else f"{fmt(stat['mean'])} ± {fmt(stat['std'])}"
    if stat.get("n_failed"):
        text += f" ({stat['n_failed']} diverged)"
    return text
