"""Find and load Fashion-MNIST from local files. Never downloads.

The Debian/Ubuntu package ``dataset-fashion-mnist`` installs the four original IDX files in
``/usr/share/datasets/fashion-mnist``; any folder holding the same four files (raw or ``.gz``)
works, including torchvision's ``FashionMNIST/raw`` layout.
"""

from __future__ import annotations

import hashlib
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


def named_folder(root=None) -> tuple[Path, str] | None:
    """The folder the user named, and how (``root``/--data, else ``$BNLAB_DATA``), or None."""
    if root is not None:
        return Path(root), "the data folder given (--data / root=)"
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]), "$BNLAB_DATA"
    return None


def candidate_dirs(root=None) -> list[Path]:
    """Every folder :func:`find_fashion_mnist` looks in, in order: only the named folder (and its
    usual sub-folders) when one is named, else ``./data`` and the system folders."""
    named = named_folder(root)
    bases = [named[0]] if named else [Path.cwd() / "data"]
    out = [base / sub if sub else base for base in bases for sub in _SUBDIRS]
    return out if named else out + list(SYSTEM_DIRS)


def find_fashion_mnist(root=None) -> Path:
    """The first folder holding all four Fashion-MNIST IDX files (raw or ``.gz``).

    A folder the user names (``root``, else ``$BNLAB_DATA``) is the only place looked in (also
    its sub-folders ``fashion-mnist``, ``FashionMNIST/raw`` and ``fashion_mnist``): bnlab uses it
    or fails, never another copy. With nothing named: ``./data`` (and those sub-folders), then
    ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: naming the folder given (or listing every folder looked in) and the
            install command.
    """
    looked = candidate_dirs(root)
    for folder in looked:
        if all(_locate(folder, stem) is not None for pair in FILES.values() for stem in pair):
            return folder
    wanted = ", ".join(s + "[.gz]" for pair in FILES.values() for s in pair)
    install = f"`{INSTALL_COMMAND}` (without sudo when root)"
    named = named_folder(root)
    if named:
        path, how = named
        if not path.exists():
            state = "does not exist"
        elif not path.is_dir():
            state = "is not a folder"
        else:
            state = "does not hold Fashion-MNIST"
        raise FileNotFoundError(
            f"{path} ({how}) {state}: expected {wanted} in it or in one of its sub-folders "
            f"{', '.join(s for s in _SUBDIRS if s)}. bnlab uses the folder you name and never "
            f"falls back to another copy; to use the system copy, install it with {install} "
            "and name no folder."
        )
    raise FileNotFoundError(
        f"Fashion-MNIST not found (bnlab never downloads): looked for {wanted} in "
        f"{'; '.join(str(p) for p in looked)}. Install it with {install}, or name a folder "
        "holding the four files with --data or $BNLAB_DATA."
    )


def data_source(folder: Path) -> dict:
    """Provenance of the data in ``folder`` for metrics.json and the report: the resolved folder
    and, per file, its size in bytes and sha256 (cached while the files are unchanged)."""
    folder = Path(folder)
    files = {}
    for pair in FILES.values():
        for stem in pair:
            path = _locate(folder, stem)
            if path is None:
                raise FileNotFoundError(f"{folder}: {stem}[.gz] is missing")
            files[path.name] = _file_digest(path)
    return {"folder": str(folder.resolve()), "files": files}


_digests: dict[tuple, dict] = {}


def _file_digest(path: Path) -> dict:
    key = (str(path.resolve()), *_stamp(path))
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return _digests[key]


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
