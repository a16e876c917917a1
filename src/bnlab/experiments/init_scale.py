"""``init-scale``: accuracy of a 6-layer fully connected net vs the weight-init scale, ±BN.

cs231n (assignment 2, "Batch normalization and initialization") trains a deep fully connected
net with and without batch norm for weight scales logspace(-4, 0) and plots final train and
validation accuracy against the scale. Here the net is

    x (N, 784) → [Linear(·,100) → BatchNorm1d? → ReLU] × 5 → Linear(100, 10)

with W ~ N(0, scale²), b = 0, trained with SGD + momentum on the same Fashion-MNIST subset and
the same batches for both variants. Sensitivity = spread (max − min over scales) of the mean
final validation accuracy.
"""

from __future__ import annotations

import numpy as np

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "init-scale"
TITLE = "6-layer FC net: accuracy vs weight-init scale, with and without BatchNorm"
CLAIM = "A network with batch normalization is far less sensitive to the weight initialization."
SOURCE = "cs231n assignment 2, BatchNormalization.ipynb; Ioffe & Szegedy 2015, sec. 3.3"
VARIANTS = ("bn", "none")

_BUDGETS = {
    "full": dict(n_scales=13, n_train=10000, n_val=2000, epochs=10),
    "quick": dict(n_scales=9, n_train=3000, n_val=1000, epochs=5),
    "tiny": dict(n_scales=3, n_train=200, n_val=100, epochs=1),
}


def config(budget: str) -> dict:
    b = _BUDGETS[budget]
    return {
        "scales": [float(s) for s in np.logspace(-4, 0, b["n_scales"])],
        "hidden": [100] * 5,
        "n_train": b["n_train"],
        "n_val": b["n_val"],
        "epochs": b["epochs"],
        "batch_size": 50,
        "lr": 0.01,
        "momentum": 0.9,
        "n_eval_train": 1000,  # train accuracy measured on the first 1000 training images
    }


def run_seed(cfg: dict, seed: int, progress) -> dict:
    """Final train/val accuracy and loss for each (variant, scale)."""
    from bnlab.experiments._data import Split, fashion_mnist, flat  # noqa: PLC0415
    from bnlab.experiments._fcnet import fc_net  # noqa: PLC0415
    from bnlab.experiments._train import evaluate, train_steps  # noqa: PLC0415

    train, val, _ = fashion_mnist(cfg["n_train"], cfg["n_val"], 0)
    train, val = flat(train), flat(val)
    train_probe = Split(train.x[: cfg["n_eval_train"]], train.y[: cfg["n_eval_train"]])
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    out = {v: {"train_acc": [], "val_acc": [], "final_loss": []} for v in VARIANTS}
    with progress(len(VARIANTS) * len(cfg["scales"]), f"seed {seed}") as bar:
        for variant in VARIANTS:
            for scale in cfg["scales"]:
                model = fc_net(variant, tuple(cfg["hidden"]), weight_scale=scale, seed=seed)
                losses = train_steps(
                    model,
                    train,
                    batch_size=cfg["batch_size"],
                    steps=steps,
                    lr=cfg["lr"],
                    momentum=cfg["momentum"],
                    seed=seed,
                )
                out[variant]["train_acc"].append(evaluate(model, train_probe)[1])
                out[variant]["val_acc"].append(evaluate(model, val)[1])
                out[variant]["final_loss"].append(losses[-1])
                bar.update(1, variant=variant, scale=scale, val=out[variant]["val_acc"][-1])
    return out


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    """Per variant and metric: one mean ± std per scale; plus the spread of the mean val acc."""
    summary = {}
    for v in VARIANTS:
        summary[v] = {
            metric: [
                mean_std(run[v][metric][i] for run in per_seed) for i in range(len(cfg["scales"]))
            ]
            for metric in ("train_acc", "val_acc")
        }
        means = [s["mean"] for s in summary[v]["val_acc"]]
        summary[v]["val_acc_best"] = max(means)
        summary[v]["val_acc_worst"] = min(means)
        summary[v]["val_acc_spread"] = max(means) - min(means)
    return summary


def verdict(summary: dict, cfg: dict) -> Verdict:
    bn, none = summary["bn"], summary["none"]
    holds = bn["val_acc_spread"] <= 0.5 * none["val_acc_spread"]
    text = (
        f"over init scales {fmt(cfg['scales'][0])}..{fmt(cfg['scales'][-1])}, the validation "
        f"accuracy spread (best − worst scale) is {fmt(bn['val_acc_spread'])} with BN "
        f"(worst {fmt(bn['val_acc_worst'])}, best {fmt(bn['val_acc_best'])}) vs "
        f"{fmt(none['val_acc_spread'])} without (worst {fmt(none['val_acc_worst'])}, best "
        f"{fmt(none['val_acc_best'])}); criterion: BN spread <= half the no-BN spread."
    )
    return Verdict(holds, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import COLORS, band, new_figure, save_png  # noqa: PLC0415

    scales, summary = result["config"]["scales"], result["summary"]
    fig, axes = new_figure(1, 2)
    for ax, metric, label in zip(
        axes[0], ("train_acc", "val_acc"), ("train accuracy", "validation accuracy"), strict=True
    ):
        for v, name in (("bn", "with BatchNorm"), ("none", "without BatchNorm")):
            stats = summary[v][metric]
            band(ax, scales, [s["mean"] for s in stats], _stds(stats), name, COLORS[v], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("weight initialization scale (std of W)")
        ax.set_ylabel(f"final {label}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"6-layer FC net on Fashion-MNIST: {result['title'].split(': ')[1]}")
    return [save_png(fig, out_dir / "init_scale.png")]


def _stds(stats: list[dict]):
    if any(s["std"] is None for s in stats):
        return None
    return [s["std"] for s in stats]


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    lines = [
        f"**Setup.** Fully connected net 784 → {' → '.join(map(str, cfg['hidden']))} → 10 "
        f"(ReLU; BatchNorm1d after every hidden Linear in the BN variant), W ~ N(0, scale²), "
        f"b = 0. SGD lr {cfg['lr']}, momentum {cfg['momentum']}, batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs ({steps} steps) on {cfg['n_train']} Fashion-MNIST training "
        f"images (standardized); validation on {cfg['n_val']} held-out training images; train "
        f"accuracy on the first {min(cfg['n_eval_train'], cfg['n_train'])} training images. "
        f"Same batches for both variants.",
        "",
        "| init scale | BN train acc | BN val acc | no-BN train acc | no-BN val acc |",
        "|---|---|---|---|---|",
    ]
    for i, scale in enumerate(cfg["scales"]):
        cells = [fmt_pm(summary[v][m][i]) for v in VARIANTS for m in ("train_acc", "val_acc")]
        lines.append(f"| {fmt(scale)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
