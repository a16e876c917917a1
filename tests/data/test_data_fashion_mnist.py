"""Finding and loading Fashion-MNIST: the real files, and fake folders for every failure."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

import bnlab.data.fashion_mnist as fm
from bnlab.data import INSTALL_COMMAND, clear_cache, find_fashion_mnist, load_fashion_mnist
from bnlab.errors import DataFormatError


def test_real_data_shapes_counts_and_labels(fashion_mnist_dir):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split, root=fashion_mnist_dir)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        # Fashion-MNIST is exactly balanced: n/10 examples of every class 0..9.
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
        assert images.max() == 255 and images.min() == 0


def test_real_data_cache_returns_read_only_arrays(fashion_mnist_dir):
    a, la = load_fashion_mnist("test", root=fashion_mnist_dir)
    b, lb = load_fashion_mnist("test", root=fashion_mnist_dir)
    assert a is b and la is lb
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1
    c, _ = load_fashion_mnist("test", root=fashion_mnist_dir, cache=False)
    assert c is not a and c.flags.writeable
    np.testing.assert_array_equal(a, c)


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def make_fake(folder, n_train=12, n_test=5, labels_override=None, gz=True):
    """Write a tiny Fashion-MNIST look-alike into ``folder``; return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        if labels_override is not None and split == "train":
            labels = labels_override
        for stem, arr in zip(fm.FILES[split], (images, labels), strict=True):
            data = _idx(arr)
            name = stem + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
        out[split] = (images, labels)
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $BNLAB_DATA, an empty cwd, no system folder, an empty cache."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path / "system"])
    clear_cache()
    yield tmp_path
    clear_cache()


def test_missing_data_error_lists_every_place_and_the_install_command(isolated):
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist()
    msg = str(err.value)
    assert INSTALL_COMMAND == "sudo apt-get install dataset-fashion-mnist"
    assert INSTALL_COMMAND in msg and "never downloads" in msg
    for place in fm.candidate_dirs():
        assert str(place) in msg
    assert str(isolated / "cwd" / "data") in msg and str(isolated / "system") in msg


@pytest.mark.parametrize("how", ["root", "env"])
@pytest.mark.parametrize("state", ["missing", "empty", "incomplete", "a file"])
def test_a_named_folder_without_the_data_is_an_error_naming_it(isolated, monkeypatch, how, state):
    """A folder the user names is used or refused: never replaced by another copy, even when
    ./data and the system folder both hold the data set."""
    make_fake(isolated / "cwd" / "data")
    make_fake(isolated / "system")
    named = isolated / "mine"
    if state == "empty":
        named.mkdir()
    elif state == "incomplete":
        make_fake(named)
        (named / "train-labels-idx1-ubyte.gz").unlink()
    elif state == "a file":
        named.write_text("not a folder")
    root = named if how == "root" else None
    if how == "env":
        monkeypatch.setenv("BNLAB_DATA", str(named))
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(root)
    msg = str(err.value)
    assert str(named) in msg and "never falls back" in msg
    assert ("$BNLAB_DATA" in msg) == (how == "env")
    assert str(isolated / "system") not in msg
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist("test", root=root)


@pytest.mark.parametrize("where", ["root", "env", "cwd", "system", "torchvision-layout"])
def test_found_in_each_place(isolated, monkeypatch, where):
    folder = {
        "root": isolated / "given",
        "env": isolated / "env",
        "cwd": isolated / "cwd" / "data",
        "system": isolated / "system",
        "torchvision-layout": isolated / "cwd" / "data" / "FashionMNIST" / "raw",
    }[where]
    make_fake(folder, gz=where != "env")
    root = folder if where == "root" else None
    if where == "env":
        monkeypatch.setenv("BNLAB_DATA", str(folder))
    assert find_fashion_mnist(root) == folder
    images, labels = load_fashion_mnist("test", root=root)
    assert images.shape == (5, 28, 28) and labels.shape == (5,)


def test_env_is_the_only_place_when_no_root_is_given(isolated, monkeypatch):
    make_fake(isolated / "env", n_test=3)
    make_fake(isolated / "cwd" / "data", n_test=4)
    monkeypatch.setenv("BNLAB_DATA", str(isolated / "env"))
    assert load_fashion_mnist("test")[0].shape[0] == 3
    make_fake(isolated / "given", n_test=2)
    assert load_fashion_mnist("test", root=isolated / "given")[0].shape[0] == 2


def test_data_source_records_sizes_and_hashes(isolated):
    import hashlib

    folder = isolated / "given"
    make_fake(folder)
    src = fm.data_source(folder)
    assert src["folder"] == str(folder.resolve())
    assert sorted(src["files"]) == sorted(p.name for p in folder.iterdir())
    for name, info in src["files"].items():
        data = (folder / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_root_takes_precedence(isolated, monkeypatch):
    make_fake(isolated / "given", n_test=3)
    make_fake(isolated / "cwd" / "data", n_test=4)
    assert load_fashion_mnist("test", root=isolated / "given")[0].shape[0] == 3
    assert load_fashion_mnist("test")[0].shape[0] == 4


def test_incomplete_folder_is_not_found(isolated):
    make_fake(isolated / "given")
    (isolated / "given" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_fashion_mnist(isolated / "given")


def test_loaded_values_equal_what_was_written(isolated):
    written = make_fake(isolated / "given")
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, root=isolated / "given")
        np.testing.assert_array_equal(images, written[split][0])
        np.testing.assert_array_equal(labels, written[split][1])


def test_count_mismatch(isolated):
    make_fake(isolated / "given", labels_override=np.zeros(11, np.uint8))
    with pytest.raises(DataFormatError, match="12 images but .* 11 labels"):
        load_fashion_mnist("train", root=isolated / "given")


def test_label_out_of_range(isolated):
    make_fake(isolated / "given", labels_override=np.full(12, 10, np.uint8))
    with pytest.raises(DataFormatError, match=r"labels must be in 0\.\.9, found 10"):
        load_fashion_mnist("train", root=isolated / "given")


def test_wrong_image_shape(isolated):
    folder = isolated / "given"
    make_fake(folder)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx(np.zeros((5, 28, 27), np.uint8)))
    )
    with pytest.raises(DataFormatError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist("test", root=folder)


def test_corrupt_file_in_the_folder(isolated):
    folder = isolated / "given"
    make_fake(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFormatError, match="train-images"):
        load_fashion_mnist("train", root=folder)


def test_bad_split(isolated):
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("valid")


def test_cache_invalidated_when_file_changes(isolated):
    folder = isolated / "given"
    make_fake(folder, n_test=5)
    assert load_fashion_mnist("test", root=folder)[0].shape[0] == 5
    make_fake(folder, n_test=6)
    assert load_fashion_mnist("test", root=folder)[0].shape[0] == 6
