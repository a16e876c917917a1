"""Reading images for ``bnlab infer``: .npy arrays or .png/.jpg files, ImageNet preprocessing.

Preprocessing of an 8-bit image (torchvision's ImageNet evaluation transform):

    resize so the shorter side is 256 (bilinear) -> center crop 224 x 224 -> x / 255
    -> (x − mean) / std per channel, mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225)
    -> NCHW float32

A float ``.npy`` is taken as already preprocessed: (3, H, W) or (N, 3, H, W). A uint8 ``.npy``
of shape (H, W, 3) is an 8-bit image and gets the transform above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError, DTypeError, ShapeError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE, CROP = 256, 224
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(path) -> np.ndarray:
    """(N, 3, H, W) float32 ready for the network, from a .npy or an image file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _from_npy(path)
    if suffix in IMAGE_SUFFIXES:
        return preprocess(_read_image(path))[None]
    raise DataFormatError(f"{path}: unknown input suffix {path.suffix!r} (expected .npy or .png)")


def _from_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataFormatError(
            f"{path}: not a readable .npy array (pickles refused): {err}"
        ) from err
    if a.dtype == np.uint8:
        if a.ndim != 3 or a.shape[2] != 3:
            raise ShapeError(f"{path}: a uint8 image must be (H, W, 3) RGB, got shape {a.shape}")
        return preprocess(a)[None]
    if not np.issubdtype(a.dtype, np.floating):
        raise DTypeError(f"{path}: expected float32 (preprocessed) or uint8 (RGB), got {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise ShapeError(
            f"{path}: a float array must be preprocessed images (3, H, W) or (N, 3, H, W), "
            f"got shape {a.shape}"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _read_image(path: Path) -> np.ndarray:
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError(f"{path}: reading images needs Pillow (pip install pillow)") from err
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise DataFormatError(f"{path}: not a readable image: {err}") from err


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, 224, 224) float32, the ImageNet evaluation transform."""
    from PIL import Image  # noqa: PLC0415

    h, w = rgb.shape[:2]
    scale = RESIZE / min(h, w)
    size = (max(CROP, round(w * scale)), max(CROP, round(h * scale)))
    im = Image.fromarray(rgb).resize(size, Image.BILINEAR)
    a = np.asarray(im, np.float32) / 255.0
    top, left = (a.shape[0] - CROP) // 2, (a.shape[1] - CROP) // 2
    a = a[top : top + CROP, left : left + CROP]
    return np.ascontiguousarray(((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (max subtracted first)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(probs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per row, the k (class, probability) pairs of highest probability, best first."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, probs, strict=True)]
