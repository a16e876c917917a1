"""Training loop, evaluation, metrics.json, checkpoints and report.md for bnlab's own engine.

One epoch = one pass over the training set in the seeded order of :mod:`bnlab.data.batches`
(a pure function of (seed, epoch)), SGD on the cross-entropy loss, then test accuracy in eval
mode. After every epoch the run folder gets, each written atomically:

    checkpoint.safetensors + checkpoint.json   model, optimizer, epoch, RNG key (resumable)
    metrics.json   {"config": {...}, "epochs": [{"epoch", "train_loss", "train_acc", "test_acc",
                   "examples_per_s", "seconds"}, ...]}
    report.md      curves (loss.png, accuracy.png) and the learned BN γ and β

``train(config, out, resume=True)`` continues from the checkpoint bit-identically: the model,
BN buffers, momentum buffers and the epoch counter are restored and batches depend only on
(seed, epoch).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bnlab import nn
from bnlab.checkpoint import load_checkpoint, paths, save_checkpoint
from bnlab.models import MODELS, build_model
from bnlab.optim import SGD
from bnlab.progress import Progress


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in metrics.json and the checkpoint).

    ``train_limit``/``test_limit`` keep only the first N examples of each split (quick runs).
    """

    model: str = "lenet-bn"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1.0
    seed: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    train_limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 1000

    def validate(self) -> TrainConfig:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        _int(self.epochs, "epochs", 0)
        _int(self.batch_size, "batch_size", 1)
        _int(self.seed, "seed", 0)
        _int(self.eval_batch_size, "eval_batch_size", 1)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, 1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        return self

    def resumable_with(self, other: dict) -> list[str]:
        """Fields (other than ``epochs``) that differ from a stored config."""
        mine = asdict(self)
        return [k for k in mine if k != "epochs" and other.get(k) != mine[k]]


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- data


@dataclass
class Splits:
    """uint8 images (N, 28, 28) and integer labels (N,) of both splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_splits(config: TrainConfig, root=None) -> Splits:
    """Fashion-MNIST from disk (never downloaded), cut to the config's limits."""
    from bnlab.data import load_fashion_mnist

    tr_x, tr_y = load_fashion_mnist("train", root)
    te_x, te_y = load_fashion_mnist("test", root)
    return limit_splits(Splits(tr_x, tr_y, te_x, te_y), config)


def limit_splits(s: Splits, config: TrainConfig) -> Splits:
    a, b = config.train_limit, config.test_limit
    return Splits(s.train_images[:a], s.train_labels[:a], s.test_images[:b], s.test_labels[:b])


# --------------------------------------------------------------------------- steps


def train_step(model: nn.Module, loss_fn, optimizer: SGD, x, y) -> tuple[float, int]:
    """Forward, backward, SGD update on one batch; returns (mean loss, number correct)."""
    optimizer.zero_grad()
    logits = model(x)
    loss = loss_fn(logits, y)
    model.backward(loss_fn.backward())
    optimizer.step()
    return loss, int((logits.argmax(axis=1) == y).sum())


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size=1000) -> float:
    """Accuracy in eval mode (running BN statistics); the model's mode is restored after."""
    from bnlab.data import batches

    was_training = model.training
    model.eval()
    correct = 0
    try:
        with nn.no_grad():
            for x, y in batches(images, labels, batch_size, shuffle=False):
                correct += int((model(x).argmax(axis=1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


def train_epoch(
    model,
    loss_fn,
    optimizer,
    splits: Splits,
    config: TrainConfig,
    epoch: int,
    progress: bool | None = None,
) -> dict:
    """One epoch (``epoch`` counts from 0); returns its metrics row (without test_acc)."""
    from bnlab.data import batches

    it = batches(
        splits.train_images, splits.train_labels, config.batch_size, seed=config.seed, epoch=epoch
    )
    loss_sum, correct, seen = 0.0, 0, 0
    model.train()
    desc = f"epoch {epoch + 1}/{config.epochs}"
    start = time.perf_counter()
    with Progress(len(it), desc, enabled=progress) as bar:
        for x, y in it:
            loss, ok = train_step(model, loss_fn, optimizer, x, y)
            loss_sum += loss * len(y)
            correct += ok
            seen += len(y)
            bar.update(1, loss=loss)
    return epoch_row(epoch, loss_sum, correct, seen, time.perf_counter() - start)


def epoch_row(epoch: int, loss_sum: float, correct: int, seen: int, seconds: float) -> dict:
    """The metrics.json row of one epoch (``epoch`` counts from 0; test_acc is added later):
    mean loss and accuracy over the ``seen`` training examples, examples per second."""
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "examples_per_s": seen / seconds,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- the run


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare_model(config: TrainConfig) -> tuple[nn.Module, SGD]:
    model = build_model(config.model, seed=config.seed)
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    first.input_grad = False  # nothing upstream of the first layer needs dL/dx
    opt = SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return model, opt


def train(
    config: TrainConfig,
    out,
    *,
    resume: bool = False,
    splits: Splits | None = None,
    data_root=None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    report: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a run in folder ``out``; returns the metrics dict also in metrics.json.

    ``splits`` overrides the data (tests); otherwise Fashion-MNIST is loaded from ``data_root``
    or the default locations. Raises FileExistsError when ``out`` already holds a checkpoint
    and neither ``resume`` nor ``overwrite`` is set (``overwrite`` first deletes the files a
    previous run wrote there), and ValueError when resuming with an incompatible config.
    """
    config.validate()
    log = log or (lambda s: print(s, flush=True))
    out = Path(out)
    model, opt = prepare_model(config)
    metrics = {"config": asdict(config), "epochs": []}
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    start_epoch = _restore(config, out, model, opt, metrics) if resume else _fresh(out, overwrite)
    splits = limit_splits(splits, config) if splits is not None else load_splits(config, data_root)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, config.epochs):
        row = train_epoch(model, loss_fn, opt, splits, config, epoch, progress)
        row["test_acc"] = evaluate(
            model, splits.test_images, splits.test_labels, config.eval_batch_size
        )
        metrics["epochs"].append(row)
        metrics["peak_rss_mb"] = peak_rss_mb()
        _save_epoch(out, model, opt, config, metrics, epoch + 1)
        log(format_epoch(row, config.epochs))
    if metrics["epochs"] and has_batch_norm(model):
        metrics["population_stats"] = population_stats_accuracy(model, splits, config)
        _write_metrics(out, metrics)
        log(
            f"test_acc with population statistics (BN paper, Alg. 2): "
            f"{metrics['population_stats']['test_acc']:.4f}"
        )
    if report:
        write_report(out, metrics, model)
    return metrics


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def population_stats_accuracy(model: nn.Module, splits: Splits, config: TrainConfig) -> dict:
    """Test accuracy of a *copy* of the model whose BN statistics are the population statistics
    of the training set (mean of batch means, unbiased mean of batch variances: Ioffe & Szegedy
    2015, Algorithm 2) instead of the moving averages d2l uses. The trained model, its
    checkpoint and resume are untouched: this is an extra number, reported next to test_acc.
    """
    from bnlab.data import batches
    from bnlab.recalibrate import recalibrate

    twin = build_model(config.model, seed=0)
    twin.load_state_dict(model.state_dict())
    it = batches(
        splits.train_images,
        splits.train_labels,
        config.batch_size,
        shuffle=False,
        drop_last=len(splits.train_labels) > config.batch_size,
    )
    with nn.no_grad():
        summary = recalibrate(twin, it)
    acc = evaluate(twin, splits.test_images, splits.test_labels, config.eval_batch_size)
    return {"test_acc": acc, "batches": summary.batches_used, "method": "population"}


RUN_FILES = (
    "checkpoint.safetensors",
    "checkpoint.json",
    "metrics.json",
    "report.md",
    "loss.png",
    "accuracy.png",
)


def _fresh(out: Path, overwrite: bool) -> int:
    weights, _ = paths(out)
    if weights.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a checkpoint; pass --resume to continue it, --overwrite to "
            "start again, or choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # only the files a run writes; anything else in the folder is left alone
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return 0


def _restore(config: TrainConfig, out: Path, model, opt, metrics: dict) -> int:
    ckpt = load_checkpoint(out, expect_model=config.model)
    bad = config.resumable_with(ckpt.meta.get("config", {}))
    if bad:
        raise ValueError(
            f"cannot resume {out}: these settings differ from the checkpoint's: {bad} "
            f"(stored: { {k: ckpt.meta.get('config', {}).get(k) for k in bad} })"
        )
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(ckpt.optim_state)
    metrics["epochs"] = list(ckpt.meta.get("epochs", []))[: ckpt.epoch]
    return ckpt.epoch


def _save_epoch(out: Path, model, opt, config: TrainConfig, metrics: dict, epochs_done: int):
    extra = {
        "config": asdict(config),
        "rng": {
            "data_order": "numpy default_rng([seed, epoch]).permutation",
            "seed": config.seed,
            "next_epoch": epochs_done,
        },
        "epochs": metrics["epochs"],
    }
    save_checkpoint(out, model, opt, model_name=config.model, epoch=epochs_done, extra=extra)
    _write_metrics(out, metrics)


def _write_metrics(out: Path, metrics: dict) -> None:
    from bnlab.io import atomic_write_json

    atomic_write_json(out / "metrics.json", metrics)


def format_epoch(row: dict, total: int) -> str:
    return (
        f"epoch {row['epoch']:>2}/{total}  train_loss {row['train_loss']:.4f}  "
        f"train_acc {row['train_acc']:.4f}  test_acc {row['test_acc']:.4f}  "
        f"{row['examples_per_s']:,.0f} examples/s  ({row['seconds']:.1f} s)"
    )


# --------------------------------------------------------------------------- report


def bn_parameters(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, γ, β) of every affine batch-norm layer, in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            out.append((name, m.weight.data.copy(), m.bias.data.copy()))
    return out


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


def _vector(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(a):.3f}" for a in v) + "]"


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


def reproduce_command(cfg: dict, out) -> str:
    """The ``bnlab train`` command line that reruns this configuration (either engine)."""
    flags = " ".join(
        f"--{k.replace('_', '-')} {cfg[k]}" for k in _CLI_FLAGS if cfg.get(k) is not None
    )
    if cfg.get("engine") == "torch":
        flags += f" --engine torch --nproc {cfg.get('world_size', 1)}"
    return f"bnlab train {flags} --out {out}"


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


def render_report(metrics: dict, bn: list, figures: list[str], out=".") -> str:
    cfg = metrics["config"]
    rows = metrics["epochs"]
    lines = [
        f"# bnlab training report: {cfg['model']}",
        "",
        f"Command: `{reproduce_command(cfg, out)}`",
        "",
    ]
    if rows:
        last = rows[-1]
        lines += [
            f"Final test accuracy: **{last['test_acc']:.4f}** after {last['epoch']} epochs "
            f"(peak RSS {metrics.get('peak_rss_mb', float('nan')):.0f} MiB).",
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


def write_report(out: Path, metrics: dict, model: nn.Module) -> Path:
    """report.md (+ loss.png, accuracy.png) in ``out``; returns the report path."""
    from bnlab.io import atomic_write_text

    figures = plot_curves(out, metrics["epochs"])
    text = render_report(metrics, bn_parameters(model), figures, out)
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def read_metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
