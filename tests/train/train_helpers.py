"""Synthetic Fashion-MNIST-shaped data for the training tests (no real data needed)."""

from __future__ import annotations

import contextlib
import gzip
import struct
from pathlib import Path

import numpy as np

from bnlab.nn.threads import set_num_threads
from bnlab.train import Splits


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) noise plus a bright 7x7 block whose position encodes the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 4)
        images[i, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = 230
    return images, labels


def synthetic_splits(n_train: int = 512, n_test: int = 200) -> Splits:
    tr = synthetic_images(n_train, 0)
    te = synthetic_images(n_test, 1)
    return Splits(*tr, *te)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """The IDX format: magic (0, 0, 0x08 = uint8, ndim), big-endian uint32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fake_fashion_mnist(folder: Path, n_train: int = 512, n_test: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (images, labels) in (
        ("train", synthetic_images(n_train, 0)),
        ("t10k", synthetic_images(n_test, 1)),
    ):
        write_idx_gz(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return folder


@contextlib.contextmanager
def single_thread():
    """Run with one numba and one BLAS thread (robust on a shared machine), then restore."""
    from bnlab.nn.threads import get_num_threads, set_blas_threads

    numba_before, blas_before = get_num_threads()
    set_num_threads(1)
    try:
        yield
    finally:
        if numba_before is not None:
            import numba

            numba.set_num_threads(numba_before)
        if blas_before is not None:
            set_blas_threads(blas_before)
