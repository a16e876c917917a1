"""Bad inputs to the data loader (bnlab.data): clear errors, inputs untouched, no downloads."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

import bnlab.data.fashion_mnist as fm
from bnlab.data import batches, find_fashion_mnist, load_fashion_mnist
from bnlab.errors import DTypeError, ShapeError

FAMILY = "bad input: data loader"


@pytest.fixture
def data(rng):
    return rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8) % 10


BATCH_CASES = [
    ("batch-size-zero", {"batch_size": 0}, ValueError, ["batch_size", ">= 1", "0"]),
    ("batch-size-negative", {"batch_size": -256}, ValueError, ["batch_size", ">= 1"]),
    ("batch-size-float", {"batch_size": 32.0}, TypeError, ["batch_size", "int"]),
    ("seed-negative", {"seed": -1}, ValueError, ["seed", ">= 0"]),
    ("epoch-negative", {"epoch": -2}, ValueError, ["epoch", ">= 0"]),
    ("epoch-float", {"epoch": 1.5}, TypeError, ["epoch"]),
    ("drop-last-str", {"drop_last": "no"}, TypeError, ["drop_last", "True or False"]),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batches_bad_arguments(data, case):
    _, override, exc, needles = case
    kw = {"batch_size": 4, **override}
    expect_clean_error(lambda: batches(*data, **kw), exc, needles, list(data))


def test_batches_bad_arrays(data):
    images, labels = data
    expect_clean_error(
        lambda: batches(images, labels[:-1], 4), ShapeError, ["10 images", "9 labels"], list(data)
    )
    expect_clean_error(
        lambda: batches(images.astype(np.int16), labels, 4), DTypeError, ["images", "uint8"]
    )
    expect_clean_error(
        lambda: batches(images, labels.astype(np.float64), 4), DTypeError, ["labels", "integer"]
    )
    expect_clean_error(lambda: batches(images[0], labels, 4), ShapeError, ["images", "(N, H, W)"])


def test_missing_dataset_names_every_place_and_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path / "usr-share"])
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    err = expect_clean_error(
        find_fashion_mnist,
        FileNotFoundError,
        ["sudo apt-get install dataset-fashion-mnist", "never downloads", "--data"],
        [tmp_path],
    )
    assert str(tmp_path / "usr-share") in str(err) and str(tmp_path / "data") in str(err)


def test_a_named_folder_is_named_in_the_error_and_nothing_else_is_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path / "usr-share"])
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    err = expect_clean_error(
        lambda: find_fashion_mnist(tmp_path / "given"),
        FileNotFoundError,
        ["given", "does not exist", "never falls back", "dataset-fashion-mnist"],
        [tmp_path],
    )
    assert str(tmp_path / "usr-share") not in str(err) and "env" not in str(err)


def test_bad_split_name():
    expect_clean_error(lambda: load_fashion_mnist("validation"), ValueError, ["split", "train"])
