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
import math
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError, DTypeError

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


# --------------------------------------------------------------------------- safetensors

#: safetensors dtype tag <-> little-endian NumPy dtype (BF16/F8 have no NumPy dtype: refused).
ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
_TAG_OF = {(dt.kind, dt.itemsize): tag for tag, dt in ST_DTYPES.items()}
#: Same limit as the reference implementation: a header above 100 MB is refused.
MAX_HEADER_BYTES = 100_000_000


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> ndarray) and str ``metadata`` as a safetensors file, atomically.

    Layout: ``u64 LE n`` | ``n`` bytes of JSON header (space-padded to a multiple of 8) | the
    tensors' little-endian C-order bytes, back to back in header order. Readable by the
    ``safetensors`` package and by :func:`load_safetensors`.

    Raises:
        TypeError: a name or metadata key/value is not a str, or a value is not an ndarray.
        DTypeError: an array's dtype has no safetensors tag (object, complex, strings, ...).
    """
    arrays = _check_tensor_dict(tensors)
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = _check_metadata(metadata)
    offset = 0
    for name, arr in arrays.items():
        header[name] = {
            "dtype": _TAG_OF[(arr.dtype.kind, arr.dtype.itemsize)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).data)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)`` (metadata ``{}`` when absent).

    Validated before any tensor is allocated: header length within the file and <= 100 MB, header
    is a UTF-8 JSON object without duplicate keys, each entry has exactly ``dtype``/``shape``/
    ``data_offsets``, known dtype, non-negative integer shape, ``prod(shape) * itemsize`` equal to
    the span, spans contiguous from 0 to the end of the file (no gap, overlap or trailing bytes).

    Raises:
        FileNotFoundError: missing file.
        DataFormatError: anything else wrong with the file, naming the file and the field.
    """
    path = Path(path)
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        n = _read_header_length(path, f.read(8), size)
        entries, metadata = _parse_st_header(path, f.read(n))
        _check_st_layout(path, entries, size - 8 - n)
        tensors = {}
        for name, (dtype, shape, (begin, end)) in entries.items():
            out = np.empty(shape, dtype=dtype)
            f.seek(8 + n + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
                raise DataFormatError(f"{path}: file shrank while reading tensor {name!r}")
            tensors[name] = out if dtype.isnative else out.byteswap().view(dtype.newbyteorder("="))
    return tensors, metadata


def _read_header_length(path: Path, prefix: bytes, size: int) -> int:
    if len(prefix) < 8:
        raise DataFormatError(
            f"{path}: not a safetensors file: {size} bytes, the header length alone needs 8"
        )
    (n,) = struct.unpack("<Q", prefix)
    if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
        raise DataFormatError(
            f"{path}: not a safetensors file (or truncated): header length {n} must be in "
            f"2..{min(MAX_HEADER_BYTES, size - 8)} for a {size}-byte file"
        )
    return n


def _parse_st_header(path: Path, raw: bytes):
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as err:
        raise DataFormatError(f"{path}: safetensors header is not valid UTF-8 JSON: {err}") from err
    if not isinstance(header, dict):
        raise DataFormatError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DataFormatError(f"{path}: __metadata__ must map strings to strings")
    entries = {name: _parse_st_entry(path, name, info) for name, info in header.items()}
    return entries, metadata


def _parse_st_entry(path: Path, name: str, info) -> tuple[np.dtype, tuple, tuple[int, int]]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise DataFormatError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    if info["dtype"] not in ST_DTYPES:
        raise DataFormatError(
            f"{where}: dtype {info['dtype']!r} not supported (expected one of {sorted(ST_DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise DataFormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise DataFormatError(f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
    dtype = ST_DTYPES[info["dtype"]]
    begin, end = offsets
    if end < begin or math.prod(shape) * dtype.itemsize != end - begin:
        raise DataFormatError(
            f"{where}: shape {shape} of {info['dtype']} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes but data_offsets span {end - begin}"
        )
    return dtype, tuple(shape), (begin, end)


def _check_st_layout(path: Path, entries: dict, data_size: int) -> None:
    """The spans, sorted, must tile [0, data_size) exactly: no gap, no overlap, no trailing data."""
    position = 0
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise DataFormatError(
                f"{path}: tensor {name!r} at byte {begin} {what} (expected {position}); "
                "the file is corrupt"
            )
        position = end
    if position != data_size:
        raise DataFormatError(
            f"{path}: tensors cover {position} data bytes but the file holds {data_size} "
            f"({'truncated' if data_size < position else 'trailing bytes'})"
        )


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_tensor_dict(tensors) -> dict[str, np.ndarray]:
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> ndarray, got {type(tensors).__name__}")
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise TypeError(
                f"tensor names must be non-empty str other than '__metadata__': {name!r}"
            )
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"tensors[{name!r}] must be a numpy ndarray, got {type(arr).__name__}")
        if (arr.dtype.kind, arr.dtype.itemsize) not in _TAG_OF or arr.dtype.kind not in "biuf":
            raise DTypeError(
                f"tensors[{name!r}] has dtype {arr.dtype}, which safetensors cannot store "
                f"(supported: {', '.join(str(d) for d in ST_DTYPES.values())})"
            )
    return dict(tensors)


def _check_metadata(metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("metadata must be a dict of str -> str (JSON-encode other values first)")
    return dict(metadata)


# --------------------------------------------------------------------------- npz


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
