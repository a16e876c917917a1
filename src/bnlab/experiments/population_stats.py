"""``population-stats``: which statistics should batch norm use at inference?

Ioffe & Szegedy (Alg. 2) replace the batch statistics at inference by population statistics,
E[x] = E_B[μ_B] and Var[x] = m/(m−1)·E_B[σ²_B] over training batches with the final weights;
frameworks instead keep an exponential moving average (EMA) during training. One LeNet-BN per
seed is trained (d2l's setup) and its test accuracy is measured with each set of statistics:

* ``ema-0.1``        EMA with PyTorch momentum 0.1 (the default), as kept during training
* ``ema-0.01``       EMA with momentum 0.01 over the same training batches
* ``ema-0.1-few``    EMA with momentum 0.1 re-estimated from only ``few_steps`` batches at the
                     final weights (starting from the buffers' initial 0 and 1)
* ``population``     Ioffe's population statistics over one pass of the training set at the
                     final weights (:func:`bnlab.recalibrate.recalibrate`, cross-checked
                     against the engine's own cumulative average, momentum=None)
* ``precise``        the exact mean and (unbiased) variance of every value of each BN input in
                     that pass ("precise BN", Wu & Johnson 2021; ``method="precise"``)

During training the BN layers run with momentum 1.0, so after each step their buffers hold that
step's batch mean and unbiased variance (training itself uses batch statistics and is not
affected); both EMAs are then advanced with :func:`bnlab.functional.running.update_running_stats`.
"""

from __future__ import annotations

import numpy as np

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt, fmt_pm, mean_std

NAME = "population-stats"
TITLE = "Inference statistics for BN: moving averages vs population vs precise statistics"
CLAIM = (
    "Population statistics (mean of batch means, unbiased mean of batch variances) are the "
    "right inference statistics: at least as accurate as the moving averages frameworks keep."
)
SOURCE = "Ioffe & Szegedy 2015, Algorithm 2; d2l 8.5; Wu & Johnson 2021 (precise BN)"
STATS = ("ema-0.1", "ema-0.01", "ema-0.1-few", "population", "precise")
LABELS = {
    "ema-0.1": "moving average, momentum 0.1",
    "ema-0.01": "moving average, momentum 0.01",
    "ema-0.1-few": "moving average, momentum 0.1, few steps",
    "population": "population statistics (Ioffe Alg. 2)",
    "precise": "precise statistics (exact mean/var)",
}

_BUDGETS = {
    "full": dict(n_train=60000, n_test=10000, epochs=10, batch_size=256),
    "quick": dict(n_train=12800, n_test=2000, epochs=3, batch_size=128),
    "tiny": dict(n_train=256, n_test=100, epochs=1, batch_size=64),
}


def config(budget: str) -> dict:
    return {**_BUDGETS[budget], "lr": 1.0, "few_steps": 10, "momenta": [0.1, 0.01]}


def _ema_convention():
    """PyTorch's momentum meaning, fed with variances that are already unbiased."""
    from bnlab.conventions import NormConvention  # noqa: PLC0415

    return NormConvention("pytorch, unbiased input", 0.1, True, False, 1e-5)


def train_tracking_emas(model, train, cfg: dict, seed: int, bar) -> dict:
    """Train ``model``; return {momentum: EMA stats per BN layer} over the training batches."""
    from bnlab.experiments import _bn  # noqa: PLC0415
    from bnlab.experiments._train import train_steps  # noqa: PLC0415
    from bnlab.functional.running import update_running_stats  # noqa: PLC0415

    conv = _ema_convention()
    init = _bn.get_running(model)  # zeros and ones
    emas = {mom: [(m.copy(), v.copy()) for m, v in init] for mom in cfg["momenta"]}

    def on_step(step, loss):
        for mom, stats in emas.items():
            for (r_mean, r_var), (b_mean, b_var) in zip(stats, _bn.get_running(model), strict=True):
                # count is unused: the convention takes the variance as already unbiased
                update_running_stats(r_mean, r_var, b_mean, b_var, 2, mom, conv)
        bar.update(1, loss=loss)

    with _bn.momentum(model, 1.0):  # buffers = the last batch's mean and unbiased variance
        train_steps(model, train, batch_size=cfg["batch_size"], steps=_steps(cfg), lr=cfg["lr"],
                    seed=seed, on_step=on_step)  # fmt: skip
    return emas


def _steps(cfg: dict) -> int:
    return cfg["epochs"] * (cfg["n_train"] // cfg["batch_size"])


def few_step_ema(model, train, cfg: dict, seed: int) -> list:
    """EMA (momentum 0.1) from ``few_steps`` training-mode passes at the final weights."""
    from bnlab.experiments import _bn  # noqa: PLC0415
    from bnlab.experiments._data import batch_indices  # noqa: PLC0415
    from bnlab.nn import no_grad  # noqa: PLC0415

    with _bn.running_stats_restored(model), _bn.momentum(model, 0.1):
        for m in _bn.bn_layers(model):
            m.reset_running_stats()
        model.train()
        with no_grad():
            for idx in batch_indices(len(train), cfg["batch_size"], seed + 1, cfg["few_steps"]):
                model.forward(train.x[idx])
        return _bn.get_running(model)


def population_and_precise(model, train, cfg: dict) -> tuple[list, list, float]:
    """:func:`bnlab.recalibrate.recalibrate` over one pass of the training set (file order, full
    batches) at the final weights, with ``method="population"`` and ``"precise"``.

    Returns (population, precise, max |engine cumulative average − population|): the engine's
    own momentum=None buffers over the same batches must give Ioffe's population statistics too.
    """
    from bnlab.experiments import _bn  # noqa: PLC0415
    from bnlab.nn import no_grad  # noqa: PLC0415
    from bnlab.recalibrate import recalibrate  # noqa: PLC0415

    b = cfg["batch_size"]
    batches = [train.x[i : i + b] for i in range(0, len(train) - b + 1, b)]
    stats = {}
    for method in ("population", "precise"):
        with _bn.running_stats_restored(model):
            recalibrate(model, batches, method=method)
            stats[method] = _bn.get_running(model)
    with _bn.running_stats_restored(model), _bn.momentum(model, None):
        for m in _bn.bn_layers(model):
            m.reset_running_stats()
        model.train()
        with no_grad():
            for x in batches:
                model.forward(x)
        engine = _bn.get_running(model)
    check = max(
        float(max(np.abs(e_m - p_m).max(), np.abs(e_v - p_v).max()))
        for (e_m, e_v), (p_m, p_v) in zip(engine, stats["population"], strict=True)
    )
    return stats["population"], stats["precise"], check


def run_seed(cfg: dict, seed: int, progress) -> dict:
    from bnlab.experiments import _bn  # noqa: PLC0415
    from bnlab.experiments._data import fashion_mnist  # noqa: PLC0415
    from bnlab.experiments._train import evaluate  # noqa: PLC0415
    from bnlab.models import lenet_bn  # noqa: PLC0415

    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"], standardize=False)
    model = lenet_bn(seed)
    with progress(_steps(cfg), f"seed {seed}") as bar:
        emas = train_tracking_emas(model, train, cfg, seed, bar)
    population, precise, check = population_and_precise(model, train, cfg)
    stats = {
        "ema-0.1": emas[0.1],
        "ema-0.01": emas[0.01],
        "ema-0.1-few": few_step_ema(model, train, cfg, seed),
        "population": population,
        "precise": precise,
    }
    out = {"test_acc": {}, "test_loss": {}, "engine_vs_formula_max_abs_diff": check}
    for name, s in stats.items():
        _bn.set_running(model, s)
        out["test_loss"][name], out["test_acc"][name] = evaluate(model, test)
    # How far each set of statistics is from the population ones (relative, all layers).
    out["var_rel_diff_to_population"] = {
        name: float(
            max(np.max(np.abs(v / pv - 1)) for (_, v), (_, pv) in zip(s, population, strict=True))
        )
        for name, s in stats.items()
    }
    return out


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    return {
        "test_acc": {s: mean_std(r["test_acc"][s] for r in per_seed) for s in STATS},
        "test_loss": {s: mean_std(r["test_loss"][s] for r in per_seed) for s in STATS},
        "var_rel_diff_to_population": {
            s: mean_std(r["var_rel_diff_to_population"][s] for r in per_seed) for s in STATS
        },
        "engine_vs_formula_max_abs_diff": max(
            r["engine_vs_formula_max_abs_diff"] for r in per_seed
        ),
    }


def verdict(summary: dict, cfg: dict) -> Verdict:
    """Holds when population statistics are within 0.005 of (or above) every moving average."""
    acc = {s: summary["test_acc"][s]["mean"] for s in STATS}
    emas = [s for s in STATS if s.startswith("ema")]
    holds = all(acc["population"] >= acc[s] - 0.005 for s in emas)
    parts = ", ".join(f"{s} {fmt(acc[s])}" for s in STATS)
    return Verdict(
        holds,
        f"test accuracy: {parts}; criterion: population >= every moving average − 0.005. "
        f"Engine cumulative average vs bnlab.recalibrate: max abs diff "
        f"{fmt(summary['engine_vs_formula_max_abs_diff'])}.",
    )


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import new_figure, save_png  # noqa: PLC0415

    summary = result["summary"]["test_acc"]
    fig, ax = new_figure(size=(9.0, 4.2))
    means = [summary[s]["mean"] for s in STATS]
    errs = [summary[s]["std"] or 0.0 for s in STATS]
    colors = ["tab:blue", "tab:cyan", "tab:gray", "tab:green", "tab:olive"]
    ax.barh(range(len(STATS)), means, xerr=errs, color=colors, capsize=4, label="test accuracy")
    ax.set_yticks(range(len(STATS)), [LABELS[s] for s in STATS])
    ax.invert_yaxis()
    lo = min(m - e for m, e in zip(means, errs, strict=True))
    hi = max(m + e for m, e in zip(means, errs, strict=True))
    ax.set_xlim(max(0.0, lo - 0.05), min(1.0, hi + 0.02))
    ax.set_xlabel("test accuracy (mean ± std over seeds)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("LeNet-BN on Fashion-MNIST: test accuracy with each set of BN statistics")
    return [save_png(fig, out_dir / "population_stats.png")]


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    lines = [
        f"**Setup.** d2l's LeNet-BN, SGD lr {cfg['lr']}, batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs ({_steps(cfg)} steps) over {cfg['n_train']} Fashion-MNIST "
        f"training images; test accuracy on {cfg['n_test']} test images with each set of BN "
        f"statistics (same weights). Few steps = {cfg['few_steps']} batches. The last column is "
        f"the largest relative difference of any running variance from the population one.",
        "",
        "| inference statistics | test accuracy | test loss | max rel. var diff to population |",
        "|---|---|---|---|",
    ]
    for s in STATS:
        lines.append(
            f"| {LABELS[s]} | {fmt_pm(summary['test_acc'][s])} | "
            f"{fmt_pm(summary['test_loss'][s])} | "
            f"{fmt_pm(summary['var_rel_diff_to_population'][s])} |"
        )
    return "\n".join(lines)
