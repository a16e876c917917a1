"""A training batch with NaN/Inf never reaches the running statistics, on every path that keeps
them: functional (each backend, each layout, each convention), nn modules, bnlab.torch (fast path
and the torch-ops reference path), d2l's BatchNorm. SyncBN (one rank with NaN) is in
test_rel_distributed.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reliability_helpers import expect_clean_error, snapshot

from bnlab import functional as F
from bnlab import nn
from bnlab.backend import numba_available
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError

FAMILY = "non-finite batches"
BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])
POISON = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _warns_and_keeps(fn, state):
    before = [snapshot(s) for s in state]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    assert any(issubclass(w.category, NonFiniteBatchWarning) for w in seen), [
        str(w.message) for w in seen
    ]
    for obj, old in zip(state, before, strict=True):
        assert snapshot(obj) == old, "running statistics changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["NC", "NCL", "NCHW", "NHWC"])
@pytest.mark.parametrize("poison", sorted(POISON))
def test_functional_every_backend_and_layout(rng, backend, layout, poison):
    shape = {"NC": (6, 3), "NCL": (6, 3, 4), "NCHW": (6, 3, 2, 2), "NHWC": (6, 2, 2, 3)}[layout]
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[7] = POISON[poison]
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.random(3).astype(np.float32)
    nbt = np.array(4, np.int64)
    _warns_and_keeps(
        lambda: F.batch_norm_forward(
            x,
            None,
            None,
            training=True,
            running_mean=rm,
            running_var=rv,
            layout=layout,
            num_batches_tracked=nbt,
            backend=backend,
        ),  # fmt: skip
        [rm, rv, nbt],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["pytorch", "keras", "flax", "cs231n", "d2l"])
def test_functional_every_convention_raise_policy(rng, backend, convention):
    x = rng.standard_normal((5, 3, 2, 2)).astype(np.float64)
    x[0, 2, 1, 1] = np.nan
    rm, rv = np.zeros(3), np.ones(3)
    expect_clean_error(
        lambda: F.batch_norm_forward(
            x,
            None,
            None,
            training=True,
            running_mean=rm,
            running_var=rv,
            convention=convention,
            backend=backend,
            on_nonfinite="raise",
        ),  # fmt: skip
        NonFiniteError,
        ["NaN or Inf"],
        [rm, rv],
    )


def test_momentum_none_cumulative_average_counter_untouched(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    x[1, 1] = np.inf
    rm, rv, nbt = np.zeros(3, np.float32), np.ones(3, np.float32), np.array(2, np.int64)
    _warns_and_keeps(
        lambda: F.batch_norm(
            x, rm, rv, training=True, momentum=None, layout="NC", num_batches_tracked=nbt
        ),  # fmt: skip
        [rm, rv, nbt],
    )


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6, 3)), (nn.BatchNorm2d, (6, 3, 2, 2))])
def test_nn_modules(rng, cls, shape):
    m = cls(3)
    m(rng.standard_normal(shape).astype(np.float32))  # non-initial buffers
    x = rng.standard_normal(shape).astype(np.float32)
    x[2, 1] = np.nan
    _warns_and_keeps(lambda: m(x), [m])


def test_nn_model_keeps_training_after_a_bad_batch(rng):
    """The bad batch is skipped by the statistics; the next good batch updates them normally."""
    from bnlab.models import lenet_bn

    model = lenet_bn(seed=0)
    bad = rng.random((4, 1, 28, 28)).astype(np.float32)
    bad[0, 0, 3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteBatchWarning)
        model(bad)
    for name, buf in model.named_buffers():
        assert np.isfinite(buf).all(), name
    model(rng.random((4, 1, 28, 28)).astype(np.float32))
    counts = [int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts == [1] * len(counts)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "dtype, memory_format",
    [
        (torch.float32, torch.contiguous_format),  # fast path
        (torch.float64, torch.channels_last),  # fast path, channels-last
        (torch.float16, torch.contiguous_format),  # torch-ops reference path
    ],
    ids=["fast-f32", "fast-f64-channels-last", "reference-f16"],
)
def test_bnlab_torch_paths(dtype, memory_format):
    import bnlab.torch as bt

    m = bt.BatchNorm2d(3).to(dtype)
    m(torch.randn(4, 3, 2, 2, dtype=dtype))
    x = torch.randn(4, 3, 2, 2, dtype=dtype).contiguous(memory_format=memory_format)
    x[1, 0, 1, 0] = float("inf")
    _warns_and_keeps(lambda: m(x), [m])


def test_d2l_batch_norm_module():
    import bnlab.torch as bt

    m = bt.BatchNorm(3, num_dims=4)
    m(torch.randn(4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    before = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x)
    assert snapshot(m) == before
