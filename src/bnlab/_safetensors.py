"""The safetensors format in pure NumPy: every field of the header validated before any tensor
is allocated. Import from :mod:`bnlab.io`."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError, DTypeError

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
    from bnlab.io import atomic_open  # noqa: PLC0415 (bnlab.io re-exports this module)

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
