"""Seeded batching: coverage, determinism per (seed, epoch), resume, scaling, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.data import BatchIterator, batches
from bnlab.errors import DTypeError, ShapeError


@pytest.fixture
def data(rng):
    images = rng.integers(0, 256, (37, 6, 5), dtype=np.uint8)
    labels = np.arange(37, dtype=np.uint8) % 10
    return images, labels


def test_yields_scaled_float32_nchw_and_int64(data):
    images, labels = data
    x, y = next(iter(batches(images, labels, 8, shuffle=False)))
    assert x.shape == (8, 1, 6, 5) and x.dtype == np.float32
    assert y.shape == (8,) and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], images[:8] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels[:8])


@pytest.mark.parametrize("drop_last, sizes", [(False, [10, 10, 10, 7]), (True, [10, 10, 10])])
def test_every_example_once_per_epoch(data, drop_last, sizes):
    images, labels = data
    it = batches(images, labels, 10, seed=3, epoch=1, drop_last=drop_last)
    got = list(it)
    assert [len(y) for _, y in got] == sizes and len(it) == len(sizes)
    # Identify examples by their pixels: the union is the dataset (a permutation of it).
    seen = np.concatenate([np.round(x[:, 0] * 255).astype(np.uint8) for x, _ in got])
    if not drop_last:
        order = np.lexsort(seen.reshape(len(seen), -1).T)
        ref = np.lexsort(images.reshape(len(images), -1).T)
        np.testing.assert_array_equal(seen[order], images[ref])


def test_order_is_a_function_of_seed_and_epoch(data):
    images, labels = data

    def labels_of(**kw):
        return np.concatenate([y for _, y in batches(images, labels, 5, **kw)])

    a = labels_of(seed=1, epoch=0)
    np.testing.assert_array_equal(a, labels_of(seed=1, epoch=0))
    assert not np.array_equal(a, labels_of(seed=1, epoch=1))
    assert not np.array_equal(a, labels_of(seed=2, epoch=0))
    np.testing.assert_array_equal(labels_of(shuffle=False), labels)


def test_resume_mid_epoch_is_bit_identical(data):
    images, labels = data
    full = list(batches(images, labels, 4, seed=9, epoch=2))
    resumed = list(batches(images, labels, 4, seed=9, epoch=2, start_batch=3))
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed, strict=True):
        assert xa.tobytes() == xb.tobytes() and ya.tobytes() == yb.tobytes()


def test_iterating_twice_gives_the_same_batches(data):
    it = BatchIterator(*data, 6, seed=5)
    first = [y.copy() for _, y in it]
    second = [y for _, y in it]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nchw_and_float_inputs(rng):
    images = rng.random((9, 3, 4, 4)).astype(np.float64)
    x, _ = next(iter(batches(images, np.zeros(9, np.int64), 9, shuffle=False)))
    assert x.shape == (9, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, images, rtol=1e-6)  # floats are not rescaled


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": -3}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"epoch": -1}, ValueError, "epoch"),
        ({"start_batch": -1}, ValueError, "start_batch"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
    ],
)
def test_bad_arguments(data, kwargs, error, match):
    args = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        batches(*data, **args)


def test_bad_arrays(rng):
    ok_x, ok_y = np.zeros((4, 2, 2), np.uint8), np.zeros(4, np.int64)
    with pytest.raises(ShapeError, match="same length"):
        batches(ok_x, ok_y[:3], 2)
    with pytest.raises(ShapeError, match="images must be"):
        batches(ok_x[0], ok_y, 2)
    with pytest.raises(DTypeError, match="images must be uint8 or floating"):
        batches(ok_x.astype(np.int32), ok_y, 2)
    with pytest.raises(DTypeError, match="labels must be integer"):
        batches(ok_x, ok_y.astype(np.float32), 2)
    with pytest.raises(ShapeError, match="labels must be a 1-D"):
        batches(ok_x, ok_y[:, None], 2)
    with pytest.raises(TypeError, match="numpy arrays"):
        batches(ok_x.tolist(), ok_y, 2)
