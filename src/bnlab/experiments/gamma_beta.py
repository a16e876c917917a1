"""``gamma-beta``: the learned scale γ and shift β of every BN layer of LeNet-BN.

d2l ends its batch-norm section by printing the learned ``gamma`` and ``beta`` of the first BN
layer. Here LeNet-BN is trained as in d2l and the distribution of γ and β per BN layer is
plotted. A channel is *effectively turned off* when |γ| < ``off_threshold``: its output is then
nearly the constant β whatever the input (BN output std = |γ|; the following sigmoid has slope
<= 1/4, so the channel varies by less than ``off_threshold``/4 after it).
"""

from __future__ import annotations

import numpy as np

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "gamma-beta"
TITLE = "Learned γ and β per BN layer of LeNet-BN, and how many channels are turned off"
CLAIM = (
    "The network uses BN's learnable γ and β: they move away from their initial values "
    "(1 and 0), and it effectively turns some channels off (|γ| ≈ 0)."
)
SOURCE = "d2l 8.5 (prints net[1].gamma, net[1].beta); Ioffe & Szegedy 2015, sec. 3"
LAYER_NAMES = ("BN2d(6) after conv1", "BN2d(16) after conv2", "BN1d(120) after fc1",
               "BN1d(84) after fc2")  # fmt: skip

_BUDGETS = {
    "full": dict(n_train=60000, n_test=10000, epochs=10, batch_size=256),
    "quick": dict(n_train=12800, n_test=2000, epochs=4, batch_size=128),
    "tiny": dict(n_train=256, n_test=100, epochs=1, batch_size=64),
}


def config(budget: str) -> dict:
    return {**_BUDGETS[budget], "lr": 1.0, "off_threshold": 0.1}


def run_seed(cfg: dict, seed: int, progress) -> dict:
    from bnlab.experiments._bn import bn_layers  # noqa: PLC0415
    from bnlab.experiments._data import fashion_mnist  # noqa: PLC0415
    from bnlab.experiments._train import evaluate, train_steps  # noqa: PLC0415
    from bnlab.models import lenet_bn  # noqa: PLC0415

    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"], standardize=False)
    model = lenet_bn(seed)
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    with progress(steps, f"seed {seed}") as bar:
        train_steps(model, train, batch_size=cfg["batch_size"], steps=steps, lr=cfg["lr"],
                    seed=seed, on_step=lambda step, loss: bar.update(1, loss=loss))  # fmt: skip
    layers = bn_layers(model)
    return {
        "gamma": [m.weight.data.astype(float).tolist() for m in layers],
        "beta": [m.bias.data.astype(float).tolist() for m in layers],
        "test_acc": evaluate(model, test)[1],
    }


def off_fraction(gamma: list[float], threshold: float) -> float:
    """Fraction of channels with |γ| < threshold."""
    return float(np.mean(np.abs(np.asarray(gamma)) < threshold))


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    n_layers = len(per_seed[0]["gamma"])
    thr = cfg["off_threshold"]
    layers = []
    for i in range(n_layers):
        g = [run["gamma"][i] for run in per_seed]
        b = [run["beta"][i] for run in per_seed]
        layers.append(
            {
                "off_fraction": mean_std(off_fraction(x, thr) for x in g),
                "negative_gamma_fraction": mean_std(float(np.mean(np.less(x, 0))) for x in g),
                "mean_abs_gamma_minus_1": mean_std(
                    float(np.mean(np.abs(np.subtract(x, 1)))) for x in g
                ),  # fmt: skip
                "mean_abs_beta": mean_std(float(np.mean(np.abs(x))) for x in b),
            }
        )
    all_off = [off_fraction([v for layer in run["gamma"] for v in layer], thr) for run in per_seed]
    return {
        "layers": layers,
        "off_fraction_all": mean_std(all_off),
        "test_acc": mean_std(run["test_acc"] for run in per_seed),
    }


def verdict(summary: dict, cfg: dict) -> Verdict:
    """Holds when γ, β moved (mean |γ−1| or |β| > 0.1 in some layer) and some channel is off."""
    off = summary["off_fraction_all"]["mean"]
    max_dg = max(layer["mean_abs_gamma_minus_1"]["mean"] for layer in summary["layers"])
    max_b = max(layer["mean_abs_beta"]["mean"] for layer in summary["layers"])
    per_layer = ", ".join(
        f"layer {i + 1} {fmt(layer['off_fraction']['mean'])}"
        for i, layer in enumerate(summary["layers"])
    )
    text = (
        f"fraction of channels with |γ| < {cfg['off_threshold']}: {fmt(off)} overall "
        f"({per_layer}); largest per-layer mean |γ − 1| {fmt(max_dg)}, largest mean |β| "
        f"{fmt(max_b)}; test accuracy {fmt_pm(summary['test_acc'])}."
    )
    return Verdict(max(max_dg, max_b) > 0.1 and off > 0, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import new_figure, save_png  # noqa: PLC0415

    runs = result["per_seed"]
    thr = result["config"]["off_threshold"]
    n_layers = len(runs[0]["gamma"])
    fig, axes = new_figure(2, n_layers, size=(3.6, 3.0))
    for i in range(n_layers):
        gammas = np.concatenate([run["gamma"][i] for run in runs])
        betas = np.concatenate([run["beta"][i] for run in runs])
        ax = axes[0][i]
        ax.hist(gammas, bins=30, color="tab:blue", label=f"γ ({len(runs)} seeds pooled)")
        ax.axvspan(-thr, thr, color="tab:red", alpha=0.15, label=f"|γ| < {thr}: off")
        ax.axvline(1.0, color="k", ls=":", label="initial γ = 1")
        ax.set(title=LAYER_NAMES[i] if i < len(LAYER_NAMES) else f"BN layer {i + 1}",
               xlabel="γ", ylabel="channels")  # fmt: skip
        ax = axes[1][i]
        ax.hist(betas, bins=30, color="tab:orange", label="β")
        ax.axvline(0.0, color="k", ls=":", label="initial β = 0")
        ax.set(xlabel="β", ylabel="channels")
        for ax in (axes[0][i], axes[1][i]):
            ax.legend(fontsize="x-small")
    fig.suptitle("LeNet-BN on Fashion-MNIST: learned γ (top) and β (bottom) per BN layer")
    return [save_png(fig, out_dir / "gamma_beta.png")]


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    steps = cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])
    lines = [
        f"**Setup.** d2l's LeNet-BN, SGD lr {cfg['lr']}, batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs ({steps} steps) over {cfg['n_train']} Fashion-MNIST training "
        f"images; γ, β read from the trained BN layers. Off = |γ| < {cfg['off_threshold']}.",
        "",
        "| BN layer | channels off | γ < 0 | mean abs(γ − 1) | mean abs(β) |",
        "|---|---|---|---|---|",
    ]
    for i, layer in enumerate(summary["layers"]):
        lines.append(
            f"| {LAYER_NAMES[i] if i < len(LAYER_NAMES) else i + 1} | "
            f"{fmt_pm(layer['off_fraction'])} | {fmt_pm(layer['negative_gamma_fraction'])} | "
            f"{fmt_pm(layer['mean_abs_gamma_minus_1'])} | {fmt_pm(layer['mean_abs_beta'])} |"
        )
    lines += ["", f"Test accuracy of the trained nets: {fmt_pm(summary['test_acc'])}."]
    return "\n".join(lines)
