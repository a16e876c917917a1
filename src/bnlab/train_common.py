"""What both trainers share (:mod:`bnlab.train`, the NumPy engine, and :mod:`bnlab.torch.train`):
the run's configuration, the Fashion-MNIST splits, and the records written to metrics.json, the
checkpoint and the log (epoch rows, the divergence message, the dropped-batch note)."""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab.models import MODELS

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


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def announce_dropped(data: dict, log) -> None:
    if data.get("dropped_last_batch"):
        log(
            f"note: the last training batch would hold {data['dropped_last_batch']} example(s), "
            "too few for batch-norm statistics; it is dropped every epoch (like drop_last). "
            "Choose another --batch-size or --train-limit to keep it."
        )


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


def format_epoch(row: dict, total: int) -> str:
    return (
        f"epoch {row['epoch']:>2}/{total}  train_loss {row['train_loss']:.4f}  "
        f"train_acc {row['train_acc']:.4f}  test_acc {row['test_acc']:.4f}  "
        f"{row['examples_per_s']:,.0f} examples/s  ({row['seconds']:.1f} s)"
    )


def read_metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
