"""Seeded, resumable mini-batches of an image dataset.

The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)``: a pure function
of ``(seed, epoch)``, so resuming at epoch ``e`` (and batch ``start_batch``) reproduces exactly the
batches an uninterrupted run would have seen, with no RNG state to save.
"""

from __future__ import annotations

import numbers

import numpy as np

from bnlab.errors import DTypeError, ShapeError


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Indices ``(n,)`` of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``, or arange."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def to_float_images(x: np.ndarray) -> np.ndarray:
    """uint8 ``(B, H, W)`` or ``(B, C, H, W)`` -> float32 ``(B, C, H, W)`` in [0, 1] (ToTensor).

    Floating input is cast to float32 without rescaling.
    """
    if x.ndim == 3:
        x = x[:, None]
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1.0 / 255.0)
    return x.astype(np.float32, copy=False)


class BatchIterator:
    """Mini-batches ``(x float32 (B, C, H, W) in [0,1], y int64 (B,))`` of one epoch.

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)``, uint8 (scaled by 1/255) or floating.
        labels: ``(N,)`` integer class labels.
        batch_size: ``B >= 1``; the last batch is smaller unless ``drop_last``.
        shuffle: permute per ``(seed, epoch)``; ``False`` keeps file order.
        seed, epoch: the permutation key (ints >= 0).
        drop_last: drop a final partial batch.
        start_batch: skip this many batches (mid-epoch resume).

    Iterating twice yields the same batches; ``len()`` is the number of batches yielded.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
    ):
        self.images, self.labels = _check_dataset(images, labels)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.epoch = _check_int(epoch, "epoch", 0)
        self.start_batch = _check_int(start_batch, "start_batch", 0)
        if not isinstance(shuffle, (bool, np.bool_)) or not isinstance(drop_last, (bool, np.bool_)):
            raise TypeError(
                f"shuffle and drop_last must be True or False, got {shuffle!r}, {drop_last!r}"
            )
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)

    def num_batches_per_epoch(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        return max(0, self.num_batches_per_epoch() - self.start_batch)

    def __iter__(self):
        order = epoch_order(len(self.labels), self.seed, self.epoch, self.shuffle)
        b = self.batch_size
        for i in range(self.start_batch, self.num_batches_per_epoch()):
            idx = order[i * b : (i + 1) * b]
            yield to_float_images(self.images[idx]), self.labels[idx].astype(np.int64)


def batches(
    images,
    labels,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
) -> BatchIterator:
    """Shorthand for :class:`BatchIterator` (same arguments)."""
    return BatchIterator(
        images,
        labels,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=drop_last,
        start_batch=start_batch,
    )


def _check_dataset(images, labels) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise TypeError(
            "images and labels must be numpy arrays, got "
            f"{type(images).__name__} and {type(labels).__name__}"
        )
    if images.ndim not in (3, 4):
        raise ShapeError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DTypeError(f"images must be uint8 or floating, got {images.dtype}")
    if labels.ndim != 1:
        raise ShapeError(f"labels must be a 1-D array (N,), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DTypeError(f"labels must be integer class indices, got {labels.dtype}")
    if len(labels) != len(images):
        raise ShapeError(
            f"images and labels must have the same length N, got {len(images)} images and "
            f"{len(labels)} labels"
        )
    return images, labels
