"""Batch renorm and ghost batch norm (bnlab.nn.renorm / bnlab.nn.ghost): the same guarantees as
BatchNorm: bad hyper-parameters and inputs raise before any buffer changes, and a non-finite
batch never reaches the running statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reliability_helpers import expect_clean_error, snapshot

from bnlab.errors import NonFiniteBatchWarning, ShapeError

renorm = pytest.importorskip("bnlab.nn.renorm")
ghost = pytest.importorskip("bnlab.nn.ghost")

FAMILY = "bad input: nn modules"
FAMILIES = {"test_nonfinite_batch_never_reaches_the_statistics": "non-finite batches"}

MODULES = {
    "renorm": lambda: renorm.BatchRenorm2d(3),
    "ghost-mean": lambda: ghost.GhostBatchNorm2d(3, virtual_batch_size=2),
    "ghost-sequential": lambda: ghost.GhostBatchNorm2d(3, 2, running_update="sequential"),
}


def _warm(make, rng):
    m = make()
    m(rng.standard_normal((4, 3, 2, 2)).astype(np.float32))
    return m


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nonfinite_batch_never_reaches_the_statistics(rng, name):
    m = _warm(MODULES[name], rng)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    x[3, 2, 1, 1] = np.nan  # in the last virtual batch only
    before = snapshot(m)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m(x)
    assert any(issubclass(w.category, NonFiniteBatchWarning) for w in seen)
    assert snapshot(m) == before


@pytest.mark.parametrize("name", sorted(MODULES))
def test_channel_mismatch_changes_nothing(rng, name):
    m = _warm(MODULES[name], rng)
    x = rng.standard_normal((4, 5, 2, 2)).astype(np.float32)
    expect_clean_error(lambda: m(x), ShapeError, ["5"], [m])


@pytest.mark.parametrize(
    "make, exc, needles",
    [
        (lambda: renorm.BatchRenorm2d(3, rmax=0.5), ValueError, ["rmax", ">= 1"]),
        (lambda: renorm.BatchRenorm2d(3, dmax=-1.0), ValueError, ["dmax", ">= 0"]),
        (
            lambda: renorm.BatchRenorm2d(3, track_running_stats=False),
            ValueError,
            ["track_running_stats"],
        ),  # fmt: skip
        (lambda: renorm.BatchRenorm2d(3, momentum=None), ValueError, ["momentum"]),
        (lambda: ghost.GhostBatchNorm2d(3, 0), ValueError, ["virtual_batch_size", ">= 1"]),
        (lambda: ghost.GhostBatchNorm2d(3, 2.5), TypeError, ["virtual_batch_size"]),
        (
            lambda: ghost.GhostBatchNorm2d(3, 2, running_update="ema"),
            ValueError,
            ["running_update"],
        ),  # fmt: skip
    ],
    ids=[
        "rmax<1",
        "dmax<0",
        "renorm-no-tracking",
        "renorm-momentum-none",
        "vbs-0",
        "vbs-float",
        "running-update",
    ],  # fmt: skip
)
def test_bad_hyperparameters(make, exc, needles):
    expect_clean_error(make, exc, needles)


def test_ghost_virtual_batch_of_one_value_per_channel(rng):
    """Virtual batches of one sample of (N, C) input: one value per channel, as in BatchNorm."""
    m = ghost.GhostBatchNorm1d(3, virtual_batch_size=1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    expect_clean_error(lambda: m(x), (ShapeError, ValueError), ["value"], [m])
