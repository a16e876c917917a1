"""``covariate-shift``: how the distribution of each layer's input drifts over training, ±BN.

Ioffe & Szegedy (2015, fig. 1) train a fully connected net with three hidden layers of 100
sigmoid units and show that with BN the distribution of a sigmoid's input stays put, while
without BN it moves ("internal covariate shift"). Here, every ``measure_every`` steps, a fixed
probe batch of training images is passed through the net in training mode (BN uses the probe's
batch statistics, as training does; running statistics are restored afterwards) and, for each
hidden layer ℓ, the mean m_ℓ(t), std s_ℓ(t) and 15/50/85th percentiles of the sigmoid inputs
are recorded.

Drift of layer ℓ = path length of its statistics, Σ_t |m_ℓ(t+1) − m_ℓ(t)| + |s_ℓ(t+1) − s_ℓ(t)|.
"""

from __future__ import annotations

import numpy as np

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "covariate-shift"
TITLE = "Drift of per-layer activation statistics over training, with and without BatchNorm"
CLAIM = (
    "Batch norm reduces internal covariate shift: the distribution of each layer's input "
    "drifts much less over training with BN than without."
)
SOURCE = "Ioffe & Szegedy 2015, sec. 4.1 and fig. 1; d2l 8.5 (which questions the explanation)"
VARIANTS = ("bn", "none")
PERCENTILES = (15, 50, 85)

_BUDGETS = {
    "full": dict(steps=10000, measure_every=200, n_train=50000, n_test=10000),
    "quick": dict(steps=2400, measure_every=100, n_train=12000, n_test=1000),
    "tiny": dict(steps=20, measure_every=10, n_train=300, n_test=100, probe_size=64),
}


def config(budget: str) -> dict:
    return {  # the budget comes last: it may override the probe size
        "hidden": [100, 100, 100],
        "activation": "sigmoid",
        "batch_size": 60,
        "lr": 0.1,
        "momentum": 0.9,
        "probe_size": 256,
        **_BUDGETS[budget],
    }


def sigmoid_inputs(model, x: np.ndarray) -> list[np.ndarray]:
    """Inputs of every Sigmoid for batch ``x``, computed in training mode without changing any
    state: BN uses the batch's statistics and its running buffers are restored afterwards."""
    from bnlab import nn  # noqa: PLC0415

    saved = {k: v.copy() for k, v in model.state_dict().items()}
    model.train()
    inputs = []
    with nn.no_grad():
        for layer in model:
            if isinstance(layer, nn.Sigmoid):
                inputs.append(np.array(x, dtype=np.float64))
            x = layer.forward(x)
    model.load_state_dict(saved)
    return inputs


def layer_stats(inputs: list[np.ndarray]) -> dict:
    """Per layer: mean, std and the PERCENTILES of all values (probe examples × units)."""
    return {
        "mean": [float(a.mean()) for a in inputs],
        "std": [float(a.std()) for a in inputs],
        "percentiles": [[float(p) for p in np.percentile(a, PERCENTILES)] for a in inputs],
    }


def drift(means: list[float], stds: list[float]) -> float:
    """Σ_t |Δmean| + |Δstd| along one layer's trajectory."""
    return float(np.abs(np.diff(means)).sum() + np.abs(np.diff(stds)).sum())


def run_seed(cfg: dict, seed: int, progress) -> dict:
    from bnlab.experiments._data import fashion_mnist, flat  # noqa: PLC0415
    from bnlab.experiments._fcnet import fc_net  # noqa: PLC0415
    from bnlab.experiments._train import evaluate, train_steps  # noqa: PLC0415

    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"])
    train, test = flat(train), flat(test)
    probe = train.x[: cfg["probe_size"]]
    out = {}
    with progress(len(VARIANTS) * cfg["steps"], f"seed {seed}") as bar:
        for v in VARIANTS:
            model = fc_net(v, tuple(cfg["hidden"]), activation=cfg["activation"], seed=seed)
            trace = {"step": [], "test_acc": [], "layers": []}

            def measure(step: int, model=model, trace=trace) -> None:
                trace["step"].append(step)
                trace["layers"].append(layer_stats(sigmoid_inputs(model, probe)))
                trace["test_acc"].append(evaluate(model, test)[1])

            def on_step(step, loss, v=v, measure=measure) -> None:
                if (step + 1) % cfg["measure_every"] == 0:
                    measure(step + 1)
                bar.update(1, variant=v, loss=loss)

            measure(0)
            train_steps(
                model,
                train,
                batch_size=cfg["batch_size"],
                steps=cfg["steps"],
                lr=cfg["lr"],
                momentum=cfg["momentum"],
                seed=seed,
                on_step=on_step,
            )
            n_layers = len(cfg["hidden"])
            means = [[t["mean"][i] for t in trace["layers"]] for i in range(n_layers)]
            stds = [[t["std"][i] for t in trace["layers"]] for i in range(n_layers)]
            trace["drift"] = [drift(means[i], stds[i]) for i in range(n_layers)]
            out[v] = trace
    return out


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    n_layers = len(cfg["hidden"])
    summary = {}
    for v in VARIANTS:
        summary[v] = {
            "drift": [mean_std(run[v]["drift"][i] for run in per_seed) for i in range(n_layers)],
            "mean_drift": mean_std(float(np.mean(run[v]["drift"])) for run in per_seed),
            "final_test_acc": mean_std(run[v]["test_acc"][-1] for run in per_seed),
        }
    summary["drift_ratio_bn_to_none"] = (
        summary["bn"]["mean_drift"]["mean"] / summary["none"]["mean_drift"]["mean"]
    )
    return summary


def verdict(summary: dict, cfg: dict) -> Verdict:
    ratio = summary["drift_ratio_bn_to_none"]
    holds = ratio < 0.5
    text = (
        f"mean drift over the {len(cfg['hidden'])} hidden layers: "
        f"{fmt_pm(summary['bn']['mean_drift'])} with BN vs "
        f"{fmt_pm(summary['none']['mean_drift'])} without (ratio {fmt(ratio)}); final test "
        f"accuracy {fmt_pm(summary['bn']['final_test_acc'])} vs "
        f"{fmt_pm(summary['none']['final_test_acc'])}; criterion: BN drift < half the no-BN drift."
    )
    return Verdict(holds, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import COLORS, new_figure, save_png  # noqa: PLC0415

    run, summary = result["per_seed"][0], result["summary"]  # trajectories: seed 0
    n_layers = len(result["config"]["hidden"])
    fig, axes = new_figure(1, 4, size=(4.4, 4.0))
    ax = axes[0][0]
    for v, label in (("bn", "with BN"), ("none", "without BN")):
        ax.plot(run[v]["step"], run[v]["test_acc"], color=COLORS[v], label=label)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy, seed 0")
    ax.legend()
    last = n_layers - 1
    limits = []
    for ax, v, tag in zip(axes[0][1:3], ("none", "bn"), ("b", "c"), strict=True):
        p = np.array([t["percentiles"][last] for t in run[v]["layers"]])
        for k, q in enumerate(PERCENTILES):
            ax.plot(run[v]["step"], p[:, k], color=COLORS[v], lw=2 if q == 50 else 1,
                    ls="-" if q == 50 else "--", label=f"{q}th percentile")  # fmt: skip
        ax.set(xlabel="training step", ylabel=f"input of the layer-{last + 1} sigmoids",
               title=f"({tag}) {'without' if v == 'none' else 'with'} BN, seed 0")  # fmt: skip
        ax.legend(fontsize="small")
        limits += list(ax.get_ylim())
    for ax in axes[0][1:3]:
        ax.set_ylim(min(limits), max(limits))
    ax = axes[0][3]
    x = np.arange(n_layers)
    for offset, v, label in ((-0.2, "bn", "with BN"), (0.2, "none", "without BN")):
        stats = summary[v]["drift"]
        ax.bar(x + offset, [s["mean"] for s in stats], width=0.4, color=COLORS[v], label=label,
               yerr=[s["std"] or 0.0 for s in stats], capsize=3)  # fmt: skip
    ax.set_xticks(x, [f"layer {i + 1}" for i in x])
    ax.set(ylabel="drift Σ|Δmean| + |Δstd| (mean ± std over seeds)", title="(d) drift per layer")
    ax.legend()
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.suptitle("Internal covariate shift (Ioffe & Szegedy fig. 1): sigmoid inputs ±BN")
    return [save_png(fig, out_dir / "covariate_shift.png")]


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    lines = [
        f"**Setup.** Fully connected net 784 → {' → '.join(map(str, cfg['hidden']))} → 10 with "
        f"sigmoid units (BatchNorm1d before every sigmoid in the BN variant), SGD lr "
        f"{cfg['lr']}, momentum {cfg['momentum']}, batch {cfg['batch_size']}, {cfg['steps']} "
        f"steps on {cfg['n_train']} Fashion-MNIST training images (standardized). Every "
        f"{cfg['measure_every']} steps a fixed probe of {cfg['probe_size']} training images "
        f"is passed in training mode and the statistics of every sigmoid's input are recorded. "
        f"Drift = Σ_t |Δmean| + |Δstd| over the whole run. The figure shows seed 0.",
        "",
        "| hidden layer | drift with BN | drift without BN |",
        "|---|---|---|",
    ]
    for i in range(len(cfg["hidden"])):
        lines.append(
            f"| {i + 1} | {fmt_pm(summary['bn']['drift'][i])} | "
            f"{fmt_pm(summary['none']['drift'][i])} |"
        )
    lines.append(
        f"| mean | {fmt_pm(summary['bn']['mean_drift'])} | "
        f"{fmt_pm(summary['none']['mean_drift'])} |"
    )
    return "\n".join(lines)
