"""Reader for the IDX format of (Fashion-)MNIST, raw or gzip-compressed, that trusts nothing.

An IDX file is a header followed by the array in big-endian C order::

    bytes 0..1   0x00 0x00
    byte  2      type code: 0x08 u1, 0x09 i1, 0x0B i2, 0x0C i4, 0x0D f4, 0x0E f8
    byte  3      ndim (number of dimensions, >= 1)
    4 * ndim     dims, each a big-endian uint32
    prod(dims) * itemsize bytes of data

Everything in the header is checked *before* the data array is allocated: sizes are computed in
Python integers (no fixed-width overflow), a raw file must have exactly the declared length, and a
gzip stream must be able to hold the declared size (deflate expands at most ~1032x, so a header
claiming more than that is rejected from the compressed size alone). The gzip payload is then read
in bounded chunks straight into the output array, and must end exactly where declared.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError

#: IDX type code -> big-endian NumPy dtype.
TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Largest array (in bytes) read_idx accepts by default; Fashion-MNIST's largest file is 47 MB.
DEFAULT_MAX_BYTES = 1 << 31

#: Deflate cannot expand a stream by more than ~1032:1; used to reject impossible gzip headers.
_DEFLATE_MAX_RATIO = 1032
_GZIP_SLACK = 1 << 16
_CHUNK = 1 << 20
_MAX_NDIM = 16


def read_idx(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-endian array of the declared shape.

    Args:
        path: the file. Compression is detected from the gzip magic bytes, not the suffix.
        max_bytes: refuse arrays whose declared data size exceeds this many bytes.

    Returns:
        ``np.ndarray`` of shape ``dims`` and the dtype of the type code (native byte order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: wrong magic, unknown type code, bad dims, a declared size above
            ``max_bytes``, a file shorter or longer than declared, or a corrupt gzip stream. The
            message names the file and what was wrong.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    if compressed:
        return _read_gzip(path, max_bytes)
    return _read_raw(path, max_bytes)


def parse_header(path: Path, prefix: bytes, read_more) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate the 4-byte magic and the dims; return (dtype, shape, header_length).

    ``prefix`` is the first 4 bytes; ``read_more(n)`` returns the next ``n`` bytes (possibly fewer
    if the file ends).
    """
    if len(prefix) < 4:
        raise DataFormatError(f"{path}: not an IDX file: only {len(prefix)} bytes, header needs 4")
    if prefix[0] != 0 or prefix[1] != 0:
        raise DataFormatError(
            f"{path}: not an IDX file: magic must start with bytes 0x00 0x00, got "
            f"0x{prefix[0]:02x} 0x{prefix[1]:02x}"
        )
    code, ndim = prefix[2], prefix[3]
    if code not in TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in TYPE_CODES)
        raise DataFormatError(
            f"{path}: unknown IDX type code 0x{code:02X} (expected one of {known})"
        )
    if not 1 <= ndim <= _MAX_NDIM:
        raise DataFormatError(f"{path}: IDX ndim must be in 1..{_MAX_NDIM}, got {ndim}")
    dim_bytes = read_more(4 * ndim)
    if len(dim_bytes) != 4 * ndim:
        raise DataFormatError(
            f"{path}: truncated IDX header: {ndim} dims need {4 * ndim} bytes, got {len(dim_bytes)}"
        )
    shape = tuple(int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return TYPE_CODES[code], shape, 4 + 4 * ndim


def _declared_nbytes(path: Path, dtype: np.dtype, shape: tuple[int, ...], max_bytes: int) -> int:
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: cannot overflow
    if nbytes > max_bytes:
        raise DataFormatError(
            f"{path}: IDX header declares dims {shape} ({nbytes} bytes of data), more than the "
            f"limit max_bytes={max_bytes}; refusing to allocate"
        )
    return nbytes


def _read_raw(path: Path, max_bytes: int) -> np.ndarray:
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        dtype, shape, header = parse_header(path, f.read(4), f.read)
        nbytes = _declared_nbytes(path, dtype, shape, max_bytes)
        if size != header + nbytes:
            raise DataFormatError(
                f"{path}: IDX header declares dims {shape} of {dtype.str[1:]} = {nbytes} data "
                f"bytes, so the file must be {header + nbytes} bytes, but it is {size} bytes "
                f"({'short' if size < header + nbytes else 'trailing data'})"
            )
        out = np.empty(shape, dtype=dtype.newbyteorder("="))
        _fill(path, f, out, nbytes)
    _to_native(out, dtype)
    return out


def _read_gzip(path: Path, max_bytes: int) -> np.ndarray:
    compressed_size = os.stat(path).st_size
    try:
        with gzip.open(path, "rb") as f:
            dtype, shape, header = parse_header(path, f.read(4), f.read)
            nbytes = _declared_nbytes(path, dtype, shape, max_bytes)
            if header + nbytes > compressed_size * _DEFLATE_MAX_RATIO + _GZIP_SLACK:
                raise DataFormatError(
                    f"{path}: IDX header declares dims {shape} ({nbytes} data bytes) but a "
                    f"{compressed_size}-byte gzip file cannot expand to that; refusing to allocate"
                )
            out = np.empty(shape, dtype=dtype.newbyteorder("="))
            _fill(path, f, out, nbytes)
            if f.read(1):
                raise DataFormatError(
                    f"{path}: trailing data after the {nbytes} data bytes declared by dims {shape}"
                )
    except (EOFError, OSError, zlib.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream: {err}") from err
    _to_native(out, dtype)
    return out


def _fill(path: Path, f, out: np.ndarray, nbytes: int) -> None:
    """Read exactly ``nbytes`` from ``f`` into ``out``'s buffer, in chunks of at most 1 MiB."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < nbytes:
        n = f.readinto(view[done : min(done + _CHUNK, nbytes)])
        if not n:
            raise DataFormatError(
                f"{path}: short file: IDX header declares {nbytes} data bytes, got only {done}"
            )
        done += n


def _to_native(out: np.ndarray, dtype: np.dtype) -> None:
    """The bytes were read big-endian into a native-order array: swap in place if needed."""
    if not dtype.isnative:
        out.byteswap(inplace=True)
