"""Training loop, evaluation, metrics.json, checkpoints and report.md for bnlab's own engine.

One epoch = one pass over the training set in the seeded order of :mod:`bnlab.data.batches`
(a pure function of (seed, epoch)), SGD on the cross-entropy loss, then test accuracy in eval
mode. After every epoch the run folder gets, each written atomically:

    checkpoint.safetensors + checkpoint.json   model, optimizer, epoch, RNG key (resumable)
    metrics.json   {"config": {...}, "data": {folder, files with bytes and sha256},
                   "epochs": [{"epoch", "train_loss", "train_acc", "test_acc",
                   "examples_per_s", "seconds"}, ...]}
    report.md      curves (loss.png, accuracy.png) and the learned BN γ and β

The folder's rules (one owner at a time, --overwrite acting only once the new run has something
to write, writability checked first) are :mod:`bnlab.runs`'. A loss or weight that stops being
finite ends the run with :class:`bnlab.errors.TrainingDiverged`; the folder then holds the last
finite epoch's files, all valid JSON.

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
from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.models import MODELS, build_model
from bnlab.optim import SGD
from bnlab.progress import Progress
from bnlab.runs import RunFolder, data_mismatch, resume_error

ENGINES = ("numpy", "torch")


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
    engine: str = "numpy"

    def validate(self) -> TrainConfig:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
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


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- data


@dataclass
class Splits:
    """uint8 images (N, 28, 28) and integer labels (N,) of both splits; ``source`` says where
    they came from (folder, files, sizes, sha256) when they were read from disk."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: dict | None = None


def load_splits(config: TrainConfig, root=None) -> Splits:
    """Fashion-MNIST from disk (never downloaded), cut to the config's limits. ``root`` (or
    ``$BNLAB_DATA``), when given, is the only folder used (see :func:`find_fashion_mnist`)."""
    from bnlab.data import find_fashion_mnist, load_fashion_mnist
    from bnlab.data.fashion_mnist import data_source

    folder = find_fashion_mnist(root)
    tr_x, tr_y = load_fashion_mnist("train", folder)
    te_x, te_y = load_fashion_mnist("test", folder)
    return limit_splits(Splits(tr_x, tr_y, te_x, te_y, data_source(folder)), config)


def limit_splits(s: Splits, config: TrainConfig) -> Splits:
    a, b = config.train_limit, config.test_limit
    return Splits(
        s.train_images[:a], s.train_labels[:a], s.test_images[:b], s.test_labels[:b], s.source
    )


def short_last_batch(n: int, batch_size: int, world: int = 1) -> int:
    """Size of a final partial batch too small for batch-norm statistics (fewer than 2 examples,
    or fewer than one per data-parallel process), which training drops; 0 when there is none."""
    rest = n % batch_size
    return rest if n > batch_size and 0 < rest < max(2, world) else 0


def data_record(splits: Splits, config: TrainConfig, world: int = 1) -> dict:
    """metrics.json's "data" entry: provenance plus the examples actually used."""
    record = dict(splits.source or {"folder": None, "files": {}})
    record["train_examples"] = int(len(splits.train_labels))
    record["test_examples"] = int(len(splits.test_labels))
    dropped = short_last_batch(len(splits.train_labels), config.batch_size, world)
    if dropped:
        record["dropped_last_batch"] = dropped
    return record


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

    drop = short_last_batch(len(splits.train_labels), config.batch_size) > 0
    it = batches(
        splits.train_images,
        splits.train_labels,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        drop_last=drop,
    )
    loss_sum, correct, seen = 0.0, 0, 0
    model.train()
    desc = f"epoch {epoch + 1}/{config.epochs}"
    start = time.perf_counter()
    with Progress(len(it), desc, enabled=progress) as bar:
        for step, (x, y) in enumerate(it):
            loss, ok = train_step(model, loss_fn, optimizer, x, y)
            if not math.isfinite(loss):
                raise TrainingDiverged(divergence_message(config, epoch, f"step {step + 1}"))
            loss_sum += loss * len(y)
            correct += ok
            seen += len(y)
            bar.update(1, loss=loss)
    if not weights_finite(p.data for p in model.parameters()):
        raise TrainingDiverged(divergence_message(config, epoch, "the end of the epoch"))
    return epoch_row(epoch, loss_sum, correct, seen, time.perf_counter() - start)


def weights_finite(arrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def divergence_message(config: TrainConfig, epoch: int, where: str) -> str:
    """What happened, where, and what to change (the run folder keeps the last finite epoch)."""
    kept = f"epoch {epoch}'s checkpoint is the last one kept" if epoch else "no epoch was saved"
    return (
        f"training diverged: the loss or the weights became NaN/Inf in epoch {epoch + 1} at "
        f"{where} (lr {config.lr:g}, momentum {config.momentum:g}); {kept}. Start again "
        "with a smaller --lr (with --overwrite in the same --out)."
    )


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
    (or ``$BNLAB_DATA``, or the default locations). Everything is validated before the folder is
    changed: UsageError for a folder that holds a checkpoint without ``resume``/``overwrite``,
    nothing to resume, a config the checkpoint cannot continue, or a folder another process owns;
    OSError for an unwritable folder; FileNotFoundError/DataFormatError for the data. Resuming a
    run that already has ``config.epochs`` epochs does nothing and returns its metrics.
    Raises TrainingDiverged when the loss or the weights stop being finite.
    """
    config.validate()
    log = log or (lambda s: print(s, flush=True))
    with RunFolder.claim(out, resume=resume, overwrite=overwrite) as run:
        model, opt = prepare_model(config)
        metrics = {"config": asdict(config), "epochs": []}
        start_epoch = _restore(config, run.path, model, opt, metrics) if resume else 0
        if resume and start_epoch >= config.epochs:
            log(
                f"nothing to do: {run.path} already has {start_epoch} epochs (--epochs "
                f"{config.epochs}); the run is left as it is"
            )
            return read_metrics(run.path)
        if splits is None:
            splits = load_splits(config, data_root)
        else:
            splits = limit_splits(splits, config)
        current = data_record(splits, config)
        problem = resume and data_mismatch(run.path, metrics.get("data"), current)
        if problem:
            raise UsageError(problem)
        metrics["data"] = current
        announce_dropped(metrics["data"], log)
        _train_epochs(model, opt, splits, config, run, metrics, start_epoch, progress, log)
        if metrics["epochs"] and has_batch_norm(model):
            metrics["population_stats"] = population_stats_accuracy(model, splits, config)
            _write_metrics(run.path, metrics)
            log(
                f"test_acc with population statistics (BN paper, Alg. 2): "
                f"{metrics['population_stats']['test_acc']:.4f}"
            )
        if report:
            from bnlab.report import write_report

            write_report(run.path, metrics, bn_parameters(model))
            run.wrote()
    return metrics


def announce_dropped(data: dict, log) -> None:
    if data.get("dropped_last_batch"):
        log(
            f"note: the last training batch would hold {data['dropped_last_batch']} example(s), "
            "too few for batch-norm statistics; it is dropped every epoch (like drop_last). "
            "Choose another --batch-size or --train-limit to keep it."
        )


def _train_epochs(model, opt, splits, config, run, metrics, start_epoch, progress, log) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, config.epochs):
        row = train_epoch(model, loss_fn, opt, splits, config, epoch, progress)
        row["test_acc"] = evaluate(
            model, splits.test_images, splits.test_labels, config.eval_batch_size
        )
        metrics["epochs"].append(row)
        metrics["peak_rss_mb"] = peak_rss_mb()
        _save_epoch(run.path, model, opt, config, metrics, epoch + 1)
        run.wrote()
        log(format_epoch(row, config.epochs))


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


def _restore(config: TrainConfig, out: Path, model, opt, metrics: dict) -> int:
    ckpt = load_checkpoint(out, expect_model=config.model)
    problem = resume_error(out, asdict(config), ckpt.meta.get("config", {}))
    if problem:
        raise UsageError(problem)
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(ckpt.optim_state)
    metrics["epochs"] = list(ckpt.meta.get("epochs", []))[: ckpt.epoch]
    metrics["data"] = ckpt.meta.get("data")
    return ckpt.epoch


def _save_epoch(out: Path, model, opt, config: TrainConfig, metrics: dict, epochs_done: int):
    save_checkpoint(
        out,
        model,
        opt,
        model_name=config.model,
        epoch=epochs_done,
        extra=checkpoint_extra(asdict(config), metrics, epochs_done),
    )
    _write_metrics(out, metrics)


def checkpoint_extra(config: dict, metrics: dict, epochs_done: int) -> dict:
    """The metadata both engines store next to the weights: config, data order, metrics."""
    return {
        "config": config,
        "rng": {
            "data_order": "numpy default_rng([seed, epoch]).permutation",
            "seed": config["seed"],
            "next_epoch": epochs_done,
        },
        "epochs": metrics["epochs"],
        "data": metrics.get("data"),
    }


def _write_metrics(out: Path, metrics: dict) -> None:
    from bnlab.io import atomic_write_json

    atomic_write_json(out / "metrics.json", metrics)


def format_epoch(row: dict, total: int) -> str:
    return (
        f"epoch {row['epoch']:>2}/{total}  train_loss {row['train_loss']:.4f}  "
        f"train_acc {row['train_acc']:.4f}  test_acc {row['test_acc']:.4f}  "
        f"{row['examples_per_s']:,.0f} examples/s  ({row['seconds']:.1f} s)"
    )


def bn_parameters(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, γ, β) of every affine batch-norm layer, in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            out.append((name, m.weight.data.copy(), m.bias.data.copy()))
    return out


def read_metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
