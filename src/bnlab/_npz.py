"""NumPy ``.npz`` archives with ``allow_pickle=False``: each member's declared shape is checked
against its stored size before allocation. Import from :mod:`bnlab.io`."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError, DTypeError


def save_npz(path, arrays: dict, *, compressed: bool = False) -> None:
    """Write ``arrays`` (name -> ndarray) as an ``.npz`` archive, atomically; no object arrays.

    Raises:
        TypeError: a name is not a str or a value is not an ndarray.
        DTypeError: an object-dtype array (it would need pickle to load).
    """
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of name -> ndarray, got {type(arrays).__name__}")
    for name, arr in arrays.items():
        if not isinstance(name, str) or not isinstance(arr, np.ndarray):
            raise TypeError(f"arrays must map str -> ndarray, got {name!r}: {type(arr).__name__}")
        if arr.dtype.hasobject:
            raise DTypeError(f"arrays[{name!r}] has dtype {arr.dtype}: object arrays need pickle")
    from bnlab.io import atomic_open  # noqa: PLC0415 (bnlab.io re-exports this module)

    with atomic_open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def load_npz(path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` archive with ``allow_pickle=False``.

    Each member's sizes are checked before anything is allocated: the zip directory's sizes
    against the archive size (a stored member cannot be larger than the archive, a deflated one
    not more than ~1032x its compressed size), then the ``.npy`` header's shape against the
    member's size. A hostile archive therefore cannot trigger an allocation much larger than
    itself.

    Raises:
        FileNotFoundError: missing file.
        DataFormatError: not a zip, corrupt (CRC), truncated, a member that is not ``.npy``, or a
            pickled/object array (refused, never unpickled).
    """
    path = Path(path)
    archive_size = os.stat(path).st_size  # FileNotFoundError first, before zipfile muddies it
    try:
        with zipfile.ZipFile(path) as zf:
            return {
                _npz_key(path, info.filename): _read_npy_member(path, zf, info, archive_size)
                for info in zf.infolist()
            }
    except DataFormatError:
        raise
    except _NPZ_ERRORS as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataFormatError(f"{path}: not a valid .npz archive: {err}") from err


_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data by more than ~1032:1

_NPZ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    zlib.error,
)


def _npz_key(path: Path, member: str) -> str:
    if not member.endswith(".npy"):
        raise DataFormatError(f"{path}: archive member {member!r} is not a .npy array")
    return member[: -len(".npy")]


def _check_member_sizes(path: Path, info: zipfile.ZipInfo, archive_size: int) -> None:
    """The zip directory's sizes must be possible for an archive of ``archive_size`` bytes."""
    limit = (
        info.compress_size
        if info.compress_type == zipfile.ZIP_STORED
        else info.compress_size * _DEFLATE_MAX_RATIO + 1024
    )
    if info.compress_size > archive_size or info.file_size > limit:
        raise DataFormatError(
            f"{path}: member {info.filename!r} claims {info.file_size} bytes "
            f"({info.compress_size} compressed) in a {archive_size}-byte archive"
        )


def _read_npy_member(path: Path, zf: zipfile.ZipFile, info, archive_size: int) -> np.ndarray:
    _check_member_sizes(path, info, archive_size)
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DataFormatError(f"{path}: member {info.filename!r}: unsupported .npy {version}")
        if dtype.hasobject:
            raise DataFormatError(
                f"{path}: member {info.filename!r} is a pickled object array ({dtype}); "
                "refused: bnlab never loads pickle"
            )
        data_start = f.tell()
        declared = math.prod(shape) * dtype.itemsize
        if info.file_size - data_start != declared:
            raise DataFormatError(
                f"{path}: member {info.filename!r} declares shape {shape} {dtype} = {declared} "
                f"bytes but stores {info.file_size - data_start}"
            )
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)
