"""Wrong, truncated, bit-flipped and pickled weight / checkpoint files: a clear error, no pickle.

Every loader is pointed at hostile files; the model it would load into must be unchanged.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab.errors import DataFormatError
from bnlab.io import load_npz, load_safetensors, load_weights, save_npz, save_safetensors

FAMILY = "bad input: checkpoints & weight files"


class Payload:
    """Unpickling this would run code: no loader may ever unpickle it."""

    def __reduce__(self):
        return (pytest.fail, ("a pickle payload was executed",))


@pytest.fixture
def weights(rng):
    return {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
            "bn.running_var": rng.random(4).astype(np.float32)}  # fmt: skip


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_truncated_files(tmp_path, weights, suffix):
    path = tmp_path / f"w{suffix}"
    (save_safetensors if suffix == ".safetensors" else save_npz)(path, weights)
    blob = path.read_bytes()
    for cut in (0, 7, 8, len(blob) // 3, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        expect_clean_error(lambda p=path: load_weights(p), DataFormatError, [str(path)], [path])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_wrong_format_behind_the_suffix(tmp_path, weights, suffix):
    path = tmp_path / f"w{suffix}"
    other = ".npz" if suffix == ".safetensors" else ".safetensors"
    (save_npz if other == ".npz" else save_safetensors)(tmp_path / f"o{other}", weights)
    path.write_bytes((tmp_path / f"o{other}").read_bytes())
    expect_clean_error(lambda: load_weights(path), DataFormatError, [str(path)], [path])
    path.write_text("epoch: 3\nthis is a yaml file\n")
    expect_clean_error(lambda: load_weights(path), DataFormatError, [str(path)], [path])


def test_safetensors_header_bit_flips(tmp_path, weights):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, weights)
    blob = path.read_bytes()
    refused = 0
    for pos in (0, 3, 7, 8, 9, 20, 40, 60):
        bad = bytearray(blob)
        bad[pos] ^= 0x04
        path.write_bytes(bytes(bad))
        try:
            load_safetensors(path)
        except DataFormatError as err:
            refused += str(path) in str(err)
    assert refused >= 6


def test_npz_data_bit_flip_caught_by_crc(tmp_path, weights):
    path = tmp_path / "w.npz"
    save_npz(path, weights)
    blob = bytearray(path.read_bytes())
    blob[blob.index(weights["conv.weight"].tobytes()[:16]) + 5] ^= 0x01
    path.write_bytes(bytes(blob))
    expect_clean_error(lambda: load_npz(path), DataFormatError, [str(path)], [path])


def test_pickle_payloads_are_refused_everywhere(tmp_path):
    raw = pickle.dumps({"w": Payload()})
    for name in ("p.npz", "p.safetensors"):
        (tmp_path / name).write_bytes(raw)
        expect_clean_error(lambda n=name: load_weights(tmp_path / n), DataFormatError, [name])
    np.savez(tmp_path / "obj.npz", w=np.array([Payload], dtype=object))
    expect_clean_error(lambda: load_npz(tmp_path / "obj.npz"), DataFormatError, ["pickle"])
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as zf:
        zf.writestr("w.npy", raw)
    expect_clean_error(lambda: load_npz(tmp_path / "member.npz"), DataFormatError, ["member"])


def test_torch_pickle_payload_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    expect_clean_error(
        lambda: load_weights(tmp_path / "evil.pt"), DataFormatError, ["weights-only", "evil.pt"]
    )


def test_missing_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    expect_clean_error(
        lambda: load_weights(tmp_path / "w.h5"), DataFormatError, [".h5", "expected"]
    )


def test_failed_save_leaves_previous_file(tmp_path, weights):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, weights)
    expect_clean_error(
        lambda: save_safetensors(path, {**weights, "bad": np.array(["str"])}), TypeError,
        ["bad", "dtype"], [tmp_path],
    )  # fmt: skip


# ------------------------------------------------------------------ bnlab.checkpoint


@pytest.fixture
def ckpt(tmp_path):
    ck = pytest.importorskip("bnlab.checkpoint")
    from bnlab.models import lenet_bn
    from bnlab.optim import SGD

    model = lenet_bn(seed=0)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = ck.save_checkpoint(tmp_path / "run", model, opt, model_name="lenet-bn", epoch=1)
    return ck, weights


def test_checkpoint_truncated(ckpt):
    ck, weights = ckpt
    weights.write_bytes(weights.read_bytes()[:-100])
    expect_clean_error(lambda: ck.load_checkpoint(weights), DataFormatError, [weights.name])


def test_checkpoint_bit_flip_in_data_caught_by_the_sidecar(ckpt):
    ck, weights = ckpt
    blob = bytearray(weights.read_bytes())
    blob[-50] ^= 0x08
    weights.write_bytes(bytes(blob))
    expect_clean_error(lambda: ck.load_checkpoint(weights), DataFormatError, ["sha256"])


def test_checkpoint_bit_flip_in_data_without_sidecar(ckpt):
    ck, weights = ckpt
    weights.with_suffix(".json").unlink()
    blob = bytearray(weights.read_bytes())
    blob[-50] ^= 0x08
    weights.write_bytes(bytes(blob))
    with pytest.raises(DataFormatError):
        ck.load_checkpoint(weights)


def test_checkpoint_of_another_model(ckpt):
    ck, weights = ckpt
    expect_clean_error(
        lambda: ck.load_checkpoint(weights, expect_model="lenet"), ValueError, ["lenet-bn", "lenet"]
    )


def test_plain_safetensors_is_not_a_checkpoint(ckpt, tmp_path, weights):
    ck, _ = ckpt
    save_safetensors(tmp_path / "plain.safetensors", weights)
    expect_clean_error(
        lambda: ck.load_checkpoint(tmp_path / "plain.safetensors"), DataFormatError,
        ["not a bnlab checkpoint"],
    )  # fmt: skip


def test_checkpoint_missing(ckpt, tmp_path):
    ck, _ = ckpt
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "nothing-here")


def test_checkpoint_into_a_different_model_changes_nothing(ckpt):
    ck, weights = ckpt
    from bnlab.models import lenet

    target = lenet(seed=3)
    state = ck.load_checkpoint(weights).model_state
    expect_clean_error(lambda: target.load_state_dict(state), KeyError, ["missing keys"], [target])
