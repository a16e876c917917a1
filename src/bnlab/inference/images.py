"""Reading images for ``bnlab infer``: .npy arrays or .png/.jpg files, and their preprocessing.

:func:`read_input` reads a file without knowing the model; :func:`to_batch` then makes the
model's input. A float ``.npy`` is taken as already preprocessed: (C, H, W) or (N, C, H, W).
8-bit images (a .png/.jpg, a uint8 ``.npy`` (H, W, 3) RGB or (N, H, W) grayscale) are
preprocessed for the model's channel count:

* 3 channels: torchvision's ImageNet evaluation transform: resize so the shorter side is 256
  (bilinear) -> center crop 224 x 224 -> x / 255 -> (x − mean) / std per channel,
  mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225);
* 1 channel (bnlab's Fashion-MNIST models): grayscale (RGB -> ITU-R 601 luma) -> x / 255, as
  ``bnlab train`` scales its images, at the image's own size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError, DTypeError, NonFiniteError, ShapeError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE, CROP = 256, 224
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(path, channels: int = 3) -> np.ndarray:
    """(N, channels, H, W) float32 ready for the network, from a .npy or an image file."""
    return to_batch(read_input(path), channels, path)


def read_input(path) -> np.ndarray:
    """A float (N, C, H, W) batch, or 8-bit images: uint8 (N, H, W, 3) RGB or (N, H, W) gray."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _from_npy(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_image(path)[None]
    raise DataFormatError(f"{path}: unknown input suffix {path.suffix!r} (expected .npy or .png)")


def to_batch(a: np.ndarray, channels: int, path="input") -> np.ndarray:
    """The model's float32 (N, channels, H, W) input from what :func:`read_input` returned."""
    if a.dtype != np.uint8:
        if a.shape[1] != channels:
            raise ShapeError(
                f"{path}: the model takes {channels}-channel images (N, {channels}, "
                f"H, W), got shape {a.shape}"
            )
        return a
    if channels == 3:
        if a.ndim != 4:
            raise ShapeError(f"{path}: the model takes RGB images; grayscale {a.shape} given")
        return np.stack([preprocess(im) for im in a])
    if channels == 1:
        gray = a if a.ndim == 3 else _luma(a)
        return (gray.astype(np.float32) * np.float32(1 / 255))[:, None]
    raise ShapeError(f"{path}: 8-bit images have 1 or 3 channels, the model takes {channels}")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB (what PIL's convert("L") computes), as uint8."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


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
        if a.ndim == 3 and a.shape[2] == 3:
            return a[None]
        if a.ndim == 3:
            return a
        raise ShapeError(
            f"{path}: a uint8 array must be an (H, W, 3) RGB image or (N, H, W) "
            f"grayscale images, got shape {a.shape}"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise DTypeError(f"{path}: expected float32 (preprocessed) or uint8 (RGB), got {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or 0 in a.shape:
        raise ShapeError(
            f"{path}: a float array must be preprocessed images (C, H, W) or (N, C, H, W), "
            f"got shape {a.shape}"
        )
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{path}: the images contain NaN or Inf")
    return a


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
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
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
