"""Hostile IDX data files: rejected before allocation (bounded memory), with a clear error."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

import bnlab.data.fashion_mnist as fm
from bnlab.data import clear_cache, load_fashion_mnist, read_idx
from bnlab.errors import DataFormatError

FAMILY = "hostile data files (IDX)"
MEMORY_BOUND = 4 << 20  # bytes of Python-traced allocation allowed while rejecting a header


def header(code: int, dims) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _write(path, data: bytes, gz: bool):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _bounded(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"traced peak {peak} bytes while rejecting a hostile file"


CASES = {
    # name: (bytes, needle)
    "huge-dims-2^96": (header(0x08, [2**32 - 1] * 3) + bytes(64), "refusing to allocate"),
    "huge-dims-int32-wrap": (header(0x0C, [2**16, 2**14]) + bytes(64), "refusing to allocate"),
    "huge-dims-47GB": (header(0x08, [60000, 28, 28000]) + bytes(64), "refusing to allocate"),
    "wrong-magic": (b"\x08\x03\x00\x00" + bytes(16), "magic"),
    "unknown-type-code": (header(0x0A, [4]) + bytes(4), "type code 0x0A"),
    "short-file": (header(0x08, [10, 28, 28]) + bytes(7839), "7840"),
    "trailing-bytes": (header(0x08, [2]) + bytes(3), "trailing"),
    "truncated-header": (header(0x08, [10, 28, 28])[:9], "truncated IDX header"),
    "zero-ndim": (header(0x08, []), "ndim"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_idx(tmp_path, name, gz):
    data, needle = CASES[name]
    path = _write(tmp_path / f"{name}.idx", data, gz)
    # default limit, then with the limit lifted (the length / deflate checks must still hold)
    for kwargs, needles in (({}, [str(path), needle]), ({"max_bytes": 1 << 62}, [str(path)])):
        _bounded(
            lambda kw=kwargs, nd=needles: expect_clean_error(
                lambda: read_idx(path, **kw), DataFormatError, nd, [path]
            )
        )


def test_truncated_gzip(tmp_path, rng):
    blob = gzip.compress(header(0x08, [100, 28, 28]) + rng.bytes(78400))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    expect_clean_error(lambda: read_idx(path), DataFormatError, ["cut.gz", "gzip"])


def test_mismatched_image_and_label_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [])
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n_img, n_lbl in (("train", 6, 5), ("test", 3, 3)):
        img, lbl = fm.FILES[split]
        _write(folder / f"{img}.gz", header(0x08, [n_img, 28, 28]) + bytes(n_img * 784), True)
        _write(folder / f"{lbl}.gz", header(0x08, [n_lbl]) + bytes(n_lbl), True)
    clear_cache()
    expect_clean_error(
        lambda: load_fashion_mnist("train"), DataFormatError, ["6 images", "5 labels"], [folder]
    )
    assert load_fashion_mnist("test")[0].shape == (3, 28, 28)


def test_label_values_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path])
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        img, lbl = fm.FILES[split]
        _write(tmp_path / img, header(0x08, [2, 28, 28]) + bytes(2 * 784), False)
        _write(tmp_path / lbl, header(0x08, [2]) + bytes([3, 200]), False)
    clear_cache()
    expect_clean_error(lambda: load_fashion_mnist("test"), DataFormatError, ["0..9", "200"])
    clear_cache()


def test_real_files_are_read_exactly(fashion_mnist_dir):
    """Sanity for the rejections above: the genuine files pass the same checks."""
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8 and labels.max() == 9
