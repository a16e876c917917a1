"""Pure-NumPy safetensors: compatible both ways with the `safetensors` package; hostile files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bnlab.errors import DataFormatError, DTypeError
from bnlab.io import load_safetensors, save_safetensors

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8,
          np.uint16, np.uint32, np.uint64, np.bool_]  # fmt: skip


def sample(rng) -> dict[str, np.ndarray]:
    t = {f"t.{np.dtype(d).name}": (rng.standard_normal((2, 3)) * 50).astype(d) for d in DTYPES}
    t["scalar"] = np.array(3.5, np.float32)
    t["empty"] = np.zeros((0, 4), np.float32)
    t["features.0.weight"] = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
    t["strided"] = rng.standard_normal((4, 6))[:, ::2]  # non-contiguous input
    return t


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


def test_ours_to_reference_package(tmp_path, rng):
    t = sample(rng)
    save_safetensors(tmp_path / "a.safetensors", t, {"format": "np", "epoch": "3"})
    assert_same(t, load_file(tmp_path / "a.safetensors"))
    from safetensors import safe_open

    with safe_open(tmp_path / "a.safetensors", "np") as f:
        assert f.metadata() == {"format": "np", "epoch": "3"}


def test_reference_package_to_ours(tmp_path, rng):
    t = {k: np.ascontiguousarray(v) for k, v in sample(rng).items()}
    save_file(t, tmp_path / "b.safetensors", metadata={"k": "v"})
    tensors, meta = load_safetensors(tmp_path / "b.safetensors")
    assert_same(t, tensors)
    assert meta == {"k": "v"}


def test_round_trip_without_metadata_and_big_endian_input(tmp_path, rng):
    x = rng.standard_normal((3, 2)).astype(">f4")
    save_safetensors(tmp_path / "c.safetensors", {"x": x})
    tensors, meta = load_safetensors(tmp_path / "c.safetensors")
    assert meta == {} and tensors["x"].dtype == np.float32
    np.testing.assert_array_equal(tensors["x"], x)


@pytest.mark.parametrize(
    "tensors, metadata, error",
    [
        ({"o": np.array([None])}, None, DTypeError),
        ({"c": np.zeros(2, np.complex64)}, None, DTypeError),
        ({"s": np.array(["a"])}, None, DTypeError),
        ({"l": [1.0, 2.0]}, None, TypeError),
        ({1: np.zeros(2)}, None, TypeError),
        ({"__metadata__": np.zeros(2)}, None, TypeError),
        ({"x": np.zeros(2)}, {"epoch": 3}, TypeError),
        ([np.zeros(2)], None, TypeError),
    ],
    ids=["object", "complex", "str", "list", "int-key", "reserved-key", "meta-int", "not-dict"],
)
def test_save_refuses_bad_input_and_writes_nothing(tmp_path, tensors, metadata, error):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(error):
        save_safetensors(path, tensors, metadata)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def build(header: dict, data: bytes, n: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if n is None else n) + blob + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}  # fmt: skip
GOOD_DATA = bytes(16)


def _entry(**kw):
    return {"a": {**GOOD["a"], **kw}, "b": GOOD["b"]}


_A = b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
_DUP = b"{" + _A + b"," + _A + b"}"

HOSTILE = {
    "empty": b"",
    "seven-bytes": b"\x01" * 7,
    "header-len-huge": build(GOOD, GOOD_DATA, n=1 << 62),
    "header-len-past-eof": build(GOOD, GOOD_DATA, n=10_000),
    "header-len-zero": build(GOOD, GOOD_DATA, n=0),
    "not-json": struct.pack("<Q", 4) + b"{{{{" + GOOD_DATA,
    "not-utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    "json-list": build([1, 2], b""),
    "duplicate-key": struct.pack("<Q", len(_DUP)) + _DUP + bytes(8),
    "unknown-dtype": build(_entry(dtype="Q7"), GOOD_DATA),
    "bf16-unsupported": build(_entry(dtype="BF16", shape=[4]), GOOD_DATA),
    "negative-shape": build(_entry(shape=[-2]), GOOD_DATA),
    "float-shape": build(_entry(shape=[2.0]), GOOD_DATA),
    "bool-shape": build(_entry(shape=[True, True]), GOOD_DATA),
    "shape-span-mismatch": build(_entry(shape=[3]), GOOD_DATA),
    "huge-shape": build(_entry(shape=[1 << 40, 1 << 40]), GOOD_DATA),
    "offsets-reversed": build(_entry(data_offsets=[8, 0]), GOOD_DATA),
    "offsets-one": build(_entry(data_offsets=[8]), GOOD_DATA),
    "extra-field": build(_entry(extra=1), GOOD_DATA),
    "missing-field": build({"a": {"dtype": "F32", "shape": [2]}}, GOOD_DATA),
    "overlap": build({"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [4, 12]}}, GOOD_DATA),
    "gap": build({"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [12, 20]}}, bytes(20)),
    "truncated-data": build(GOOD, GOOD_DATA[:-1]),
    "trailing-data": build(GOOD, GOOD_DATA + b"\x00"),
    "metadata-not-str": build({**GOOD, "__metadata__": {"epoch": 3}}, GOOD_DATA),
    "npz-file": b"PK\x03\x04" + bytes(60),
    "pickle": b"\x80\x04\x95" + bytes(40),
}


def test_good_fixture_is_good(tmp_path):
    """The hostile cases are mutations of this file, which itself loads."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(build(GOOD, GOOD_DATA))
    tensors, _ = load_safetensors(path)
    assert tensors["a"].shape == (2,) and tensors["b"].dtype == np.int64
    assert_same(tensors, load_file(path))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_a_data_format_error_naming_the_file(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(DataFormatError) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


def test_every_truncation_of_a_real_file_is_refused(tmp_path, rng):
    path = tmp_path / "full.safetensors"
    save_safetensors(path, {"w": rng.standard_normal((3, 3)), "b": np.arange(3)}, {"m": "x"})
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(blob)):
        cut.write_bytes(blob[:n])
        with pytest.raises(DataFormatError):
            load_safetensors(cut)


def test_bit_flips_in_the_header_are_refused_or_harmless(tmp_path, rng):
    """A flip in the header either breaks validation or yields a consistent, same-size file.

    A flip inside the raw tensor bytes cannot be detected by the format (it has no checksum):
    the checkpoint layer adds a digest for that.
    """
    path = tmp_path / "full.safetensors"
    save_safetensors(path, {"w": rng.standard_normal((3, 3)), "b": np.arange(3)})
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    flipped = tmp_path / "flip.safetensors"
    refused = 0
    for pos in range(8 + n):
        for bit in (0, 6):
            mutated = bytearray(blob)
            mutated[pos] ^= 1 << bit
            flipped.write_bytes(bytes(mutated))
            try:
                tensors, _ = load_safetensors(flipped)
            except DataFormatError:
                refused += 1
                continue
            # accepted: it must still describe exactly the bytes in the file
            assert sum(t.nbytes for t in tensors.values()) == len(blob) - 8 - n
    assert refused > (8 + n)  # most flips are caught


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "nope.safetensors")
