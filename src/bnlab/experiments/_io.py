"""Output of experiment results: writable-folder checks up front, strict deterministic JSON,
and crash-safe writes through :mod:`bnlab.io` (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a reader never sees a half-written results.json."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from bnlab.io import atomic_write_text


def ensure_writable_dir(path: Path, what: str = "--out") -> Path:
    """Create ``path`` if needed and check we can write there; raise a clear error otherwise.

    Raises ``PermissionError`` / ``NotADirectoryError`` naming ``what`` (the CLI argument).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} must be a directory, but {str(path)!r} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"{what}: cannot create output directory {str(path)!r}: {err.strerror or err}"
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: output directory {str(path)!r} is not writable")
    try:  # os.access lies for root on read-only mounts: really try
        fd, probe = tempfile.mkstemp(dir=path, prefix=".bnlab-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{what}: output directory {str(path)!r} is not writable: {err.strerror or err}"
        ) from err
    return path


def jsonable(obj):
    """Plain JSON types only: NumPy scalars/arrays become floats/lists, NaN/Inf become None
    (a diverged run is recorded as ``null``, which strict JSON parsers accept)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # NumPy array or scalar
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def dumps_json(obj) -> str:
    """Deterministic, strict JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps_json(obj))
