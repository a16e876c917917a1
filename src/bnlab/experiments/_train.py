"""The few training primitives the experiments share, on bnlab's own engine (bnlab.nn/optim).

Pure bookkeeping: forward, loss, backward, SGD step, accuracy. The math lives in bnlab.nn.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.experiments._data import Split, batch_indices


def sgd_step(model, loss_fn, opt, x: np.ndarray, y: np.ndarray) -> float:
    """One step of minibatch SGD in training mode; returns the batch loss (NaN if diverged)."""
    model.train()
    opt.zero_grad()
    with np.errstate(all="ignore"):  # a diverging run is expected at lr 1.0 and recorded as NaN
        logits = model.forward(x)
        loss = float(loss_fn.forward(logits, y))
        if not math.isfinite(loss):
            return float("nan")
        model.backward(loss_fn.backward())
        opt.step()
    return loss


def evaluate(model, data: Split, batch_size: int = 1000) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode; the model's mode is restored."""
    from bnlab.nn import CrossEntropyLoss, no_grad  # noqa: PLC0415

    was_training = model.training
    model.eval()
    loss_fn = CrossEntropyLoss()
    total_loss, correct = 0.0, 0
    try:
        with no_grad(), np.errstate(all="ignore"):
            for i in range(0, len(data), batch_size):
                x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
                logits = model.forward(x)
                total_loss += float(loss_fn.forward(logits, y)) * len(y)
                correct += int((np.argmax(logits, axis=1) == y).sum())
    finally:
        model.train(was_training)
    loss = total_loss / len(data)
    return (loss if math.isfinite(loss) else float("nan")), correct / len(data)


def train_steps(
    model,
    train: Split,
    *,
    batch_size: int,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    on_step=None,
) -> list[float]:
    """``steps`` SGD steps on seeded batches of ``train``; returns the per-step losses.

    ``on_step(step, loss)`` is called after every step (progress bars, measurements).
    """
    from bnlab.nn import CrossEntropyLoss  # noqa: PLC0415
    from bnlab.optim import SGD  # noqa: PLC0415

    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = CrossEntropyLoss()
    losses = []
    for step, idx in enumerate(batch_indices(len(train), batch_size, seed, steps)):
        losses.append(sgd_step(model, loss_fn, opt, train.x[idx], train.y[idx]))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def train_with_curve(
    model,
    train: Split,
    test: Split,
    *,
    batch_size: int,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    n_evals: int = 10,
    on_step=None,
) -> dict:
    """Train like :func:`train_steps` and record a learning curve at ``n_evals`` evenly spaced
    points: ``{"step", "train_loss" (mean since the previous point), "test_loss", "test_acc"}``.
    """
    eval_at = {round(steps * (k + 1) / n_evals) for k in range(n_evals)}
    curve = {"step": [], "train_loss": [], "test_loss": [], "test_acc": []}
    window: list[float] = []

    def record(step: int, loss: float) -> None:
        window.append(loss)
        if step + 1 in eval_at:
            test_loss, test_acc = evaluate(model, test)
            curve["step"].append(step + 1)
            curve["train_loss"].append(sum(window) / len(window))
            curve["test_loss"].append(test_loss)
            curve["test_acc"].append(test_acc)
            window.clear()
        if on_step is not None:
            on_step(step, loss)

    train_steps(
        model,
        train,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        momentum=momentum,
        seed=seed,
        on_step=record,
    )
    return curve
