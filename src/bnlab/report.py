"""report.md of a training run (either engine): curves, the epoch table, data provenance and the
learned batch-norm γ and β. Rendering is a pure function of ``metrics.json`` and the (name, γ, β)
list; :func:`write_report` adds the figures and writes the files atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CLI_FLAGS = (
    "model",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "seed",
    "train_limit",
    "test_limit",
)


def plot_curves(out: Path, epochs: list[dict]) -> list[str]:
    """loss.png and accuracy.png in ``out``; no figures (an empty list) without matplotlib, which
    is the optional ``plots`` extra: training must not fail at its very end for a plot."""
    if not epochs:
        return []
    try:
        import matplotlib
    except ImportError:
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnlab.io import atomic_open

    x = [e["epoch"] for e in epochs]
    files = []
    for name, keys, ylabel in (
        ("loss.png", ["train_loss"], "cross-entropy"),
        ("accuracy.png", ["train_acc", "test_acc"], "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for k in keys:
            ax.plot(x, [e[k] for e in epochs], marker="o", label=k.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_open(out / name, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def reproduce_command(cfg: dict, out) -> str:
    """The ``bnlab train`` command line that reruns this configuration (either engine)."""
    flags = " ".join(
        f"--{k.replace('_', '-')} {cfg[k]}" for k in _CLI_FLAGS if cfg.get(k) is not None
    )
    if cfg.get("engine") == "torch":
        flags += f" --engine torch --nproc {cfg.get('world_size', 1)}"
    return f"bnlab train {flags} --out {out}"


def _vector(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(a):.3f}" for a in v) + "]"


def _population_sentence(pop: dict, final_acc: float | None) -> str:
    text = (
        "With the BN paper's population statistics instead of the moving averages "
        f"(Ioffe & Szegedy 2015, Algorithm 2: mean of the {pop['batches']} training-batch "
        "means and unbiased variances, computed on a copy of the final model): test "
        f"accuracy **{pop['test_acc']:.4f}**."
    )
    if final_acc is None:
        return text
    diff = pop["test_acc"] - final_acc
    if diff > 0:
        return text + (
            f" That is {100 * diff:.2f} points above the moving averages: their statistics lag "
            "behind the weights of the final epochs."
        )
    return text + f" That is {100 * -diff:.2f} points below (or equal to) the moving averages."


def _data_lines(data: dict | None) -> list[str]:
    """Where the training data came from: folder, files, sizes and sha256 prefixes."""
    if not data:
        return []
    lines = [f"Data: `{data['folder']}`"]
    for name, info in data.get("files", {}).items():
        lines.append(f"- `{name}`: {info['bytes']:,} bytes, sha256 `{info['sha256'][:16]}…`")
    if data.get("dropped_last_batch"):
        lines.append(
            f"- the last training batch of {data['dropped_last_batch']} example(s) is dropped "
            "every epoch (batch-norm statistics need more than one value per channel)"
        )
    return [*lines, ""]


def render_report(metrics: dict, bn: list, figures: list[str], out=".") -> str:
    """The markdown of report.md; ``bn`` is [(layer name, γ, β)] of the affine BN layers."""
    cfg = metrics["config"]
    rows = metrics["epochs"]
    lines = [
        f"# bnlab training report: {cfg['model']}",
        "",
        f"Command: `{reproduce_command(cfg, out)}`",
        "",
        *_data_lines(metrics.get("data")),
    ]
    if rows:
        last = rows[-1]
        rss = metrics.get("peak_rss_mb")
        rss_text = f" (peak RSS {rss:.0f} MiB)" if rss is not None else ""
        lines += [
            f"Final test accuracy: **{last['test_acc']:.4f}** after {last['epoch']} epochs"
            f"{rss_text}.",
            "",
        ]
    pop = metrics.get("population_stats")
    if pop:
        final = rows[-1]["test_acc"] if rows else None
        lines += [_population_sentence(pop, final), ""]
    lines += [
        "| epoch | train loss | train acc | test acc | examples/s | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | "
            f"{r['test_acc']:.4f} | {r['examples_per_s']:,.0f} | {r['seconds']:.1f} |"
        )
    lines += [""] + [f"![{f[:-4]}]({f})" for f in figures] + [""]
    if bn:
        lines += [
            "## Learned batch-norm scale γ and shift β",
            "",
            "As d2l prints them: one value per channel (per feature for the linear layers).",
            "",
        ]
        for name, g, b in bn:
            lines += [
                f"### layer `{name}` ({g.size} channels)",
                "",
                f"- γ: {_vector(g)}",
                f"- β: {_vector(b)}",
                "",
            ]
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, bn: list) -> Path:
    """report.md (+ loss.png, accuracy.png) in ``out``; returns the report path."""
    from bnlab.io import atomic_write_text

    out = Path(out)
    figures = plot_curves(out, metrics["epochs"])
    path = out / "report.md"
    atomic_write_text(path, render_report(metrics, bn, figures, out))
    return path
