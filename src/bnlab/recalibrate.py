"""Population statistics for inference: recompute every BN's running mean and variance.

One pass over training batches with the network in training mode (each BN normalizes with its
batch statistics, as during training), recording for every BN layer and batch B the per-channel
mean μ_B, biased variance σ²_B and count m_B (= N·H·W values per channel). Then:

``method="population"`` (Ioffe & Szegedy 2015, Alg. 2, the textbook inference statistics):

    E[x]   = mean_B μ_B
    Var[x] = m/(m−1) · mean_B σ²_B        (each batch unbiased by its own m_B/(m_B−1) when
                                            batch sizes differ; identical for equal sizes)

``method="precise"`` (the exact statistics of every value seen in the pass, pooled by count):

    M      = Σ_B m_B
    E[x]   = Σ_B m_B μ_B / M
    Var[x] = Σ_B m_B (σ²_B + (μ_B − E[x])²) / (M − 1)      (unbiased, as PyTorch stores it)

Batches containing NaN/Inf (in the input, or in any BN's statistics) are skipped and counted.
Works on bnlab models and on PyTorch models (any ``torch.nn.BatchNorm*d``, including
:mod:`bnlab.torch`'s drop-ins, which subclass them, and d2l's module
:class:`bnlab.torch.BatchNorm`, whose ``moving_mean``/``moving_var`` get the same statistics).
On any error the model is left untouched; on success only the running (moving) statistics change
(and the training flags are restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("population", "precise")


@dataclass
class RecalibrationSummary:
    method: str
    batches_used: int
    batches_skipped: int
    skipped_batches: list[int] = field(default_factory=list)  # 0-based indices in the pass
    layers: list[str] = field(default_factory=list)  # BN layers recalibrated, by name


# --------------------------------------------------------------------------- the formulas


def population_statistics(means, variances, counts) -> tuple[np.ndarray, np.ndarray]:
    """mean_B μ_B and mean_B [m_B/(m_B−1) · σ²_B]; inputs are per-batch (C,) arrays and ints."""
    mu = np.mean(np.stack(means), axis=0)
    unbiased = [v * (m / (m - 1)) for v, m in zip(variances, counts, strict=True)]
    return mu, np.mean(np.stack(unbiased), axis=0)


def pooled_statistics(means, variances, counts) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and unbiased variance of all Σ m_B values from per-batch (μ_B, σ²_B, m_B)."""
    from bnlab.functional.stats import pool_moments

    mu, var, total = pool_moments(np.stack(means), np.stack(variances), counts)
    return mu, var * (total / (total - 1))


COMBINE = {"population": population_statistics, "precise": pooled_statistics}


# --------------------------------------------------------------------------- the pass


def recalibrate(model, batches, *, method: str = "population") -> RecalibrationSummary:
    """Recompute the running statistics of every BN in ``model`` from ``batches`` (one pass).

    ``batches``: an iterable of input arrays (or of tuples whose first item is the input, as a
    data loader yields). Returns a :class:`RecalibrationSummary`.
    """
    from bnlab.bn_layers import bn_layers

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = bn_layers(model)
    names = [n for n in layers.layers if layers.info(n).tracks_running_stats]
    if not names:
        raise ValueError("model has no batch-norm layer with running statistics to recalibrate")
    if isinstance(batches, np.ndarray) or not hasattr(batches, "__iter__"):
        raise TypeError("batches must be an iterable of input batches (e.g. a list or a loader)")
    stats, skipped = _collect(layers, names, batches)
    if not stats:
        raise ValueError(
            f"no usable batch: {len(skipped)} batches were given and every one had non-finite "
            "values"
            if skipped
            else "batches is empty: recalibration needs at least one batch"
        )
    results = {}
    for name in names:
        means, variances, counts = zip(*(s[name] for s in stats), strict=True)
        if min(counts) < 2:
            raise ValueError(
                f"BN layer {name!r} saw a batch with {min(counts)} value per channel: the "
                "unbiased variance needs at least 2 (use larger batches)"
            )
        results[name] = COMBINE[method](means, variances, counts)
    for name, (mean, var) in results.items():  # nothing is written unless every layer succeeded
        layers.write_running(name, mean, var)
    return RecalibrationSummary(method, len(stats), len(skipped), skipped, names)


def _collect(layers, names, batches) -> tuple[list[dict], list[int]]:
    """One training-mode pass: per usable batch, {layer: (mean, var, m)}; batches with NaN/Inf in
    the input or in any layer's statistics are skipped (their indices returned). The pass leaves
    the model's modes and buffers as they were."""
    from bnlab.bn_layers import first_item

    stats, skipped = [], []
    for i, batch in enumerate(batches):
        x = layers.as_input(first_item(batch), i)
        record: dict = {}
        if not _finite(x):
            skipped.append(i)
            continue
        layers.run(x, train="all", record=record)
        if all(np.isfinite(record[n][0]).all() and np.isfinite(record[n][1]).all() for n in names):
            stats.append(record)
        else:
            skipped.append(i)
    return stats, skipped


def _finite(x) -> bool:
    return (
        bool(np.isfinite(np.asarray(x)).all())
        if isinstance(x, np.ndarray)
        else bool(x.isfinite().all())
    )


# --------------------------------------------------------------------------- a run folder


def recalibrate_run(
    checkpoint, out, *, data_root=None, batch_size=None, max_batches=None,
    method: str = "population", overwrite: bool = False,
) -> dict:  # fmt: skip
    """Recalibrate a ``bnlab train`` run into a new run folder ``out`` (the CLI's
    ``bnlab recalibrate``): the run's model with population statistics from the training split
    (the run's own ``train_limit``; batches in file order, ``batch_size`` defaulting to the
    run's), test accuracy before and after, and the same checkpoint format, so every command
    that takes a run takes ``out``. Returns the record also stored in ``out/metrics.json``.
    """
    import itertools

    from bnlab import nn
    from bnlab.checkpoint import load_checkpoint, save_state
    from bnlab.data import batches, find_fashion_mnist, load_fashion_mnist
    from bnlab.data.fashion_mnist import data_source
    from bnlab.errors import UsageError
    from bnlab.io import atomic_write_json
    from bnlab.models import build_model
    from bnlab.runs import RunFolder
    from bnlab.train import evaluate, has_batch_norm

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.model_name, seed=0)
    model.load_state_dict(ckpt.model_state)
    if not has_batch_norm(model):
        raise UsageError(f"{checkpoint}: model {ckpt.model_name!r} has no batch-norm layer")
    cfg = ckpt.meta.get("config", {})
    b = batch_size or int(cfg.get("batch_size", 256))
    folder = find_fashion_mnist(data_root)
    train_x, train_y = (a[: cfg.get("train_limit")] for a in load_fashion_mnist("train", folder))
    test_x, test_y = (a[: cfg.get("test_limit")] for a in load_fashion_mnist("test", folder))
    it = batches(train_x, train_y, b, shuffle=False, drop_last=len(train_y) > b)
    with RunFolder.claim(out, overwrite=overwrite, can_resume=False) as run:
        before = evaluate(model, test_x, test_y)
        with nn.no_grad():
            summary = recalibrate(model, itertools.islice(it, max_batches), method=method)
        record = {
            "from": str(checkpoint),
            "method": method,
            "batches": summary.batches_used,
            "batches_skipped": summary.batches_skipped,
            "batch_size": b,
            "layers": summary.layers,
            "test_acc_before": before,
            "test_acc_after": evaluate(model, test_x, test_y),
        }
        data = data_source(folder)
        extra = {k: v for k, v in ckpt.meta.items() if k in ("config", "rng", "epochs")}
        extra |= {"data": data, "recalibration": record}
        save_state(
            run.path, model.state_dict(), ckpt.optim_state, ckpt.meta["optimizer"],
            model_name=ckpt.model_name, epoch=ckpt.epoch, extra=extra,
        )  # fmt: skip
        metrics = {"config": cfg, "data": data, "epochs": ckpt.meta.get("epochs", [])}
        atomic_write_json(run.path / "metrics.json", {**metrics, "recalibration": record})
        run.wrote()
    return record
