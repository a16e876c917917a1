"""Find and load Fashion-MNIST from local files. Never downloads.

The Debian/Ubuntu package ``dataset-fashion-mnist`` installs the four original IDX files in
``/usr/share/datasets/fashion-mnist``; any folder holding the same four files (raw or ``.gz``)
works, including torchvision's ``FashionMNIST/raw`` layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bnlab.data.idx import read_idx
from bnlab.errors import DataFormatError

INSTALL_COMMAND = "sudo apt-get install dataset-fashion-mnist"

#: Folders searched after ``root``, ``$BNLAB_DATA`` and ``./data`` (a list so tests can patch it).
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets/fashion-mnist")]

#: split -> (images file stem, labels file stem), the names of the original release.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SUBDIRS = ("", "fashion-mnist", "FashionMNIST/raw", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)

_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def candidate_dirs(root=None) -> list[Path]:
    """Every folder :func:`find_fashion_mnist` looks in, in order."""
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root))
    if os.environ.get("BNLAB_DATA"):
        bases.append(Path(os.environ["BNLAB_DATA"]))
    bases.append(Path.cwd() / "data")
    out = [base / sub if sub else base for base in bases for sub in _SUBDIRS]
    return out + list(SYSTEM_DIRS)


def find_fashion_mnist(root=None) -> Path:
    """The first folder holding all four Fashion-MNIST IDX files (raw or ``.gz``).

    Looks in ``root``, ``$BNLAB_DATA``, ``./data`` (each also in the sub-folders ``fashion-mnist``,
    ``FashionMNIST/raw`` and ``fashion_mnist``) and ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: listing every folder looked in and the install command.
    """
    looked = candidate_dirs(root)
    for folder in looked:
        if all(_locate(folder, stem) is not None for pair in FILES.values() for stem in pair):
            return folder
    places = "\n".join(f"  - {p}" for p in looked)
    raise FileNotFoundError(
        "Fashion-MNIST not found (bnlab never downloads). Looked for "
        f"{', '.join(s + '[.gz]' for pair in FILES.values() for s in pair)} in:\n{places}\n"
        f"Install it with `{INSTALL_COMMAND}` (without sudo when root), or point $BNLAB_DATA "
        "(or root=) at a folder holding the four files."
    )


def load_fashion_mnist(split: str = "train", root=None, *, cache: bool = True):
    """Load one split: ``(images uint8 (N, 28, 28), labels uint8 (N,))``.

    Checks that the image and label counts match, images are 28x28 uint8 and labels lie in 0..9.
    With ``cache=True`` the arrays are kept in-process (keyed by folder, split and file mtimes) and
    returned read-only, so a caller cannot corrupt the cache; ``.copy()`` them to modify.

    Raises:
        ValueError: ``split`` is not "train" or "test".
        FileNotFoundError: see :func:`find_fashion_mnist`.
        DataFormatError: a file is corrupt, or images and labels disagree.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = find_fashion_mnist(root)
    img_path, lbl_path = (_locate(folder, stem) for stem in FILES[split])
    key = (str(folder.resolve()), split, _stamp(img_path), _stamp(lbl_path))
    if cache and key in _cache:
        return _cache[key]
    images, labels = read_idx(img_path), read_idx(lbl_path)
    check_pair(images, labels, img_path, lbl_path)
    if cache:
        images.flags.writeable = False
        labels.flags.writeable = False
        _cache[key] = (images, labels)
    return images, labels


def clear_cache() -> None:
    """Forget every cached split."""
    _cache.clear()


def check_pair(images: np.ndarray, labels: np.ndarray, img_path, lbl_path) -> None:
    """Fashion-MNIST's invariants: (N,28,28) uint8 images, (N,) uint8 labels in 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataFormatError(
            f"{img_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(
            f"{lbl_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"image/label count mismatch: {img_path} has {images.shape[0]} images but "
            f"{lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataFormatError(
            f"{lbl_path}: labels must be in 0..{NUM_CLASSES - 1}, found {int(labels.max())}"
        )


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size
