"""Output of a diagnosis: the terminal table and the per-layer plot (JSON is in results.py)."""

from __future__ import annotations

import io
import math

import numpy as np

from bnlab.diagnose.results import Diagnosis


def _fmt(v, spec=".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    return format(v, spec)


def format_table(d: Diagnosis) -> str:
    """A fixed-width table, one row per layer, then the problems and advice of flagged layers."""
    head = ("layer", "type", "C", "m/batch", "momentum", "|shift|σ", "var ratio", "train-eval",
            "noise", "dead", "nonfin", "verdict")  # fmt: skip
    rows = [head]
    for lay in d.layers:
        rows.append((
            lay.name, lay.kind, str(lay.num_features), f"{lay.values_per_channel:.0f}",
            "None (cumulative)" if lay.momentum is None else _fmt(lay.momentum, "g"),
            _fmt(lay.max_abs_shift_sigma), _fmt(lay.worst_var_ratio, ".3g"),
            _fmt(lay.train_eval_rms, ".3f"), _fmt(lay.batch_noise_rms, ".3f"),
            str(len(lay.dead_channels)), str(len(lay.nonfinite_channels)), lay.verdict.upper(),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    agree = (
        ""
        if d.prediction_agreement is None
        else (f", predictions agree on {100 * d.prediction_agreement:.1f}%")
    )
    lines.append("")
    lines.append(
        f"model ({d.framework}): {d.num_batches} batches, {d.num_samples} samples; output with BN "
        f"in train vs eval mode differs by {_fmt(d.output_rel_diff, '.3f')} (relative rms){agree}"
    )
    lines.append("momentum convention: pytorch (weight of the new batch); running_var unbiased")
    for lay in d.layers:
        if lay.verdict == "ok" and not lay.problems:
            continue
        lines.append(f"\n[{lay.verdict.upper()}] {lay.name} ({lay.kind})")
        lines += [f"  problem: {p}" for p in lay.problems]
        lines += [f"  advice:  {a}" for a in lay.advice]
        lines.append(f"  fold:    {lay.fold}")
    lines.append(f"\nverdict: {d.verdict.upper()}")
    return "\n".join(lines)


def _bar_colors(values: np.ndarray, limit: float | None) -> list[str]:
    """Green below the warning limit, orange above, red above twice the limit or non-finite."""
    if limit is None:
        return ["tab:blue" if np.isfinite(v) else "tab:red" for v in values]
    return [
        "tab:red" if not np.isfinite(v) or v > 2 * limit else "tab:orange" if v > limit else
        "tab:green"
        for v in values
    ]  # fmt: skip


def plot_diagnosis(d: Diagnosis, path) -> None:
    """Per-layer divergence (|shift|, |log2 var ratio|, rms differences) as a PNG, atomically.

    Bars are coloured by their own threshold; a layer with non-finite running statistics gets a
    full-width red bar labelled "non-finite" in the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnlab.io import atomic_write_bytes

    names = [lay.name or "(root)" for lay in d.layers]
    th = d.thresholds
    nonfinite = np.array([bool(lay.nonfinite_channels) for lay in d.layers])

    def log2_ratio(r):
        return abs(math.log2(r)) if r > 0 and math.isfinite(r) else math.inf

    panels = [
        ("max |mean shift| (σ of the data)", [lay.max_abs_shift_sigma for lay in d.layers],
         th.shift_sigma),
        ("worst |log2 variance ratio|", [log2_ratio(lay.worst_var_ratio) for lay in d.layers],
         math.log2(th.var_ratio)),
        ("train-vs-eval rms of x̂", [lay.train_eval_rms for lay in d.layers], None),
        ("batch-noise rms of x̂", [lay.batch_noise_rms for lay in d.layers], th.batch_noise),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 2.5 + 0.3 * len(names)))
    pos = np.arange(len(names))
    for k, (ax, (title, values, limit)) in enumerate(zip(axes, panels, strict=True)):
        vals = np.array(values, np.float64)
        missing = ~np.isfinite(vals) | (nonfinite if k == 0 else False)
        finite_top = np.max(vals[~missing]) if (~missing).any() else 0.0
        full = max(finite_top, limit or 0.0) * 1.15 or 1.0
        shown = np.where(missing, full, vals)
        ax.barh(pos, shown, color=_bar_colors(np.where(missing, np.inf, vals), limit))
        for p in pos[missing]:
            ax.text(full, p, "non-finite ", va="center", ha="right", fontsize=7, color="w")
        if limit is not None:
            ax.axvline(limit, color="k", linestyle="--", linewidth=1)
        ax.set_yticks(pos, names if k == 0 else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"bnlab diagnose: verdict {d.verdict.upper()} (dashed line: warning threshold)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
