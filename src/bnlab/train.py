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

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bnlab import nn
from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.models import build_model
from bnlab.optim import SGD
from bnlab.progress import Progress
from bnlab.runs import RunFolder, data_mismatch, resume_error
from bnlab.train_common import (
    Splits,
    TrainConfig,
    announce_dropped,
    checkpoint_extra,
    data_record,
    divergence_message,
    epoch_row,
    format_epoch,
    limit_splits,
    load_splits,
    peak_rss_mb,
    read_metrics,
    short_last_batch,
    weights_finite,
)

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


# --------------------------------------------------------------------------- the run


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


def _write_metrics(out: Path, metrics: dict) -> None:
    from bnlab.io import atomic_write_json

    atomic_write_json(out / "metrics.json", metrics)


def bn_parameters(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, γ, β) of every affine batch-norm layer, in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            out.append((name, m.weight.data.copy(), m.bias.data.copy()))
    return out
