"""``bn-vs-none``: LeNet vs LeNet-BN on Fashion-MNIST at learning rates 1.0 and 0.1.

d2l ("Batch Normalization") trains LeNet-BN with lr 1.0 and notes that it converges faster
than plain LeNet and tolerates a large learning rate. Both models (d2l's definitions, sigmoid
activations, xavier init, :mod:`bnlab.models`) are trained here with plain SGD on the same
batches, at lr 1.0 and lr 0.1, and the loss and test-accuracy curves are recorded.
"""

from __future__ import annotations

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "bn-vs-none"
TITLE = "LeNet vs LeNet-BN on Fashion-MNIST at lr 1.0 and lr 0.1"
CLAIM = (
    "With batch normalization LeNet trains faster and tolerates the large learning rate (lr 1.0)."
)
SOURCE = "d2l 8.5 Batch Normalization; Ioffe & Szegedy 2015, sec. 3.3 and 4.2"
MODELS = ("lenet", "lenet-bn")
LABELS = {"lenet": "LeNet", "lenet-bn": "LeNet-BN"}

_BUDGETS = {
    "full": dict(n_train=60000, n_test=10000, epochs=10, batch_size=256, n_evals=20),
    "quick": dict(n_train=12800, n_test=2000, epochs=3, batch_size=128, n_evals=6),
    "tiny": dict(n_train=256, n_test=100, epochs=1, batch_size=64, n_evals=2),
}


def config(budget: str) -> dict:
    return {**_BUDGETS[budget], "lrs": [1.0, 0.1], "models": list(MODELS)}


def variant(model: str, lr: float) -> str:
    return f"{model}@lr{lr:g}"


def run_seed(cfg: dict, seed: int, progress) -> dict:
    """Learning curve of each (model, lr), keyed ``"lenet-bn@lr1"`` etc."""
    from bnlab.experiments._data import fashion_mnist  # noqa: PLC0415
    from bnlab.experiments._train import train_with_curve  # noqa: PLC0415
    from bnlab.models import build_model  # noqa: PLC0415

    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"], standardize=False)
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    out = {}
    with progress(steps * len(cfg["models"]) * len(cfg["lrs"]), f"seed {seed}") as bar:
        for lr in cfg["lrs"]:
            for name in cfg["models"]:
                key = variant(name, lr)
                out[key] = train_with_curve(
                    build_model(name, seed),
                    train,
                    test,
                    batch_size=cfg["batch_size"],
                    steps=steps,
                    lr=lr,
                    seed=seed,
                    n_evals=cfg["n_evals"],
                    on_step=lambda step, loss, key=key: bar.update(1, run=key, loss=loss),
                )
    return out


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    summary = {}
    for lr in cfg["lrs"]:
        for name in cfg["models"]:
            key = variant(name, lr)
            runs = [run[key] for run in per_seed]
            summary[key] = {
                "final_test_acc": mean_std(r["test_acc"][-1] for r in runs),
                "first_test_acc": mean_std(r["test_acc"][0] for r in runs),
                "final_train_loss": mean_std(r["train_loss"][-1] for r in runs),
                "test_acc_curve": [
                    mean_std(r["test_acc"][i] for r in runs) for i in range(len(runs[0]["step"]))
                ],
            }
    return summary


def verdict(summary: dict, cfg: dict) -> Verdict:
    """Faster: LeNet-BN's test accuracy at the first evaluation point beats LeNet's at both lrs.
    Tolerates lr 1.0: LeNet-BN at lr 1.0 is within 0.01 of (or above) LeNet-BN at lr 0.1."""

    def acc(model, lr, what="final_test_acc"):
        return summary[variant(model, lr)][what]["mean"]

    hi, lo = max(cfg["lrs"]), min(cfg["lrs"])
    faster = all(
        (acc("lenet-bn", lr, "first_test_acc") or 0) > (acc("lenet", lr, "first_test_acc") or 0)
        for lr in cfg["lrs"]
    )
    tolerant = (acc("lenet-bn", hi) or 0) >= (acc("lenet-bn", lo) or 0) - 0.01
    parts = "; ".join(
        f"lr {lr:g}: LeNet-BN {fmt(acc('lenet-bn', lr, 'first_test_acc'))} → "
        f"{fmt(acc('lenet-bn', lr))}, LeNet {fmt(acc('lenet', lr, 'first_test_acc'))} → "
        f"{fmt(acc('lenet', lr))}"
        for lr in cfg["lrs"]
    )
    text = (
        f"test accuracy at the first evaluation → at the end: {parts}. Faster at both lrs: "
        f"{'yes' if faster else 'no'}; LeNet-BN at lr {hi:g} within 0.01 of lr {lo:g}: "
        f"{'yes' if tolerant else 'no'}."
    )
    return Verdict(faster and tolerant, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import new_figure, save_png  # noqa: PLC0415

    cfg = result["config"]
    styles = {"lenet": "tab:red", "lenet-bn": "tab:blue"}
    fig, axes = new_figure(1, 2)
    for lr, dash in zip(cfg["lrs"], ("-", "--"), strict=False):
        for name in cfg["models"]:
            key = variant(name, lr)
            steps = result["per_seed"][0][key]["step"]
            examples = [s * cfg["batch_size"] for s in steps]
            label = f"{LABELS[name]}, lr {lr:g}"
            for ax, metric in zip(axes[0], ("train_loss", "test_acc"), strict=True):
                runs = [run[key][metric] for run in result["per_seed"]]
                mean = [_nanmean(vals) for vals in zip(*runs, strict=True)]
                ax.plot(examples, mean, dash, color=styles[name], marker="o", ms=3, label=label)
    axes[0][0].set(
        xlabel="training examples seen",
        ylabel="training loss (mean over seeds)",
        yscale="log",
        title="training loss",
    )
    axes[0][1].set(
        xlabel="training examples seen",
        ylabel="test accuracy (mean over seeds)",
        ylim=(0, 1),
        title="test accuracy",
    )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LeNet vs LeNet-BN on Fashion-MNIST (d2l), SGD at lr 1.0 and 0.1")
    return [save_png(fig, out_dir / "bn_vs_none.png")]


def _nanmean(vals) -> float:
    finite = [v for v in vals if v is not None]
    return sum(finite) / len(finite) if finite else float("nan")


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    lines = [
        f"**Setup.** d2l's LeNet and LeNet-BN (sigmoid, average pooling, xavier init), plain SGD "
        f"(no momentum, no weight decay), batch {cfg['batch_size']}, {cfg['epochs']} epochs "
        f"({steps} steps) over {cfg['n_train']} Fashion-MNIST training images (pixels in "
        f"[0, 1], as d2l); test accuracy on {cfg['n_test']} test images, evaluated "
        f"{cfg['n_evals']} times during training. Same initial weights and batches per seed.",
        "",
        "| model | lr | test acc after 1st eval | final test acc | final train loss |",
        "|---|---|---|---|---|",
    ]
    for lr in cfg["lrs"]:
        for name in cfg["models"]:
            s = summary[variant(name, lr)]
            lines.append(
                f"| {LABELS[name]} | {lr:g} | {fmt_pm(s['first_test_acc'])} | "
                f"{fmt_pm(s['final_test_acc'])} | {fmt_pm(s['final_train_loss'])} |"
            )
    return "\n".join(lines)
