"""npz without pickle, and load_weights' suffix dispatch (incl. torch weights_only)."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest

from bnlab.errors import DataFormatError, DTypeError
from bnlab.io import load_npz, load_weights, save_npz, save_safetensors


@pytest.fixture
def arrays(rng):
    return {
        "conv.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "mask": np.array([True, False]),
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, arrays, compressed):
    save_npz(tmp_path / "a.npz", arrays, compressed=compressed)
    got = load_npz(tmp_path / "a.npz")
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    # and numpy itself reads it
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["conv.weight"], arrays["conv.weight"])


def test_save_npz_refuses_object_arrays_and_keeps_old_file(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"old")
    with pytest.raises(DTypeError, match="object"):
        save_npz(path, {"o": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(TypeError, match="str -> ndarray"):
        save_npz(path, {"l": [1, 2]})
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def _pickle_npz(path):
    np.savez(path, ok=np.zeros(2), evil=np.array([{"payload": 1}], dtype=object))


class _Boom:
    """Unpickling this would run code: it must never be unpickled."""

    def __reduce__(self):
        return (pytest.fail, ("pickle payload was executed",))


def test_pickle_payloads_are_refused(tmp_path):
    _pickle_npz(tmp_path / "obj.npz")
    with pytest.raises(DataFormatError, match="pickle"):
        load_npz(tmp_path / "obj.npz")
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(DataFormatError):
        load_npz(raw)
    # a zip whose member is a bare pickle
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as zf:
        zf.writestr("w.npy", pickle.dumps(_Boom()))
    with pytest.raises(DataFormatError):
        load_npz(tmp_path / "member.npz")


def _npy_with_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + bytes(16)


@pytest.mark.parametrize("shape", [(1 << 40,), (1 << 20, 1 << 20, 1 << 20), (3,)])
def test_npy_member_declaring_more_than_stored_is_refused(tmp_path, shape):
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as zf:
        zf.writestr("w.npy", _npy_with_header(shape))
    with pytest.raises(DataFormatError, match="declares shape"):
        load_npz(tmp_path / "h.npz")


def test_npz_truncated_bitflipped_and_wrong_format(tmp_path, arrays):
    save_npz(tmp_path / "good.npz", arrays)
    blob = (tmp_path / "good.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    for n in range(0, len(blob), max(1, len(blob) // 40)):
        bad.write_bytes(blob[:n])
        with pytest.raises(DataFormatError, match="bad.npz"):
            load_npz(bad)
    # a flip inside the stored data is caught by the zip CRC
    data_pos = blob.index(arrays["conv.weight"].tobytes()[:8])
    flipped = bytearray(blob)
    flipped[data_pos + 3] ^= 0x10
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DataFormatError, match="bad.npz"):
        load_npz(bad)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(DataFormatError):
        load_npz(tmp_path / "plain.npy")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DataFormatError, match="not a .npy"):
        load_npz(tmp_path / "other.npz")


def test_load_npz_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "none.npz")


def test_load_weights_dispatch(tmp_path, arrays):
    save_npz(tmp_path / "w.npz", arrays)
    save_safetensors(tmp_path / "w.safetensors", arrays)
    for name in ("w.npz", "w.safetensors"):
        got = load_weights(tmp_path / name)
        np.testing.assert_array_equal(got["conv.weight"], arrays["conv.weight"])
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(DataFormatError, match="unknown weight file suffix"):
        load_weights(tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")
    # wrong format behind a right suffix
    (tmp_path / "fake.safetensors").write_bytes((tmp_path / "w.npz").read_bytes())
    with pytest.raises(DataFormatError):
        load_weights(tmp_path / "fake.safetensors")


def test_load_weights_torch(tmp_path, arrays):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    sd["half"] = torch.ones(2, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.pth")
    for name in ("w.pt", "nested.pth"):
        got = load_weights(tmp_path / name)
        np.testing.assert_array_equal(got["conv.weight"], arrays["conv.weight"])
        assert got["half"].dtype == np.float32
    torch.save({"w": _Boom()}, tmp_path / "evil.pt")  # refused by weights_only
    with pytest.raises(DataFormatError, match="weights-only"):
        load_weights(tmp_path / "evil.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:100])
    with pytest.raises(DataFormatError):
        load_weights(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataFormatError, match="state_dict"):
        load_weights(tmp_path / "list.pt")


def _forge_sizes(blob: bytes, file_size: int) -> bytes:
    """Rewrite the uncompressed size of the (single) member in both zip headers."""
    out = bytearray(blob)
    local = out.index(b"PK\x03\x04")
    out[local + 22 : local + 26] = file_size.to_bytes(4, "little")
    central = out.index(b"PK\x01\x02")
    out[central + 24 : central + 28] = file_size.to_bytes(4, "little")
    return bytes(out)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_forged_zip_sizes_refused_before_allocation(tmp_path, compression):
    import tracemalloc

    declared = 1 << 31  # 2 GiB of float64 declared by both the zip directory and the npy header
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (declared // 8,)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        zf.writestr("w.npy", header.getvalue() + bytes(64))
    path = tmp_path / "forged.npz"
    path.write_bytes(_forge_sizes(buf.getvalue(), declared + len(header.getvalue())))
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="claims"):
            load_npz(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
