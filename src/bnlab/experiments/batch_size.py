"""``batch-size``: test accuracy vs batch size for BN, LayerNorm, GroupNorm and no norm.

The 6-layer fully connected net of ``init-scale`` (PyTorch-default initialisation) is trained
with each normalization at batch sizes 2 … 256 for the *same number of examples seen*. The
learning rate follows the linear scaling rule, lr(B) = lr_ref · B / B_ref (Goyal et al. 2017),
so that in the small-step limit every batch size follows the same trajectory and what remains
is the effect of the batch size itself: for BN, noisier batch statistics in training and a
mismatch between batch statistics (training) and running statistics (inference).

Degradation of a method = (its best test accuracy over batch sizes) − (its accuracy at the
smallest batch size).
"""

from __future__ import annotations

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "batch-size"
TITLE = "Test accuracy vs batch size: BatchNorm, Ghost BN, Batch Renorm, LayerNorm, GroupNorm, none"
CLAIM = (
    "Batch norm degrades at small batch sizes (noisy batch statistics, train/inference "
    "mismatch); LayerNorm and GroupNorm, which do not normalize over the batch, do not."
)
SOURCE = "Wu & He 2018 (Group Normalization), fig. 1; Ba et al. 2016 (Layer Normalization)"
NORMS = ("bn", "ghost", "renorm", "ln", "gn", "none")

_BUDGETS = {
    "full": dict(batch_sizes=[2, 4, 8, 16, 32, 64, 128, 256], examples=61440, n_train=20000),
    "quick": dict(batch_sizes=[2, 4, 8, 16, 32, 64, 128, 256], examples=6144, n_train=6144),
    "tiny": dict(batch_sizes=[2, 8, 32], examples=128, n_train=128),
}


def config(budget: str) -> dict:
    b = _BUDGETS[budget]
    return {
        "norms": list(NORMS),
        "batch_sizes": b["batch_sizes"],
        "examples_seen": b["examples"],
        "n_train": b["n_train"],
        "n_test": {"full": 10000, "quick": 2000, "tiny": 200}[budget],
        "hidden": [100] * 5,
        "gn_groups": 4,
        "lr_ref": 0.05,
        "batch_ref": 64,
        "momentum": 0.9,
    }


def learning_rate(cfg: dict, batch_size: int) -> float:
    """Linear scaling rule: lr(B) = lr_ref · B / B_ref."""
    return cfg["lr_ref"] * batch_size / cfg["batch_ref"]


def run_seed(cfg: dict, seed: int, progress) -> dict:
    """Test accuracy per norm and batch size (lists aligned with cfg["batch_sizes"])."""
    from bnlab.experiments._data import fashion_mnist, flat  # noqa: PLC0415
    from bnlab.experiments._fcnet import fc_net  # noqa: PLC0415
    from bnlab.experiments._train import evaluate, train_steps  # noqa: PLC0415

    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"])
    train, test = flat(train), flat(test)
    out = {n: {"test_acc": [], "final_train_loss": []} for n in cfg["norms"]}
    total_steps = len(cfg["norms"]) * sum(cfg["examples_seen"] // b for b in cfg["batch_sizes"])
    with progress(total_steps, f"seed {seed}") as bar:
        for norm in cfg["norms"]:
            for b in cfg["batch_sizes"]:
                model = fc_net(norm, tuple(cfg["hidden"]), seed=seed)
                losses = train_steps(
                    model,
                    train,
                    batch_size=b,
                    steps=cfg["examples_seen"] // b,
                    lr=learning_rate(cfg, b),
                    momentum=cfg["momentum"],
                    seed=seed,
                    on_step=lambda step, loss, n=norm, b=b: bar.update(1, norm=n, batch=b),
                )
                out[norm]["test_acc"].append(evaluate(model, test)[1])
                tail = losses[-max(1, len(losses) // 10) :]  # mean loss of the last 10 % of steps
                out[norm]["final_train_loss"].append(sum(tail) / len(tail))
    return out


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    summary = {}
    for n in cfg["norms"]:
        accs = [
            mean_std(run[n]["test_acc"][i] for run in per_seed)
            for i in range(len(cfg["batch_sizes"]))
        ]
        means = [a["mean"] for a in accs]
        summary[n] = {
            "test_acc": accs,
            "best": max(means),
            "at_smallest_batch": means[0],
            "degradation": max(means) - means[0],
        }
    return summary


def verdict(summary: dict, cfg: dict) -> Verdict:
    """Holds when BN loses >= 2 points at the smallest batch and LN, GN lose < 1/3 of that."""
    deg = {n: summary[n]["degradation"] for n in cfg["norms"]}
    bn_drop = deg.get("bn", 0.0)
    others = [n for n in ("ln", "gn") if n in deg]
    holds = bn_drop >= 0.02 and all(deg[n] < bn_drop / 3 for n in others)
    b0 = cfg["batch_sizes"][0]
    parts = ", ".join(
        f"{n.upper() if n != 'none' else 'no norm'} {fmt(deg[n])} "
        f"({fmt(summary[n]['at_smallest_batch'])} vs best {fmt(summary[n]['best'])})"
        for n in cfg["norms"]
    )
    text = (
        f"test-accuracy drop from the best batch size to batch {b0}: {parts}; criterion: BN "
        f"drops >= 0.02 and LN/GN drop less than a third of BN's drop."
    )
    return Verdict(holds, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._fcnet import NORM_LABELS  # noqa: PLC0415
    from bnlab.experiments._plot import COLORS, band, new_figure, save_png  # noqa: PLC0415

    cfg, summary = result["config"], result["summary"]
    fig, ax = new_figure(size=(7.0, 4.5))
    for n in cfg["norms"]:
        accs = summary[n]["test_acc"]
        stds = None if any(a["std"] is None for a in accs) else [a["std"] for a in accs]
        band(
            ax,
            cfg["batch_sizes"],
            [a["mean"] for a in accs],
            stds,
            NORM_LABELS[n],
            COLORS[n],
            marker="o",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg["batch_sizes"], [str(b) for b in cfg["batch_sizes"]])
    ax.set_xlabel(f"batch size (same {cfg['examples_seen']} examples seen; lr ∝ batch size)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("6-layer FC net on Fashion-MNIST: BN vs LN vs GN vs none across batch sizes")
    return [save_png(fig, out_dir / "batch_size.png")]


def report(result: dict) -> str:
    from bnlab.experiments._fcnet import NORM_LABELS  # noqa: PLC0415

    cfg, summary = result["config"], result["summary"]
    lines = [
        f"**Setup.** Fully connected net 784 → {' → '.join(map(str, cfg['hidden']))} → 10 "
        f"(ReLU after the norm; GroupNorm with {cfg['gn_groups']} groups), PyTorch-default "
        f"init, SGD momentum {cfg['momentum']}, lr = {cfg['lr_ref']} · B / {cfg['batch_ref']}, "
        f"{cfg['examples_seen']} examples seen at every batch size B, drawn from "
        f"{cfg['n_train']} Fashion-MNIST training images (standardized); test accuracy on "
        f"{cfg['n_test']} test images, BN in eval mode (running statistics, momentum 0.1).",
        "",
        "| batch size | " + " | ".join(NORM_LABELS[n] for n in cfg["norms"]) + " |",
        "|---|" + "---|" * len(cfg["norms"]),
    ]
    for i, b in enumerate(cfg["batch_sizes"]):
        cells = [fmt_pm(summary[n]["test_acc"][i]) for n in cfg["norms"]]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
