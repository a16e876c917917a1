"""Safe file I/O: atomic writes, and weight files loaded without pickle.

* ``atomic_write_bytes/text/json`` and the :func:`atomic_open` context manager write to a temp
  file in the destination folder, ``fsync`` it, ``os.replace`` it over the target and ``fsync``
  the folder: a reader (or a crash at any instant) sees the old file or the new one, never a mix.
* ``save_safetensors``/``load_safetensors``: the safetensors format in pure NumPy, every field of
  the header validated before any tensor is allocated.
* ``save_npz``/``load_npz``: NumPy archives with ``allow_pickle=False``; each member's declared
  shape is checked against its stored size before allocation.
* ``load_weights``: dispatch on the suffix (``.safetensors``, ``.npz``, ``.pt``/``.pth`` via
  ``torch.load(weights_only=True)`` when torch is installed).

Corrupt, truncated or wrong-format files raise :class:`bnlab.errors.DataFormatError` naming the
file; missing files raise ``FileNotFoundError``. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bnlab._npz import load_npz, save_npz
from bnlab._safetensors import MAX_HEADER_BYTES, ST_DTYPES, load_safetensors, save_safetensors
from bnlab.errors import DataFormatError

__all__ = [
    "MAX_HEADER_BYTES",
    "ST_DTYPES",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "load_npz",
    "load_safetensors",
    "load_weights",
    "save_npz",
    "save_safetensors",
]

# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temp file next to ``path``; on clean exit make it ``path`` atomically and durably.

    On an exception the temp file is removed and ``path`` is untouched. ``mode`` is ``"wb"`` or
    ``"w"`` (UTF-8 text). The new file keeps the old file's permission bits (0o644 if new).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, *, indent: int | None = 2) -> None:
    """Serialise ``obj`` as JSON (NaN/Inf refused: they are not JSON) and write it atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, sort_keys=False)
    atomic_write_text(path, text + "\n")


def fsync_dir(folder) -> None:
    """fsync a folder so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


# --------------------------------------------------------------------------- dispatch


def load_weights(path) -> dict[str, np.ndarray]:
    """Load a name -> ndarray weight dict from ``.safetensors``, ``.npz`` or ``.pt``/``.pth``.

    ``.pt``/``.pth`` go through ``torch.load(weights_only=True)`` (needs torch; a nested
    ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped); bfloat16 becomes float32.

    Raises:
        FileNotFoundError, DataFormatError: as the per-format loaders; DataFormatError for an
            unknown suffix; ImportError for ``.pt`` without torch.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)[0]
    if suffix == ".npz":
        return load_npz(path)
    if suffix in (".pt", ".pth"):
        return _load_torch(path)
    raise DataFormatError(
        f"{path}: unknown weight file suffix {path.suffix!r} "
        "(expected .safetensors, .npz, .pt or .pth)"
    )


def _load_torch(path: Path) -> dict[str, np.ndarray]:
    os.stat(path)
    try:
        import torch  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            f"{path}: reading .pt/.pth files needs torch (pip install torch)"
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise DataFormatError(
            f"{path}: cannot read as a weights-only torch file (pickled code is refused): {err}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise DataFormatError(f"{path}: expected a dict of str -> tensor (a state_dict)")
    return {k: _tensor_to_numpy(v) for k, v in obj.items()}


def _tensor_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()
