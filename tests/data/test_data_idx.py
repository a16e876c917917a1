"""The IDX reader: round trips, and hostile files rejected before allocation."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest

from bnlab.data import read_idx
from bnlab.data.idx import TYPE_CODES
from bnlab.errors import DataFormatError


def idx_bytes(arr: np.ndarray, code: int | None = None, dims=None) -> bytes:
    """Encode ``arr`` as IDX; ``code``/``dims`` override the header (to build hostile files)."""
    if code is None:
        code = next(c for c, dt in TYPE_CODES.items() if dt.newbyteorder("=") == arr.dtype)
    dims = arr.shape if dims is None else dims
    header = bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(tmp_path, name, data: bytes, gz: bool = False):
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_every_type_code(tmp_path, rng, dtype, gz):
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    out = read_idx(write(tmp_path, "a.idx", idx_bytes(arr), gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_compression_detected_by_content_not_suffix(tmp_path, rng):
    arr = rng.integers(0, 255, (7, 2), dtype=np.uint8)
    path = tmp_path / "plain-name"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "only 0 bytes"),
        (b"\x00\x00\x08", "only 3 bytes"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "ndim"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
        (b"PK\x03\x04" + b"\x00" * 20, "magic"),
    ],
    ids=["empty", "short-magic", "bad-magic", "type-code", "ndim-0", "short-dims", "zip"],
)
def test_bad_header(tmp_path, data, match, gz):
    path = write(tmp_path, "bad", data, gz)
    with pytest.raises(DataFormatError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("gz", [False, True])
def test_short_and_long_files(tmp_path, rng, gz):
    good = idx_bytes(rng.integers(0, 255, (10, 4), dtype=np.uint8))
    with pytest.raises(DataFormatError, match="short|40"):
        read_idx(write(tmp_path, "short", good[:-1], gz))
    with pytest.raises(DataFormatError, match="trailing"):
        read_idx(write(tmp_path, "long", good + b"\x00", gz))


def test_truncated_gzip_stream(tmp_path, rng):
    blob = gzip.compress(idx_bytes(rng.integers(0, 255, (50, 50), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match="cut.gz"):
        read_idx(path)


def test_corrupt_gzip_stream(tmp_path, rng):
    blob = bytearray(gzip.compress(idx_bytes(rng.integers(0, 255, (50, 50), dtype=np.uint8))))
    blob[len(blob) // 2] ^= 0xFF
    path = tmp_path / "flip.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataFormatError, match="flip.gz"):
        read_idx(path)


HUGE_DIMS = [
    (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),  # 2**96 elements: overflows any fixed-width product
    (60000, 28, 28 * 1000),  # 47 GB: fits in int64, still must not be allocated
    (1 << 16, 1 << 16),  # exactly 2**32: wraps a uint32 size to 0
]


@pytest.mark.parametrize("max_bytes", [None, 1 << 100], ids=["default-limit", "no-limit"])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims", HUGE_DIMS, ids=["2^96", "47GB", "2^32"])
def test_huge_declared_dims_rejected_with_bounded_memory(tmp_path, dims, gz, max_bytes):
    """Refused by max_bytes or (limit lifted) by the length / deflate bound: never allocated."""
    data = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    path = write(tmp_path, "huge", data + b"\x00" * 1000, gz)
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="refusing to allocate|must be .* bytes"):
            read_idx(path, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak traced memory {peak} bytes while rejecting a hostile header"


def test_gzip_header_beyond_deflate_ratio_rejected_before_allocation(tmp_path):
    """Declared 64 MB (< max_bytes) in a tiny gzip: impossible, refused without allocating."""
    dims = (64, 1024, 1024)
    data = bytes([0, 0, 0x08, 3]) + b"".join(struct.pack(">I", d) for d in dims)
    path = write(tmp_path, "bomb", data, gz=True)
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="cannot expand"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_max_bytes_limit(tmp_path, rng):
    path = write(tmp_path, "a", idx_bytes(rng.integers(0, 255, (100,), dtype=np.uint8)))
    assert read_idx(path, max_bytes=100).shape == (100,)
    with pytest.raises(DataFormatError, match="max_bytes=99"):
        read_idx(path, max_bytes=99)


def test_zero_sized_dim_is_an_empty_array(tmp_path):
    path = write(tmp_path, "empty", bytes([0, 0, 0x08, 2]) + struct.pack(">II", 0, 28))
    assert read_idx(path).shape == (0, 28)
