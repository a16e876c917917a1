"""Fashion-MNIST subsets for the experiments (via :mod:`bnlab.data`, never downloaded).

The subset is a fixed function of its sizes (data seed 0), so every seed and every variant of an
experiment sees the same images; seeds vary initialisation and batch order only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATA_SEED = 0


@dataclass(frozen=True)
class Split:
    """``x`` float32 (N, 1, 28, 28) (or (N, 784) after :func:`flat`); ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _take(images, labels, idx, mean, std) -> Split:
    x = (images[idx].astype(np.float32) / np.float32(255.0) - mean) / std
    return Split(np.ascontiguousarray(x[:, None]), labels[idx].astype(np.int64))


def fashion_mnist(
    n_train: int, n_val: int, n_test: int, *, standardize: bool = True
) -> tuple[Split, Split, Split]:
    """(train, val, test): train and val are disjoint subsets of the training split, test of
    the test split (capped at its 10000 images). ``standardize=False`` keeps pixels in [0, 1]
    (d2l's ``ToTensor``); True subtracts the training subset's mean and divides by its std
    (cs231n's preprocessing)."""
    from bnlab.data import load_fashion_mnist  # noqa: PLC0415

    tr_img, tr_lbl = load_fashion_mnist("train")
    te_img, te_lbl = load_fashion_mnist("test")
    if n_train + n_val > len(tr_lbl):
        raise ValueError(
            f"n_train + n_val must be <= {len(tr_lbl)}, got {n_train} + {n_val} = {n_train + n_val}"
        )
    order = np.random.default_rng(DATA_SEED).permutation(len(tr_lbl))
    tr_idx, val_idx = np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val])
    te_idx = np.sort(
        np.random.default_rng(DATA_SEED).permutation(len(te_lbl))[: min(n_test, len(te_lbl))]
    )
    pixels = tr_img[tr_idx].astype(np.float64) / 255.0
    mean, std = (pixels.mean(), pixels.std()) if standardize else (0.0, 1.0)
    mean, std = np.float32(mean), np.float32(std)
    return (
        _take(tr_img, tr_lbl, tr_idx, mean, std),
        _take(tr_img, tr_lbl, val_idx, mean, std),
        _take(te_img, te_lbl, te_idx, mean, std),
    )


def flat(split: Split) -> Split:
    """The same split with images flattened to (N, 784) for fully connected nets."""
    return Split(split.x.reshape(len(split), -1), split.y)


def batch_indices(n: int, batch_size: int, seed: int, steps: int):
    """Yield ``steps`` index arrays of ``batch_size``: epochs of seeded permutations
    (:func:`bnlab.data.epoch_order`), dropping each epoch's last partial batch."""
    from bnlab.data import epoch_order  # noqa: PLC0415

    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size must be <= the training set size {n}, got {batch_size}")
    done, epoch = 0, 0
    while done < steps:
        order = epoch_order(n, seed, epoch)
        for i in range(min(per_epoch, steps - done)):
            yield order[i * batch_size : (i + 1) * batch_size]
        done += min(per_epoch, steps - done)
        epoch += 1
