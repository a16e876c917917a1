"""Bad inputs to the functional API (bnlab.functional): clear error, buffers untouched."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab import functional as F
from bnlab.backend import numba_available
from bnlab.errors import DTypeError, NonFiniteError, ShapeError

FAMILY = "bad input: functional"
BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])

C = 3


def _state(rng, n=4, c=C):
    x = rng.standard_normal((n, c, 2, 2)).astype(np.float32)
    return {
        "x": x,
        "gamma": rng.standard_normal(c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "running_mean": rng.standard_normal(c).astype(np.float32),
        "running_var": rng.random(c).astype(np.float32) + 0.5,
        "num_batches_tracked": np.array(5, np.int64),
    }


def _bn(s, **override):
    kw = dict(
        training=True,
        running_mean=s["running_mean"],
        running_var=s["running_var"],
        num_batches_tracked=s["num_batches_tracked"],
    )
    kw.update(override)
    x = kw.pop("x", s["x"])
    gamma, beta = kw.pop("gamma", s["gamma"]), kw.pop("beta", s["beta"])
    return lambda: F.batch_norm_forward(x, gamma, beta, **kw)


# (id, override of batch_norm_forward's arguments, error type, needles in the message)
BN_CASES = [
    ("x-list", {"x": [[1.0, 2.0]]}, DTypeError, ["x must be a numpy.ndarray"]),
    ("x-int", {"x": np.ones((4, C, 2, 2), np.int32)}, DTypeError, ["x", "floating dtype"]),
    ("x-complex", {"x": np.ones((4, C, 2, 2), np.complex64)}, DTypeError, ["x", "floating"]),
    ("x-3d-for-NCHW", {"x": np.ones((4, C, 2), np.float32)}, ShapeError, ["x must be 4-D", "NCHW"]),
    ("gamma-size", {"gamma": np.ones(C + 1, np.float32)}, ShapeError, ["gamma", f"({C},)"]),
    ("beta-size", {"beta": np.ones(C - 1, np.float32)}, ShapeError, ["beta", f"({C},)"]),
    ("gamma-int", {"gamma": np.ones(C, np.int64)}, DTypeError, ["gamma", "floating"]),
    (
        "channels-mismatch-running",
        {"running_mean": np.zeros(C + 2, np.float32)},
        ShapeError,
        ["running_mean", f"({C},)", "channels"],
    ),
    ("running-var-2d", {"running_var": np.ones((C, 1), np.float32)}, ShapeError, ["running_var"]),
    (
        "one-value-per-channel",
        {"x": np.ones((1, C, 1, 1), np.float32)},
        ShapeError,
        ["more than 1 value per channel"],
    ),
    ("empty-batch-training", {"x": np.ones((0, C, 2, 2), np.float32)}, ShapeError, ["empty"]),
    ("eps-zero", {"eps": 0.0}, ValueError, ["eps", "> 0"]),
    ("eps-negative", {"eps": -1e-5}, ValueError, ["eps", "> 0"]),
    ("eps-nan", {"eps": float("nan")}, ValueError, ["eps"]),
    ("eps-str", {"eps": "1e-5"}, TypeError, ["eps"]),
    ("momentum-above-1", {"momentum": 1.5}, ValueError, ["momentum", "[0, 1]"]),
    ("momentum-negative", {"momentum": -0.1}, ValueError, ["momentum", "[0, 1]"]),
    ("training-str", {"training": "yes"}, TypeError, ["training", "True or False"]),
    ("training-none", {"training": None}, TypeError, ["training"]),
    ("layout-unknown", {"layout": "NCWH"}, ValueError, ["layout must be one of"]),
    ("convention-unknown", {"convention": "caffe"}, ValueError, ["convention", "caffe"]),
    ("on-nonfinite-unknown", {"on_nonfinite": "ignore"}, ValueError, ["on_nonfinite"]),
    ("backend-unknown", {"backend": "cuda"}, ValueError, ["backend must be one of"]),
    (
        "momentum-none-no-counter",
        {"momentum": None, "num_batches_tracked": None},
        ValueError,
        ["num_batches_tracked"],
    ),  # fmt: skip
    ("counter-float", {"num_batches_tracked": np.array(1.0)}, DTypeError, ["num_batches_tracked"]),
    ("mean-without-var", {"running_var": None}, ValueError, ["running_mean and running_var"]),
    (
        "eval-without-stats",
        {"training": False, "running_mean": None, "running_var": None},
        ValueError,
        ["running_mean", "required", "training=False"],
    ),  # fmt: skip
    ("out-wrong-shape", {"out": np.empty((4, C, 2, 3), np.float32)}, ShapeError, ["out"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batch_norm_forward_bad_input(rng, case, backend):
    """Every case on every backend: validation happens before dispatch, identically."""
    _, override, exc, needles = case
    s = _state(rng)
    override = {"backend": backend, **override}
    expect_clean_error(_bn(s, **override), exc, needles, state=list(s.values()))


def test_read_only_running_stats_in_training(rng):
    s = _state(rng)
    s["running_mean"].flags.writeable = False
    expect_clean_error(_bn(s), ValueError, ["running_mean", "writable"], list(s.values()))


def test_nonfinite_batch_with_raise_policy_touches_nothing(rng):
    s = _state(rng)
    s["x"][1, 2, 0, 1] = np.inf
    expect_clean_error(
        _bn(s, on_nonfinite="raise"), NonFiniteError, ["NaN or Inf", "running"], list(s.values())
    )


def test_backward_wrong_dout_and_cache(rng):
    s = _state(rng)
    _, cache = _bn(s)()
    expect_clean_error(
        lambda: F.batch_norm_backward(np.ones((4, C, 2, 3), np.float32), cache),
        ShapeError,
        ["dout", "shape of x"],
    )
    expect_clean_error(
        lambda: F.batch_norm_backward(np.ones((4, C, 2, 2), np.float32), {"x": 1}),
        TypeError,
        ["cache", "BatchNormCache"],
    )


def test_torch_style_batch_norm_bad_momentum(rng):
    s = _state(rng)
    expect_clean_error(
        lambda: F.batch_norm(
            s["x"], s["running_mean"], s["running_var"], training=True, momentum=2.0
        ),  # fmt: skip
        ValueError,
        ["momentum"],
        [s["running_mean"], s["running_var"]],
    )


def test_layer_norm_bad_normalized_shape(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    expect_clean_error(lambda: F.layer_norm_forward(x, (5,)), ShapeError, ["normalized_shape"], [x])
    g = np.ones(3, np.float32)
    expect_clean_error(
        lambda: F.layer_norm_forward(x, (4,), gamma=g), ShapeError, ["gamma", "(4,)"], [x, g]
    )
    expect_clean_error(lambda: F.layer_norm_forward(x, (4,), eps=-1.0), ValueError, ["eps"], [x])


def test_group_norm_groups_not_dividing_channels(rng):
    x = rng.standard_normal((2, 6, 3, 3)).astype(np.float32)
    expect_clean_error(
        lambda: F.group_norm_forward(x, 4), ValueError, ["num_groups", "divisor", "C=6"], [x]
    )
    expect_clean_error(lambda: F.group_norm_forward(x, 2.0), TypeError, ["num_groups"], [x])
    expect_clean_error(lambda: F.group_norm_forward(x, 0), ValueError, ["num_groups"], [x])


def test_instance_norm_int_input():
    x = np.ones((2, 3, 4, 4), np.int16)
    expect_clean_error(lambda: F.instance_norm_forward(x), DTypeError, ["floating"], [x])
